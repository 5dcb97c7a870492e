"""KVCacheManager and BlockPool: exact block ids, ref counts, eviction order and counters."""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import Counter

import pytest

from crossinfer.engine.kv_cache import CachedPrefix, KVCacheManager, hash_block_tokens, root_hash

BLOCK_SIZE = 4


def make(num_blocks: int = 8, enable_prefix_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching)


def toks(n: int, start: int = 0) -> list[int]:
    """``n`` distinct token ids from ``start`` on."""
    return list(range(start, start + n))


def refs(kv: KVCacheManager) -> list[int]:
    return [kv.pool.ref_count(b) for b in range(kv.num_blocks)]


def snapshot(kv: KVCacheManager, request_ids: list[str]) -> tuple[object, ...]:
    """Everything a failed call must leave unchanged."""
    pool = kv.pool
    return (
        refs(kv),
        pool.free_block_ids(),
        [pool.block_hash(b) for b in range(kv.num_blocks)],
        [kv.block_ids(r) for r in request_ids],
        kv.num_prefix_queried_tokens,
        kv.num_prefix_hit_tokens,
    )


def admit(
    kv: KVCacheManager, rid: str, tokens: list[int], extra_key: str | None = None
) -> list[int]:
    """Admit a request with its whole prompt in one step, reusing any cached prefix."""
    cached = kv.find_cached_prefix(tokens, extra_key)
    block_ids = kv.allocate(rid, tokens, len(tokens), cached, extra_key)
    assert block_ids is not None
    return block_ids


def test_fresh_allocation_takes_blocks_in_id_order() -> None:
    kv = make()
    assert kv.num_blocks_needed("a", 10) == 3
    assert kv.allocate("a", toks(10), 10) == [0, 1, 2]
    assert kv.allocate("b", toks(5, 100), 5) == [3, 4]
    assert kv.block_ids("a") == [0, 1, 2]
    assert refs(kv) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert kv.num_free_blocks == 3
    assert kv.usage == pytest.approx(5 / 8)
    assert kv.pool.free_block_ids() == [5, 6, 7]


def test_growth_takes_one_block_each_time_a_block_fills() -> None:
    kv = make()
    tokens = toks(13)
    assert kv.allocate("a", tokens, 4) == [0]
    expected = {5: [0, 1], 6: [0, 1], 7: [0, 1], 8: [0, 1], 9: [0, 1, 2], 13: [0, 1, 2, 3]}
    for num_tokens, block_ids in expected.items():
        assert kv.num_blocks_needed("a", num_tokens) == len(block_ids) - len(kv.block_ids("a"))
        assert kv.allocate("a", tokens, num_tokens) == block_ids
    assert kv.num_free_blocks == 4
    # A block is hashed once it is full: blocks 0..2 are, the partial block 3 is not.
    assert [kv.pool.block_hash(b) is not None for b in range(4)] == [True, True, True, False]


def test_second_request_shares_the_cached_first_two_blocks() -> None:
    kv = make()
    assert admit(kv, "a", toks(10)) == [0, 1, 2]
    b_tokens = toks(8) + [500, 501]
    cached = kv.find_cached_prefix(b_tokens)
    assert cached == CachedPrefix((0, 1), 8)
    assert kv.num_blocks_needed("b", 10, cached) == 1
    assert kv.can_allocate("b", 10, cached)
    assert kv.allocate("b", b_tokens, 10, cached) == [0, 1, 3]
    assert refs(kv) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert kv.num_prefix_queried_tokens == 20
    assert kv.num_prefix_hit_tokens == 8


def test_find_cached_prefix_is_pure() -> None:
    kv = make()
    admit(kv, "a", toks(9))
    kv.free("a")
    before = snapshot(kv, ["a"])
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((0, 1), 8)
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((0, 1), 8)
    assert snapshot(kv, ["a"]) == before


def test_hit_never_covers_the_last_token() -> None:
    kv = make()
    admit(kv, "a", toks(8))  # exactly two full blocks, both cached
    assert kv.find_cached_prefix(toks(8)) == CachedPrefix((0,), 4)
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((0, 1), 8)
    assert kv.find_cached_prefix(toks(1)) == CachedPrefix((), 0)
    assert kv.find_cached_prefix([]) == CachedPrefix((), 0)
    assert admit(kv, "b", toks(8)) == [0, 2]
    assert refs(kv)[:3] == [2, 1, 1]


