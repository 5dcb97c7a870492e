"""The pool of KV-cache blocks: reference counts, an LRU free list and the prefix-hash index.

This is the low layer under `kv_cache.KVCacheManager`. It knows nothing about requests or
tokens: blocks are integers, hashes are opaque byte strings. The manager decides what to hash and
when; the pool keeps the three structures consistent:

- ``ref_count(b)``: how many requests hold block ``b``. A block is free when this is 0.
- the free list: every free block, least recently freed first. Handing out a block for new
  content takes the least recently freed one.
- the hash index: ``hash -> block id`` for blocks whose full content is known. A freed block
  keeps its hash (lazy eviction): prefix lookups still find it, and `acquire` takes it back off
  the free list. Only when `take_free` hands it out for other content is its hash dropped.

Invariant: ``block_hash(b) == h`` exactly when ``lookup(h) == b``; a hash maps to one block.

Reserved blocks (a compiled backend's sink for padded writes) are never free and never handed
out; they exist only so that block ids stay the device's.
"""

from __future__ import annotations

from collections import OrderedDict

BlockHash = bytes  # a digest identifying a full block's content and everything before it


class BlockPool:
    """A fixed set of ``num_blocks`` KV-cache blocks with reference counts and lazy eviction."""

    def __init__(self, num_blocks: int, reserved: frozenset[int] = frozenset()) -> None:
        self.num_blocks = num_blocks
        self.reserved = reserved
        self._ref_counts = [0] * num_blocks
        # Hash each block is registered under in `_block_by_hash`, or None when it is not.
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        self._block_by_hash: dict[BlockHash, int] = {}
        # An OrderedDict keyed by block id is a doubly linked list with O(1) removal by key:
        # popitem(last=False) takes the least recently freed block, `del` revives one from the
        # middle, and assignment appends a newly freed block at the most recent end.
        # Fresh blocks start in id order so that a new pool hands out 0, 1, 2, ...
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(
            b for b in range(num_blocks) if b not in reserved
        )

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached or not."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, in use or free."""
        return len(self._block_by_hash)

    def ref_count(self, block_id: int) -> int:
        """How many holders block ``block_id`` has."""
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The hash ``block_id`` is registered under, or None."""
        return self._hashes[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order: the first is the next one `take_free` hands out."""
        return list(self._free)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block registered under ``block_hash`` (in use or free), or None. Pure."""
        return self._block_by_hash.get(block_hash)

    def take_free(self) -> int:
        """Hand out the least recently freed block for new content, with ref count 1.

        Its old hash, if any, is dropped here: this is the moment it is actually evicted.
        Callers check `num_free_blocks` first; an empty pool is a caller bug.
        """
        if not self._free:
            raise RuntimeError("no free KV-cache block: check num_free_blocks before take_free()")
        block_id, _ = self._free.popitem(last=False)
        old_hash = self._hashes[block_id]
        if old_hash is not None:
            del self._block_by_hash[old_hash]
            self._hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def acquire(self, block_id: int) -> None:
        """Add a holder to ``block_id``; a free (cached) block is revived off the free list."""
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        """Drop a holder; at ref count 0 the block joins the free list as most recently freed."""
        if self._ref_counts[block_id] <= 0:
            raise RuntimeError(f"KV-cache block {block_id} released more often than acquired")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free[block_id] = None

    def register(self, block_id: int, block_hash: BlockHash) -> bool:
        """Make ``block_id`` findable under ``block_hash``; False (nothing changes) when it is
        already registered or another block already holds that hash (the duplicate stays
        uncached so that the existing mapping keeps working)."""
        if self._hashes[block_id] is not None or block_hash in self._block_by_hash:
            return False
        self._hashes[block_id] = block_hash
        self._block_by_hash[block_hash] = block_id
        return True

    def reset_hashes(self) -> bool:
        """Forget every hash; refused (False) while any block is in use."""
        if len(self._free) != self.num_blocks - len(self.reserved):
            return False
        self._block_by_hash.clear()
        self._hashes = [None] * self.num_blocks
        return True
