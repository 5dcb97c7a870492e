"""/v1/chat/completions through the official openai SDK: the chat template, streaming, n,
logprobs and the max_tokens defaults."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from crossinfer import SamplingParams
from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _offline_chat(offline: Any, max_tokens: int | None, **kw: Any) -> Any:
    return offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=max_tokens, **kw))[0]


def test_greedy_chat_equals_offline(client: openai.OpenAI, offline: Any) -> None:
    expected = _offline_chat(offline, 6)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.outputs[0].text
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(offline.apply_chat_template(MESSAGES))
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_default_max_tokens_is_the_rest_of_the_context(client: openai.OpenAI, offline: Any) -> None:
    expected = _offline_chat(offline, None)  # the model stops by itself within a few tokens
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert r.choices[0].finish_reason == "stop" == expected.outputs[0].finish_reason
    assert r.choices[0].message.content == expected.outputs[0].text


def test_max_completion_tokens_wins(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=9, max_completion_tokens=3, temperature=0
    )
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_stream_starts_with_the_role_and_ends_with_usage(
    client: openai.OpenAI, offline: Any
) -> None:
    expected = _offline_chat(offline, 6)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, body, last = chunks[0], chunks[1:-1], chunks[-1]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in body) == expected.outputs[0].text
    assert body[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 6


def test_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    assert r.choices[0].logprobs is not None
    content = r.choices[0].logprobs.content
    assert content is not None and len(content) == 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes or []) == t.token.encode()
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)


def test_n_samples_and_stream_indices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, n=2, seed=5
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens <= 10
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, n=2, seed=5, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]  # same seed


def test_async_chat(base_url: str, offline: Any) -> None:
    expected = _offline_chat(offline, 5)

    async def main() -> str | None:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        async with client:
            r = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0
            )
        return r.choices[0].message.content

    assert asyncio.run(main()) == expected.outputs[0].text
