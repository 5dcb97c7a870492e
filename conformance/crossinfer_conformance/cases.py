"""Every case of the suite, as data: level, check, dtype, shapes, parameters and a readable id.

Most cases are the same for every backend, so reports line up in one matrix; L1 is built
from what the backend advertises. Whether the backend supports a case is decided here, from
its Capabilities, before the case runs. No torch: the pytest process imports this.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from crossinfer_conformance import LEVELS
from crossinfer_conformance.info import CapsInfo

KV_HEADS = 2
"""KV heads of every kernel case; query heads are ``KV_HEADS * gqa``."""

Seqs = tuple[tuple[int, int], ...]
"""Per sequence: (tokens already in the cache, new tokens this step)."""

SHAPES: MappingProxyType[str, Seqs] = MappingProxyType(
    {
        # Two whole prompts, nothing cached.
        "prefill": ((0, 7), (0, 19)),
        # New tokens after a cached prefix: one ending on a block boundary, one mid-block.
        "prefix": ((16, 5), (37, 11)),
        # One token each: the first token of a sequence, a token opening a new block.
        "decode": ((0, 1), (5, 1), (16, 1), (40, 1)),
        # What the engine sends: a prefill, decodes and a chunk after a cached prefix.
        "mixed": ((0, 9), (21, 1), (30, 6), (47, 1)),
        # The same without the chunk, for backends that declare no prefix caching.
        "prefill_decode": ((0, 9), (21, 1), (47, 1)),
        # Hundreds of tokens of context, the last block partly filled.
        "long": ((300, 1), (270, 13)),
    }
)


@dataclass(frozen=True)
class Case:
    """One check with its parameters. Fields a check does not use stay empty / zero."""

    id: str
    """Readable and unique, e.g. ``L2-attention-mixed-fp32-bs16-h64-gqa4``; ``-k`` filters it."""
    level: str
    check: str
    """Name of the check function (crossinfer_conformance.checks.CHECKS)."""
    dtype: str = ""
    """Activation dtype, short name (fp32, bf16, fp16)."""
    kv_dtype: str = ""
    """KV-cache dtype when it differs from ``dtype`` (or when only the cache has one)."""
    block_size: int = 0
    head_size: int = 0
    gqa: int = 0
    """Query heads per KV head."""
    seqs: Seqs = ()

    @property
    def num_heads(self) -> int:
        return KV_HEADS * self.gqa

    @property
    def cache_dtype(self) -> str:
        return self.kv_dtype or self.dtype

    def params(self) -> dict[str, object]:
        """The parameters that are set, for the report."""
        named: dict[str, object] = {
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "block_size": self.block_size,
            "head_size": self.head_size,
            "gqa": self.gqa,
            "num_kv_heads": KV_HEADS if self.gqa else 0,
            "seqs": [list(s) for s in self.seqs],
        }
        return {key: value for key, value in named.items() if value}


def attention_case(
    case_id: str, level: str, variant: str, dtype: str, block_size: int, head: int, gqa: int
) -> Case:
    """An attention case over the named shape (a key of :data:`SHAPES`)."""
    return Case(case_id, level, "attention", dtype, "", block_size, head, gqa, SHAPES[variant])


def build_cases(caps: CapsInfo, max_level: str = "L5") -> list[Case]:
    """Every case of levels L0 up to ``max_level``, in running order."""
    builders = {
        "L0": _discovery,
        "L1": _capabilities,
        "L2": _kernels,
        "L3": _memory,
        "L4": _collectives,
        "L5": _engine,
    }
    wanted = LEVELS[: LEVELS.index(max_level) + 1]
    return [case for level in wanted for case in builders[level](caps)]


def unsupported_reason(case: Case, caps: CapsInfo) -> str:
    """Why the backend's Capabilities rule this case out; "" when they do not."""
    if case.dtype and case.dtype not in caps.dtypes:
        return f"dtype {case.dtype} is not among the backend's dtypes ({_names(caps.dtypes)})"
    kv = case.cache_dtype
    if kv and kv not in caps.kv_cache_dtypes:
        return f"KV-cache dtype {kv} is not among {_names(caps.kv_cache_dtypes)}"
    if case.block_size and case.block_size not in caps.block_sizes:
        return f"block size {case.block_size} is not among {_names(caps.block_sizes)}"
    if case.head_size and case.head_size not in caps.head_sizes:
        return f"head size {case.head_size} is not among {_names(caps.head_sizes)}"
    if not caps.prefix_caching and any(cached and new > 1 for cached, new in case.seqs):
        return "new tokens after a cached prefix need prefix_caching, which it does not declare"
    if not caps.prefix_caching and case.check == "engine_prefix_cache":
        return "the backend does not declare prefix_caching"
    if case.check.startswith("static_") and not caps.static_shapes:
        return "a dynamic backend: it declares no static shapes"
    if case.check == "native_attention" and not caps.native_attention:
        return (
            "its attention kernel runs only on the hardware; this run uses the reference "
            "static-shape ops in its place"
        )
    return ""


def _names(values: tuple[object, ...]) -> str:
    return ", ".join(map(str, values)) or "none"


def _head(caps: CapsInfo) -> int:
    return 64 if 64 in caps.head_sizes or not caps.head_sizes else caps.head_sizes[0]


