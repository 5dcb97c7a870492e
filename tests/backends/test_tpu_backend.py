"""The tpu backend in the main environment (torch 2.13, no torch-xla): its probe says what to
install, --device tpu fails before loading, and what it declares follows tpu-inference. Its
kernels run in the compat environment (tests/conformance/test_emulated_xla_suites.py)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from crossinfer.backend import EMULATE_ENV, EngineLimits, KVCacheSpec
from crossinfer.registry import DeviceError, resolve_device
from crossinfer_tpu import TpuBackend
from crossinfer_tpu import backend as tpu_module
from crossinfer_xla import static_ops


@pytest.fixture
def no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)


def _installed(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = importlib.util.find_spec

    def find(name: str, *args: Any) -> Any:
        if name in names:
            return object()
        if name in ("torch_xla", "libtpu"):
            return None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find)


@pytest.mark.usefixtures("no_emulation")
def test_probe_names_the_pairing_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch)
    probe = TpuBackend().probe()
    assert not probe.available and "torch-xla is not installed" in probe.reason
    assert "torch-xla 2.8.1 with torch 2.8.0" in probe.reason and torch.__version__ in probe.reason
    _installed(monkeypatch, "torch_xla")
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert "without the TPU runtime (libtpu)" in TpuBackend().probe().reason
    _installed(monkeypatch, "torch_xla", "libtpu")
    monkeypatch.setattr(tpu_module, "tpu_device_files", lambda: [])
    assert "no TPU on this machine" in TpuBackend().probe().reason
    monkeypatch.setattr(tpu_module, "tpu_device_files", lambda: ["/dev/accel0", "/dev/accel1"])
    probe = TpuBackend().probe()
    assert probe.available and probe.devices == ("tpu:0", "tpu:1")


@pytest.mark.usefixtures("no_emulation")
def test_device_tpu_fails_before_loading() -> None:
    with pytest.raises(DeviceError, match="torch-xla is not installed"):
        resolve_device("tpu")


@pytest.mark.usefixtures("no_emulation")
def test_buckets_and_capabilities_follow_tpu_inference() -> None:
    backend = TpuBackend()
    shapes = backend.static_shapes(EngineLimits(2048, 256, 4096, 32))
    assert shapes.token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert shapes.seq_buckets == (8, 16, 32, 64, 128, 256)
    assert shapes.block_table_widths == (128,)
    assert shapes.decode_first and shapes.sample_on_host and shapes.pad_block == 0
    # The budget itself is the last bucket, even off the doubling.
    assert backend.static_shapes(EngineLimits(1000, 100, 512, 16)).token_buckets[-1] == 1000
    caps = backend.capabilities()
    assert caps.dtypes[0] == torch.bfloat16 and caps.distributed_backend == "xla"
    assert caps.native_attention and not caps.emulated and caps.kv_update == "in_place"


def test_the_ragged_attention_layout_round_trips() -> None:
    # [blocks, block_size, 2 * kv_heads, head padded to 128]: each head's K and V interleaved
    layout = TpuBackend.layout
    spec = KVCacheSpec(1, 2, 64, 16, torch.float32)
    assert layout.shape(spec, 5) == (5, 16, 4, 128)
    cache = torch.zeros(layout.shape(spec, 5))
    keys, values = torch.randn(7, 2, 64), torch.randn(7, 2, 64)
    slots = torch.tensor([0, 3, 17, 18, 40, 79, 33])
    static_ops.write_kv(layout, keys, values, cache, slots, in_place=True)
    got_k, got_v = static_ops.read_kv(layout, cache, slots, 64)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert torch.equal(cache[0, 3, 2, :64], keys[1, 1]) and torch.equal(
        cache[0, 3, 3, :64], values[1, 1]
    )
    assert (cache[..., 64:] == 0).all()  # the padding of each head stays zero
