"""RocmBackend: AMD Instinct and Radeon GPUs. The ROCm build of torch keeps the torch.cuda API
(devices are "cuda:N", RCCL answers to the "nccl" process-group name), so the Triton kernels
and the graph capture of crossinfer_triton apply as they are; what differs is the probe and
the launch shape for 64-lane wavefronts."""

from __future__ import annotations

import torch

from crossinfer.backend import Capabilities, Probe
from crossinfer_triton import AttentionTiles, TritonBackend
from crossinfer_triton.devices import visible_device_count
from crossinfer_triton.graphs import Capture, device_graph_capture

INSTALL_HINT = (
    "install the ROCm build of torch (pip install torch --index-url "
    "https://download.pytorch.org/whl/rocm6.4) and the amdgpu driver"
)


class RocmBackend(TritonBackend):
    """AMD GPUs: Triton paged attention, RCCL collectives, HIP graphs for decode."""

    name = "rocm"

    def hardware_probe(self) -> Probe:
        if not torch.version.hip:
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
            return Probe(
                False, f"torch {torch.__version__} is not a ROCm build ({built}); {INSTALL_HINT}"
            )
        count = visible_device_count(torch.cuda)
        if count == 0:
            return Probe(
                False,
                f"torch {torch.__version__} (HIP {torch.version.hip}) sees no AMD GPU: check "
                "rocm-smi, the amdgpu driver and HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES",
            )
        return Probe(True, devices=tuple(f"rocm:{i}" for i in range(count)))

    def hardware_capabilities(self) -> Capabilities:
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            # A 64-lane wavefront reads a whole 16-token block of 64-dim heads per two loads;
            # smaller blocks waste lanes on the gather.
            block_sizes=(16, 32, 64, 128),
            head_sizes=(64, 80, 96, 128, 256),
            prefix_caching=True,
            graph_capture=True,
            distributed_backend="nccl",
            default_block_size=32,
            warp_size=64,
        )

    def hardware_tiles(self) -> AttentionTiles:
        # Wavefronts of 64: 4 warps are 256 lanes, the same threads per program as 8 NVIDIA
        # warps, so fewer warps and wider key tiles; CDNA's MFMA takes 16-row tiles too.
        return AttentionTiles(block_m=16, block_m_prefill=64, block_n=64, num_warps=4)

    def graph_capture(self) -> Capture:
        # HIP graphs, under the torch.cuda names of ROCm builds of torch.
        return device_graph_capture(torch.cuda, torch.cuda.CUDAGraph)