def _base_dtype(caps: CapsInfo) -> str:
    return "fp32" if "fp32" in caps.dtypes or not caps.dtypes else caps.dtypes[0]


def _discovery(_caps: CapsInfo) -> list[Case]:
    return [
        Case(f"L0-{name.replace('_', '-')}", "L0", name)
        for name in ("entry_point", "api_version", "probe_cheap", "probe_honest")
    ]


def _capabilities(caps: CapsInfo) -> list[Case]:
    head, dtype, bs = _head(caps), _base_dtype(caps), caps.default_block_size
    # L1 asks whether each advertised value runs, so its batch asks for nothing more.
    shape = "mixed" if caps.prefix_caching else "prefill_decode"
    cases = [Case("L1-capabilities", "L1", "capabilities")]
    cases += [attention_case(f"L1-dtype-{d}", "L1", shape, d, bs, head, 2) for d in caps.dtypes]
    for kv in caps.kv_cache_dtypes:
        # The contract has no separate KV dtype for activations: keys arrive in an activation
        # dtype, the backend's own if it has one of the same name.
        act = kv if kv in caps.dtypes else dtype
        cases.append(Case(f"L1-kv-dtype-{kv}", "L1", "write_kv", act, kv, bs, head))
    cases += [
        attention_case(f"L1-block-size-{b}", "L1", shape, dtype, b, head, 2)
        for b in caps.block_sizes
    ]
    cases += [
        attention_case(f"L1-head-size-{h}", "L1", shape, dtype, bs, h, 2) for h in caps.head_sizes
    ]
    return cases


def _kernels(_caps: CapsInfo) -> list[Case]:
    grid: list[tuple[str, str, int, int, int]] = [
        (variant, "fp32", 16, 64, gqa)
        for variant in ("prefill", "prefix", "decode", "mixed")
        for gqa in (1, 2, 4)
    ]
    grid += [("mixed", dtype, 16, 64, gqa) for dtype in ("bf16", "fp16") for gqa in (1, 4)]
    grid += [("mixed", "fp32", bs, 64, 2) for bs in (1, 8, 32)]
    grid += [("mixed", "fp32", 16, head, 2) for head in (80, 128)]
    grid += [("long", dtype, 16, 64, 2) for dtype in ("fp32", "bf16")]
    cases = [
        attention_case(f"L2-attention-{v}-{d}-bs{bs}-h{h}-gqa{g}", "L2", v, d, bs, h, g)
        for v, d, bs, h, g in grid
    ]
    writes = [(d, 16, 64) for d in ("fp32", "bf16", "fp16")] + [("fp32", 1, 64), ("fp32", 8, 128)]
    cases += [
        Case(f"L2-write_kv-{d}-bs{bs}-h{h}", "L2", "write_kv", d, "", bs, h) for d, bs, h in writes
    ]
    copies = [("fp32", 16, 64), ("bf16", 16, 64), ("fp32", 8, 128)]
    cases += [
        Case(f"L2-copy_blocks-{d}-bs{bs}-h{h}", "L2", "copy_blocks", d, "", bs, h)
        for d, bs, h in copies
    ]
    mixed = SHAPES["mixed"]
    # A cache narrower than the activations (--kv-cache-dtype): keys and values are stored in
    # the cache's dtype and attention reads them back; the reference reads what was stored.
    cases += [
        Case(f"L2-attention-{v}-fp32-kvbf16-bs16-h64-gqa2", "L2", "attention", "fp32", "bf16",
             16, 64, 2, SHAPES[v])
        for v in ("mixed", "long")
    ]  # fmt: skip
    cases += [
        Case("L2-native-attention-mixed-fp32-bs16-h64-gqa2", "L2", "native_attention",
             "fp32", "", 16, 64, 2, mixed),
        # Compiled-graph backends (static shapes): the engine's padded form of a batch.
        Case("L2-static-padded-mixed-fp32-bs16-h64-gqa2", "L2", "static_padded",
             "fp32", "", 16, 64, 2, mixed),
        Case("L2-static-sink-mixed-fp32-bs16-h64", "L2", "static_sink", "fp32", "", 16, 64, 0,
             mixed),
    ]  # fmt: skip
    return cases


def _memory(caps: CapsInfo) -> list[Case]:
    head, bs = _head(caps), caps.default_block_size
    return [
        Case("L3-memory_info", "L3", "memory_info"),
        Case("L3-allocate_kv_cache-fp32", "L3", "allocate_kv_cache", "", "fp32", bs, head),
        Case("L3-allocate_kv_cache-bf16", "L3", "allocate_kv_cache", "", "bf16", bs, head),
        Case("L3-free_memory", "L3", "free_memory", "", "", bs, head),
    ]


def _collectives(_caps: CapsInfo) -> list[Case]:
    return [
        Case(f"L4-{op}", "L4", op) for op in ("all_reduce", "all_gather", "broadcast", "barrier")
    ]


def _engine(_caps: CapsInfo) -> list[Case]:
    cases = [
        Case(f"L5-engine-{name.replace('_', '-')}", "L5", f"engine_{name}")
        for name in ("greedy", "prefix_cache", "preemption")
    ]
    return [*cases, Case("L5-static-no-recompile", "L5", "static_no_recompile")]
