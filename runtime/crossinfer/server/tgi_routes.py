"""Text Generation Inference's routes: POST /generate and /generate_stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from crossinfer.engine.async_engine import OutputStream
from crossinfer.engine.outputs import CompletionOutput
from crossinfer.server.context import ClientDisconnected, ServerContext
from crossinfer.server.errors import ERROR_RESPONSES
from crossinfer.server.params import tgi_params
from crossinfer.server.protocol import (
    TGIDetails,
    TGIGenerateRequest,
    TGIGenerateResponse,
    TGIStreamResponse,
    TGIToken,
)
from crossinfer.server.streaming import MEDIA_TYPE, error_event, sse


def _finish_reason(completion: CompletionOutput) -> Any:
    if completion.finish_reason == "length":
        return "length"
    # A stop string or stop token ended it, or (no stop reason) the model's EOS token.
    return "eos_token" if completion.stop_reason is None else "stop_sequence"


def tgi_router(ctx: ServerContext) -> APIRouter:
    """TGI-compatible routes over the same engine (one sample per request)."""
    router = APIRouter(responses=ERROR_RESPONSES)
    special_ids = frozenset(ctx.tokenizer.all_special_ids)

    def token(token_id: int, text: str, logprob: float | None) -> TGIToken:
        return TGIToken(id=token_id, text=text, logprob=logprob, special=token_id in special_ids)

    @router.post("/generate", response_model=TGIGenerateResponse)
    async def generate(body: TGIGenerateRequest, request: Request) -> Response:
        params = tgi_params(body.parameters)
        _, stream = await ctx.submit("tgi", [body.inputs], params, {"*": "inputs"})
        try:
            (output,) = await ctx.collect(stream, request)
        except ClientDisconnected:
            return Response(status_code=499)
        completion = output.outputs[0]
        prefix = body.inputs if body.parameters.return_full_text else ""
        details = None
        if body.parameters.details:
            tokens = [
                token(t.token_id, ctx.tokenizer.decode([t.token_id]), t.logprob)
                for t in completion.logprobs or ()
            ]
            details = TGIDetails(
                finish_reason=_finish_reason(completion),
                generated_tokens=len(completion.token_ids),
                seed=params.seed,
                tokens=tokens,
            )
        result = TGIGenerateResponse(generated_text=prefix + completion.text, details=details)
        return Response(result.model_dump_json(), media_type="application/json")

    async def events(stream: OutputStream, body: TGIGenerateRequest) -> AsyncIterator[str]:
        seed = body.parameters.seed
        prefix = body.inputs if body.parameters.return_full_text else ""
        try:
            async for output in stream:
                completion = output.outputs[0]
                if completion.num_new_tokens == 0:
                    continue
                last = (completion.logprobs or ())[-1:]
                logprob = last[0].logprob if last else None
                event = TGIStreamResponse(
                    index=len(completion.token_ids),
                    token=token(completion.token_ids[-1], completion.delta, logprob),
                )
                if completion.finish_reason is not None:
                    event.generated_text = prefix + completion.text
                    event.details = TGIDetails(
                        finish_reason=_finish_reason(completion),
                        generated_tokens=len(completion.token_ids),
                        seed=seed,
                    )
                yield sse(event)
        except Exception as exc:  # the engine stopped mid-stream
            yield error_event(exc)
        finally:
            stream.close()

    @router.post("/generate_stream")
    async def generate_stream(body: TGIGenerateRequest) -> StreamingResponse:
        params = tgi_params(body.parameters)
        _, stream = await ctx.submit("tgi", [body.inputs], params, {"*": "inputs"})
        return StreamingResponse(events(stream, body), media_type=MEDIA_TYPE)

    return router
