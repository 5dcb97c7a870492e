"""Prompt logprobs over HTTP: OpenAI's echo with logprobs (what lm-evaluation-harness sends),
echo with max_tokens 0, vLLM's prompt_logprobs on completions and chat, and TGI's
decoder_input_details, each against the offline engine's scores."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from crossinfer import SamplingParams
from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _offline(offline: Any, prompt: Any, max_tokens: int, k: int, **kw: Any) -> Any:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=k, **kw)
    return offline.generate([prompt], params)[0]


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(
    client: openai.OpenAI, offline: Any
) -> None:
    expected = _offline(offline, PROMPT, 1, 1, logprobs=1)
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    (choice,) = r.choices
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    num_prompt = len(expected.prompt_token_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == num_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [s.logprob for s in expected.prompt_logprobs[1:]] + [
        expected.outputs[0].logprobs[0].logprob
    ]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert choice.text == PROMPT + expected.outputs[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # lm-eval's greedy check: a token is greedy when its logprob is the best alternative's.
    pairs = zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True)
    greedy = [tok == max(top.values()) for tok, top in pairs]
    ranks = [s.rank == 1 for s in expected.prompt_logprobs[1:]]
    assert greedy[:-1] == ranks


def test_echo_with_max_tokens_0_returns_the_prompt_alone(
    client: openai.OpenAI, offline: Any
) -> None:
    expected = _offline(offline, PROMPT, 0, 2)
    ids = list(expected.prompt_token_ids)
    for prompt in (PROMPT, ids):
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2
        )
        (choice,) = r.choices
        assert choice.text == PROMPT and choice.finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 0
        assert r.usage.prompt_tokens == len(ids)
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        assert len(lp.token_logprobs) == len(ids)
        want = [s.logprob for s in expected.prompt_logprobs[1:]]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
        assert all(len(top) == 2 for top in lp.top_logprobs[1:])


def test_vllm_prompt_logprobs_on_completions(base_url: str, offline: Any) -> None:
    expected = _offline(offline, PROMPT, 2, 2)
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 2,
        "temperature": 0,
        "prompt_logprobs": 2,
    }
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    scores = choice["prompt_logprobs"]
    assert scores[0] is None and len(scores) == len(expected.prompt_token_ids)
    for entry, token_id, score in zip(
        scores[1:], expected.prompt_token_ids[1:], expected.prompt_logprobs[1:], strict=True
    ):
        mine = entry[str(token_id)]
        assert mine["logprob"] == pytest.approx(score.logprob, abs=1e-5)
        assert mine["rank"] == score.rank and isinstance(mine["decoded_token"], str)
        top_ids = [t for t, _ in score.top_logprobs]
        assert {str(t) for t in top_ids} <= set(entry) and len(entry) <= 3
        assert [entry[str(t)]["rank"] for t in top_ids] == [1, 2]
    assert choice["logprobs"] is None  # prompt logprobs alone do not ask for sampled ones


def test_streamed_echo_equals_the_whole_response(base_url: str) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    whole = httpx.post(base_url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", base_url + "/v1/completions", json={**body, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [v for c in chunks for v in c["logprobs"][key]] == whole["logprobs"][key]


def test_chat_prompt_logprobs(base_url: str, offline: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0}
    r = httpx.post(base_url + "/v1/chat/completions", json={**body, "prompt_logprobs": 1})
    scores = r.json()["prompt_logprobs"]
    prompt_ids = offline.apply_chat_template(messages)
    expected = _offline(offline, prompt_ids, 2, 1)
    assert scores[0] is None and len(scores) == len(prompt_ids)
    got = [entry[str(t)]["logprob"] for entry, t in zip(scores[1:], prompt_ids[1:], strict=True)]
    assert got == pytest.approx([s.logprob for s in expected.prompt_logprobs[1:]], abs=1e-5)
    stream = {**body, "prompt_logprobs": 1, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=stream) as r:
        chunks = [
            json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"
        ]
    with_scores = [c for c in chunks if c.get("prompt_logprobs")]
    assert len(with_scores) == 1 and with_scores[0]["prompt_logprobs"] == scores


def test_tgi_decoder_input_details_and_top_n_tokens(base_url: str, offline: Any) -> None:
    expected = _offline(offline, PROMPT, 3, 0, logprobs=2)
    parameters = {"max_new_tokens": 3, "decoder_input_details": True, "top_n_tokens": 2}
    r = httpx.post(base_url + "/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    prefill = details["prefill"]
    assert [t["id"] for t in prefill] == list(expected.prompt_token_ids)
    assert prefill[0]["logprob"] is None
    want = [s.logprob for s in expected.prompt_logprobs[1:]]
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(want, abs=1e-5)
    sampled = expected.outputs[0].logprobs
    assert [[t["id"] for t in top] for top in details["top_tokens"]] == [
        [t for t, _ in s.top_logprobs] for s in sampled
    ]


def test_truncate_keeps_the_last_input_tokens(base_url: str, offline: Any) -> None:
    ids = offline.tokenizer.encode(PROMPT)
    (expected,) = offline.generate([ids[-2:]], SamplingParams(temperature=0, max_tokens=3))
    parameters = {"max_new_tokens": 3, "truncate": 2, "decoder_input_details": True}
    r = httpx.post(base_url + "/generate", json={"inputs": PROMPT, "parameters": parameters})
    body = r.json()
    assert body["generated_text"] == expected.outputs[0].text
    assert [t["id"] for t in body["details"]["prefill"]] == ids[-2:]
