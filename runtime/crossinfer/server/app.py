"""The FastAPI application: routers, error handlers, the request guard, /health, /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

import crossinfer
from crossinfer.engine.frontend import EngineClient
from crossinfer.server.adapters import ServedAdapters
from crossinfer.server.context import ServerContext, ServerSettings, now
from crossinfer.server.errors import APIError, install_error_handlers
from crossinfer.server.guards import RequestGuard
from crossinfer.server.lora_routes import lora_router
from crossinfer.server.metrics import CONTENT_TYPE, ServerMetrics
from crossinfer.server.openai_routes import openai_router
from crossinfer.server.openapi import install_openapi
from crossinfer.server.params import ParamsBuilder
from crossinfer.server.prompts import PromptService
from crossinfer.server.protocol import ErrorResponse, HealthResponse
from crossinfer.server.tgi_routes import tgi_router
from crossinfer.server.tokenize_routes import tokenize_router


def _system_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse, "description": "the engine has stopped, and why"}},
    )
    async def health() -> HealthResponse:
        if not ctx.engine.is_healthy:
            raise APIError(503, ctx.engine.stop_reason or "the engine stopped", code="engine_dead")
        return HealthResponse()

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus metrics in the text exposition format",
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return router


def build_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    """An app serving ``engine``. The app starts the engine thread; its owner (``crossinfer
    serve``, or a test) shuts the engine down, so several apps may share one engine."""
    limits = settings.limits.resolve(engine.max_model_len)
    vocab_size = engine.vocab_size
    max_logprobs = engine.max_logprobs
    prompts = PromptService(engine.tokenizer, vocab_size, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        for name, path in settings.lora_modules:  # --lora-modules: a bad one stops the start
            await ctx.load_adapter(name, path)
        yield
        prompts.close()

    app = FastAPI(
        title="crossinfer",
        version=getattr(crossinfer, "__version__", "0"),
        description="OpenAI- and TGI-compatible LLM server",
        lifespan=lifespan,
    )
    metrics = ServerMetrics(engine.stats, settings.served_model_name)
    ctx = ServerContext(
        engine=engine,
        settings=settings,
        limits=limits,
        metrics=metrics,
        params=ParamsBuilder(limits, max_logprobs),
        prompts=prompts,
        created=now(),
        adapters=ServedAdapters(),
    )
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        max_concurrent=limits.max_concurrent_requests,
        retry_after_s=settings.retry_after_s,
    )
    for router in (openai_router, tokenize_router, tgi_router, lora_router, _system_router):
        app.include_router(router(ctx))
    install_openapi(app, limits, vocab_size, max_logprobs)
    return app
