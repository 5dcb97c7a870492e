"""LoRA over HTTP: adapters served from the start and loaded at run time, chosen by the OpenAI
``model`` and TGI's ``adapter_id``; their tokens equal peft's merged models, also when two
adapters alternate through one device slot; /v1/models lists them; the load route needs the
API key and refuses bad folders, names already served and unknown names with reasons."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.lora.adapters import NEW_TOKENS, PROMPTS
from tests.lora.conftest import Adapters
from tests.server.harness import serve_in_thread

KEY = "lora-key"
BASE = "tiny-base"


@pytest.fixture(scope="module")
def server(adapters: Adapters) -> Iterator[str]:
    from crossinfer.engine.core_client import ProcessEngine
    from crossinfer.engine.setup import EngineConfig
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    config = EngineConfig(
        model=str(adapters.base),
        device="cpu",
        dtype="float32",
        kv_cache_memory=1 << 22,
        block_size=8,
        enable_lora=True,
        max_loras=1,  # two adapters in turn: each use of the other evicts it
    )
    engine = ProcessEngine.launch(config, log_level="warning")
    settings = ServerSettings(
        served_model_name=BASE,
        api_key=KEY,
        lora_modules=(("qv", str(adapters.folders["qv"])),),
    )
    try:
        with serve_in_thread(build_app(engine, settings)) as url:
            yield url
    finally:
        engine.shutdown()


def _post(url: str, path: str, body: dict[str, Any], key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def _text(adapters: Adapters, name: str | None, prompt: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(adapters.base)
    return str(tokenizer.decode(adapters.expected[name][prompt]))


def test_adapters_load_list_alternate_and_unload(server: str, adapters: Adapters) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    # the load route is guarded by the key like the rest of the API
    body = {"lora_name": "all", "lora_path": str(adapters.folders["all"])}
    assert _post(server, "/v1/load_lora_adapter", body, key=None).status_code == 401
    assert _post(server, "/v1/load_lora_adapter", body).status_code == 200
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "qv", "all"}
    assert cards["all"].parent == BASE and cards["all"].root == str(adapters.folders["all"])  # type: ignore[attr-defined]

    def complete(model: str, prompt: int) -> str:
        out = client.completions.create(
            model=model,
            prompt=PROMPTS[prompt],
            max_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.model == model
        return out.choices[0].text.strip()  # the first token's text follows the prompt's

    # one slot, two adapters in turn and the base between them
    for model, prompt in (("qv", 0), ("all", 0), (BASE, 1), ("qv", 1), ("all", 2), ("qv", 0)):
        assert complete(model, prompt) == _text(adapters, None if model == BASE else model, prompt)

    parameters = {"adapter_id": "all", "max_new_tokens": NEW_TOKENS}
    tgi = _post(server, "/generate", {"inputs": "w7 w8 w9 w60", "parameters": parameters})
    assert tgi.status_code == 200
    assert tgi.json()["generated_text"].strip() == _text(adapters, "all", 2)

    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "all"}).status_code == 200
    with pytest.raises(openai.NotFoundError) as gone:
        complete("all", 0)
    assert gone.value.code == "model_not_found"
    assert {m.id for m in client.models.list().data} == {BASE, "qv"}


def test_bad_requests_are_refused_with_the_reason(server: str, adapters: Adapters) -> None:
    missing = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
    assert missing.status_code == 400
    assert "/nowhere is not a folder" in missing.json()["error"]["message"]
    duplicate = _post(
        server, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": str(adapters.base)}
    )
    assert duplicate.status_code == 400 and "already loaded" in duplicate.json()["error"]["message"]
    not_an_adapter = _post(
        server, "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": str(adapters.base)}
    )
    assert not_an_adapter.status_code == 400
    assert "adapter_config.json: missing" in not_an_adapter.json()["error"]["message"]
    unknown = _post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    completion = _post(
        server, "/v1/completions", {"model": "nope", "prompt": "w3", "max_tokens": 1}
    )
    assert completion.status_code == 404
    assert completion.json()["error"]["code"] == "model_not_found"
    tgi = _post(server, "/generate", {"inputs": "w3", "parameters": {"adapter_id": "nope"}})
    assert tgi.status_code == 404 and "'nope' does not exist" in tgi.json()["error"]
