"""NeuronBackend: AWS Trainium and Inferentia through torch-neuronx, an XLA device.

What it declares follows vLLM's Neuron plugin (vllm-neuron) and NxD Inference, all in
``static_shapes`` and ``hardware_capabilities``:

- prefill (context encoding) and decode (token generation) never share a step: two kinds
  of graph, as Neuron compiles them;
- prefill token buckets from 128 doubling to the engine's token budget (the budget is the
  last bucket), over sequence buckets 1, 2, 4, ... ``max_num_seqs``;
- decode buckets 1, 2, 4, ... ``max_num_seqs``: a decode step of ``n`` sequences is one token
  each, at the smallest bucket holding ``n``;
- one full-width block table (a decode reads ``ceil(max_model_len / block_size)`` blocks, as
  vllm-neuron does without decode context-length buckets); sampling on the host;
- the cache layout ``(2, num_blocks, kv_heads, block_size, head)`` of vllm-neuron's attention;
- block 0 is the sink that padded tokens write into (NxD Inference reserves one block the same
  way, since a compiled scatter cannot skip a slot).

The cache update: Neuron's graphs take the cache as an input and return the updated cache,
aliased to it. torch-xla produces exactly that from an in-place ``index_copy_`` (it
functionalises the op and donates the cache's buffer when the step's graph runs), so the
backend writes in place (``kv_update == "in_place"``) and keeps the buffer aliased.

Not verified until it runs on Trainium or Inferentia: neuronx-cc's lowering of these graphs
and its compile times, NKI attention kernels (not built: the reference static-shape attention
of crossinfer_xla runs, compiled by neuronx-cc), Neuron collectives, the runtime's memory
statistics, performance.
"""

from __future__ import annotations

import logging
import os

import torch

from crossinfer.backend import Capabilities, EngineLimits, MemoryInfo, Probe, StaticShapes
from crossinfer_neuron import probe
from crossinfer_xla import KVLayout, XlaBackend
from crossinfer_xla.backend import torch_xla_missing
from crossinfer_xla.buckets import doubling

logger = logging.getLogger("crossinfer.neuron")

MIN_PREFILL_BUCKET = 128  # Neuron's smallest context-encoding bucket
NEURONCORE_V2_HBM = 16 << 30  # one NeuronCore-v2's share of a trn1 / inf2 chip's HBM
CACHE_ENV = "NEURON_COMPILE_CACHE_URL"  # torch-neuronx's persistent NEFF cache


class NeuronBackend(XlaBackend):
    """Trainium and Inferentia: torch-neuronx graphs at Neuron's prefill and decode buckets."""

    name = "neuron"
    layout = KVLayout(heads_first=True)

    def hardware_probe(self) -> Probe:
        problem = probe.torch_neuronx_problem() or torch_xla_missing()
        if problem:
            return Probe(False, problem)
        devices = probe.neuron_device_files()
        if not devices:
            return Probe(
                False,
                "no Neuron device on this machine (no /dev/neuron* node): run on a Trainium "
                "(trn1, trn2) or Inferentia2 (inf2) instance, or set CROSSINFER_EMULATE=1 to "
                "run on XLA's CPU device",
            )
        return Probe(True, devices=tuple(f"neuron:{i}" for i in range(len(devices))))

    def hardware_capabilities(self) -> Capabilities:
        dtypes = (torch.bfloat16, torch.float16)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            block_sizes=(16, 32, 64, 128),
            head_sizes=(64, 80, 96, 128),
            prefix_caching=True,
            graph_capture=True,  # every step is one compiled graph (a NEFF) per bucket
            distributed_backend="xla",
            default_block_size=32,
            native_attention=False,  # no NKI kernel yet: the reference ops, compiled
        )

    def static_shapes(self, limits: EngineLimits) -> StaticShapes:
        budget = limits.max_num_batched_tokens
        seqs = doubling(1, limits.max_num_seqs)
        return StaticShapes(
            token_buckets=doubling(min(MIN_PREFILL_BUCKET, budget), budget),
            seq_buckets=seqs,
            decode_buckets=seqs,
            block_table_widths=(limits.max_blocks_per_seq,),
            pad_block=0,
            split_prefill_decode=True,
            sample_on_host=True,
        )

    # -- memory and the compile cache: the Neuron runtime's where it has them ---------------
    def fallback_memory_bytes(self) -> int:
        return NEURONCORE_V2_HBM

    def memory_info(self) -> MemoryInfo:
        if not self.emulated:
            stats = runtime_memory_stats()
            if stats is not None:
                used, free = stats
                return MemoryInfo(used + free, free)
        return super().memory_info()

    def set_compile_cache_dir(self, path: str) -> None:
        if self.emulated:  # XLA's CPU device: XLA's own persistent cache
            super().set_compile_cache_dir(path)
            return
        os.makedirs(path, exist_ok=True)
        os.environ.setdefault(CACHE_ENV, path)  # a user's own setting wins


def runtime_memory_stats() -> tuple[int, int] | None:
    """(bytes used, bytes free) of this process's NeuronCore from the Neuron runtime, or None
    where the runtime does not offer them (then XLA's figures, then the declared fallback)."""
    try:
        used, free = torch.classes.neuron.Runtime().get_vnc_memory_stats()
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        logger.info("Neuron runtime memory statistics unavailable: %s", exc)
        return None
    return int(used), int(free)
