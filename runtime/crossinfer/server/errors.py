"""Every error in the OpenAI shape, ``{"error": {"message", "type", "param", "code"}}``, with
the status code a client can act on: 400 bad input, 401 bad key, 404 unknown model or route,
413 body too large, 503 (with Retry-After) when the server is full."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from crossinfer.sampling_params import SamplingParams
from crossinfer.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("crossinfer.server")

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))

# For the OpenAPI schema: which error bodies a route may return.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (503, "server busy; retry after Retry-After seconds"),
    )
}


class APIError(HTTPException):
    """An error to send in the OpenAI shape. An HTTPException, so that FastAPI passes one
    raised while reading the body (the body-size guard) straight to the handler."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        # OpenAI's two types: the client's fault (4xx) or the server's (5xx).
        return "server_error" if self.status_code >= 500 else "invalid_request_error"


def error_response(error: APIError) -> JSONResponse:
    """The JSON response for ``error``, with its headers (Retry-After, ...)."""
    info = ErrorInfo(message=error.message, type=error.type, param=error.param, code=error.code)
    return JSONResponse(
        ErrorResponse(error=info).model_dump(),
        status_code=error.status_code,
        headers=error.headers,
    )


def bad_request(exc: ValueError, params: dict[str, str] | None = None) -> APIError:
    """400 for a ValueError from SamplingParams or the engine. Their messages start with the
    parameter's name (``"top_p must be in (0, 1]..."``); ``params`` maps engine names to the
    API's (``{"logprobs": "top_logprobs"}``), and ``"*"`` names the prompt's field for the
    engine's length and token errors."""
    message = str(exc)
    names = params or {}
    first = message.split(" ", 1)[0]
    param = names.get(first, first) if first in _SAMPLING_FIELDS else names.get("*")
    return APIError(400, message, param=param, code="invalid_value")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(exc)
    return error_response(APIError(400, message, param=param, code="invalid_value"))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(APIError(exc.status_code, message, headers=headers))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI or Starlette raises through the OpenAI error shape."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
