"""The CPU backend's native decode-attention kernel: built from ``paged_decode.c`` on first use
with the machine's C compiler, cached, and called through ctypes.

Plain C, not a torch C++ extension: no torch headers to compile against, so it builds in
under a second. It is linked against the OpenMP runtime torch already loaded (same soname),
so the kernel's threads are torch's threads.

Nothing here is required: without a compiler, on a platform other than Linux, or with
``CROSSINFER_CPU_NATIVE=0``, :func:`decode_kernel` returns None (``why_unavailable`` says why)
and attention runs in PyTorch alone.
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
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

NATIVE_ENV = "CROSSINFER_CPU_NATIVE"
_SOURCE = "paged_decode.c"
_FLAGS = ("-O3", "-ffast-math", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def decode_kernel() -> Callable[..., int] | None:
    """The compiled ``paged_decode_attention`` function, or None when it cannot be had."""
    return _load()[0]


def why_unavailable() -> str | None:
    return _load()[1]


@functools.cache
def _load() -> tuple[Callable[..., int] | None, str | None]:
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None, f"{NATIVE_ENV}=0"
    if sys.platform != "linux":
        return None, f"native kernels are built on Linux only, not {sys.platform}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found (install gcc, or set CC)"
    source = resources.files("crossinfer_cpu").joinpath(_SOURCE).read_bytes()
    try:
        library = _build(compiler, source)
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"could not build the native kernel: {exc}"
    fn = lib.paged_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, i64]
    fn.argtypes += [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn, None


def _build(compiler: str, source: bytes) -> Path:
    """Compile into the cache (keyed by source, flags, compiler and CPU) unless already there."""
    key = hashlib.sha256(source)
    for part in (*_FLAGS, compiler, platform.machine(), _cpu_flags()):
        key.update(part.encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crossinfer"
    library = cache / f"paged_decode-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        built = Path(tmp) / library.name
        cmd = [compiler, *_FLAGS, str(src), "-o", str(built), "-lm"]
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
    kv_cache: [2, blocks, block_size, kv_heads, head_size] fp32, contiguous;
    block_table: int32 [seqs, blocks], rows contiguous; seq_lens: int32 [seqs].
    """
    kernel = decode_kernel()
    assert kernel is not None, why_unavailable()
    _, num_blocks, block_size, num_kv_heads, head_size = kv_cache.shape
    status = kernel(
        out.data_ptr(),
        out.stride(0),
        query.data_ptr(),
        query.stride(0),
        rows.data_ptr(),
        kv_cache.data_ptr(),
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
