"""The cuda and rocm backends' probes, capabilities and emulation on a machine without GPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from crossinfer.backend import EMULATE_ENV
from crossinfer.registry import DeviceError, resolve_device
from crossinfer_cuda import CudaBackend
from crossinfer_rocm import RocmBackend


@pytest.fixture
def no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)


def _torch_build(
    monkeypatch: pytest.MonkeyPatch, cuda: str | None, hip: str | None, devices: int
) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


@pytest.mark.usefixtures("no_emulation")
def test_cpu_torch_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_build(monkeypatch, cuda=None, hip=None, devices=0)
    cuda, rocm = CudaBackend().probe(), RocmBackend().probe()
    assert not cuda.available and "built without CUDA" in cuda.reason
    assert "download.pytorch.org/whl/cu" in cuda.reason
    assert not rocm.available and "is not a ROCm build (CPU only)" in rocm.reason
    assert "download.pytorch.org/whl/rocm" in rocm.reason


@pytest.mark.usefixtures("no_emulation")
def test_each_refuses_the_other_vendors_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_build(monkeypatch, cuda=None, hip="6.4.0", devices=1)
    probe = CudaBackend().probe()
    assert not probe.available and "--device rocm" in probe.reason
    _torch_build(monkeypatch, cuda="12.8", hip=None, devices=1)
    probe = RocmBackend().probe()
    assert not probe.available and "(CUDA 12.8)" in probe.reason


@pytest.mark.usefixtures("no_emulation")
def test_right_build_without_devices_and_with_two(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_build(monkeypatch, cuda="12.8", hip=None, devices=0)
    assert "sees no NVIDIA GPU" in CudaBackend().probe().reason
    _torch_build(monkeypatch, cuda=None, hip="6.4.0", devices=0)
    assert "sees no AMD GPU" in RocmBackend().probe().reason
    _torch_build(monkeypatch, cuda=None, hip="6.4.0", devices=2)
    assert RocmBackend().probe().devices == ("rocm:0", "rocm:1")
    _torch_build(monkeypatch, cuda="12.8", hip=None, devices=2)
    probe = CudaBackend().probe()
    assert probe.available and [d.split()[0] for d in probe.devices] == ["cuda:0", "cuda:1"]


@pytest.mark.usefixtures("no_emulation")
def test_device_rocm_fails_with_the_probe_reason() -> None:
    with pytest.raises(DeviceError, match="is not a ROCm build"):
        resolve_device("rocm")
    assert resolve_device("auto").name == "cpu"


def test_hardware_capabilities_suit_each_vendor(no_emulation: None) -> None:
    cuda, rocm = CudaBackend().capabilities(), RocmBackend().capabilities()
    assert (cuda.warp_size, rocm.warp_size) == (32, 64)
    assert cuda.dtypes[0] == rocm.dtypes[0] == torch.bfloat16
    assert cuda.graph_capture and rocm.graph_capture and not cuda.emulated
    assert (cuda.distributed_backend, rocm.distributed_backend) == ("nccl", "nccl")
    assert min(rocm.block_sizes) == 16 and rocm.default_block_size in rocm.block_sizes
    assert rocm.default_block_size * rocm.warp_size >= cuda.default_block_size * cuda.warp_size


@pytest.mark.parametrize("backend_class", [CudaBackend, RocmBackend])
def test_emulation_runs_on_the_cpu_and_says_so(
    monkeypatch: pytest.MonkeyPatch, backend_class: type[CudaBackend | RocmBackend]
) -> None:
    monkeypatch.setenv(EMULATE_ENV, "1")
    backend = backend_class()
    probe, caps = backend.probe(), backend.capabilities()
    assert probe.available and f"emulated {backend.name}" in probe.devices[0]
    assert caps.emulated and not caps.graph_capture and caps.distributed_backend == "gloo"
    assert caps.dtypes[0] == torch.float32
    assert backend.device() == torch.device("cpu")
    assert backend.tiles().dot_fp32
    assert resolve_device(backend.name).name == backend.name


def test_emulation_refuses_when_triton_was_loaded_for_a_gpu() -> None:
    script = (
        "import os, triton.language\n"
        f"os.environ[{EMULATE_ENV!r}] = '1'\n"
        "from crossinfer_cuda import CudaBackend\n"
        "print(CudaBackend().probe().reason)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", EMULATE_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("cannot emulate cuda: triton was imported before emulation")
    assert "export TRITON_INTERPRET=1" in done.stdout


def test_the_suite_sets_the_variable_backends_read() -> None:
    import crossinfer_conformance

    assert crossinfer_conformance.EMULATE_ENV == EMULATE_ENV == "CROSSINFER_EMULATE"
