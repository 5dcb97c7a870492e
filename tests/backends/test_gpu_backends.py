"""The cuda, rocm and xpu backends' probes, capabilities and emulation on a machine without
GPUs, and the shared Triton base reaching each device only through torch's device module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from crossinfer.backend import EMULATE_ENV
from crossinfer.registry import DeviceError, resolve_device
from crossinfer_cuda import CudaBackend
from crossinfer_rocm import RocmBackend
from crossinfer_triton import graphs
from crossinfer_xpu import XpuBackend
from crossinfer_xpu.devices import xpu_device_names


@pytest.fixture
def no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)


def _torch_build(
    monkeypatch: pytest.MonkeyPatch,
    cuda: str | None,
    hip: str | None,
    devices: int,
    xpu: str | None = None,
) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "xpu", xpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices if cuda or hip else 0)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: devices if xpu else 0)


@pytest.mark.usefixtures("no_emulation")
def test_cpu_torch_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_build(monkeypatch, cuda=None, hip=None, devices=0)
    cuda, rocm = CudaBackend().probe(), RocmBackend().probe()
    assert not cuda.available and "built without CUDA" in cuda.reason
    assert "download.pytorch.org/whl/cu" in cuda.reason
    assert not rocm.available and "is not a ROCm build (CPU only)" in rocm.reason
    assert "download.pytorch.org/whl/rocm" in rocm.reason
    xpu = XpuBackend().probe()
    assert not xpu.available and "was built without XPU (CPU only)" in xpu.reason
    assert "PyTorch's XPU wheel index" in xpu.reason and "whl/xpu" in xpu.reason


@pytest.mark.usefixtures("no_emulation")
def test_each_refuses_the_other_vendors_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_build(monkeypatch, cuda=None, hip="6.4.0", devices=1)
    probe = CudaBackend().probe()
    assert not probe.available and "--device rocm" in probe.reason
    _torch_build(monkeypatch, cuda="12.8", hip=None, devices=1)
    probe = RocmBackend().probe()
    assert not probe.available and "(CUDA 12.8)" in probe.reason
    probe = XpuBackend().probe()
    assert not probe.available and "built without XPU (a CUDA build)" in probe.reason
    _torch_build(monkeypatch, cuda=None, hip=None, devices=1, xpu="20250101")
    assert "built without CUDA" in CudaBackend().probe().reason


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
@pytest.mark.usefixtures("no_emulation")
def test_xpu_build_without_devices_and_with_two(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _torch_build(monkeypatch, cuda=None, hip=None, devices=0, xpu="20250101")
    probe = XpuBackend().probe()
    assert not probe.available and "(XPU 20250101) sees no Intel GPU" in probe.reason
    assert "ZE_AFFINITY_MASK" in probe.reason
    _torch_build(monkeypatch, cuda=None, hip=None, devices=2, xpu="20250101")
    probe = XpuBackend().probe()
    assert probe.available and [d.split()[0] for d in probe.devices] == ["xpu:0", "xpu:1"]
    # Names come from the PCI ids in sysfs when they account for every device.
    for slot, vendor, ident in [("0000:3a:00.0", "0x8086", "0x0bd5"), ("0000:9a:00.0", "0x8086",
                                "0xe20b"), ("0000:00:02.0", "0x1002", "0x73bf")]:  # fmt: skip
        device = tmp_path / slot
        device.mkdir()
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text("0x038000\n")
        (device / "device").write_text(ident + "\n")
    assert xpu_device_names(2, tmp_path) == (
        "xpu:0 Intel Data Center GPU Max 1550",
        "xpu:1 Intel Arc B580",
    )
    assert xpu_device_names(3, tmp_path) == ("xpu:0", "xpu:1", "xpu:2")


@pytest.mark.usefixtures("no_emulation")
def test_device_rocm_and_xpu_fail_with_the_probe_reason() -> None:
    with pytest.raises(DeviceError, match="is not a ROCm build"):
        resolve_device("rocm")
    with pytest.raises(DeviceError, match="built without XPU"):
        resolve_device("xpu")
    assert resolve_device("auto").name == "cpu"


def test_hardware_capabilities_suit_each_vendor(no_emulation: None) -> None:
    cuda, rocm = CudaBackend().capabilities(), RocmBackend().capabilities()
    xpu = XpuBackend().capabilities()
    assert (cuda.warp_size, rocm.warp_size, xpu.warp_size) == (32, 64, 16)
    assert xpu.dtypes == (torch.bfloat16, torch.float16) and xpu.distributed_backend == "xccl"
    assert all(size % 16 == 0 for size in (*xpu.block_sizes, *xpu.head_sizes))
    assert xpu.default_block_size == 64 and not xpu.graph_capture  # off until verified
    tiles = XpuBackend().tiles()
    assert all(t % 16 == 0 for t in (tiles.block_m, tiles.block_m_prefill, tiles.block_n))
    assert tiles.launch_options() == {"num_warps": 4, "threads_per_warp": 16}
    assert CudaBackend().tiles().launch_options() == {"num_warps": 4}  # NVIDIA's Triton refuses it
    assert cuda.dtypes[0] == rocm.dtypes[0] == torch.bfloat16
    assert cuda.graph_capture and rocm.graph_capture and not cuda.emulated
    assert (cuda.distributed_backend, rocm.distributed_backend) == ("nccl", "nccl")
    assert min(rocm.block_sizes) == 16 and rocm.default_block_size in rocm.block_sizes
    assert rocm.default_block_size * rocm.warp_size >= cuda.default_block_size * cuda.warp_size


@pytest.mark.parametrize("backend_class", [CudaBackend, RocmBackend, XpuBackend])
def test_emulation_runs_on_the_cpu_and_says_so(
    monkeypatch: pytest.MonkeyPatch, backend_class: type[CudaBackend | RocmBackend | XpuBackend]
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


def test_xpu_graphs_only_when_asked(monkeypatch: pytest.MonkeyPatch, no_emulation: None) -> None:
    assert not XpuBackend().capabilities().graph_capture
    monkeypatch.setenv("CROSSINFER_XPU_GRAPHS", "1")
    assert XpuBackend().capabilities().graph_capture == hasattr(torch.xpu, "XPUGraph")


# -- the shared Triton base is device-agnostic -------------------------------------------

TRITON_PACKAGE = Path(__file__).resolve().parents[2] / "backends" / "triton" / "crossinfer_triton"


def _names_torch_cuda(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        attribute = (
            isinstance(node, ast.Attribute)
            and node.attr == "cuda"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        )
        imports = isinstance(node, ast.ImportFrom) and (
            (node.module or "").startswith("torch.cuda")
            or (node.module == "torch" and any(a.name == "cuda" for a in node.names))
        )
        imports |= isinstance(node, ast.Import) and any(
            a.name.startswith("torch.cuda") for a in node.names
        )
        if attribute or imports:
            lines.append(node.lineno)  # type: ignore[attr-defined]
    return lines


def test_the_triton_base_never_names_torch_cuda() -> None:
    """The vendor packages hand in their device module and graph type; the shared code
    reaches the device only through torch.get_device_module(torch_device_type)."""
    files = sorted(TRITON_PACKAGE.glob("*.py"))
    assert len(files) >= 6
    hits = {f.name: lines for f in files if (lines := _names_torch_cuda(ast.parse(f.read_text())))}
    assert hits == {}
    assert _names_torch_cuda(ast.parse("import torch\nx = torch.cuda.current_device()"))
    assert _names_torch_cuda(ast.parse("from torch.cuda import graph"))
    assert _names_torch_cuda(ast.parse("from torch import cuda"))


class FakeDeviceModule:
    """torch.<device> as the base uses it, recording what it is asked."""

    def __init__(self, free: int | None = 3 << 30) -> None:
        self.calls: list[str] = []
        self.free = free

    def current_device(self) -> int:
        return 1

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        self.calls.append(f"mem_get_info({device})")
        if self.free is None:
            raise RuntimeError("not supported by this runtime")
        return self.free, 8 << 30

    def get_device_properties(self, device: torch.device) -> Any:
        return SimpleNamespace(total_memory=8 << 30, gpu_subslice_count=56, max_compute_units=448)

    def memory_reserved(self, device: torch.device) -> int:
        return 1 << 30

    def synchronize(self, device: torch.device) -> None:
        self.calls.append(f"synchronize({device})")


@pytest.mark.usefixtures("no_emulation")
def test_the_base_reaches_the_device_through_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDeviceModule()
    monkeypatch.setattr(XpuBackend, "device_module", property(lambda self: fake))
    backend = XpuBackend()
    assert backend.device() == torch.device("xpu", 1)
    memory = backend.memory_info()
    assert (memory.total_bytes, memory.free_bytes) == (8 << 30, 3 << 30)
    assert backend.num_cores() == 56  # Xe-cores
    backend.synchronize()
    assert fake.calls == ["mem_get_info(xpu:1)", "synchronize(xpu:1)"]
    assert torch.get_device_module(XpuBackend.torch_device_type) is torch.xpu


@pytest.mark.usefixtures("no_emulation")
def test_memory_without_mem_get_info_falls_back_to_the_total(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeDeviceModule(free=None)
    monkeypatch.setattr(XpuBackend, "device_module", property(lambda self: fake))
    memory = XpuBackend().memory_info()
    assert (memory.total_bytes, memory.free_bytes) == (8 << 30, 7 << 30)  # less what is reserved


def test_device_graph_capture_uses_the_vendor_module_and_graph_type() -> None:
    calls: list[str] = []

    class Stream:
        def wait_stream(self, other: object) -> None:
            calls.append("wait_stream")

    class Graph:
        def pool(self) -> str:
            return "pool-0"

        def replay(self) -> None:
            calls.append("replay")

    side_stream = Stream

    class Module:
        Stream = side_stream

        @staticmethod
        def current_stream() -> Stream:
            return side_stream()

        @staticmethod
        def stream(stream: Stream) -> Any:
            calls.append("on side stream")
            return _nothing()

        @staticmethod
        def graph(graph: Graph, pool: object = None) -> Any:
            calls.append(f"graph(pool={pool})")
            return _nothing()

    capture = graphs.device_graph_capture(Module, Graph)  # type: ignore[arg-type]
    out, replay = capture(lambda: torch.ones(2))
    out2, _ = capture(lambda: torch.zeros(2))
    replay()
    assert torch.equal(out, torch.ones(2)) and torch.equal(out2, torch.zeros(2))
    assert calls == [
        "wait_stream", "on side stream", "wait_stream", "graph(pool=None)",
        "wait_stream", "on side stream", "wait_stream", "graph(pool=pool-0)",  # one shared pool
        "replay",
    ]  # fmt: skip


class _nothing:  # noqa: N801 -- a context manager that does nothing
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None
