"""XpuBackend: Intel GPUs through torch.xpu. Kernels come from crossinfer_triton (Intel's
Triton backend compiles them for Xe GPUs); this file says how to find the devices, what they
take, and how to size the launch for them.

Unverified until it runs on Intel hardware: the kernels compiled by Intel's Triton (with DPAS
for tl.dot), the tiles' performance, xccl collectives, XPU graphs, the memory figures.
"""

from __future__ import annotations

import os

import torch

from crossinfer.backend import Capabilities, Probe
from crossinfer_triton import AttentionTiles, TritonBackend
from crossinfer_triton.devices import visible_device_count
from crossinfer_triton.graphs import Capture, device_graph_capture
from crossinfer_xpu.devices import xpu_device_names

INSTALL_HINT = (
    "install the XPU build of torch from PyTorch's XPU wheel index (pip install torch "
    "--index-url https://download.pytorch.org/whl/xpu) and Intel's GPU driver"
)
GRAPHS_ENV = "CROSSINFER_XPU_GRAPHS"
"""Set to "1" to capture decode steps as XPU graphs (off by default: not yet verified)."""


class XpuBackend(TritonBackend):
    """Intel GPUs: Triton paged attention, xccl collectives; XPU graphs only when asked."""

    name = "xpu"
    torch_device_type = "xpu"

    def hardware_probe(self) -> Probe:
        version = getattr(torch.version, "xpu", None)
        if not version:
            other = "CUDA" if torch.version.cuda else "ROCm" if torch.version.hip else None
            built = f"a {other} build" if other else "CPU only"
            return Probe(
                False,
                f"torch {torch.__version__} was built without XPU ({built}); {INSTALL_HINT}",
            )
        count = visible_device_count(torch.xpu)
        if count == 0:
            return Probe(
                False,
                f"torch {torch.__version__} (XPU {version}) sees no Intel GPU: check the GPU "
                "driver and Level Zero (xpu-smi discovery), and ZE_AFFINITY_MASK / "
                "ONEAPI_DEVICE_SELECTOR",
            )
        return Probe(True, devices=xpu_device_names(count))

    def hardware_capabilities(self) -> Capabilities:
        dtypes = (torch.bfloat16, torch.float16)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            # DPAS works on sub-groups of 16: blocks, like every tile, are multiples of 16.
            block_sizes=(16, 32, 64, 128),
            head_sizes=(32, 64, 80, 96, 128, 256),
            prefix_caching=True,
            graph_capture=os.environ.get(GRAPHS_ENV) == "1" and hasattr(torch.xpu, "XPUGraph"),
            distributed_backend="xccl",
            default_block_size=64,
            warp_size=16,
        )

    def hardware_tiles(self) -> AttentionTiles:
        # Intel's Triton lowers tl.dot to DPAS on sub-groups of 16 lanes (its
        # threads_per_warp): 16-row decode tiles and 64-key tiles are whole DPAS shapes.
        return AttentionTiles(
            block_m=16, block_m_prefill=64, block_n=64, num_warps=4, threads_per_warp=16
        )

    def graph_capture(self) -> Capture | None:
        if not hasattr(torch.xpu, "XPUGraph"):
            return None
        return device_graph_capture(torch.xpu, torch.xpu.XPUGraph)

    def compute_units(self, properties: object) -> int:
        # Xe-cores (sub-slices) run the work-groups; older runtimes report EUs only.
        count = getattr(properties, "gpu_subslice_count", 0)
        return int(count or getattr(properties, "max_compute_units"))  # noqa: B009
