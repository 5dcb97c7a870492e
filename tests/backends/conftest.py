"""Fixtures of the backend tests: an emulated cuda backend (its Triton kernels run under
Triton's interpreter on CPU tensors), and the CPU backend with and without its native kernels."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from crossinfer.backend import EMULATE_ENV
from crossinfer_cpu import native
from crossinfer_cuda import CudaBackend


@pytest.fixture(scope="module")
def emulated_cuda() -> Iterator[CudaBackend]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(EMULATE_ENV, "1")  # tests/conftest.py chose Triton's interpreter
        yield CudaBackend()


@pytest.fixture(params=["native", "pytorch"])
def cpu_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the CPU backend's native kernels, then with PyTorch alone."""
    if request.param == "native" and native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    if request.param == "pytorch":
        monkeypatch.setattr(native, "library", lambda: None)
    return str(request.param)
