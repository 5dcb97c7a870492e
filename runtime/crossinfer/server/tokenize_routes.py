"""vLLM's /tokenize and /detokenize: the served model's tokenizer over HTTP."""

from __future__ import annotations

from fastapi import APIRouter

from crossinfer.server.context import ServerContext
from crossinfer.server.errors import ERROR_RESPONSES, APIError
from crossinfer.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


def tokenize_router(ctx: ServerContext) -> APIRouter:
    """/tokenize (a prompt, or chat messages through the template) and /detokenize."""
    router = APIRouter(responses=ERROR_RESPONSES)

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt or messages", code="invalid_value")
        if body.messages is not None:
            rendered = await ctx.prompts.chat_prompt(body.messages, body.add_generation_prompt)
            ids = rendered.token_ids
            if body.add_special_tokens:
                ids = list(ctx.tokenizer.build_inputs_with_special_tokens(ids))
        else:
            assert body.prompt is not None
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await ctx.prompts.encode(body.prompt, "prompt", special)
        return TokenizeResponse(count=len(ids), max_model_len=ctx.engine.max_model_len, tokens=ids)

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(body.model)
        vocab = ctx.prompts.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise APIError(
                400,
                f"tokens: {bad[:5]} are outside the vocabulary [0, {vocab})",
                param="tokens",
                code="invalid_value",
            )
        return DetokenizeResponse(prompt=await ctx.prompts.decode(body.tokens))

    return router
