"""/v1/models, /health, /tokenize, /detokenize, /metrics and /openapi.json."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from tests.server.conftest import MAX_MODEL_LEN, MODEL

pytestmark = pytest.mark.slow


def test_models_and_health(base_url: str) -> None:
    r = httpx.get(base_url + "/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "crossinfer"
    assert card["max_model_len"] == MAX_MODEL_LEN and card["root"] == "smollm2.gguf"
    assert httpx.get(base_url + "/health").status_code == 200


def test_tokenize_and_detokenize(base_url: str, offline: Any) -> None:
    r = httpx.post(base_url + "/tokenize", json={"prompt": "Hello world"})
    assert r.status_code == 200
    ids = offline.tokenizer.encode("Hello world")
    assert r.json() == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids}
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(base_url + "/tokenize", json={"messages": messages})
    assert r.json()["tokens"] == offline.apply_chat_template(messages)
    r = httpx.post(base_url + "/detokenize", json={"tokens": ids})
    assert r.json() == {"prompt": "Hello world"}
    r = httpx.post(base_url + "/detokenize", json={"tokens": [10**8]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    both = {"prompt": "x", "messages": messages}
    assert httpx.post(base_url + "/tokenize", json=both).status_code == 400


def _sample(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


def test_metrics_count_a_request(base_url: str) -> None:
    before = httpx.get(base_url + "/metrics").text
    body = {"model": MODEL, "prompt": "One two three", "max_tokens": 3, "ignore_eos": True}
    usage = httpx.post(base_url + "/v1/completions", json=body, timeout=60).json()["usage"]
    r = httpx.get(base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text

    def delta(name: str, labels: str = "") -> float:
        return _sample(after, name, labels) - _sample(before, name, labels)

    assert delta("crossinfer_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("crossinfer_generation_tokens_total") == 3
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert delta(f"crossinfer_{histogram}_seconds_count") == 1
    assert _sample(after, "crossinfer_request_success_total", 'finished_reason="length"') >= 1
    for gauge in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_ratio",
        "prefix_cache_hit_rate",
    ):
        assert 0 <= _sample(after, f"crossinfer_{gauge}") <= 1
    assert _sample(after, "crossinfer_num_preemptions_total") >= 0
    assert f'model_name="{MODEL}"' in after


def test_each_app_has_its_own_registry(server_engine: Any) -> None:
    from prometheus_client import REGISTRY

    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    build_app(server_engine, ServerSettings(served_model_name="a"))
    build_app(server_engine, ServerSettings(served_model_name="b"))  # no duplicate names
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("crossinfer")]


def test_openapi_schema(base_url: str) -> None:
    schema = httpx.get(base_url + "/openapi.json").json()
    validate(schema)  # raises on any violation of the OpenAPI 3 specification
    assert re.fullmatch(r"3\.\d+\.\d+", schema["openapi"])
    assert schema["info"]["title"] == "crossinfer"
    paths = schema["paths"]
    for path in (
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/generate",
        "/generate_stream",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
    ):
        assert path in paths
    for path, methods in paths.items():
        for method, operation in methods.items():
            assert operation["responses"], f"{method} {path} documents no response"
    refs = re.findall(
        r'"\$ref": ?"#/components/schemas/([^"]+)"', httpx.get(base_url + "/openapi.json").text
    )
    assert refs and set(refs) <= set(schema["components"]["schemas"])
    errors = paths["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(errors)
