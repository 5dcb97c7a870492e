"""vLLM's run-time adapter routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Both need the API key like the rest of the API (the request guard sees to it). Loading reads
and checks the folder in the engine before the name is served; a folder the model cannot run
is a 400 naming the file and the reason.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import Field

from crossinfer.server.context import ServerContext
from crossinfer.server.errors import ERROR_RESPONSES, APIError
from crossinfer.server.protocol import Body

Name = Annotated[str, Field(min_length=1, max_length=256)]
# vLLM answers success in plain text; errors are JSON in the OpenAI error shape.
_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"description": "done", "content": {"text/plain": {"schema": {"type": "string"}}}},
}


class LoadLoRAAdapterRequest(Body):
    lora_name: Name
    lora_path: Annotated[str, Field(min_length=1)]


class UnloadLoRAAdapterRequest(Body):
    lora_name: Name
    lora_int_id: int | None = None  # vLLM accepts it; the name decides here


def lora_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(responses=_RESPONSES)

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        name = body.lora_name
        if name == ctx.settings.served_model_name or ctx.adapters.get(name) is not None:
            raise APIError(
                400,
                f"the LoRA adapter {name!r} is already loaded; unload it first",
                param="lora_name",
                code="invalid_value",
            )
        await ctx.load_adapter(name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        lora = ctx.adapters.remove(body.lora_name)
        if lora is None:
            raise APIError(
                404,
                f"the LoRA adapter {body.lora_name!r} is not loaded",
                param="lora_name",
                code="model_not_found",
            )
        await ctx.engine.remove_lora(lora.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
