"""The CPU backend's native kernels: built from its C sources on first use with the machine's C
compiler, cached, and called through ctypes.

* ``paged_decode.c``: decode attention read in place from the paged cache;
* ``paged_prefill.c``: causal prefill attention read in place from the paged cache (both
  share ``paged.h``);
* ``pointwise.c``: RMSNorm (with the residual add), rotary embedding, SiLU-and-multiply and
  the KV-cache write (to an fp32 or a bf16 cache), each one pass over memory;
* ``quantize.c``: the two ends of an int8 linear layer (activation rows to int8, int32 sums
  back to floats);
* ``int8_gemm.c``: a whole int8 linear layer on AVX-512 VNNI over a weight packed at load
  (the rows quantised, the GEMM, the scales and bias applied in its last step);
* ``int8_amx.c``: the same layer on AMX tiles, over the same packed weight, for calls of 16
  rows or more on a CPU that has AMX (``CROSSINFER_CPU_AMX=0`` keeps them on VNNI).

Plain C, not a torch C++ extension: no torch headers to compile against, so it builds in
about a second. It is linked against the OpenMP runtime torch already loaded (same soname),
so the kernels' threads are torch's threads.

Nothing here is required: without a compiler, on a platform other than Linux, or with
``CROSSINFER_CPU_NATIVE=0``, :func:`library` returns None (``why_unavailable`` says why) and
everything runs in PyTorch alone.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

NATIVE_ENV = "CROSSINFER_CPU_NATIVE"
AMX_ENV = "CROSSINFER_CPU_AMX"  # 0: the int8 layers keep to AVX-512 VNNI on an AMX CPU
_HEADERS = ("paged.h",)  # written beside the sources, not compiled on their own
_SOURCES = (
    "paged_decode.c", "paged_prefill.c", "pointwise.c", "quantize.c", "int8_gemm.c", "int8_amx.c",
)  # fmt: skip
_FLAGS = ("-O3", "-ffast-math", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")

_I64, _PTR, _F32, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
# name -> (argument types, return type); every kernel takes the thread count last
_SIGNATURES: dict[str, tuple[list[type], type | None]] = {
    "paged_decode_attention": (
        [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _INT, _I64, _I64, _I64, _I64, _I64, _PTR, _I64]
        + [_PTR, _I64, _F32, _INT],
        _INT,
    ),
    "paged_prefill_available": ([], _INT),
    "paged_prefill_attention": (
        [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _INT, _I64, _I64, _I64, _I64, _I64, _PTR]
        + [_I64, _PTR, _I64, _F32, _INT],
        _INT,
    ),
    "rms_norm": ([_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _F32, _INT], None),
    "add_rms_norm": ([_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _F32, _INT], None),
    "rotary": ([_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _INT], None),
    "silu_and_mul": ([_PTR, _PTR, _I64, _I64, _I64, _INT], None),
    "write_kv": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _INT], None),
    "write_kv_bf16": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _INT], None),
    "quantize_rows": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _INT], None),
    "dequantize_sums": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _INT], None),
    "int8_gemm_available": ([], _INT),
    "int8_linear": ([_PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _INT], _INT),
    "int8_amx_enable": ([_INT], _INT),
    "int8_amx_wants": ([_I64, _I64], _INT),
}


def library() -> ctypes.CDLL | None:
    """The built library, its functions typed, or None when it cannot be had."""
    return _load()[0]


def why_unavailable() -> str | None:
    return _load()[1]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None, f"{NATIVE_ENV}=0"
    if sys.platform != "linux":
        return None, f"native kernels are built on Linux only, not {sys.platform}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found (install gcc, or set CC)"
    package = resources.files("crossinfer_cpu")
    sources = {name: package.joinpath(name).read_bytes() for name in _HEADERS + _SOURCES}
    try:
        lib = ctypes.CDLL(str(_build(compiler, sources)))
    except subprocess.CalledProcessError as exc:
        errors = exc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        return None, "could not build the native kernels: " + " | ".join(errors or [str(exc)])
    except OSError as exc:
        return None, f"could not build the native kernels: {exc}"
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    lib.int8_amx_enable(int(os.environ.get(AMX_ENV, "1") != "0"))
    return lib, None


def _build(compiler: str, sources: dict[str, bytes]) -> Path:
    """Compile into the cache (keyed by sources, flags, compiler and CPU) unless already there."""
    key = hashlib.sha256()
    for text in sources.values():
        key.update(text)
    for part in (*_FLAGS, compiler, platform.machine(), _cpu_flags()):
        key.update(part.encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crossinfer"
    library = cache / f"crossinfer_cpu-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        paths = []
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
            if name.endswith(".c"):
                paths.append(Path(tmp) / name)
        built = Path(tmp) / library.name
        cmd = [compiler, *_FLAGS, *map(str, paths), "-o", str(built), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(built, library)  # atomic: a concurrent build just replaces it
    return library


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def paged_decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    rows: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """``out[rows]`` = attention of ``query[rows]`` (one token per sequence) over the cache.

    out, query: [tokens, heads, head_size] fp32 with contiguous rows; rows: int64 [seqs];
    kv_cache: [2, blocks, block_size, kv_heads, head_size] fp32 or bf16, contiguous;
    block_table: int32 [seqs, blocks], rows contiguous; seq_lens: int32 [seqs].
    """
    lib = library()
    assert lib is not None, why_unavailable()
    _, num_blocks, block_size, num_kv_heads, head_size = kv_cache.shape
    status = lib.paged_decode_attention(
        out.data_ptr(),
        out.stride(0),
        query.data_ptr(),
        query.stride(0),
        rows.data_ptr(),
        kv_cache.data_ptr(),
        int(kv_cache.dtype == torch.bfloat16),
        num_blocks,
        block_size,
        num_kv_heads,
        head_size,
        query.shape[1],
        block_table.data_ptr(),
        block_table.stride(0),
        seq_lens.data_ptr(),
        rows.shape[0],
        scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its scratch buffers")


def paged_prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    first_rows: torch.Tensor,
    query_lens: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """Causal attention of each sequence's ``query_lens[s]`` query rows (from row
    ``first_rows[s]``, the sequence's last tokens) over its cache, into the same rows of
    ``out``. Layouts as :func:`paged_decode_attention`; first_rows: int64 [seqs], query_lens:
    int32 [seqs]."""
    lib = library()
    assert lib is not None, why_unavailable()
    _, num_blocks, block_size, num_kv_heads, head_size = kv_cache.shape
    status = lib.paged_prefill_attention(
        out.data_ptr(), out.stride(0), query.data_ptr(), query.stride(0), first_rows.data_ptr(),
        query_lens.data_ptr(), kv_cache.data_ptr(), int(kv_cache.dtype == torch.bfloat16),
        num_blocks, block_size, num_kv_heads, head_size, query.shape[1], block_table.data_ptr(),
        block_table.stride(0), seq_lens.data_ptr(), first_rows.shape[0], scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if status == -1:
        raise MemoryError("paged prefill attention could not allocate its scratch buffers")
    if status != 0:
        raise ValueError(f"paged prefill attention does not take this shape ({status})")
