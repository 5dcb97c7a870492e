"""TGI's /generate and /generate_stream over httpx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from crossinfer import SamplingParams

pytestmark = pytest.mark.slow

INPUTS = "The three primary colours are"


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def test_generate_greedy_with_details(base_url: str, offline: Any) -> None:
    (expected,) = offline.generate(
        [INPUTS], SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    )
    body = {"inputs": INPUTS, "parameters": {"max_new_tokens": 6, "details": True}}
    r = httpx.post(base_url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["generated_text"] == expected.outputs[0].text
    details = out["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 6
    assert [t["id"] for t in details["tokens"]] == list(expected.outputs[0].token_ids)
    assert [t["logprob"] for t in details["tokens"]] == pytest.approx(
        [t.logprob for t in expected.outputs[0].logprobs], abs=1e-4
    )
    assert not any(t["special"] for t in details["tokens"])


def test_generate_without_details_and_full_text(base_url: str) -> None:
    body = {"inputs": INPUTS, "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    out = httpx.post(base_url + "/generate", json=body, timeout=60).json()
    assert set(out) == {"generated_text", "details"} and out["details"] is None
    assert out["generated_text"].startswith(INPUTS) and len(out["generated_text"]) > len(INPUTS)


def test_generate_stream_matches_generate(base_url: str) -> None:
    body = {"inputs": INPUTS, "parameters": {"max_new_tokens": 5}}
    whole = httpx.post(base_url + "/generate", json=body, timeout=60).json()["generated_text"]
    with httpx.stream("POST", base_url + "/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert "".join(e["token"]["text"] for e in events) == whole
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == whole
    assert events[-1]["details"]["finish_reason"] == "length"
    assert events[-1]["details"]["generated_tokens"] == 5


def test_stop_sequence_and_sampling_seed(base_url: str) -> None:
    free = httpx.post(
        base_url + "/generate",
        json={"inputs": "Count: one, two, three,", "parameters": {"max_new_tokens": 10}},
        timeout=60,
    ).json()["generated_text"]
    stop = free.strip()[3:6]
    params = {"max_new_tokens": 10, "stop": [stop], "details": True}
    out = httpx.post(
        base_url + "/generate",
        json={"inputs": "Count: one, two, three,", "parameters": params},
        timeout=60,
    ).json()
    assert out["generated_text"] == free[: free.index(stop)]
    assert out["details"]["finish_reason"] == "stop_sequence"
    sampled = {"do_sample": True, "seed": 3, "max_new_tokens": 4, "details": True}
    a, b = (
        httpx.post(base_url + "/generate", json={"inputs": "Hi", "parameters": sampled}).json()
        for _ in range(2)
    )
    assert a == b and a["details"]["seed"] == 3
