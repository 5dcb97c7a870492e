"""The case list as data: ids, levels, what the capabilities rule out."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from crossinfer_conformance.cases import build_cases, unsupported_reason
from crossinfer_conformance.info import CapsInfo

CPU_LIKE = CapsInfo(
    dtypes=("fp32", "bf16", "fp16"),
    kv_cache_dtypes=("fp32", "bf16", "fp16"),
    block_sizes=(1, 8, 16, 32, 64, 128),
    head_sizes=(32, 64, 80, 96, 128, 256),
    prefix_caching=True,
    graph_capture=False,
    distributed_backend="gloo",
    emulated=False,
    default_block_size=16,
)
NARROW = replace(
    CPU_LIKE,
    dtypes=("bf16",),
    kv_cache_dtypes=("bf16", "float8_e4m3fn"),
    block_sizes=(16,),
    head_sizes=(64, 128),
    prefix_caching=False,
)


def test_ids_are_unique_readable_and_filterable() -> None:
    ids = [case.id for case in build_cases(CPU_LIKE)]
    assert len(ids) == len(set(ids)) == 71
    assert all(re.fullmatch(r"L[0-5]-[a-z0-9_-]+", case_id) for case_id in ids), ids
    assert "L2-attention-mixed-fp32-bs16-h64-gqa4" in ids
    assert "L2-attention-long-bf16-bs16-h64-gqa2" in ids
    assert "L2-write_kv-fp32-bs16-h64" in ids
    assert "L2-attention-mixed-fp32-kvbf16-bs16-h64-gqa2" in ids


def test_levels_run_from_l0_up_to_the_chosen_one() -> None:
    assert Counter(c.level for c in build_cases(CPU_LIKE, "L2")) == {"L0": 4, "L1": 19, "L2": 36}
    assert {c.level for c in build_cases(CPU_LIKE, "L0")} == {"L0"}


def test_l1_covers_exactly_what_is_advertised() -> None:
    ids = [c.id for c in build_cases(NARROW) if c.level == "L1"]
    assert ids == [
        "L1-capabilities",
        "L1-dtype-bf16",
        "L1-kv-dtype-bf16",
        "L1-kv-dtype-float8_e4m3fn",
        "L1-block-size-16",
        "L1-head-size-64",
        "L1-head-size-128",
    ]
    fp8 = next(c for c in build_cases(NARROW) if c.id == "L1-kv-dtype-float8_e4m3fn")
    # No fp32 activations here: keys arrive in the backend's first dtype.
    assert (fp8.check, fp8.dtype, fp8.kv_dtype, fp8.block_size, fp8.head_size) == (
        "write_kv",
        "bf16",
        "float8_e4m3fn",
        16,
        64,
    )


def test_capabilities_decide_what_is_not_supported() -> None:
    reasons = {c.id: unsupported_reason(c, NARROW) for c in build_cases(NARROW)}
    assert reasons["L2-attention-mixed-fp16-bs16-h64-gqa1"] == (
        "dtype fp16 is not among the backend's dtypes (bf16)"
    )
    assert reasons["L2-write_kv-fp32-bs16-h64"].startswith("dtype fp32 is not among")
    assert reasons["L3-allocate_kv_cache-fp32"] == (
        "KV-cache dtype fp32 is not among bf16, float8_e4m3fn"
    )
    assert reasons["L2-attention-mixed-bf16-bs16-h64-gqa4"] == (
        "new tokens after a cached prefix need prefix_caching, which it does not declare"
    )
    # L1 runs each advertised value in a batch that needs nothing else (no prefix here).
    assert reasons["L1-block-size-16"] == reasons["L1-dtype-bf16"] == ""
    assert reasons["L1-kv-dtype-float8_e4m3fn"] == ""
    assert reasons["L3-allocate_kv_cache-bf16"] == ""
    assert reasons["L4-all_reduce"] == reasons["L5-engine-greedy"] == ""
    assert reasons["L5-engine-prefix-cache"] == "the backend does not declare prefix_caching"


def test_decode_needs_no_prefix_caching() -> None:
    bf16 = replace(NARROW, dtypes=("bf16", "fp32"), kv_cache_dtypes=("bf16", "fp32"))
    by_id = {c.id: c for c in build_cases(bf16)}
    assert unsupported_reason(by_id["L2-attention-decode-fp32-bs16-h64-gqa2"], bf16) == ""
    assert unsupported_reason(by_id["L2-attention-mixed-fp32-bs8-h64-gqa2"], bf16) == (
        "block size 8 is not among 16"
    )
    assert unsupported_reason(by_id["L2-attention-mixed-fp32-bs16-h80-gqa2"], bf16) == (
        "head size 80 is not among 64, 128"
    )
