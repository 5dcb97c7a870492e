"""Adapters in the bookkeeping: a step holds at most max_loras distinct adapters (the others
wait, keeping their place), and prefix-cache blocks are never shared across adapters."""

from __future__ import annotations

from crossinfer.engine.kv_cache import KVCacheManager
from crossinfer.engine.request import Request
from crossinfer.engine.scheduler import Scheduler, SchedulerConfig
from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams


def _request(rid: str, lora_id: int | None) -> Request:
    lora = None if lora_id is None else LoRARequest(f"a{lora_id}", lora_id, "/adapters")
    return Request(rid, [1, 2, 3, 4, 5], SamplingParams(temperature=0), 4, lora=lora)


def test_a_step_holds_at_most_max_loras_adapters() -> None:
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, max_loras=1
    )
    scheduler = Scheduler(config, KVCacheManager(32, 4, True))
    for rid, lora in (("r1", 1), ("r2", 2), ("r3", None), ("r4", 1), ("r5", 2)):
        scheduler.add(_request(rid, lora))
    first = scheduler.schedule()
    assert [c.request.request_id for c in first.chunks] == ["r1", "r3", "r4"]
    assert [r.request_id for r in scheduler.waiting] == ["r2", "r5"]  # in their order
    scheduler.advance(first)
    second = scheduler.schedule()  # adapter 1 holds the slot while its requests run
    assert [c.request.request_id for c in second.chunks] == ["r1", "r3", "r4"]
    for request in list(scheduler.running):
        if request.lora_int_id == 1:
            scheduler.finish(request, request.status.FINISHED_STOPPED)
    scheduler.advance(second)
    third = scheduler.schedule()
    assert [c.request.request_id for c in third.chunks] == ["r3", "r2", "r5"]


def test_prefix_blocks_are_not_shared_across_adapters() -> None:
    kv = KVCacheManager(16, 4, True, hash_seed=b"seed")
    tokens = list(range(9))
    assert kv.allocate("a", tokens, 9, lora_int_id=1) is not None
    assert kv.find_cached_prefix(tokens, lora_int_id=1).num_tokens == 8
    assert kv.find_cached_prefix(tokens, lora_int_id=2).num_tokens == 0
    assert kv.find_cached_prefix(tokens).num_tokens == 0  # the base model
    assert kv.find_cached_prefix(tokens, extra_key="1").num_tokens == 0  # nor a salt
    # a salt and an adapter together make a key of their own, apart from each alone
    assert kv.first_parent("s", 1) not in {kv.first_parent("s"), kv.first_parent(None, 1)}
