"""Every error in the shape its client parses, with a status code it can act on.

OpenAI routes: ``{"error": {"message", "type", "param", "code"}}``; 400 bad input, 401 bad
key, 404 unknown model or route, 413 body too large, 429 too many requests in flight and 503
a full queue (both with Retry-After), 500 a request that failed inside the engine.
TGI's routes: TGI's ``{"error": message, "error_type": kind}``, with TGI's 422 for invalid
input. Messages never carry internal exception text or paths: the traceback goes to the log.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from crossinfer.engine.async_engine import EngineDeadError
from crossinfer.engine.errors import RequestFailedError
from crossinfer.sampling_params import SamplingParams
from crossinfer.server.protocol import UNSUPPORTED, ErrorInfo, ErrorResponse
from crossinfer.server.tgi_protocol import TGIErrorResponse

logger = logging.getLogger("crossinfer.server")

TGI_PATHS = frozenset({"/generate", "/generate_stream"})
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_TGI_ERROR_TYPES = {
    401: "authentication",
    404: "not_found",
    413: "validation",
    422: "validation",
    429: "overloaded",
    503: "unhealthy",
}
_ERROR_TEXT = (
    (400, "invalid request"),
    (401, "missing or wrong API key"),
    (404, "unknown model"),
    (413, "request body too large"),
    (429, "too many requests in flight; retry after Retry-After seconds"),
    (500, "the request failed inside the engine"),
    (503, "server busy (retry after Retry-After seconds), or the engine stopped"),
)
# For the OpenAPI schema: which error bodies a route may return.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_TEXT
}
TGI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    (422 if status == 400 else status): {"model": TGIErrorResponse, "description": text}
    for status, text in _ERROR_TEXT
}


class APIError(HTTPException):
    """An error to send in the client's shape. An HTTPException, so that FastAPI passes one
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


def openai_error_body(error: APIError) -> ErrorResponse:
    info = ErrorInfo(message=error.message, type=error.type, param=error.param, code=error.code)
    return ErrorResponse(error=info)


def tgi_error_body(error: APIError) -> tuple[int, TGIErrorResponse]:
    """TGI's status and body for ``error``: invalid input is 422, as TGI answers it."""
    status = 422 if error.status_code == 400 else error.status_code
    kind = _TGI_ERROR_TYPES.get(status, "generation" if status >= 500 else "validation")
    message = (
        f"{error.param}: {error.message}"
        if error.param and error.param not in error.message
        else error.message
    )
    return status, TGIErrorResponse(error=message, error_type=kind)


def error_response(error: APIError, path: str = "") -> JSONResponse:
    """The JSON response for ``error`` on ``path``, with its headers (Retry-After, ...)."""
    if path in TGI_PATHS:
        status, body = tgi_error_body(error)
        return JSONResponse(body.model_dump(), status_code=status, headers=error.headers)
    return JSONResponse(
        openai_error_body(error).model_dump(), status_code=error.status_code, headers=error.headers
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


def internal_error(request_id: str | None = None) -> APIError:
    where = f" (request {request_id})" if request_id else ""
    return APIError(500, f"internal server error{where}; see the server log", code="internal_error")


def stream_error(exc: BaseException) -> APIError:
    """What a client is told when its output stream ended with ``exc``."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestFailedError):
        return APIError(500, exc.message, code="internal_error")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    logger.error("a response failed", exc_info=exc)
    return internal_error()


_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``; stops at the tags
    pydantic adds for union members (``list[int]``, ``str``) and at dict keys."""
    parts = [p for p in loc if p != "body"]
    if not parts or not isinstance(parts[0], str):
        return None
    param = parts[0]
    for part in parts[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part) and part not in _TYPE_TAGS:
            param += f".{part}"
        else:
            break
    return param


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body", code="invalid_value")
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        message = f"the request body is not valid JSON: {detail}".rstrip(": ")
        return APIError(400, message, code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if kind == "extra_forbidden" and param is not None:
        field = param.rsplit(".", 1)[-1]
        why = UNSUPPORTED.get(field, "an unknown parameter; this server does not accept it")
        return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:  # a model-level check: its message starts with the field's name
        head = message.split(":", 1)[0]
        param = head if _IDENTIFIER.fullmatch(head) else None
    elif not message.startswith(param):
        message = f"{param}: {message}"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return APIError(400, message + more, param=param, code="invalid_value")


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc, request.url.path)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(_validation_error(exc), request.url.path)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(APIError(exc.status_code, message, headers=headers), request.url.path)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(internal_error(), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI or Starlette raises through the client's error shape."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
