"""The OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from crossinfer.engine.outputs import RequestOutput
from crossinfer.sampling_params import SamplingParams
from crossinfer.server.context import ClientDisconnected, ServerContext, now
from crossinfer.server.errors import ERROR_RESPONSES
from crossinfer.server.params import (
    chat_params,
    completion_params,
    completion_prompts,
    render_chat,
)
from crossinfer.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    StreamOptions,
)
from crossinfer.server.responses import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    prompt_text,
    usage,
)
from crossinfer.server.streaming import MEDIA_TYPE, StreamSpec, chat_events, completion_events

# A client that closed the connection gets no answer; the status only shows in access logs.
_CLIENT_CLOSED = 499


def openai_router(ctx: ServerContext) -> APIRouter:
    """The OpenAI-compatible routes, closed over the server's context."""
    router = APIRouter(responses=ERROR_RESPONSES)
    tokens = TokenText(ctx.tokenizer)

    def stream_spec(
        response_id: str, params: SamplingParams, options: StreamOptions | None, echo: bool = False
    ) -> StreamSpec:
        return StreamSpec(
            response_id=response_id,
            model=ctx.settings.served_model_name,
            created=now(),
            n=params.n,
            tokens=tokens,
            logprobs=params.logprobs is not None,
            include_usage=bool(options and options.include_usage),
            echo=echo,
        )

    @router.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        card = ModelCard(
            id=ctx.settings.served_model_name,
            created=ctx.created,
            root=ctx.settings.model_path,
            max_model_len=ctx.engine.max_model_len,
        )
        return ModelList(data=[card])

    @router.post("/v1/completions", response_model=CompletionResponse)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        ctx.check_model(body.model)
        params = completion_params(body)
        prompts = completion_prompts(body)
        response_id, stream = await ctx.submit("cmpl", prompts, params, {"*": "prompt"})
        spec = stream_spec(response_id, params, body.stream_options, echo=body.echo)
        if body.stream:
            events = completion_events(stream, spec, ctx.tokenizer)
            return StreamingResponse(events, media_type=MEDIA_TYPE)
        try:
            outputs = await ctx.collect(stream, request)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        return _json(_completion_response(ctx, spec, outputs))

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        ctx.check_model(body.model)
        params = chat_params(body)
        prompt = render_chat(ctx.tokenizer, body.messages, body.add_generation_prompt)
        response_id, stream = await ctx.submit("chatcmpl", [prompt], params, {"*": "messages"})
        spec = stream_spec(response_id, params, body.stream_options)
        if body.stream:
            return StreamingResponse(chat_events(stream, spec), media_type=MEDIA_TYPE)
        try:
            outputs = await ctx.collect(stream, request)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        return _json(_chat_response(spec, outputs))

    return router


def _json(body: CompletionResponse | ChatCompletionResponse) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _completion_response(
    ctx: ServerContext, spec: StreamSpec, outputs: list[RequestOutput]
) -> CompletionResponse:
    choices = []
    for i, output in enumerate(outputs):
        prefix = prompt_text(ctx.tokenizer, output) if spec.echo else ""
        for completion in output.outputs:
            logprobs = None
            if spec.logprobs and completion.logprobs is not None:
                logprobs = completion_logprobs(spec.tokens, completion.logprobs, len(prefix))
            choices.append(
                CompletionChoice(
                    index=i * spec.n + completion.index,
                    text=prefix + completion.text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
            )
    return CompletionResponse(
        id=spec.response_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(outputs),
    )


def _chat_response(spec: StreamSpec, outputs: list[RequestOutput]) -> ChatCompletionResponse:
    (output,) = outputs
    choices = [
        ChatChoice(
            index=completion.index,
            message=ChatResponseMessage(content=completion.text),
            logprobs=(
                chat_logprobs(spec.tokens, completion.logprobs)
                if spec.logprobs and completion.logprobs is not None
                else None
            ),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        for completion in output.outputs
    ]
    return ChatCompletionResponse(
        id=spec.response_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(outputs),
    )
