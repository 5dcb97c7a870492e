"""CudaBackend: NVIDIA GPUs. Kernels come from crossinfer_triton; this file says how to find
the devices and how to size the launch for them."""

from __future__ import annotations

import torch

from crossinfer.backend import Capabilities, Probe
from crossinfer_triton import AttentionTiles, TritonBackend
from crossinfer_triton.devices import visible_device_count
from crossinfer_triton.graphs import Capture, device_graph_capture

INSTALL_HINT = (
    "install the CUDA build of torch (pip install torch --index-url "
    "https://download.pytorch.org/whl/cu128) and an NVIDIA driver"
)


class CudaBackend(TritonBackend):
    """NVIDIA GPUs: Triton paged attention, NCCL collectives, CUDA graphs for decode."""

    name = "cuda"

    def hardware_probe(self) -> Probe:
        if torch.version.hip:
            return Probe(
                False,
                f"torch {torch.__version__} is a ROCm (HIP) build; for AMD GPUs use "
                f"--device rocm, for NVIDIA GPUs {INSTALL_HINT}",
            )
        if not torch.version.cuda:
            return Probe(False, f"torch {torch.__version__} was built without CUDA; {INSTALL_HINT}")
        count = visible_device_count(torch.cuda)
        if count == 0:
            return Probe(
                False,
                f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no NVIDIA GPU: "
                "check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES",
            )
        return Probe(True, devices=nvidia_device_names(count))

    def hardware_capabilities(self) -> Capabilities:
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            block_sizes=(1, 8, 16, 32, 64, 128),
            head_sizes=(32, 64, 80, 96, 128, 256),
            prefix_caching=True,
            graph_capture=True,
            distributed_backend="nccl",
            default_block_size=16,
            warp_size=32,
        )

    def hardware_tiles(self) -> AttentionTiles:
        # 16-row decode tiles feed the tensor cores' smallest MMA; 64-key tiles keep a warp's
        # loads of a 16-token block's rows in flight.
        return AttentionTiles(block_m=16, block_m_prefill=64, block_n=64, num_warps=4)

    def graph_capture(self) -> Capture:
        return device_graph_capture(torch.cuda, torch.cuda.CUDAGraph)


def nvidia_device_names(count: int) -> tuple[str, ...]:
    """Model names from the driver's /proc files (no CUDA context needed), else cuda:N."""
    from pathlib import Path

    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text().splitlines():
            if line.startswith("Model:"):
                names.append(line.partition(":")[2].strip())
    if len(names) != count:  # CUDA_VISIBLE_DEVICES hides some: do not guess which
        return tuple(f"cuda:{i}" for i in range(count))
    return tuple(f"cuda:{i} {name}" for i, name in enumerate(names))
