"""Scheduler policy: token budget, chunked prefill, admission with prefix hits, preemption."""

from __future__ import annotations

from crossinfer.engine.kv_cache import KVCacheManager
from crossinfer.engine.request import Request, RequestStatus
from crossinfer.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from crossinfer.sampling_params import SamplingParams


def _scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 10,
    max_seqs: int = 8,
    max_len: int = 64,
    caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(max_seqs, budget, max_len)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, caching))


def _request(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0), max_tokens)


def _step(s: Scheduler, next_token: int = 7) -> SchedulerOutput:
    """Schedule, pretend the runner ran, append a token to every sampling chunk."""
    out = s.schedule()
    s.advance(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.token_ids.append(next_token)
    return out


def _summary(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.num_computed_tokens, c.num_new_tokens) for c in out.chunks]


def test_budget_is_never_exceeded_and_long_prompts_are_chunked() -> None:
    s = _scheduler(budget=10)
    s.add(_request("a", list(range(25))))
    s.add(_request("b", list(range(100, 103))))
    steps = [_summary(_step(s)) for _ in range(4)]
    assert steps == [
        [("a", 0, 10)],
        [("a", 10, 10)],
        [("a", 20, 5), ("b", 0, 3)],
        [("a", 25, 1), ("b", 3, 1)],
    ]


def test_max_num_seqs_limits_admission() -> None:
    s = _scheduler(max_seqs=2, budget=100)
    for rid in "abc":
        s.add(_request(rid, [1, 2, 3]))
    assert [r for r, _, _ in _summary(_step(s))] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_prefix_hit_starts_after_the_cached_blocks() -> None:
    s = _scheduler(budget=100)
    prompt = list(range(10))
    s.add(_request("a", prompt))
    _step(s)
    s.add(_request("b", prompt + [99]))
    out = _step(s)
    assert _summary(out) == [("a", 10, 1), ("b", 8, 3)]
    a_blocks, b_blocks = out.chunks[0].block_ids, out.chunks[1].block_ids
    assert b_blocks[:2] == a_blocks[:2]  # two full blocks shared
    assert out.chunks[1].request.num_cached_tokens == 8


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    # 3 blocks of 2 tokens: three 2-token prompts fill the cache; every decode needs a block.
    s = _scheduler(num_blocks=3, block_size=2, budget=100, caching=False)
    for rid in "abc":
        s.add(_request(rid, [1, 2]))
    assert [r for r, _, _ in _summary(_step(s))] == ["a", "b", "c"]
    out = _step(s)
    assert out.preempted == ("c", "b")
    assert _summary(out) == [("a", 2, 1)]
    assert [r.request_id for r in s.waiting] == ["b", "c"]
    c = s.waiting[1]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0
    assert c.token_ids == [1, 2, 7]  # its generated token is kept and recomputed
    assert s.num_preemptions == 2


def test_impossible_requests_are_rejected_with_a_reason() -> None:
    s = _scheduler(num_blocks=4, block_size=4, max_len=32)
    assert s.check_fits(10, 7) is None  # 16 tokens ever computed: 4 blocks
    too_long = s.check_fits(30, 8)
    assert too_long is not None and "maximum context length is 32" in too_long
    too_big = s.check_fits(10, 10)
    assert too_big is not None and "needs 5 KV-cache blocks" in too_big and "only 4" in too_big
    assert s.check_fits(0, 1) == "the prompt is empty"


def test_finish_frees_every_block() -> None:
    s = _scheduler(num_blocks=8, block_size=4, budget=100)
    a, b = _request("a", list(range(9))), _request("b", list(range(50, 55)))
    s.add(a)
    s.add(b)
    _step(s)
    assert s.kv_cache.num_free_blocks == 8 - 3 - 2
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert s.kv_cache.num_free_blocks == 8
    assert not s.has_unfinished


def test_split_steps_never_mix_kinds_and_a_resumed_decode_waits_for_a_decode_step() -> None:
    config = SchedulerConfig(8, 100, 64, split_prefill_decode=True)
    s = Scheduler(config, KVCacheManager(64, 4, True))
    s.add(_request("a", list(range(8))))
    assert _summary(_step(s)) == [("a", 0, 8)]
    assert _summary(_step(s)) == [("a", 8, 1)]
    # c comes back from a preemption with its prompt (a's) cached and one generated token
    # to compute: a decode, though it is waiting. b behind it is a prefill.
    resumed = _request("c", list(range(8)))
    s.add(resumed)
    resumed.token_ids.append(7)
    s.add(_request("b", list(range(20, 26))))
    # A prefill turn, but the head of the queue is a decode: the step decodes instead, and
    # admits it; b's prefill takes the next step.
    decode = s.schedule()
    assert _summary(decode) == [("a", 9, 1), ("c", 8, 1)]
    assert all(c.is_decode for c in decode.chunks)
    s.advance(decode)
    for chunk in decode.chunks:
        chunk.request.token_ids.append(7)
    prefill = s.schedule()
    assert _summary(prefill) == [("b", 0, 6)] and not prefill.chunks[0].is_decode
