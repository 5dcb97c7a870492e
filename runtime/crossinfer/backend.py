"""The Backend contract: everything the engine asks of an accelerator.

A backend is a Python package that registers one class in the ``crossinfer.backends``
entry-point group. The engine never imports a vendor SDK; it calls only what is defined here.

The model of the world:

* A step is one forward pass over a *ragged batch*: the new tokens of several sequences packed
  into one ``[num_tokens, ...]`` tensor. A sequence may contribute a whole prompt (prefill), a
  chunk of a prompt whose earlier part is already in the cache (prefill after a cached prefix,
  or chunked prefill), or a single token (decode). Each sequence's computed-token count catches
  up with its total; there are no separate prefill and decode phases.
* The KV cache is paged: ``num_blocks`` blocks of ``block_size`` token slots per layer. The
  backend owns the memory layout of a block; the engine only sees block ids and slot numbers
  (``slot = block_id * block_size + offset``).
* Attention reads keys and values from the paged cache only, after ``write_kv`` has written
  the step's new tokens, so prefill, cached-prefix prefill and decode are the same operation.
  A sequence may read blocks that another sequence of the same step writes (a prefix-cache
  hit on a block filled in this step, by a sequence earlier in the batch): a kernel that fuses
  the write into the attention must finish every sequence's writes before any of them reads,
  or process the sequences in batch order.
* Compiled devices (since 1.2): a backend that compiles one graph per tensor shape declares
  ``static_shapes``; the engine then pads every step to its buckets. Padded tokens write only
  into the sink block (``StaticShapes.pad_block``), which the block pool never hands out; a
  padded sequence has no tokens, a zero context and a block-table row of sink blocks.
  ``write_kv`` may return the new cache (``Capabilities.kv_update == "functional"``); the
  engine then uses that tensor from there on. ``begin_step`` / ``end_step`` frame each step
  (an XLA device cuts its graph there), ``set_compile_cache_dir`` names where compiled graphs
  persist, and ``compiled_graph_count`` lets the engine check that nothing recompiles after
  its warm-up.
* Quantisation (since 1.3): ``Capabilities.quantizations`` names the methods a backend's
  ``quantize_model`` applies (``"int8"``: int8 weights per output channel, int8 activations
  per token). The engine asks for one only when the user does, and refuses, before loading,
  a method the backend does not list.

Optional members have defaults that never raise. The integer ``CONTRACT_VERSION`` major is
checked at load: a backend built for another major version is refused and both are named.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import torch

CONTRACT_VERSION: tuple[int, int] = (1, 3)
"""(major, minor). A major bump breaks backends; a minor bump only adds optional members."""

EMULATE_ENV = "CROSSINFER_EMULATE"
"""When "1" in the environment as a backend is built, a backend that can run its own kernels
on a stand-in without its hardware (Triton's interpreter, Pallas interpret mode, XLA's CPU
device) does so and sets ``Capabilities.emulated``; others ignore it."""


@dataclass(frozen=True)
class Probe:
    """The answer of :meth:`Backend.probe`: can this backend run here, and if not, why."""

    available: bool
    """True when at least one device is usable right now."""
    reason: str = ""
    """Empty when available; otherwise what is missing and what to install or set."""
    devices: tuple[str, ...] = ()
    """Human-readable names of the usable devices, e.g. ``("NVIDIA H100 80GB HBM3",)``."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. The conformance suite runs every advertised combination."""

    dtypes: tuple[torch.dtype, ...]
    """Activation and weight dtypes the attention kernels accept."""
    kv_cache_dtypes: tuple[torch.dtype, ...]
    """Dtypes the KV cache may be stored in."""
    block_sizes: tuple[int, ...]
    """Token slots per KV block that the kernels support."""
    head_sizes: tuple[int, ...]
    """Attention head sizes the kernels support."""
    prefix_caching: bool = True
    """Attention may start a sequence's new tokens after a cached prefix."""
    graph_capture: bool = False
    """``prepare_model`` captures graphs (CUDA graphs, XLA) for decode steps."""
    distributed_backend: str = "gloo"
    """The torch.distributed backend its communicator uses: gloo, nccl, xccl, xla."""
    emulated: bool = False
    """True when the kernels run on a stand-in (an interpreter on the CPU), not the hardware."""
    default_block_size: int = 16
    """The block size the engine picks when the user does not choose one."""
    default_kv_cache_bytes: int | None = None
    """KV-cache budget when the user sets neither a size nor a memory fraction. None means a
    fraction (0.9) of device memory; a backend on shared host memory names a fixed size."""
    warp_size: int = 1
    """Lanes that execute in lockstep (32 on NVIDIA, 64 on AMD CDNA wavefronts, 1 where the
    notion does not apply); block sizes and launch tiles are chosen to fill them. Since 1.1."""
    kv_update: Literal["in_place", "functional"] = "in_place"
    """How ``write_kv`` updates the cache: in place (it returns None), or functionally (it
    returns the new cache tensor, which replaces the one passed in). Since 1.2."""
    native_attention: bool = True
    """False when ``attention`` runs a reference implementation in place of the backend's own
    kernel (an emulated compiled device whose kernel runs only on the hardware). Since 1.2."""
    quantizations: tuple[str, ...] = ()
    """Methods ``quantize_model`` applies, e.g. ``("int8",)``; empty: none. Since 1.3."""