def test_extra_key_separates_identical_tokens() -> None:
    kv = make()
    admit(kv, "a", toks(9), extra_key="adapter-1")
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((), 0)
    assert kv.find_cached_prefix(toks(9), extra_key="adapter-2") == CachedPrefix((), 0)
    assert kv.find_cached_prefix(toks(9), extra_key="adapter-1") == CachedPrefix((0, 1), 8)
    assert admit(kv, "b", toks(9)) == [3, 4, 5]


def test_block_hashes_are_sha256_chained_from_the_root() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE, hash_seed=b"seed")
    admit(kv, "a", toks(9))
    root = root_hash(b"seed")
    first = hashlib.sha256(root + array("q", toks(4)).tobytes()).digest()
    second = hashlib.sha256(first + array("q", toks(4, 4)).tobytes()).digest()
    assert kv.pool.block_hash(0) == first == hash_block_tokens(root, toks(4))
    assert kv.pool.block_hash(1) == second
    assert kv.pool.block_hash(2) is None  # the partial third block


def test_block_hashes_are_random_per_manager_unless_seeded() -> None:
    def first_hash(kv: KVCacheManager) -> bytes | None:
        admit(kv, "a", toks(5))
        return kv.pool.block_hash(0)

    unseeded = {first_hash(make()) for _ in range(3)}
    assert len(unseeded) == 3  # a random root each time: not predictable from outside
    seeded = {first_hash(KVCacheManager(8, BLOCK_SIZE, hash_seed=b"s")) for _ in range(2)}
    assert len(seeded) == 1
    assert first_hash(KVCacheManager(8, BLOCK_SIZE, hash_seed=b"t")) not in seeded


def test_a_cache_salt_changes_every_block_hash() -> None:
    kv = make()
    admit(kv, "a", toks(9), extra_key="tenant-1")
    admit(kv, "b", toks(9), extra_key="tenant-2")
    salted_a = [kv.pool.block_hash(b) for b in kv.block_ids("a")[:2]]
    # Tenant 2's full blocks have other hashes (its duplicates stay unregistered: new ids).
    assert kv.block_ids("b") == [3, 4, 5]
    assert kv.find_cached_prefix(toks(9), "tenant-2") == CachedPrefix((3, 4), 8)
    assert None not in salted_a and kv.first_parent("tenant-1") != kv.first_parent("tenant-2")


def test_disabled_prefix_caching_never_hits_or_hashes() -> None:
    kv = make(enable_prefix_caching=False)
    admit(kv, "a", toks(9))
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((), 0)
    assert admit(kv, "b", toks(9)) == [3, 4, 5]
    assert [kv.pool.block_hash(b) for b in range(8)] == [None] * 8
    assert kv.pool.num_cached_blocks == 0
    assert (kv.num_prefix_queried_tokens, kv.num_prefix_hit_tokens) == (0, 0)
    with pytest.raises(ValueError, match="prefix caching on: False"):
        kv.allocate("c", toks(9), 9, CachedPrefix((0,), 4))


def test_out_of_blocks_returns_none_and_changes_nothing() -> None:
    kv = make(num_blocks=4)
    assert admit(kv, "a", toks(12)) == [0, 1, 2]
    before = snapshot(kv, ["a", "b"])
    assert not kv.can_allocate("b", 5)
    assert kv.allocate("b", toks(5, 100), 5) is None
    assert kv.allocate("a", toks(17), 17) is None  # growth by two blocks, one free
    assert snapshot(kv, ["a", "b"]) == before
    assert kv.allocate("b", toks(5, 100), 4) == [3]


def test_can_allocate_counts_revived_cached_blocks_against_free_blocks() -> None:
    kv = make(num_blocks=5)
    assert admit(kv, "a", toks(9)) == [0, 1, 2]
    assert admit(kv, "c", toks(4, 100)) == [3]
    kv.free("a")
    assert kv.pool.free_block_ids() == [4, 2, 1, 0]
    b_tokens = toks(8) + toks(9, 200)  # 17 tokens: 2 cached blocks + 3 new > 4 free
    cached = kv.find_cached_prefix(b_tokens)
    assert cached == CachedPrefix((0, 1), 8)
    assert kv.num_blocks_needed("b", 17, cached) == 3
    before = snapshot(kv, ["b"])
    assert not kv.can_allocate("b", 17, cached)
    assert kv.allocate("b", b_tokens, 17, cached) is None
    assert snapshot(kv, ["b"]) == before
    # Chunked prefill: the first 16 tokens fit (2 revived + 2 new == 4 free).
    assert kv.can_allocate("b", 16, cached)
    assert kv.allocate("b", b_tokens, 16, cached) == [0, 1, 4, 2]
    assert kv.num_free_blocks == 0
    assert kv.allocate("b", b_tokens, 17) is None


