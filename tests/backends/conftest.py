"""An emulated cuda backend: its Triton kernels run under Triton's interpreter on CPU tensors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from crossinfer.backend import EMULATE_ENV
from crossinfer_cuda import CudaBackend


@pytest.fixture(scope="module")
def emulated_cuda() -> Iterator[CudaBackend]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(EMULATE_ENV, "1")  # tests/conftest.py chose Triton's interpreter
        yield CudaBackend()