@dataclass(frozen=True)
class EngineLimits:
    """What the engine's configuration lets a step hold (core -> backend). Since 1.2."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


@dataclass(frozen=True)
class StaticShapes:
    """The shapes a compiled-graph backend runs (backend -> core). Since 1.2.

    Every step is padded to the smallest token bucket that holds its tokens, the smallest
    sequence bucket that holds its sequences and the narrowest block-table width that holds
    its longest sequence; the engine compiles every combination once at start (a warm-up) and
    then checks that nothing compiles again.
    """

    token_buckets: tuple[int, ...]
    """Ascending token counts; the last caps the engine's token budget per step."""
    seq_buckets: tuple[int, ...]
    """Ascending sequence counts; the last caps the sequences per step."""
    block_table_widths: tuple[int, ...]
    """Ascending block-table widths; the last must hold a whole ``max_model_len`` sequence."""
    decode_buckets: tuple[int, ...] | None = None
    """Ascending sequence counts for steps of one new token per sequence (decodes), which
    then run at ``n`` tokens and ``n`` sequences for the smallest ``n`` holding them: a decode
    graph apart from the prefill graphs. ``None``: every step takes the token and sequence
    buckets."""
    pad_block: int = 0
    """The sink: padded tokens write here; the block pool never hands it out."""
    decode_first: bool = False
    """Order each step's decoding sequences before its prefill chunks."""
    split_prefill_decode: bool = False
    """Never put prefill chunks and decodes in the same step."""
    sample_on_host: bool = True
    """Copy the (padded) logits to the host and sample there."""
    max_num_seqs: int | None = None
    """A cap of the backend's on the sequences per step (below the engine's, if set)."""

    def __post_init__(self) -> None:
        for name in ("token_buckets", "seq_buckets", "block_table_widths", "decode_buckets"):
            values = getattr(self, name)
            if values is None and name == "decode_buckets":
                continue
            if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"StaticShapes.{name} must be ascending positive integers")


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes, as the device reports it now."""

    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of the paged KV cache the engine asks a backend to allocate."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all layers, keys and values together."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_size * itemsize
        return self.num_layers * per_layer


@dataclass(frozen=True)
class AttentionBatch:
    """The ragged batch of one step, as attention kernels see it.

    Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i + 1]``; those are the
    *last* ``query_len`` tokens of its ``seq_lens[i]`` context tokens, so token ``j`` of the
    chunk sits at position ``seq_lens[i] - query_len + j`` and attends causally to positions up
    to its own. All tensors live on the backend's device.
    """

    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32: cumulative query lengths, starting at 0."""
    seq_lens: torch.Tensor
    """[num_seqs] int32: context length of each sequence after this step's tokens."""
    block_table: torch.Tensor
    """[num_seqs, max_blocks_per_seq] int32: block ids of each sequence, in order; padding is
    any valid block id and is never read past ``seq_lens``."""
    slot_mapping: torch.Tensor
    """[num_tokens] int64: cache slot each new token's key and value are written to."""
    max_query_len: int
    """Largest query length in the batch (1 for a pure decode batch)."""
    max_seq_len: int
    """Largest context length in the batch."""
    query_lens_cpu: tuple[int, ...]
    """Host copy of the per-sequence query lengths, for kernels that plan on the host (empty in
    a padded batch: a compiled graph must not depend on them)."""
    seq_lens_cpu: tuple[int, ...]
    """Host copy of ``seq_lens`` (empty in a padded batch)."""
    token_seq: torch.Tensor | None = None
    """[num_tokens] int32, padded batches only (since 1.2): the sequence each token belongs
    to; padded tokens name a padded sequence."""
    token_pos: torch.Tensor | None = None
    """[num_tokens] int32, padded batches only (since 1.2): each token's position in its
    sequence; 0 for padded tokens, which attend only to the sink."""

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class Communicator(abc.ABC):
    """Collectives across the ranks of one tensor-parallel group. Tensors live on the device."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order; returns a new one."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s, in place; returns it."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return only when every rank has called it."""

    def close(self) -> None:  # noqa: B027 - optional member with a no-op default
        """Release the process group. The default does nothing."""


