"""Text Generation Inference's routes: POST /generate and /generate_stream (TGI's bodies, its
details, and its error shape)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from crossinfer.engine.async_engine import OutputStream
from crossinfer.engine.outputs import CompletionOutput, RequestOutput
from crossinfer.engine.sampler import SampledToken
from crossinfer.server.context import ClientDisconnected, ServerContext
from crossinfer.server.errors import TGI_ERROR_RESPONSES, APIError, stream_error, tgi_error_body
from crossinfer.server.prompts import Names, Prompt
from crossinfer.server.streaming import MEDIA_TYPE, sse
from crossinfer.server.tgi_protocol import (
    TGIDetails,
    TGIGenerateRequest,
    TGIGenerateResponse,
    TGIPrefillToken,
    TGIStreamDetails,
    TGIStreamResponse,
    TGIToken,
)

_NAMES = Names(prompt="inputs", max_tokens="parameters.max_new_tokens")


def _finish_reason(completion: CompletionOutput) -> Any:
    if completion.finish_reason == "length":
        return "length"
    # A stop string or stop token ended it, or (no stop reason) the model's EOS token.
    return "eos_token" if completion.stop_reason is None else "stop_sequence"


def tgi_router(ctx: ServerContext) -> APIRouter:
    """TGI-compatible routes over the same engine (one sample per request)."""
    router = APIRouter(responses=TGI_ERROR_RESPONSES)
    special_ids = frozenset(ctx.tokenizer.all_special_ids)

    def text(token_id: int) -> str:
        return str(ctx.tokenizer.decode([token_id]))

    def token(token_id: int, token_text: str, logprob: float | None) -> TGIToken:
        return TGIToken(
            id=token_id, text=token_text, logprob=logprob, special=token_id in special_ids
        )

    def top_tokens(sampled: SampledToken) -> list[TGIToken]:
        return [token(t, text(t), lp) for t, lp in sampled.top_logprobs]

    async def prepare(body: TGIGenerateRequest) -> OutputStream:
        parameters = body.parameters
        lora = ctx.check_model(parameters.adapter_id, "parameters.adapter_id")
        params = ctx.params.tgi(parameters)
        ids = await ctx.prompts.encode(body.inputs, "inputs")
        if parameters.truncate is not None:
            if parameters.truncate > ctx.limits.input_tokens:
                raise APIError(
                    400,
                    f"parameters.truncate: {parameters.truncate} is more than the limit of "
                    f"{ctx.limits.input_tokens} input tokens (--max-input-tokens)",
                    param="parameters.truncate",
                    code="invalid_value",
                )
            ids = ids[-parameters.truncate :]
        requests = ctx.prompts.requests(
            ctx.new_id("tgi"), [Prompt(ids, body.inputs)], params, _NAMES, lora_request=lora
        )
        return await ctx.submit(requests, {"*": "inputs"})

    def prefill(output: RequestOutput) -> list[TGIPrefillToken]:
        scores: Sequence[SampledToken | None] = output.prompt_logprobs or ()
        return [
            TGIPrefillToken(
                id=token_id, text=text(token_id), logprob=None if s is None else s.logprob
            )
            for token_id, s in zip(output.prompt_token_ids, scores, strict=False)
        ]

    @router.post("/generate", response_model=TGIGenerateResponse)
    async def generate(body: TGIGenerateRequest, request: Request) -> Response:
        stream = await prepare(body)
        try:
            (output,) = await ctx.collect(stream, request)
        except ClientDisconnected:
            return Response(status_code=499)
        completion = output.outputs[0]
        parameters = body.parameters
        prefix = body.inputs if parameters.return_full_text else ""
        details = None
        if parameters.details or parameters.decoder_input_details:
            sampled = completion.logprobs or ()
            details = TGIDetails(
                finish_reason=_finish_reason(completion),
                generated_tokens=len(completion.token_ids),
                seed=parameters.seed,
                prefill=prefill(output) if parameters.decoder_input_details else [],
                tokens=[token(t.token_id, text(t.token_id), t.logprob) for t in sampled],
                top_tokens=[top_tokens(t) for t in sampled] if parameters.top_n_tokens else None,
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
                event = TGIStreamResponse(
                    index=len(completion.token_ids),
                    token=token(
                        completion.token_ids[-1],
                        completion.delta,
                        last[0].logprob if last else None,
                    ),
                    top_tokens=top_tokens(last[0]) if last and body.parameters.top_n_tokens else [],
                )
                if completion.finish_reason is not None:
                    event.generated_text = prefix + completion.text
                    event.details = TGIStreamDetails(
                        finish_reason=_finish_reason(completion),
                        generated_tokens=len(completion.token_ids),
                        seed=seed,
                    )
                yield sse(event)
        except Exception as exc:  # TGI ends a failed stream with one error event
            yield sse(tgi_error_body(stream_error(exc))[1])
        finally:
            stream.close()

    @router.post(
        "/generate_stream",
        responses={
            200: {
                "description": "server-sent events: one per token, the last with the text",
                "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/SSEEvent"}}},
            }
        },
        response_class=StreamingResponse,
    )
    async def generate_stream(body: TGIGenerateRequest) -> StreamingResponse:
        stream = await prepare(body)
        return StreamingResponse(events(stream, body), media_type=MEDIA_TYPE)

    return router
