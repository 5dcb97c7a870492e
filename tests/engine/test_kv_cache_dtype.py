"""``--kv-cache-dtype``: the cache is stored in the chosen dtype (twice the blocks for bf16
under an fp32 model in the same bytes), what it costs in accuracy is held to a bound, and a
dtype the backend does not list, or an unknown name, fails before loading with the choices.

Measured with ``crossinfer bench quality --kv-cache-dtype bfloat16`` on the 50 prompts x 64
tokens (benchmarks/RESULTS.md): 46 of 50 continuations identical, mean |logprob difference|
0.0033, max 0.043. The bound fails on a broken rounding or a misread cache, not on noise."""

from __future__ import annotations

import pytest
import torch

from crossinfer.commands.bench_quality import PROMPTS, measure

MEAN_LOGPROB_ERROR_BOUND = 0.02
MAX_LOGPROB_ERROR_BOUND = 0.3


def test_a_bf16_cache_under_fp32_holds_twice_the_blocks_and_the_quality_bound(
    smollm2_loaded,  # type: ignore[no-untyped-def]
) -> None:
    from crossinfer.llm import LLM

    reference = LLM(loaded=smollm2_loaded, device="cpu", kv_cache_memory=1 << 26)
    narrow = LLM(
        loaded=smollm2_loaded, device="cpu", kv_cache_memory=1 << 26, kv_cache_dtype="bfloat16"
    )
    ref_parts, parts = reference.engine.parts, narrow.engine.parts
    assert ref_parts.kv_spec.dtype == torch.float32 and parts.kv_spec.dtype == torch.bfloat16
    assert parts.num_blocks == 2 * ref_parts.num_blocks
    quality = measure(reference, narrow, "KV cache bfloat16", list(PROMPTS[:4]), 16)
    assert quality.logprob_err_mean < MEAN_LOGPROB_ERROR_BOUND, quality
    assert quality.logprob_err_max < MAX_LOGPROB_ERROR_BOUND, quality
    assert quality.logprob_err_mean > 0  # the narrower cache is really in use


def test_a_kv_cache_dtype_the_backend_lacks_fails_before_loading_with_the_list() -> None:
    from crossinfer.llm import LLM

    with pytest.raises(ValueError, match=r"cpu backend cannot .* float8_e4m3fn .*supports: "):
        LLM(device="cpu", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"--kv-cache-dtype int3: unknown \(choose from auto, "):
        LLM(device="cpu", kv_cache_dtype="int3")