def test_lru_eviction_order_is_exact_and_revived_blocks_are_not_handed_out() -> None:
    kv = make(num_blocks=8)
    a_tokens, b_tokens = toks(12), toks(8, 100)
    assert admit(kv, "a", a_tokens) == [0, 1, 2]
    assert admit(kv, "b", b_tokens) == [3, 4]
    kv.free("a")
    kv.free("b")
    # Never-used blocks first, then A's and B's blocks, each request tail first.
    assert kv.pool.free_block_ids() == [5, 6, 7, 2, 1, 0, 4, 3]
    assert admit(kv, "c", toks(4, 200)) == [5]
    assert admit(kv, "d", toks(16, 300)) == [6, 7, 2, 1]
    # A's block 0 survived (its prefix block was freed last); blocks 1 and 2 were evicted.
    assert kv.find_cached_prefix(a_tokens) == CachedPrefix((0,), 4)
    e_tokens = b_tokens + [999]
    cached = kv.find_cached_prefix(e_tokens)
    assert cached == CachedPrefix((3, 4), 8)
    assert kv.allocate("e", e_tokens, 8, cached) == [3, 4]
    assert kv.pool.free_block_ids() == [0]
    # The next request gets block 0, not the revived 3 and 4.
    assert kv.allocate("f", toks(4, 400), 4) == [0]
    assert kv.find_cached_prefix(a_tokens) == CachedPrefix((), 0)
    assert refs(kv) == [1] * 8


def test_freed_blocks_hit_until_reused() -> None:
    kv = make(num_blocks=4)
    a_tokens = toks(9)
    assert admit(kv, "a", a_tokens) == [0, 1, 2]
    kv.free("a")
    assert kv.find_cached_prefix(a_tokens) == CachedPrefix((0, 1), 8)
    x_tokens = toks(12, 100)
    assert admit(kv, "x", x_tokens) == [3, 2, 1]
    # Block 1 now holds X's tokens: A's chain breaks there, and block 1 hits for X instead.
    assert kv.find_cached_prefix(a_tokens) == CachedPrefix((0,), 4)
    assert kv.find_cached_prefix(x_tokens + [7]) == CachedPrefix((3, 2, 1), 12)
    assert admit(kv, "y", toks(4, 200)) == [0]
    assert kv.find_cached_prefix(a_tokens) == CachedPrefix((), 0)


def test_duplicate_block_keeps_the_existing_mapping() -> None:
    kv = make(num_blocks=6)
    assert admit(kv, "a", toks(8)) == [0, 1]
    # B computes the same content without a lookup: a duplicate, which is not registered.
    assert kv.allocate("b", toks(8), 8) == [2, 3]
    assert [kv.pool.block_hash(b) is None for b in range(4)] == [False, False, True, True]
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((0, 1), 8)
    # B's chain still continues past its duplicates.
    assert kv.allocate("b", toks(12), 12) == [2, 3, 4]
    assert kv.pool.block_hash(4) is not None
    assert kv.find_cached_prefix(toks(13)) == CachedPrefix((0, 1, 4), 12)


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    kv = make(num_blocks=6)
    assert admit(kv, "p", toks(10)) == [0, 1, 2]
    assert kv.fork("p", "p#1", 10) == [(2, 3)]
    assert kv.block_ids("p#1") == [0, 1, 3]
    assert kv.fork("p", "p#2", 8) == []
    assert kv.block_ids("p#2") == [0, 1]
    assert refs(kv) == [3, 3, 1, 1, 0, 0]
    # The child grows on its own: its copied block fills and gets hashed with its own tokens.
    child_tokens = toks(10) + [77, 78, 79]
    assert kv.allocate("p#1", child_tokens, 13) == [0, 1, 3, 4]
    assert kv.find_cached_prefix(child_tokens) == CachedPrefix((0, 1, 3), 12)
    assert kv.num_prefix_queried_tokens == 10  # forks are not admissions
    assert kv.allocate("p#2", toks(8), 8) == [0, 1]
    assert kv.fork("p", "p#3", 9) == [(2, 5)]
    before = snapshot(kv, ["p", "p#4"])
    assert kv.fork("p", "p#4", 9) is None
    assert snapshot(kv, ["p", "p#4"]) == before
    for rid in ["p#1", "p", "p#3", "p#2"]:
        kv.free(rid)
    assert kv.num_free_blocks == 6
    assert refs(kv) == [0] * 6


