"""The served /openapi.json: FastAPI's, made exact about what this server accepts.

- Request bodies come from pydantic's own JSON schema (FastAPI's renders integer bounds as
  floats, which moves 2^63 - 1 to 2^63);
- the ranges that depend on the model and the flags (token ids below the vocabulary size,
  --max-n, --max-logprobs, --max-stop-sequences, --max-client-batch-size, the token limits)
  are written in, so the document says what this server refuses;
- FastAPI's 422 is dropped from the OpenAI routes, which answer invalid input with 400;
- streamed answers are described per server-sent event (``SSEEvent``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from crossinfer.server.errors import TGI_PATHS
from crossinfer.server.limits import ServerLimits
from crossinfer.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from crossinfer.server.tgi_protocol import TGIGenerateRequest

_REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CompletionRequest,
    ChatCompletionRequest,
    TGIGenerateRequest,
    TokenizeRequest,
    DetokenizeRequest,
)
_SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event: `data` holds a JSON chunk, or `[DONE]` last.",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def install_openapi(app: FastAPI, limits: ServerLimits, vocab_size: int, max_logprobs: int) -> None:
    """Make ``app.openapi()`` return the exact schema (built once, on first request)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _exact_request_schemas(schema)
            _drop_fastapi_422(schema)
            schema["components"]["schemas"]["SSEEvent"] = _SSE_EVENT
            _write_limits(schema["components"]["schemas"], limits, vocab_size, max_logprobs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _exact_request_schemas(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    for model in _REQUEST_MODELS:
        exact = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(exact.pop("$defs", {}))
        components[model.__name__] = exact


def _drop_fastapi_422(schema: dict[str, Any]) -> None:
    for path, item in schema["paths"].items():
        if path in TGI_PATHS:  # TGI answers invalid input with 422, documented as TGI's
            continue
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)


def _write_limits(
    components: dict[str, Any], limits: ServerLimits, vocab_size: int, max_logprobs: int
) -> None:
    token_id = {"maximum": vocab_size - 1}
    stops = {"maxItems": limits.max_stop_sequences}
    n = {"maximum": limits.max_n}
    logprobs = {"maximum": max_logprobs}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        _bound(props["n"], n)
        _bound(props["stop"], stops, arrays_only=True)
        _bound(props["stop_token_ids"], stops)
        _bound(props["stop_token_ids"], token_id, items=True)
        _bound(props["prompt_logprobs"], logprobs)
        _bound(props["min_tokens"], {"maximum": limits.total_tokens - 1})
    completion = components["CompletionRequest"]["properties"]
    _bound(completion["best_of"], n)
    _bound(completion["logprobs"], logprobs)
    _bound(completion["max_tokens"], {"maximum": limits.total_tokens - 1})
    for branch in completion["prompt"]["anyOf"]:
        items = branch.get("items", {})
        if items.get("type") in ("string", "array"):  # a list of prompts, not of token ids
            branch["maxItems"] = limits.max_client_batch_size
        _bound(items, token_id, only_type="integer")
        _bound(items, token_id, items=True, only_type="array")
    chat = components["ChatCompletionRequest"]["properties"]
    _bound(chat["top_logprobs"], logprobs)
    for key in ("max_tokens", "max_completion_tokens"):
        _bound(chat[key], {"maximum": limits.total_tokens - 1})
    tgi = components["TGIParameters"]["properties"]
    _bound(tgi["max_new_tokens"], {"maximum": limits.total_tokens - 1})
    _bound(tgi["truncate"], {"maximum": limits.input_tokens})
    _bound(tgi["top_n_tokens"], logprobs)
    _bound(tgi["stop"], stops)
    _bound(components["DetokenizeRequest"]["properties"]["tokens"], token_id, items=True)


def _bound(
    schema: dict[str, Any],
    keywords: dict[str, Any],
    *,
    items: bool = False,
    arrays_only: bool = False,
    only_type: str | None = None,
) -> None:
    """Add ``keywords`` to ``schema`` (to each non-null branch of an anyOf; to its ``items``
    with ``items``), where the branch is an array (``arrays_only``) or of ``only_type``."""
    branches: list[dict[str, Any]] = schema.get("anyOf", [schema])
    for branch in branches:
        kind = branch.get("type")
        if kind == "null" or (arrays_only and kind != "array"):
            continue
        if only_type is not None and kind != only_type:
            continue
        target = branch.get("items", {}) if items else branch
        target.update(keywords)
