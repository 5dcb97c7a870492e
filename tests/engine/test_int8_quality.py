"""What int8 (W8A8) costs SmolLM2-135M, held to a bound: greedy agreement with fp32 and the
logprob error of the fp32 greedy tokens, on chat prompts of ordinary text (bench_quality.py).

Measured on the 50 prompts x 64 tokens of ``crossinfer bench quality`` (benchmarks/RESULTS.md):
a mean |logprob difference| near 0.12; on the 8 prompts x 32 tokens here, 0.116 mean, 12 tokens
median before the first difference. The bounds below fail on a clear regression (a broken
scale, a lost bias, an unquantised-activation mismatch), not on noise."""

from __future__ import annotations

import pytest

from crossinfer.commands.bench_quality import PROMPTS, measure

MEAN_LOGPROB_ERROR_BOUND = 0.2
MAX_LOGPROB_ERROR_BOUND = 2.0
MEDIAN_AGREEMENT_BOUND = 6  # tokens before the first difference, of 32


@pytest.fixture(scope="module")
def int8_llm():  # -> LLM
    from crossinfer.llm import LLM

    return LLM(device="cpu", quantization="int8", kv_cache_memory=1 << 27)


def test_int8_stays_within_the_quality_bound(smollm2_loaded, int8_llm) -> None:  # type: ignore[no-untyped-def]
    from crossinfer.llm import LLM

    reference = LLM(loaded=smollm2_loaded, device="cpu", kv_cache_memory=1 << 27)
    quality = measure(reference, int8_llm, "int8", list(PROMPTS[:8]), 32)
    assert quality.logprob_err_mean < MEAN_LOGPROB_ERROR_BOUND, quality
    assert quality.logprob_err_max < MAX_LOGPROB_ERROR_BOUND, quality
    assert quality.agree_median >= MEDIAN_AGREEMENT_BOUND, quality
    assert quality.logprob_err_mean > 0  # int8 is really on: fp32 would give exactly 0


def test_quantization_the_backend_lacks_fails_before_loading_with_the_list() -> None:
    from crossinfer.llm import LLM

    with pytest.raises(ValueError, match=r"--quantization fp4: the cpu backend .*supports: int8"):
        LLM(device="cpu", quantization="fp4")