def test_fork_misuse_raises() -> None:
    kv = make()
    admit(kv, "p", toks(6))
    with pytest.raises(ValueError, match="holds no KV-cache blocks"):
        kv.fork("nobody", "c", 4)
    with pytest.raises(ValueError, match="needs 3 blocks but the parent holds 2"):
        kv.fork("p", "c", 9)
    kv.fork("p", "c", 4)
    with pytest.raises(ValueError, match="already has KV-cache blocks"):
        kv.fork("p", "c", 4)


def test_every_block_is_free_after_all_requests_finish_or_abort() -> None:
    kv = make(num_blocks=8)
    admit(kv, "a", toks(9))
    admit(kv, "b", toks(12))
    kv.fork("b", "b#1", 11)
    assert kv.allocate("c", toks(20, 50), 6) == [5, 6]  # aborted mid chunked prefill
    kv.free("c")
    kv.free("c")  # idempotent
    kv.free("never-seen")
    for rid in ["b", "a", "b#1"]:
        kv.free(rid)
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.usage == 0.0
    assert kv.block_ids("a") == []


def test_prefix_stats_count_each_admission_once() -> None:
    kv = make(num_blocks=4)
    admit(kv, "a", toks(9))
    assert (kv.num_prefix_queried_tokens, kv.num_prefix_hit_tokens) == (9, 0)
    b_tokens = toks(8) + toks(10, 100)
    cached = kv.find_cached_prefix(b_tokens)
    kv.find_cached_prefix(b_tokens)
    assert kv.allocate("b", b_tokens, 18, cached) is None  # does not fit: not counted
    assert kv.allocate("b", b_tokens, 12, cached) == [0, 1, 3]
    assert kv.allocate("b", b_tokens, 16) is None  # growth never counts
    assert (kv.num_prefix_queried_tokens, kv.num_prefix_hit_tokens) == (27, 8)
    kv.free("b")  # preempted; re-admission is a new admission
    admit(kv, "b", b_tokens[:12])
    assert (kv.num_prefix_queried_tokens, kv.num_prefix_hit_tokens) == (39, 16)


def test_stale_or_misplaced_prefix_raises_without_changes() -> None:
    kv = make(num_blocks=3)
    admit(kv, "a", toks(9))
    kv.free("a")
    cached = kv.find_cached_prefix(toks(9))
    assert cached == CachedPrefix((0, 1), 8)
    with pytest.raises(ValueError, match="no longer holds these tokens"):
        kv.allocate("b", toks(9), 9, cached, extra_key="other")
    admit(kv, "x", toks(12, 100))  # evicts blocks 0 and 1
    before = snapshot(kv, ["b"])
    with pytest.raises(ValueError, match="no longer holds these tokens"):
        kv.allocate("b", toks(9), 9, cached)
    assert snapshot(kv, ["b"]) == before
    with pytest.raises(ValueError, match="first allocate"):
        kv.allocate("x", toks(12, 100), 12, CachedPrefix((0,), 4))
    with pytest.raises(
        ValueError, match=r"num_tokens=10 must lie in \[cached.num_tokens=0, len\(token_ids\)=9\]"
    ):
        kv.allocate("y", toks(9), 10)
    with pytest.raises(ValueError, match=r"num_tokens=3 must lie in \[cached.num_tokens=4,"):
        kv.allocate("y", toks(9), 3, kv.find_cached_prefix(toks(5, 100)))


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use() -> None:
    kv = make()
    admit(kv, "a", toks(9))
    assert not kv.reset_prefix_cache()
    kv.free("a")
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((0, 1), 8)
    assert kv.reset_prefix_cache()
    assert kv.find_cached_prefix(toks(9)) == CachedPrefix((), 0)
    assert kv.pool.num_cached_blocks == 0


def test_constructor_rejects_empty_sizes() -> None:
    with pytest.raises(
        ValueError, match="num_blocks must leave at least 1 block besides the 0 reserved, got 0"
    ):
        KVCacheManager(0, 16)
    with pytest.raises(ValueError, match="block_size must be at least 1, got 0"):
        KVCacheManager(16, 0)


