"""The OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from crossinfer.engine.async_engine import OutputStream
from crossinfer.engine.outputs import RequestOutput
from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams
from crossinfer.server.context import ClientDisconnected, ServerContext, now
from crossinfer.server.errors import ERROR_RESPONSES
from crossinfer.server.prompts import Names
from crossinfer.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    StreamOptions,
)
from crossinfer.server.responses import (
    ChoiceSpec,
    TokenText,
    chat_logprobs,
    completion_choice,
    usage,
    vllm_prompt_logprobs,
)
from crossinfer.server.streaming import MEDIA_TYPE, StreamSpec, chat_events, completion_events
from crossinfer.server.tools import ToolPlan, finish_reason, parse_reply, plan_tools

# A client that closed the connection gets no answer; the status only shows in access logs.
_CLIENT_CLOSED = 499


def _json_or_events(model: type, description: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers JSON, or server-sent events with ``stream: true``."""
    return {
        **ERROR_RESPONSES,
        200: {
            "model": model,
            "description": f"{description}; with stream: true, server-sent events of chunks "
            "and a last `data: [DONE]`",
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/SSEEvent"}}},
        },
    }


def openai_router(ctx: ServerContext) -> APIRouter:
    """The OpenAI-compatible routes, closed over the server's context."""
    router = APIRouter()
    tokens = TokenText(ctx.tokenizer)

    def stream_spec(
        response_id: str,
        params: SamplingParams,
        options: StreamOptions | None,
        choice: ChoiceSpec,
        lora: LoRARequest | None,
        tools: ToolPlan | None = None,
    ) -> StreamSpec:
        return StreamSpec(
            response_id=response_id,
            model=ctx.settings.served_model_name if lora is None else lora.lora_name,
            created=now(),
            n=params.n,
            choice=choice,
            include_usage=bool(options and options.include_usage),
            tools=tools or ToolPlan(),
        )

    async def answer(
        stream: OutputStream,
        request: Request,
        build: Callable[[list[RequestOutput]], CompletionResponse | ChatCompletionResponse],
    ) -> Response:
        """The whole response once every request finished (nothing if the client left)."""
        try:
            outputs = await ctx.collect(stream, request)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        return Response(build(outputs).model_dump_json(), media_type="application/json")

    @router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        base = ctx.settings.served_model_name
        card = ModelCard(
            id=base,
            created=ctx.created,
            root=ctx.settings.model_path,
            max_model_len=ctx.engine.max_model_len,
        )
        adapters = [
            ModelCard(
                id=lora.lora_name,
                created=ctx.created,
                root=lora.lora_path,
                parent=base,
                max_model_len=ctx.engine.max_model_len,
            )
            for lora in ctx.adapters.all()
        ]
        return ModelList(data=[card, *adapters])

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_json_or_events(CompletionResponse, "the completion"),
    )
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        lora = ctx.check_model(body.model)
        params = ctx.params.completion(body)
        prompts = await ctx.prompts.completion_prompts(body.prompt)
        response_id = ctx.new_id("cmpl")
        requests = ctx.prompts.requests(
            response_id, prompts, params, Names(), body.cache_salt, lora
        )
        stream = await ctx.submit(requests, {"*": "prompt"})
        choice = ChoiceSpec(
            tokens=tokens,
            tokenizer=ctx.tokenizer,
            echo=body.echo,
            logprobs=body.logprobs,
            prompt_logprobs=body.prompt_logprobs,
        )
        spec = stream_spec(response_id, params, body.stream_options, choice, lora)
        if body.stream:
            return StreamingResponse(completion_events(stream, spec), media_type=MEDIA_TYPE)
        return await answer(stream, request, lambda outputs: _completion_response(spec, outputs))

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_json_or_events(ChatCompletionResponse, "the chat completion"),
    )
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        lora = ctx.check_model(body.model)
        tools = plan_tools(body)
        params = ctx.params.chat(body, tools)
        prompt = await ctx.prompts.chat_prompt(
            body.messages, body.add_generation_prompt, tools.template_tools
        )
        response_id = ctx.new_id("chatcmpl")
        names = Names(
            prompt="messages",
            max_tokens="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        )
        requests = ctx.prompts.requests(response_id, [prompt], params, names, body.cache_salt, lora)
        stream = await ctx.submit(requests, {"*": "messages"})
        choice = ChoiceSpec(
            tokens=tokens,
            tokenizer=ctx.tokenizer,
            logprobs=params.logprobs,
            prompt_logprobs=body.prompt_logprobs,
        )
        spec = stream_spec(response_id, params, body.stream_options, choice, lora, tools)
        if body.stream:
            return StreamingResponse(chat_events(stream, spec), media_type=MEDIA_TYPE)
        return await answer(stream, request, lambda outputs: _chat_response(spec, outputs))

    return router


def _completion_response(spec: StreamSpec, outputs: list[RequestOutput]) -> CompletionResponse:
    choices = [
        completion_choice(
            spec.choice, output, completion, i * spec.n + completion.index, whole=True
        )
        for i, output in enumerate(outputs)
        for completion in output.outputs
    ]
    return CompletionResponse(
        id=spec.response_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(outputs),
    )


def _chat_response(spec: StreamSpec, outputs: list[RequestOutput]) -> ChatCompletionResponse:
    (output,) = outputs
    want_logprobs = spec.choice.logprobs is not None
    choices = []
    for completion in output.outputs:
        content, calls = parse_reply(spec.tools, completion.text)
        choices.append(
            ChatChoice(
                index=completion.index,
                message=ChatResponseMessage(content=content, tool_calls=calls),
                logprobs=(
                    chat_logprobs(spec.tokens, completion.logprobs)
                    if want_logprobs and completion.logprobs is not None
                    else None
                ),
                finish_reason=finish_reason(completion.finish_reason, bool(calls)),
                stop_reason=completion.stop_reason,
            )
        )
    num_top = spec.choice.prompt_logprobs
    return ChatCompletionResponse(
        id=spec.response_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(outputs),
        prompt_logprobs=(
            vllm_prompt_logprobs(spec.tokens, output, num_top) if num_top is not None else None
        ),
    )
