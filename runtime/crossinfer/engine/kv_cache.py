"""Paged KV-cache bookkeeping: which blocks each request owns, and reuse of cached prefixes.

Model of the world: the device KV cache holds ``num_blocks`` blocks of ``block_size`` token
slots. A request's token ids (prompt + generated so far) occupy its blocks in order: token
``i`` lives in slot ``i % block_size`` of ``block_ids[i // block_size]``. Each step the
scheduler says how many of a request's tokens will have been computed after the step
(``num_tokens``); the manager makes the request own enough blocks and answers with block ids
only. The runner turns ids into block tables and slot mappings; no tensor is touched here.

Automatic prefix caching: every FULL block gets a chained hash of (its parent block's hash,
its token ids), so a hash identifies the block's content together with everything before it.
The first block's parent is the manager's root, mixed with the request's ``extra_key`` (a
tenant's cache salt) and its LoRA adapter's id when it has them, so identical tokens under
different keys or adapters never share blocks (an adapter computes other keys and values).
 A block is registered when it becomes full within ``num_tokens``,
that is when the step that writes it is scheduled: a request admitted later in the same step
may reuse it because every layer writes the step's KV before it attends.

Hash choice: SHA-256 of the parent's digest and the block's token ids. It is collision
resistant, so a crafted prompt cannot alias another tenant's block. The root is derived from
a random per-process salt unless a ``hash_seed`` is given, so block hashes cannot be
predicted from outside the process (and differ between processes); a seed makes them
reproducible, for caches shared between processes. Hashing a 16-token block costs about a
microsecond, negligible beside the forward pass.
"""

from __future__ import annotations

import hashlib
import secrets
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from crossinfer.engine.block_pool import BlockHash, BlockPool


