"""The engine's request lifecycle on SmolLM2: n > 1, seeds, stops, aborts, rejections."""

from __future__ import annotations

import pytest

from crossinfer import LLM, SamplingParams
from crossinfer.engine.setup import LoadedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_loaded: LoadedModel) -> LLM:
    return LLM(device="cpu", loaded=smollm2_loaded, kv_cache_memory=64 << 20, max_model_len=512)


def _all_free(llm: LLM) -> bool:
    kv = llm.engine.scheduler.kv_cache
    return kv.num_free_blocks == kv.num_blocks and not llm.engine.has_unfinished_requests()


def test_n_samples_share_the_prompt_and_differ(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    (out,) = llm.generate(["Write a word:"], params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({c.token_ids for c in out.outputs}) == 3
    assert out.metrics.num_generated_tokens == 36
    assert _all_free(llm)
    # Same seed, same texts, even beside other requests.
    again = llm.generate(["Other prompt", "Write a word:"], [SamplingParams(max_tokens=5), params])
    assert [c.token_ids for c in again[1].outputs] == [c.token_ids for c in out.outputs]


def test_n_greedy_samples_equal_single_greedy(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    (single,) = llm.generate(["The capital of Italy is"], greedy)
    (many,) = llm.generate(
        ["The capital of Italy is"],
        SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True),
    )
    assert [c.token_ids for c in many.outputs] == [single.outputs[0].token_ids] * 2


def test_stop_string_cuts_the_text(llm: LLM) -> None:
    prompt = "Count: one, two, three,"
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    (free,) = llm.generate([prompt], greedy)
    text = free.outputs[0].text
    stop = text.strip()[3:6]  # a piece that appears mid-output
    assert len(stop) == 3 and stop in text
    (cut,) = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    )
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].stop_reason == stop
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert _all_free(llm)


def test_max_tokens_gives_length(llm: LLM) -> None:
    (out,) = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    assert out.metrics.time_to_first_token is not None and out.metrics.time_to_first_token > 0


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", "Tell me a long story", params)
    engine.add_request("b", "Tell me another long story", params)
    for _ in range(3):
        engine.step()
    assert engine.scheduler.kv_cache.num_free_blocks < engine.scheduler.kv_cache.num_blocks
    engine.abort_request("a")
    engine.abort_request("b")
    assert _all_free(llm)


def test_impossible_request_is_rejected(llm: LLM) -> None:
    with pytest.raises(ValueError, match="maximum context length is 512"):
        llm.generate([[100] * 510], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**6]], SamplingParams(max_tokens=4))
    assert _all_free(llm)


def test_chat_uses_the_template(llm: LLM) -> None:
    ids = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = llm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    (out,) = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=8))
    assert out.prompt_token_ids == tuple(
        llm.apply_chat_template([{"role": "user", "content": "Say hello."}])
    )
    assert out.outputs[0].text


def test_vllm_prompt_dicts_are_prompts(llm: LLM) -> None:
    """vLLM's TextPrompt / TokensPrompt shapes give what text and token ids give; a dict of
    another shape is refused by name."""
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    ids = llm.tokenizer.encode("The capital of France is")
    by_ids, by_text = llm.generate([ids, "The capital of France is"], greedy)
    dicts = llm.generate(
        [{"prompt_token_ids": ids}, {"prompt": "The capital of France is"}], greedy
    )
    assert [o.outputs[0].token_ids for o in dicts] == [
        by_ids.outputs[0].token_ids,
        by_text.outputs[0].token_ids,
    ]
    (single,) = llm.generate({"prompt_token_ids": ids}, greedy)
    assert single.outputs[0].token_ids == by_ids.outputs[0].token_ids
    with pytest.raises(ValueError, match="exactly one of 'prompt'"):
        llm.generate([{"prompt": "x", "multi_modal_data": {}}], greedy)
    with pytest.raises(TypeError, match="a prompt is text, a list of token ids"):
        llm.generate([3.5], greedy)  # type: ignore[list-item]
    assert _all_free(llm)
