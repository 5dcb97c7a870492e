"""The neuron backend in the main environment (torch 2.13, no torch-xla, no torch-neuronx):
its probe in each state a machine can be in, --device neuron failing before loading, what it
declares following Neuron's conventions, and its cache layout. Its kernels run in the compat
environment (tests/conformance/test_emulated_xla_suites.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from crossinfer.backend import EMULATE_ENV, AttentionBatch, EngineLimits, KVCacheSpec
from crossinfer.registry import DeviceError, resolve_device
from crossinfer_neuron import NeuronBackend, probe
from crossinfer_xla import SPLIT, KVLayout, static_ops

# PyPI's torch-neuronx 1.0, as it ships: one __init__.py that refuses to be imported.
PLACEHOLDER = (
    'raise ImportError("WRONG PACKAGE. Please install the package from Neuron Repository - '
    'pip.repos.neuron.amazonaws.com")\n'
)


@pytest.fixture
def no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)


def _package(root: Path, name: str, init: str, *modules: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(init)
    for module in modules:
        (folder / f"{module}.py").write_text("")


def _on_path(monkeypatch: pytest.MonkeyPatch, root: Path, *hidden: str) -> None:
    """``root`` first on sys.path; ``hidden`` modules not installed at all."""
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    real = importlib.util.find_spec

    def find(name: str, *args: Any) -> Any:
        return None if name in hidden else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find)


@pytest.mark.usefixtures("no_emulation")
def test_probe_without_torch_neuronx_says_where_it_comes_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _on_path(monkeypatch, tmp_path, "torch_neuronx", "torch_xla")
    got = NeuronBackend().probe()
    assert not got.available
    assert got.reason.startswith("torch-neuronx is not installed; it comes from the AWS Neuron")
    assert "not PyPI" in got.reason and "pip.repos.neuron.amazonaws.com" in got.reason


@pytest.mark.usefixtures("no_emulation")
def test_probe_names_the_pypi_placeholder_without_importing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _package(tmp_path, "torch_neuronx", PLACEHOLDER)
    _on_path(monkeypatch, tmp_path)
    with pytest.raises(ImportError, match="WRONG PACKAGE"):  # what importing it would do
        importlib.import_module("torch_neuronx")
    monkeypatch.delitem(sys.modules, "torch_neuronx", raising=False)
    got = NeuronBackend().probe()
    assert not got.available and "PyPI's placeholder" in got.reason
    assert "uninstall it and install it from the AWS Neuron repository" in got.reason
    assert "torch_neuronx" not in sys.modules  # discovery did not import it


@pytest.mark.usefixtures("no_emulation")
def test_probe_with_torch_neuronx_and_no_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _package(tmp_path, "torch_neuronx", "", "xla_impl", "trace")
    _package(tmp_path, "torch_xla", "", "runtime")
    _on_path(monkeypatch, tmp_path)
    monkeypatch.setattr(probe, "neuron_device_files", lambda: [])
    got = NeuronBackend().probe()
    assert not got.available and got.reason.startswith("no Neuron device on this machine")
    assert "CROSSINFER_EMULATE=1" in got.reason
    monkeypatch.setattr(probe, "neuron_device_files", lambda: ["/dev/neuron0", "/dev/neuron1"])
    got = NeuronBackend().probe()
    assert got.available and got.devices == ("neuron:0", "neuron:1")
    assert "torch_neuronx" not in sys.modules and "torch_xla" not in sys.modules


def test_device_nodes_sort_by_number(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = ["/dev/neuron10", "/dev/neuron2", "/dev/neuron0"]
    monkeypatch.setattr(probe.glob, "glob", lambda pattern: nodes)
    assert probe.neuron_device_files() == ["/dev/neuron0", "/dev/neuron2", "/dev/neuron10"]


@pytest.mark.usefixtures("no_emulation")
def test_device_neuron_fails_before_loading() -> None:
    with pytest.raises(DeviceError, match="torch-neuronx is not installed"):
        resolve_device("neuron")


@pytest.mark.usefixtures("no_emulation")
def test_buckets_and_capabilities_follow_neuron() -> None:
    backend = NeuronBackend()
    shapes = backend.static_shapes(EngineLimits(1024, 32, 4096, 32))
    assert shapes.token_buckets == (128, 256, 512, 1024)  # prefill: from 128, doubling
    assert shapes.seq_buckets == shapes.decode_buckets == (1, 2, 4, 8, 16, 32)
    assert shapes.block_table_widths == (128,)
    assert shapes.split_prefill_decode and shapes.sample_on_host and shapes.pad_block == 0
    assert backend.static_shapes(EngineLimits(64, 8, 256, 16)).token_buckets == (64,)
    assert backend.static_shapes(EngineLimits(1000, 6, 512, 16)).token_buckets[-1] == 1000
    caps = backend.capabilities()
    assert caps.dtypes == (torch.bfloat16, torch.float16) and caps.distributed_backend == "xla"
    assert not caps.emulated and not caps.native_attention and caps.kv_update == "in_place"


def test_memory_from_the_runtime_then_the_fallback(
    monkeypatch: pytest.MonkeyPatch, no_emulation: None
) -> None:
    from crossinfer_neuron import backend as neuron_module

    monkeypatch.setattr(neuron_module, "runtime_memory_stats", lambda: (3 << 30, 13 << 30))
    info = NeuronBackend().memory_info()
    assert (info.total_bytes, info.free_bytes) == (16 << 30, 13 << 30)
    assert NeuronBackend().fallback_memory_bytes() == 16 << 30  # a NeuronCore-v2's HBM


def test_the_compile_cache_is_neurons(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_emulation: None
) -> None:
    monkeypatch.delenv("NEURON_COMPILE_CACHE_URL", raising=False)
    NeuronBackend().set_compile_cache_dir(str(tmp_path / "neff"))
    assert (tmp_path / "neff").is_dir()
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == str(tmp_path / "neff")
    NeuronBackend().set_compile_cache_dir(str(tmp_path / "other"))  # a user's setting wins
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == str(tmp_path / "neff")


def test_the_heads_first_layout_holds_what_the_split_layout_holds() -> None:
    # (2, blocks, kv_heads, block_size, head), vllm-neuron's; attention equal to the other two
    layout = NeuronBackend.layout
    spec = KVCacheSpec(1, 2, 64, 16, torch.float32)
    assert layout.shape(spec, 5) == (2, 5, 2, 16, 64)
    layouts = [layout, SPLIT, KVLayout(combined=True, head_multiple=128)]
    caches = [torch.zeros(lay.shape(spec, 5)) for lay in layouts]
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(40, 2, 64, generator=gen), torch.randn(40, 2, 64, generator=gen)
    slots = torch.randperm(80, generator=gen)[:40]
    for lay, cache in zip(layouts, caches, strict=True):
        static_ops.write_kv(lay, keys, values, cache, slots, in_place=True)
        got_k, got_v = static_ops.read_kv(lay, cache, slots, 64)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    block, offset = int(slots[3]) // 16, int(slots[3]) % 16
    assert torch.equal(caches[0][0, block, 1, offset], keys[3, 1])
    assert torch.equal(caches[0][1, block, 0, offset], values[3, 0])
    batch = AttentionBatch(
        query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32),
        seq_lens=torch.tensor([20, 9], dtype=torch.int32),
        block_table=torch.tensor([[4, 1], [2, 0]], dtype=torch.int32),
        slot_mapping=torch.zeros(4, dtype=torch.int64),
        max_query_len=3,
        max_seq_len=20,
        query_lens_cpu=(3, 1),
        seq_lens_cpu=(20, 9),
    )
    query = torch.randn(4, 4, 64, generator=gen)
    outs = [
        static_ops.attention(lay, query, c, batch, 0.125)
        for lay, c in zip(layouts, caches, strict=True)
    ]
    assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], outs[2], atol=1e-6)
    copied = [c.clone() for c in caches]
    for lay, cache in zip(layouts, copied, strict=True):
        static_ops.copy_blocks(lay, [cache], torch.tensor([[4, 3], [1, 0]]))
        got_k, _ = static_ops.read_kv(lay, cache, torch.arange(48, 64), 64)
        want_k, _ = static_ops.read_kv(lay, cache, torch.arange(64, 80), 64)
        assert torch.equal(got_k, want_k)
