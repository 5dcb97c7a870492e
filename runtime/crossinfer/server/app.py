"""The FastAPI application: routers, error handlers, the request guard, /health, /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

import crossinfer
from crossinfer.engine.async_engine import AsyncLLMEngine
from crossinfer.server.context import ServerContext, ServerSettings, now
from crossinfer.server.errors import APIError, install_error_handlers
from crossinfer.server.guards import RequestGuard
from crossinfer.server.metrics import CONTENT_TYPE, ServerMetrics
from crossinfer.server.openai_routes import openai_router
from crossinfer.server.tgi_routes import tgi_router
from crossinfer.server.tokenize_routes import tokenize_router


def _system_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get("/health", responses={503: {"description": "the engine has stopped"}})
    async def health() -> Response:
        if not ctx.engine.is_healthy:
            raise APIError(503, "the engine has stopped", code="engine_dead")
        return Response(status_code=200)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return router


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """An app serving ``engine``. The app starts the engine thread; its owner (``crossinfer
    serve``, or a test) shuts the engine down, so several apps may share one engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield

    app = FastAPI(
        title="crossinfer",
        version=getattr(crossinfer, "__version__", "0"),
        description="OpenAI- and TGI-compatible LLM server",
        lifespan=lifespan,
    )
    metrics = ServerMetrics(engine.stats, settings.served_model_name)
    ctx = ServerContext(engine=engine, settings=settings, metrics=metrics, created=now())
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes
    )
    for router in (openai_router, tokenize_router, tgi_router, _system_router):
        app.include_router(router(ctx))
    return app
