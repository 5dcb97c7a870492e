"""/v1/completions through the official openai SDK, sync and async, against the offline API."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from crossinfer import SamplingParams
from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _greedy(offline: Any, prompt: Any, max_tokens: int, **kw: Any) -> Any:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return offline.generate([prompt], params)[0]


def test_greedy_completion_equals_offline(client: openai.OpenAI, offline: Any) -> None:
    expected = _greedy(offline, PROMPT, 8)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert [c.text for c in r.choices] == [expected.outputs[0].text]
    assert r.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="Count: 1, 2,", temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage is not None and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_stream_concatenates_to_the_whole_text(client: openai.OpenAI, offline: Any) -> None:
    expected = _greedy(offline, PROMPT, 8)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, last = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == expected.outputs[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in text_chunks)
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_n_samples_of_several_prompts(client: openai.OpenAI) -> None:
    def ask() -> Any:
        return client.completions.create(
            model=MODEL,
            prompt=["Once upon a time", "My favourite food is"],
            n=2,
            max_tokens=4,
            temperature=1.0,
            seed=11,
            extra_body={"ignore_eos": True},
        )

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert first.usage is not None and first.usage.completion_tokens == 16
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert first.choices[0].text != first.choices[1].text or first.choices[2].text != (
        first.choices[3].text
    )


def test_token_id_prompt_with_echo(client: openai.OpenAI, offline: Any) -> None:
    ids = offline.tokenizer.encode(PROMPT)
    expected = _greedy(offline, ids, 4)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text == offline.tokenizer.decode(ids) + expected.outputs[0].text


def test_logprobs(client: openai.OpenAI, offline: Any) -> None:
    expected = _greedy(offline, PROMPT, 5, logprobs=2)
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == r.choices[0].text
    want = [t.logprob for t in expected.outputs[0].logprobs]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    assert lp.top_logprobs is not None and all(len(top) == 2 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(
        max(top.values()) == pytest.approx(chosen, abs=1e-4)
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_stop_sequence_cuts_the_text(client: openai.OpenAI) -> None:
    prompt = "Count: one, two, three,"
    free = (
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = free.strip()[3:6]
    assert len(stop) == 3 and stop in free
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[: free.index(stop)]


def test_async_client_streams_concurrently(base_url: str, offline: Any) -> None:
    prompts = ["The sun rises in the", "Water boils at", "A cat is an"]
    expected = [_greedy(offline, p, 6).outputs[0].text for p in prompts]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == expected
