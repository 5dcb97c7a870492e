"""Checks that run before any route: the API key, the body size, and how many generation
requests are in flight.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, which buffers streamed
responses and hides client disconnects from them.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crossinfer.server.errors import APIError, error_response

# Probes and scrapers do not carry the key; everything else (the whole API) needs it.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/redoc"})
# The routes that generate: each holds one of --max-concurrent-requests until it answers.
GENERATION_PATHS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream"}
)


class RequestGuard:
    """401 without ``Authorization: Bearer <api_key>`` (when a key is set; compared in
    constant time); 413 when the body is over ``max_body_bytes``, known from Content-Length
    up front or counted while the body is read (chunked uploads); 429 with Retry-After when
    ``max_concurrent`` generation requests are already in flight (a stream counts until it
    ends)."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        max_concurrent: int = 128,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.retry_after_s = retry_after_s
        self.in_flight = 0  # event loop only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        error = self._check_key(scope, headers) or self._check_length(headers)
        counted = path in GENERATION_PATHS and error is None
        if counted and self.in_flight >= self.max_concurrent:
            error = APIError(
                429,
                f"{self.in_flight} generation requests are in flight, the limit of this "
                "server (--max-concurrent-requests); retry later",
                code="too_many_requests",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        if error is not None:
            await error_response(error, path)(scope, receive, send)
            return
        if not counted:
            await self.app(scope, self._limited(receive), send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.in_flight -= 1

    def _check_key(self, scope: Scope, headers: Headers) -> APIError | None:
        if self._key is None or scope["path"] in OPEN_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if hmac.compare_digest(given, self._key):
            return None
        return APIError(
            401,
            "missing or incorrect API key: send the server's --api-key as "
            "'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )

    def _check_length(self, headers: Headers) -> APIError | None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large(int(length))
        return None

    def _too_large(self, size: int) -> APIError:
        return APIError(
            413,
            f"the request body has {size} bytes or more; the limit is {self.max_body_bytes}",
            code="request_too_large",
        )

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Raised inside the route's body read; FastAPI re-raises HTTPExceptions
                    # from there, so the error handler answers 413.
                    raise self._too_large(received)
            return message

        return receive_limited
