"""Launch parameters of the attention kernels. No triton import here: a backend reads its
tiles before the kernels are compiled (or interpreted)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionTiles:
    """Launch parameters; a vendor picks them to suit its hardware."""

    block_m: int = 16
    """Query rows (tokens x grouped heads) per program for decode steps; >= 16 for tl.dot."""
    block_m_prefill: int = 64
    """Query rows per program when some sequence brings more than one new token."""
    block_n: int = 32
    """Keys per inner-loop iteration."""
    num_warps: int = 4
    split_min_context: int = 1024
    """Decode batches split the context only when it is at least this long."""
    max_splits: int = 16
    dot_fp32: bool = False
    """Cast tl.dot operands to fp32 (the interpreter computes bf16 dots wrongly)."""
    threads_per_warp: int | None = None
    """Lanes of a warp (Intel: a sub-group) where the vendor's Triton takes it as a launch
    option; None leaves the option out (NVIDIA's and AMD's Triton refuse it)."""

    def launch_options(self) -> dict[str, int]:
        """The attention kernel's launch options."""
        options = {"num_warps": self.num_warps}
        if self.threads_per_warp is not None:
            options["threads_per_warp"] = self.threads_per_warp
        return options