def hash_block_tokens(parent_hash: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: SHA-256 of its parent's hash and its token ids."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


def root_hash(seed: bytes) -> BlockHash:
    """The parent of every first block, from a manager's seed."""
    return hashlib.sha256(b"crossinfer prefix cache\0" + seed).digest()


@dataclass(frozen=True)
class CachedPrefix:
    """The leading full blocks of a sequence that are already in the cache."""

    block_ids: tuple[int, ...]  # cached blocks in sequence order
    num_tokens: int  # tokens they cover: len(block_ids) * block_size


_NO_PREFIX = CachedPrefix((), 0)


@dataclass
class _RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the leading full blocks (one per block, a prefix of block_ids). Kept
    # per request, not read back from the pool, because a duplicate block is never registered
    # there yet its hash is still the parent of the next block's hash.
    block_hashes: list[BlockHash] = field(default_factory=list)
    root: BlockHash = b""  # the parent of the first block: the manager's root and extra_key


class KVCacheManager:
    """Owns the block pool and each request's block list; the scheduler's only view of KV memory.

    Running out of blocks is a returned value (None / False) that leaves every structure as it
    was, so the scheduler can answer with preemption. Misuse (a stale or foreign prefix, an
    unknown fork parent) raises ValueError.

    Prefix-cache statistics are counted in tokens by `allocate` on a request's first
    allocation (its admission), and only when that allocation succeeds: the queried count
    grows by ``len(token_ids)``, the hit count by ``cached.num_tokens``. `find_cached_prefix`
    itself stays pure, so a scheduler that looks up a waiting request on several steps before
    it fits counts that admission once. A request re-admitted after preemption counts again.
    With prefix caching off nothing is counted.

    ``hash_seed``: None (the default) draws a random root for the block hashes; bytes make
    them reproducible across processes. ``reserved``: block ids never handed out (a compiled
    backend's sink block); ``num_blocks`` counts the others.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_seed: bytes | None = None,
        reserved: frozenset[int] = frozenset(),
    ) -> None:
        if num_blocks - len(reserved) < 1:
            raise ValueError(
                f"num_blocks must leave at least 1 block besides the {len(reserved)} reserved, "
                f"got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks - len(reserved)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0
        self._pool = BlockPool(num_blocks, reserved)
        self._requests: dict[str, _RequestBlocks] = {}
        self._root = root_hash(secrets.token_bytes(32) if hash_seed is None else hash_seed)

    @property
    def pool(self) -> BlockPool:
        """The underlying pool, for inspection (ref counts, free order) and tests."""
        return self._pool

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0; cached blocks that are free count as free."""
        return self._pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return 1.0 - self._pool.num_free_blocks / self.num_blocks

    def first_parent(
        self, extra_key: str | None = None, lora_int_id: int | None = None
    ) -> BlockHash:
        """The parent hash of a sequence's first block under ``extra_key`` and adapter
        ``lora_int_id``. The adapter is hashed in a step of its own (a salt's text cannot
        spell it)."""
        parent = self._root
        if extra_key:
            parent = hashlib.sha256(parent + extra_key.encode("utf-8", "surrogatepass")).digest()
        if lora_int_id is not None:
            parent = hashlib.sha256(
                parent + b"\xfflora" + array("q", [lora_int_id]).tobytes()
            ).digest()
        return parent

    def find_cached_prefix(
        self,
        token_ids: Sequence[int],
        extra_key: str | None = None,
        lora_int_id: int | None = None,
    ) -> CachedPrefix:
        """The longest run of leading full blocks of ``token_ids`` found in the cache. Pure.

        The hit never covers the last token, which must be recomputed to get its logits: it is
        capped at ``len(token_ids) - 1`` tokens rounded down to whole blocks.
        """
        if not self.enable_prefix_caching:
            return _NO_PREFIX
        size = self.block_size
        block_ids: list[int] = []
        parent = self.first_parent(extra_key, lora_int_id)
        for start in range(0, (max(len(token_ids), 1) - 1) // size * size, size):
            parent = hash_block_tokens(parent, token_ids[start : start + size])
            block_id = self._pool.lookup(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
        return CachedPrefix(tuple(block_ids), len(block_ids) * size)

    def num_blocks_needed(
        self, request_id: str, num_tokens: int, cached: CachedPrefix | None = None
    ) -> int:
        """How many new (free-list) blocks `allocate` would take to cover ``num_tokens``."""
        required = -(-num_tokens // self.block_size)
        return max(0, required - self._num_held_blocks(request_id, cached))

    def can_allocate(
        self, request_id: str, num_tokens: int, cached: CachedPrefix | None = None
    ) -> bool:
        """Whether `allocate` would succeed. Pure.

        Cached blocks that sit on the free list leave it when taken, so they count against
        the free blocks as well as the new ones.
        """
        num_new = self.num_blocks_needed(request_id, num_tokens, cached)
        num_revived = 0
        if cached is not None:
            num_revived = sum(1 for b in cached.block_ids if self._pool.ref_count(b) == 0)
        return num_new + num_revived <= self._pool.num_free_blocks

    def allocate(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_tokens: int,
        cached: CachedPrefix | None = None,
        extra_key: str | None = None,
        lora_int_id: int | None = None,
    ) -> list[int] | None:
        """Make ``request_id`` own blocks covering its first ``num_tokens`` tokens.

        ``num_tokens`` is the request's computed-token count after this step; ``token_ids``
        holds at least that many ids. A first call may pass ``cached`` (from
        `find_cached_prefix` with the same tokens, ``extra_key`` and ``lora_int_id``, with no
        allocation in between that could evict it): those blocks become the request's first
        blocks. Every block that is full within ``num_tokens`` gets its hash registered, when
        prefix caching is on. Returns a copy of the request's whole block list, or None,
        changing nothing, when there are not enough free blocks.
        """
        prefix = cached if cached is not None else _NO_PREFIX
        if not prefix.num_tokens <= num_tokens <= len(token_ids):
            raise ValueError(
                f"allocate({request_id!r}): num_tokens={num_tokens} must lie in "
                f"[cached.num_tokens={prefix.num_tokens}, len(token_ids)={len(token_ids)}]"
            )
        state = self._requests.get(request_id)
        # Validate before the capacity check so that misuse is reported, not hidden by a None.
        prefix_hashes = (
            []
            if state is not None
            else self._check_prefix(prefix, token_ids, self.first_parent(extra_key, lora_int_id))
        )
        if not self.can_allocate(request_id, num_tokens, prefix):
            return None
        if state is None:
            root = self.first_parent(extra_key, lora_int_id)
            state = self._admit(request_id, len(token_ids), prefix, prefix_hashes, root)
        for _ in range(self.num_blocks_needed(request_id, num_tokens)):
            state.block_ids.append(self._pool.take_free())
        if self.enable_prefix_caching:
            self._register_full_blocks(state, token_ids, num_tokens)
        return list(state.block_ids)

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's blocks in sequence order; [] for a request holding none."""
        state = self._requests.get(request_id)
        return list(state.block_ids) if state is not None else []

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Start ``child_id`` (n > 1 sampling) from the first ``num_tokens`` tokens of its parent.

        Full blocks are shared (one more holder each). A partly filled last block would be
        written by both, so the child gets a fresh block instead: the returned ``(src, dst)``
        pairs are the device copies the runner must do before the child writes ([] when
        ``num_tokens`` ends on a block boundary). None, changing nothing, when no block is free
        for the copy.
        """
        parent = self._requests.get(parent_id)
        if parent is None:
            raise ValueError(f"fork: parent request {parent_id!r} holds no KV-cache blocks")
        if child_id in self._requests:
            raise ValueError(f"fork: child request {child_id!r} already has KV-cache blocks")
        num_full, num_partial_tokens = divmod(num_tokens, self.block_size)
        num_covering = num_full + (1 if num_partial_tokens else 0)
        if num_tokens < 0 or num_covering > len(parent.block_ids):
            raise ValueError(
                f"fork({parent_id!r} -> {child_id!r}): num_tokens={num_tokens} needs "
                f"{num_covering} blocks but the parent holds {len(parent.block_ids)}"
            )
        if num_partial_tokens and self._pool.num_free_blocks == 0:
            return None
        child = _RequestBlocks(
            parent.block_ids[:num_full], parent.block_hashes[:num_full], parent.root
        )
        for block_id in child.block_ids:
            self._pool.acquire(block_id)
        copies: list[tuple[int, int]] = []
        if num_partial_tokens:
            dst = self._pool.take_free()
            copies.append((parent.block_ids[num_full], dst))
            child.block_ids.append(dst)
        self._requests[child_id] = child
        return copies

    def free(self, request_id: str) -> None:
        """Release the request's blocks (finished, aborted or preempted). Unknown ids: no-op.

        Blocks are released tail first, so a request's last block becomes the least recently
        freed and is evicted first, while its prefix blocks, the ones most likely to be shared
        by a later request, stay cached longest.
        """
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        for block_id in reversed(state.block_ids):
            self._pool.release(block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block hash (e.g. after weights change); False while any block is
        in use."""
        return self._pool.reset_hashes()

    def _num_held_blocks(self, request_id: str, cached: CachedPrefix | None) -> int:
        state = self._requests.get(request_id)
        if cached is None or not cached.block_ids:
            return len(state.block_ids) if state is not None else 0
        if state is not None:
            raise ValueError(
                f"request {request_id!r} already has KV-cache blocks; a cached prefix can only "
                "be passed with its first allocate()"
            )
        return len(cached.block_ids)

    def _check_prefix(
        self, prefix: CachedPrefix, token_ids: Sequence[int], root: BlockHash
    ) -> list[BlockHash]:
        """Hashes of the prefix blocks, after checking they still hold these tokens."""
        if not prefix.block_ids:
            return []
        size = self.block_size
        if not self.enable_prefix_caching or prefix.num_tokens != len(prefix.block_ids) * size:
            raise ValueError(
                f"cached prefix {prefix} does not come from find_cached_prefix() of this manager "
                f"(prefix caching on: {self.enable_prefix_caching}, block_size={size})"
            )
        hashes: list[BlockHash] = []
        parent = root
        for i, block_id in enumerate(prefix.block_ids):
            parent = hash_block_tokens(parent, token_ids[i * size : (i + 1) * size])
            if self._pool.block_hash(block_id) != parent:
                raise ValueError(
                    f"cached prefix block {block_id} no longer holds these tokens: call "
                    "find_cached_prefix() with the same token_ids and extra_key right before "
                    "allocate(), with no other allocation in between"
                )
            hashes.append(parent)
        return hashes

    def _admit(
        self,
        request_id: str,
        num_query_tokens: int,
        prefix: CachedPrefix,
        hashes: list[BlockHash],
        root: BlockHash,
    ) -> _RequestBlocks:
        for block_id in prefix.block_ids:
            self._pool.acquire(block_id)
        state = _RequestBlocks(list(prefix.block_ids), hashes, root)
        self._requests[request_id] = state
        if self.enable_prefix_caching:
            self.num_prefix_queried_tokens += num_query_tokens
            self.num_prefix_hit_tokens += prefix.num_tokens
        return state

    def _register_full_blocks(
        self, state: _RequestBlocks, token_ids: Sequence[int], num_tokens: int
    ) -> None:
        size = self.block_size
        parent = state.block_hashes[-1] if state.block_hashes else state.root
        for i in range(len(state.block_hashes), num_tokens // size):
            parent = hash_block_tokens(parent, token_ids[i * size : (i + 1) * size])
            state.block_hashes.append(parent)
            # A block identical to one already cached stays unregistered (see BlockPool).
            self._pool.register(state.block_ids[i], parent)
