"""The server's request limits as flags, --max-concurrent-requests' 429, /health's body, the
documented OpenAPI schema, and `crossinfer serve` exiting non-zero when its engine breaks."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from crossinfer.cli import build_parser
from crossinfer.server.limits import ServerLimits, limits_from_args
from tests.server.conftest import MAX_MODEL_LEN, MODEL
from tests.server.harness import serve_in_thread
from tests.server.test_errors import assert_error, assert_tgi_error

pytestmark = pytest.mark.slow


def test_limit_flags_parse_into_server_limits() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--max-best-of", "4",
            "--max-stop-sequences", "2",
            "--max-input-tokens", "100",
            "--max-total-tokens", "200",
            "--max-concurrent-requests", "8",
            "--max-client-batch-size", "16",
            "--max-logprobs", "5",
            "--prefix-cache-seed", "abc",
        ]
    )  # fmt: skip
    assert limits_from_args(args) == ServerLimits(
        max_n=4,
        max_stop_sequences=2,
        max_input_tokens=100,
        max_total_tokens=200,
        max_concurrent_requests=8,
        max_client_batch_size=16,
    )
    assert (args.max_logprobs, args.prefix_cache_seed) == (5, "abc")
    defaults = limits_from_args(build_parser().parse_args(["serve"]))
    assert defaults == ServerLimits()


def test_limits_resolve_against_the_model() -> None:
    assert ServerLimits().resolve(512) == ServerLimits(max_input_tokens=511, max_total_tokens=512)
    assert ServerLimits(max_total_tokens=100).resolve(512).max_input_tokens == 99
    with pytest.raises(ValueError, match="exceeds the model's context length 512"):
        ServerLimits(max_total_tokens=513).resolve(512)
    with pytest.raises(ValueError, match="below --max-total-tokens 100"):
        ServerLimits(max_input_tokens=100, max_total_tokens=100).resolve(512)
    with pytest.raises(ValueError, match="--max-n must be at least 1"):
        ServerLimits(max_n=0).resolve(512)


@pytest.fixture(scope="module")
def one_at_a_time(server_engine: Any) -> Iterator[str]:
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    settings = ServerSettings(
        served_model_name=MODEL, limits=ServerLimits(max_concurrent_requests=1), retry_after_s=2
    )
    with serve_in_thread(build_app(server_engine, settings)) as url:
        yield url


def test_requests_beyond_max_concurrent_requests_get_429(one_at_a_time: str) -> None:
    long = {"model": MODEL, "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=one_at_a_time, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=long) as stream:
            lines = stream.iter_lines()
            next(lines)  # the stream holds the one place
            r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert_error(r, 429, code="too_many_requests")
            assert r.headers["retry-after"] == "2"
            tgi = client.post("/generate", json={"inputs": "hi"})
            assert_tgi_error(tgi, 429, "overloaded")
            assert client.get("/health").status_code == 200  # not counted
            assert client.get("/v1/models").status_code == 200
        # The place is free again once the stream ended.
        deadline = time.monotonic() + 10
        while (
            r := client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        ).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 200


def test_health_has_a_json_body(base_url: str) -> None:
    r = httpx.get(base_url + "/health")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"status": "ok"}


def test_openapi_documents_media_types_and_limits(base_url: str) -> None:
    schema = httpx.get(base_url + "/openapi.json").json()
    paths = schema["paths"]
    ok = paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}
    assert set(paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]) == set(ok)
    assert set(paths["/generate_stream"]["post"]["responses"]["200"]["content"]) == {
        "text/event-stream"
    }
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]
    assert paths["/health"]["get"]["responses"]["200"]["content"]["application/json"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        assert "422" not in paths[path]["post"]["responses"]  # invalid input is a 400 here
    assert "422" in paths["/generate"]["post"]["responses"]  # TGI's status for it
    components = schema["components"]["schemas"]
    completion = components["CompletionRequest"]
    assert completion["additionalProperties"] is False
    props = completion["properties"]

    def branch(prop: dict[str, Any], kind: str) -> dict[str, Any]:
        return next(b for b in prop.get("anyOf", [prop]) if b.get("type") == kind)

    assert branch(props["n"], "integer")["maximum"] == 16
    assert branch(props["seed"], "integer")["maximum"] == 2**64 - 1  # an exact integer
    assert branch(props["seed"], "integer")["minimum"] == -(2**63)
    assert branch(props["max_tokens"], "integer")["maximum"] == MAX_MODEL_LEN - 1
    assert branch(props["logprobs"], "integer")["maximum"] == 20
    temperature = branch(props["temperature"], "number")
    assert temperature["minimum"] == 0
    token_ids = [b for b in props["prompt"]["anyOf"] if b.get("items", {}).get("type") == "integer"]
    assert token_ids[0]["items"]["maximum"] == 49151


# -- the process: exits 1 after draining when the engine breaks ----------------------------


def test_serve_exits_non_zero_when_the_engine_breaks(
    smollm2_loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import crossinfer.engine.setup as setup
    from crossinfer.server import serve

    class Broken(torch.nn.Module):  # every forward pass raises, and the device is "lost"
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.args = model.args

        def forward(self, *args: Any) -> torch.Tensor:
            raise RuntimeError("device fault")

    monkeypatch.setattr(setup, "load_model", lambda config: smollm2_loaded)
    real_parts = setup.build_engine_parts

    def broken_parts(config: Any, loaded: Any = None) -> Any:
        parts = real_parts(config, loaded)
        parts.runner.model = Broken(parts.runner.model)
        return parts

    import crossinfer.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "build_engine_parts", broken_parts)

    def lost() -> None:
        raise RuntimeError("lost")

    monkeypatch.setattr(smollm2_loaded.backend, "synchronize", lost)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args: argparse.Namespace = build_parser().parse_args(
        ["serve", "--device", "cpu", "--port", str(port), "--max-model-len", "256",
         "--kv-cache-memory", "16MiB", "--log-level", "warning",
         "--no-engine-process"]  # the faults planted above live in this process
    )  # fmt: skip
    answers: list[httpx.Response] = []

    def client() -> None:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answers.append(
                    httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
                )
                return
            except httpx.TransportError:
                time.sleep(0.1)

    thread = threading.Thread(target=client)
    thread.start()
    code = serve.run(args)  # returns once the server has drained and stopped
    thread.join(30)
    assert code == 1
    (answer,) = answers
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_dead"
    assert "lost" not in answer.text  # our words, not the exception's
