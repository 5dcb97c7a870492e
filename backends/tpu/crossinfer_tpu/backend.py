"""TpuBackend: Google TPUs through torch-xla.

What it declares follows tpu-inference (vLLM's TPU backend): token buckets from 16 doubling
to the engine's token budget (the budget itself is the last bucket, so a full chunked-prefill
step never jumps past it), sequence buckets from 8 doubling to max_num_seqs, one full-width
block table, decodes first in every step, sampling on the host. The cache layout is the one
the ragged paged attention kernel reads: ``[num_blocks, block_size, 2 * kv_heads, head]``
with each head's key and value interleaved and the head padded to a multiple of 128 lanes.

On a TPU the attention is Pallas' ragged paged attention through torch-xla's custom-kernel
API; the reference ops of crossinfer_xla (the same layout) are its fallback and the oracle
the conformance suite checks it against. Emulated (``CROSSINFER_EMULATE=1``), the reference
ops run on XLA's CPU device. Not verified until it runs on a TPU: the Pallas kernel, Mosaic
compile times, HBM figures, multi-chip sharding.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

from crossinfer.backend import AttentionBatch, Capabilities, EngineLimits, Probe, StaticShapes
from crossinfer_xla import KVLayout, XlaBackend
from crossinfer_xla.backend import PAIRINGS, torch_xla_missing
from crossinfer_xla.buckets import doubling

LANES = 128  # a TPU vector register is 8 sublanes x 128 lanes: heads are padded to 128
MIN_TOKEN_BUCKET = 16
MIN_SEQ_BUCKET = 8


def tpu_device_files() -> list[str]:
    """The TPU chips' device files on a TPU VM (no PJRT client is created to find them)."""
    accel = sorted(glob.glob("/dev/accel*"))
    vfio = sorted(p for p in glob.glob("/dev/vfio/[0-9]*"))
    return accel or vfio


class TpuBackend(XlaBackend):
    """Google TPUs: torch-xla graphs at tpu-inference's buckets, Pallas ragged attention."""

    name = "tpu"
    layout = KVLayout(combined=True, head_multiple=LANES)

    def hardware_probe(self) -> Probe:
        missing = torch_xla_missing()
        if missing:
            return Probe(False, missing)
        if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
            return Probe(
                False,
                "torch-xla is installed without the TPU runtime (libtpu); on a TPU VM install "
                f"torch_xla[tpu] ({PAIRINGS})",
            )
        chips = tpu_device_files()
        if not chips:
            return Probe(
                False,
                "no TPU on this machine (no /dev/accel* or /dev/vfio device): run on a Cloud "
                "TPU VM, or set CROSSINFER_EMULATE=1 to run on XLA's CPU device",
            )
        return Probe(True, devices=tuple(f"tpu:{i}" for i in range(len(chips))))

    def hardware_capabilities(self) -> Capabilities:
        dtypes = (torch.bfloat16, torch.float32)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            block_sizes=(16, 32, 64, 128, 256),
            head_sizes=(64, 96, 128, 256),
            prefix_caching=True,
            graph_capture=True,  # every step is one XLA graph, compiled per bucket
            distributed_backend="xla",
            default_block_size=32,
            warp_size=LANES,
        )

    def static_shapes(self, limits: EngineLimits) -> StaticShapes:
        return StaticShapes(
            token_buckets=doubling(MIN_TOKEN_BUCKET, limits.max_num_batched_tokens),
            seq_buckets=doubling(min(MIN_SEQ_BUCKET, limits.max_num_seqs), limits.max_num_seqs),
            block_table_widths=(limits.max_blocks_per_seq,),
            pad_block=0,
            decode_first=True,
            sample_on_host=True,
        )

    def hardware_attention(
        self, query: torch.Tensor, cache: torch.Tensor, batch: AttentionBatch, scale: float
    ) -> torch.Tensor | None:
        """Pallas' ragged paged attention (torch-xla's custom kernel) over the combined cache;
        decodes come first in the batch, as the kernel's work split expects."""
        from torch_xla.experimental.custom_kernel import ragged_paged_attention

        num_tokens, num_heads, head_size = query.shape
        stored = cache.shape[-1]
        q = torch.nn.functional.pad(query, (0, stored - head_size)) if stored > head_size else query
        num_seqs = (batch.seq_lens > 0).sum(dtype=torch.int32).reshape(1)
        out = ragged_paged_attention(
            q,
            cache,
            batch.seq_lens,
            batch.block_table,
            batch.query_start_loc,
            num_seqs,
            sm_scale=scale,
            use_kernel=True,
        )
        return out[..., :head_size]
