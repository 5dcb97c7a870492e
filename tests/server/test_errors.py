"""Every error status in the OpenAI shape, and bad requests never disturbing good ones."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from crossinfer import SamplingParams
from tests.server.conftest import MAX_MODEL_LEN, MODEL
from tests.server.harness import serve_in_thread

pytestmark = pytest.mark.slow

API_KEY = "s3cret-key"


def assert_tgi_error(r: httpx.Response, status: int, error_type: str) -> str:
    """TGI's error shape: {"error": message, "error_type": kind}."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}
    assert isinstance(body["error"], str) and body["error"]
    assert body["error_type"] == error_type
    return body["error"]  # type: ignore[no-any-return]


def assert_error(
    r: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    want_type = "server_error" if status >= 500 else "invalid_request_error"
    assert error["type"] == want_type
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error  # type: ignore[no-any-return]


def _complete(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "hi", "logprobs": 99}, "logprobs"),
    ],
)
def test_invalid_parameters_are_400(base_url: str, body: dict[str, Any], param: str) -> None:
    assert_error(_complete(base_url, **body), 400, param)


def test_prompt_longer_than_the_context_is_400(base_url: str) -> None:
    error = assert_error(_complete(base_url, prompt="word " * 600, max_tokens=4), 400, "prompt")
    assert str(MAX_MODEL_LEN - 1) in error["message"]
    ids = {"prompt": [1, 99_999_999], "max_tokens": 2}
    assert_error(_complete(base_url, **ids), 400, "prompt")
    messages = [{"role": "user", "content": "word " * 600}]
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert_error(r, 400, "messages")


def test_chat_errors_name_the_chat_parameters(base_url: str) -> None:
    def chat(**body: Any) -> httpx.Response:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60)

    assert_error(chat(logprobs=True, top_logprobs=50), 400, "top_logprobs")
    assert_error(chat(max_completion_tokens=0), 400, "max_completion_tokens")
    assert_error(chat(messages=[]), 400, "messages")
    parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(chat(messages=parts), 400, "messages[0].content")


def test_malformed_json_is_400(base_url: str) -> None:
    headers = {"content-type": "application/json"}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        r = httpx.post(base_url + path, content=b'{"prompt": "hi",', headers=headers)
        error = assert_error(r, 400)
        assert "JSON" in error["message"]
    for path in ("/generate", "/generate_stream"):  # TGI answers invalid input with 422
        r = httpx.post(base_url + path, content=b'{"inputs": "hi",', headers=headers)
        assert "JSON" in assert_tgi_error(r, 422, "validation")


def test_unknown_model_and_route_are_404(base_url: str) -> None:
    assert_error(_complete(base_url, prompt="hi", model="gpt-4"), 404, "model", "model_not_found")
    assert_error(httpx.get(base_url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(base_url + "/v1/completions"), 405)


def test_oversized_body_is_413(base_url: str) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * (1 << 20)}).encode()
    r = httpx.post(base_url + "/v1/completions", content=big)
    assert_error(r, 413, code="request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    headers = {"content-type": "application/json"}
    r = httpx.post(base_url + "/v1/completions", content=chunked(), headers=headers)
    assert_error(r, 413, code="request_too_large")


def test_full_waiting_queue_is_503_with_retry_after(smollm2_loaded: Any) -> None:
    from crossinfer.engine.async_engine import AsyncLLMEngine
    from crossinfer.engine.setup import EngineConfig
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    # One running slot and one waiting place: the first runs, the second waits, the third
    # finds the queue full.
    config = EngineConfig(
        device="cpu", max_model_len=MAX_MODEL_LEN, kv_cache_memory=32 << 20, max_num_seqs=1
    )
    engine = AsyncLLMEngine.from_config(config, smollm2_loaded, max_waiting=1)
    app = build_app(engine, ServerSettings(served_model_name=MODEL))
    long = {"model": MODEL, "prompt": "hi", "max_tokens": 300, "ignore_eos": True, "stream": True}
    try:
        with serve_in_thread(app) as url, httpx.Client(timeout=60) as client:
            with client.stream("POST", url + "/v1/completions", json=long) as first:
                lines = first.iter_lines()  # kept: a dropped iterator closes the connection
                next(lines)  # running
                with client.stream("POST", url + "/v1/completions", json=long) as second:
                    assert second.status_code == 200  # accepted, waiting
                    r = _complete(url, prompt="hi", max_tokens=2)
                    assert_error(r, 503, code="server_overloaded")
                    assert r.headers["retry-after"] == "1"
            assert _complete(url, prompt="hi", max_tokens=2).status_code == 200
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def keyed_url(server_engine: Any) -> Iterator[str]:
    """A second app with --api-key, on the same engine."""
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    app = build_app(server_engine, ServerSettings(served_model_name=MODEL, api_key=API_KEY))
    with serve_in_thread(app) as url:
        yield url


def test_api_key(keyed_url: str) -> None:
    models = keyed_url + "/v1/models"
    assert_error(httpx.get(models), 401, code="invalid_api_key")
    assert_error(httpx.get(models, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(models, headers={"Authorization": API_KEY}), 401)  # no scheme
    r = httpx.post(keyed_url + "/generate", json={"inputs": "hi"})
    assert_tgi_error(r, 401, "authentication")
    assert httpx.get(models, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(keyed_url + "/health").status_code == 200  # probes need no key
    assert httpx.get(keyed_url + "/metrics").status_code == 200


def test_bad_requests_do_not_disturb_a_running_stream(base_url: str, offline: Any) -> None:
    prompt = "The history of the bicycle"
    (expected,) = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=10))
    started = threading.Event()
    lines: list[str] = []

    def stream() -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        with httpx.stream(
            "POST", base_url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                started.set()
                lines.append(line)

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(30)
    headers = {"content-type": "application/json"}
    assert_error(httpx.post(base_url + "/v1/completions", content=b"{", headers=headers), 400)
    assert_error(_complete(base_url, prompt="word " * 600), 400, "prompt")
    assert_error(_complete(base_url, prompt="hi", top_k=-5), 400, "top_k")
    thread.join(60)
    events = [line.removeprefix("data: ") for line in lines if line]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == expected.outputs[0].text
