"""Greedy tokens under LoRA adapters equal transformers + peft's merged model, with requests of
three adapters and of the base model in one batch, prefix caching on, whether all adapters fit
the device slots or they take turns (max_loras=1), under tensor parallelism, and on int8 base
weights (close to fp32)."""

from __future__ import annotations

from typing import Any

import pytest

from crossinfer import LLM, LoRARequest, SamplingParams
from crossinfer.engine.scheduler import SchedulerOutput
from tests.lora.adapters import ADAPTERS, NEW_TOKENS, PROMPTS, SHARED
from tests.lora.conftest import Adapters

PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
NAMES: list[str | None] = [None, *ADAPTERS]


def _requests(adapters: Adapters) -> dict[str | None, LoRARequest | None]:
    return {
        name: None if name is None else LoRARequest(name, i, str(adapters.folders[name]))
        for i, name in enumerate(NAMES)
    }


def _generate(llm: LLM, adapters: Adapters) -> dict[str | None, list[list[int]]]:
    """Every prompt under every adapter and the base model, in one generate call."""
    loras = _requests(adapters)
    jobs = [(name, prompt) for prompt in PROMPTS for name in NAMES]
    outputs = llm.generate([p for _, p in jobs], PARAMS, lora_request=[loras[n] for n, _ in jobs])
    tokens: dict[str | None, list[list[int]]] = {name: [] for name in NAMES}
    for (name, _), output in zip(jobs, outputs, strict=True):
        tokens[name].append(list(output.outputs[0].token_ids))
    return tokens


def _llm(adapters: Adapters, **args: Any) -> LLM:
    return LLM(
        model=str(adapters.base),
        device="cpu",
        dtype="float32",
        enable_lora=True,
        block_size=8,
        kv_cache_memory=1 << 22,
        **args,
    )


def _adapters_per_step(llm: LLM) -> list[int]:
    """Record how many distinct adapters each step runs."""
    counts: list[int] = []
    execute = llm.engine.runner.execute

    def spy(output: SchedulerOutput) -> Any:
        counts.append(len({c.request.lora_int_id for c in output.chunks} - {None}))
        return execute(output)

    llm.engine.runner.execute = spy  # type: ignore[method-assign]
    return counts


def test_three_adapters_and_the_base_in_one_batch_match_peft(adapters: Adapters) -> None:
    llm = _llm(adapters, max_loras=3, enable_prefix_caching=True)
    counts = _adapters_per_step(llm)
    assert _generate(llm, adapters) == adapters.expected
    assert counts[0] == 3  # one step held every adapter and the base model
    # Same-adapter prompts shared their prefix; other adapters' identical prompts did not.
    assert llm.engine.scheduler.kv_cache.num_prefix_hit_tokens == len(NAMES) * len(SHARED)


def test_adapters_take_turns_in_one_slot(adapters: Adapters) -> None:
    llm = _llm(adapters, max_loras=1)
    counts = _adapters_per_step(llm)
    assert _generate(llm, adapters) == adapters.expected
    assert max(counts) == 1  # requests of the other adapters waited
    manager = llm.engine.runner.lora
    assert manager is not None and len(manager.slots.resident) == 1


@pytest.mark.slow
def test_tensor_parallel_two_gives_the_tokens_of_one(adapters: Adapters) -> None:
    llm = _llm(adapters, max_loras=3, tensor_parallel_size=2)
    try:
        assert _generate(llm, adapters) == adapters.expected
    finally:
        llm.close()


def test_int8_base_weights_with_an_adapter_stay_close_to_fp32(adapters: Adapters) -> None:
    lora = LoRARequest("all", 1, str(adapters.folders["all"]))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    fp32 = _llm(adapters).generate(PROMPTS, params, lora_request=lora)
    llm = _llm(adapters, quantization="int8")
    layer = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert type(layer.base).__name__ == "Int8Linear"  # the backend swapped the base inside
    # Score fp32's tokens under int8: the same tokens, so the logprobs compare one to one.
    scored = llm.generate(
        [p + list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, fp32, strict=True)],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        lora_request=lora,
    )
    errors = []
    for prompt, want, got in zip(PROMPTS, fp32, scored, strict=True):
        reference = [t.logprob for t in want.outputs[0].logprobs or ()]
        quantized = [s.logprob for s in (got.prompt_logprobs or ())[len(prompt) :]]
        errors += [abs(a - b) for a, b in zip(reference, quantized, strict=True)]
    assert 0 < sum(errors) / len(errors) < 0.05, errors
    assert max(errors) < 0.5, errors


def test_compiled_shape_backends_refuse_lora_at_start(adapters: Adapters) -> None:
    from crossinfer.engine.setup import EngineConfig, load_model
    from tests.engine.static_backend import StaticCpuBackend

    config = EngineConfig(model=str(adapters.base), enable_lora=True, max_model_len=128)
    loaded = load_model(config, StaticCpuBackend())  # the layers load; the engine refuses
    with pytest.raises(ValueError, match="static-cpu backend runs compiled static shapes"):
        LLM(model=str(adapters.base), device="cpu", loaded=loaded, enable_lora=True,
            max_model_len=128)  # fmt: skip