class Backend(abc.ABC):
    """One kind of accelerator, as the engine sees it.

    Construction must be cheap and must not touch a device: the registry builds every
    discovered backend to call :meth:`probe`. Device state is created lazily by the memory,
    attention and execution members.
    """

    name: str = ""
    """Short, user-visible name; equal to the entry-point name (``cuda``, ``rocm``, ``cpu``)."""
    api_version: tuple[int, int] = CONTRACT_VERSION
    """The contract version this backend was written against."""
    priority: int = 0
    """Tie-breaker for ``--device auto`` among backends the built-in order does not name;
    higher wins."""

    # -- identity and discovery -------------------------------------------------------------
    @abc.abstractmethod
    def probe(self) -> Probe:
        """Say whether this backend can run here. Cheap, never raises, never creates a device
        context; a missing SDK or device is ``Probe(False, reason)`` with a reason a person
        can act on."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What the kernels support on this machine."""

    @abc.abstractmethod
    def device(self) -> torch.device:
        """The torch device weights, activations and the KV cache are placed on."""

    # -- memory -----------------------------------------------------------------------------
    @abc.abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Total and free device memory now, in bytes."""

    @abc.abstractmethod
    def allocate_kv_cache(self, spec: KVCacheSpec, num_blocks: int) -> list[torch.Tensor]:
        """Allocate the paged cache: one tensor per layer, in a layout only this backend reads.

        The engine passes the returned tensors back, unopened, to ``write_kv``, ``attention``
        and ``copy_blocks``.
        """

    @abc.abstractmethod
    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        """Copy whole blocks in every layer. ``src_to_dst``: [num_pairs, 2] int64 block ids."""

    def read_kv(
        self, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the keys and values stored at ``slots`` as ``[n, num_kv_heads, head_size]``
        each. Used by tests and the conformance suite; the default raises NotImplementedError,
        which the suite records as "not supported"."""
        raise NotImplementedError(f"backend {self.name!r} does not implement read_kv")

    # -- attention --------------------------------------------------------------------------
    @abc.abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor | None:
        """Store the step's new keys and values into one layer's cache.

        key, value: [num_tokens, num_kv_heads, head_size]; slot_mapping: [num_tokens] int64.
        Only the named slots change. Returns None when the cache was updated in place, or the
        new cache (``Capabilities.kv_update == "functional"``), which the engine passes to
        ``attention`` and to every later call instead of the old one. In a padded batch the
        padded tokens' slots lie in the sink block.
        """

    @abc.abstractmethod
    def attention(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of the step's queries over each sequence's cached context.

        query: [num_tokens, num_heads, head_size], already rotated. ``num_heads`` is a multiple
        of the cache's ``num_kv_heads`` (grouped-query attention: query head ``h`` reads KV head
        ``h // (num_heads // num_kv_heads)``). Returns [num_tokens, num_heads, head_size] in
        the query's dtype. The keys and values of the step's own tokens are already in the
        cache (``write_kv`` runs first).
        """

    # -- collectives ------------------------------------------------------------------------
    @abc.abstractmethod
    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        """Join a group of ``world_size`` ranks (``init_method`` as torch.distributed takes it,
        e.g. ``env://`` or ``tcp://127.0.0.1:29500``) and return its collectives."""

    # -- execution --------------------------------------------------------------------------
    def synchronize(self) -> None:  # noqa: B027 - optional member with a no-op default
        """Wait for all queued device work. The default does nothing (synchronous devices)."""

    def seed(self, seed: int) -> None:
        """Seed every random generator this backend's device uses. The default seeds torch."""
        torch.manual_seed(seed)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Optionally transform a loaded model (compile, capture graphs). Default: unchanged."""
        return model

    def quantize_model(self, model: torch.nn.Module, method: str) -> torch.nn.Module:
        """Swap the linear layers of a loaded model (before ``prepare_model``) for ones that
        compute with ``method``, one of ``capabilities().quantizations``; the engine calls it
        with no other. Tensor-parallel wrappers hold plain ``inner`` linears, swapped like any.
        Default (a backend that lists no quantisation): unchanged. Since 1.3."""
        return model

    # -- compiled devices (since 1.2) -------------------------------------------------------
    def static_shapes(self, limits: EngineLimits) -> StaticShapes | None:
        """The buckets this backend compiles for these limits, or None (the default): a
        dynamic backend, which gets each step's exact shapes."""
        return None

    def begin_step(self) -> None:  # noqa: B027 - optional member with a no-op default
        """Called before the engine builds a step's inputs. The default does nothing."""

    def end_step(self) -> None:  # noqa: B027 - optional member with a no-op default
        """Called once a step's model and logits are queued, before their results are read
        (an XLA device cuts and dispatches its graph here). The default does nothing."""

    def set_compile_cache_dir(self, path: str) -> None:  # noqa: B027 - optional, no-op
        """Where compiled graphs persist across restarts; called before the model loads. The
        default does nothing (nothing is compiled ahead)."""

    def compiled_graph_count(self) -> int | None:
        """How many graphs this process has compiled so far, or None (the default: the
        backend does not compile). The engine checks that it stays put after warm-up."""
        return None