class _Model:
    """Drives a manager at random and mirrors what the device would hold in each block."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.kv = KVCacheManager(24, BLOCK_SIZE)
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.keys: dict[str, object] = {}
        self.content: dict[int, list[int | None]] = {}  # block id -> token per slot
        self.bases = [[self.rng.randrange(50) for _ in range(14)] for _ in range(3)]
        self.next_id = 0

    def write(self, rid: str, start: int, stop: int) -> None:
        """The runner writes tokens [start, stop) into the request's own blocks."""
        block_ids = self.kv.block_ids(rid)
        for pos in range(start, stop):
            block_id = block_ids[pos // BLOCK_SIZE]
            assert self.kv.pool.ref_count(block_id) == 1, "write into a shared block"
            slots = self.content.setdefault(block_id, [None] * BLOCK_SIZE)
            slots[pos % BLOCK_SIZE] = self.tokens[rid][pos]

    def admit(self) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        base = self.rng.choice(self.bases)
        prompt = base[: self.rng.randrange(1, 15)] + [self.rng.randrange(50) for _ in range(3)]
        key = self.rng.choice([None, None, "salt"])
        cached = self.kv.find_cached_prefix(prompt, key)
        for i, block_id in enumerate(cached.block_ids):
            expected = prompt[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            assert self.content[block_id] == expected, "hit on a block with other content"
        num_tokens = self.rng.randrange(cached.num_tokens + 1, len(prompt) + 1)
        before = snapshot(self.kv, [rid])
        if self.kv.allocate(rid, prompt, num_tokens, cached, key) is None:
            assert not self.kv.can_allocate(rid, num_tokens, cached)
            assert snapshot(self.kv, [rid]) == before
            return
        self.tokens[rid], self.computed[rid], self.keys[rid] = prompt, num_tokens, key
        self.write(rid, cached.num_tokens, num_tokens)

    def step(self, rid: str) -> None:
        """Prefill the next chunk, or decode one token once the prompt is done."""
        tokens = self.tokens[rid]
        if self.computed[rid] == len(tokens):
            tokens.append(self.rng.randrange(50))
        num_tokens = self.rng.randrange(self.computed[rid] + 1, len(tokens) + 1)
        if self.kv.allocate(rid, tokens, num_tokens, extra_key=self.keys[rid]) is None:
            self.free(rid)  # preempted
            return
        self.write(rid, self.computed[rid], num_tokens)
        self.computed[rid] = num_tokens

    def fork(self, rid: str) -> None:
        child = f"{rid}.{self.next_id}"
        self.next_id += 1
        copies = self.kv.fork(rid, child, self.computed[rid])
        if copies is None:
            assert self.kv.num_free_blocks == 0
            return
        for src, dst in copies:
            self.content[dst] = list(self.content[src])
        self.tokens[child] = list(self.tokens[rid][: self.computed[rid]])
        self.computed[child], self.keys[child] = self.computed[rid], self.keys[rid]

    def free(self, rid: str) -> None:
        self.kv.free(rid)
        del self.tokens[rid], self.computed[rid], self.keys[rid]

    def check(self) -> None:
        kv, pool = self.kv, self.kv.pool
        holders: Counter[int] = Counter()
        for rid, num_tokens in self.computed.items():
            block_ids = kv.block_ids(rid)
            assert len(block_ids) == len(set(block_ids)), "block owned twice by one request"
            assert len(block_ids) == -(-num_tokens // BLOCK_SIZE)
            holders.update(block_ids)
        assert refs(kv) == [holders[b] for b in range(kv.num_blocks)]
        free = pool.free_block_ids()
        assert sorted(free) == [b for b in range(kv.num_blocks) if holders[b] == 0]
        assert kv.num_free_blocks == len(free)
        for b in range(kv.num_blocks):
            block_hash = pool.block_hash(b)
            assert block_hash is None or pool.lookup(block_hash) == b
        assert kv.num_prefix_hit_tokens <= kv.num_prefix_queried_tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_invariants(seed: int) -> None:
    model = _Model(seed)
    for _ in range(400):
        running = sorted(model.computed)
        op = model.rng.random()
        if not running or op < 0.25:
            model.admit()
        elif op < 0.75:
            model.step(model.rng.choice(running))
        elif op < 0.85:
            model.fork(model.rng.choice(running))
        else:
            model.free(model.rng.choice(running))
        model.check()
    assert model.kv.num_prefix_hit_tokens > 0  # the walk did exercise prefix hits
    for rid in sorted(model.computed):
        model.free(rid)
    assert model.kv.num_free_blocks == model.kv.num_blocks


def test_reserved_blocks_are_never_handed_out() -> None:
    kv = KVCacheManager(4, BLOCK_SIZE, reserved=frozenset({0}))
    assert kv.num_blocks == 3 and kv.num_free_blocks == 3
    assert admit(kv, "a", toks(12)) == [1, 2, 3]
    assert kv.allocate("b", toks(1), 1) is None  # block 0 stays the sink
    kv.free("a")
    assert kv.usage == 0.0 and 0 not in kv.pool.free_block_ids()
