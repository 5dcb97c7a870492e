"""Continuous batching policy: which requests advance by how many tokens in the next step.

A step is one forward pass over a ragged batch. Each scheduled request contributes a chunk of
its not-yet-computed tokens: a whole prompt, part of a long prompt (chunked prefill), the rest
of a prompt after a prefix-cache hit, or one token to decode. Running requests go first, in
arrival order; waiting requests are admitted while the token budget, ``max_num_seqs`` and free
blocks allow. When blocks run out, the newest running request is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later.

The scheduler only decides; it never touches tensors. The runner executes its
``SchedulerOutput``; the engine then reports back through ``advance`` and ``finish``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from crossinfer.engine.kv_cache import CachedPrefix, KVCacheManager
from crossinfer.engine.request import Request, RequestStatus

_NO_PREFIX = CachedPrefix((), 0)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    """Most requests in one step."""
    max_num_batched_tokens: int
    """Most tokens in one step (the token budget)."""
    max_model_len: int
    """Longest sequence (prompt plus output) a request may reach."""
    decode_first: bool = False
    """Order each step's decodes before its prefill chunks."""
    split_prefill_decode: bool = False
    """Never schedule prefill chunks and decodes in the same step."""
    max_loras: int = 1
    """Most distinct LoRA adapters in one step (the device slots); requests of further
    adapters wait for a later step."""


@dataclass(frozen=True)
class ScheduledChunk:
    """One request's part of a step."""

    request: Request
    num_computed_tokens: int
    """Tokens already in the cache before this step."""
    num_new_tokens: int
    """Tokens computed in this step: ``token_ids[num_computed : num_computed + num_new]``."""
    block_ids: tuple[int, ...]
    """The request's blocks, covering ``num_computed_tokens + num_new_tokens`` tokens."""

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the end of the known tokens, so a token is sampled."""
        return self.num_computed_tokens + self.num_new_tokens == self.request.num_tokens

    @property
    def is_decode(self) -> bool:
        """True when the chunk is a decode: the one token left to compute, with the prompt in
        the cache (a resumed request recomputing several generated tokens is not)."""
        return self.num_new_tokens == 1 and _decodes_from(self.request, self.num_computed_tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    blocks_to_copy: tuple[tuple[int, int], ...]
    """(src, dst) block copies to run before the forward pass (copy-on-share for n > 1)."""
    preempted: tuple[str, ...]
    """Requests preempted in this step, to be recomputed later."""
    failed: tuple[tuple[Request, BaseException], ...] = ()
    """Requests whose scheduling raised: finished with an error, their blocks freed."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Holds the waiting queue and running list; decides each step's batch."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._pending_copies: list[tuple[int, int]] = []
        self._last_was_decode = False  # split_prefill_decode: which kind ran last

    # -- admission --------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request of this size can never run, or None when it can."""
        max_len = self.config.max_model_len
        if num_prompt_tokens < 1:
            return "the prompt is empty"
        if num_prompt_tokens + max_tokens > max_len:
            return (
                f"this model's maximum context length is {max_len} tokens; the request has "
                f"{num_prompt_tokens} prompt tokens and asks for {max_tokens} more"
            )
        size = self.kv_cache.block_size
        # The last sampled token is never computed, so it takes no slot; every prompt token is.
        num_slots = max(num_prompt_tokens + max_tokens - 1, num_prompt_tokens)
        needed = -(-num_slots // size)
        if needed > self.kv_cache.num_blocks:
            return (
                f"the request needs {needed} KV-cache blocks of {size} tokens but the cache has "
                f"only {self.kv_cache.num_blocks}; give it more memory (--kv-cache-memory)"
            )
        return None

    def add(self, request: Request) -> None:
        """Queue a request that ``check_fits`` accepted."""
        self.waiting.append(request)

    def add_running(self, request: Request, copies: list[tuple[int, int]]) -> None:
        """Add a forked request whose blocks are already allocated; copies run next step."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._pending_copies += copies

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide the next step. Mutates queues and block ownership, never tensors."""
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        failed: list[tuple[Request, BaseException]] = []
        if not self.config.split_prefill_decode:
            self._fill(None, chunks, preempted, failed)
        else:
            decode_step = self._decode_step()
            self._fill(decode_step, chunks, preempted, failed)
            if not chunks:  # that kind can do nothing now (no blocks to admit): the other
                decode_step = not decode_step
                self._fill(decode_step, chunks, preempted, failed)
            if chunks:
                self._last_was_decode = decode_step
        if self.config.decode_first:
            chunks.sort(key=lambda c: not c.is_decode)  # stable: arrival order within a kind
        copies, self._pending_copies = tuple(self._pending_copies), []
        return SchedulerOutput(tuple(chunks), copies, tuple(preempted), tuple(failed))

    def _fill(
        self,
        decode_step: bool | None,
        chunks: list[ScheduledChunk],
        preempted: list[str],
        failed: list[tuple[Request, BaseException]],
    ) -> None:
        """Running requests first (only decodes, or only prefills, when ``decode_step`` says
        which), then admissions while budget, sequences and blocks allow."""
        budget = self.config.max_num_batched_tokens
        index = 0
        # Forked samples join the running list directly, so it may outgrow max_num_seqs: the
        # step takes the oldest that fit, the others wait for the next.
        while index < len(self.running) and budget > 0 and len(chunks) < self.config.max_num_seqs:
            request = self.running[index]
            if decode_step is not None and _is_decoding(request) != decode_step:
                index += 1  # the other kind's turn comes in another step
                continue
            if not self._lora_fits(request, chunks):
                index += 1  # its adapter has no slot in this step
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            try:
                block_ids = self._allocate_or_preempt(request, num_new, preempted)
            except Exception as exc:  # this request's bookkeeping failed: drop it alone
                self._fail(request, exc, failed)
                continue
            if block_ids is None:  # the request itself was preempted
                break
            chunks.append(self._chunk(request, num_new, block_ids))
            budget -= num_new
            index += 1
        if not preempted:
            self._admit_waiting(budget, chunks, failed, decode_step)

    def _decode_step(self) -> bool:
        """For split_prefill_decode: whether this step decodes (else it prefills). The kinds
        take turns while both have work."""
        decodes = any(_is_decoding(r) for r in self.running)
        prefills = bool(self.waiting) or any(not _is_decoding(r) for r in self.running)
        if decodes and prefills:
            return not self._last_was_decode
        return decodes

    def _fail(
        self, request: Request, error: BaseException, failed: list[tuple[Request, BaseException]]
    ) -> None:
        self.finish(request, RequestStatus.FINISHED_ERROR)
        failed.append((request, error))

    def _allocate_or_preempt(
        self, request: Request, num_new: int, preempted: list[str]
    ) -> list[int] | None:
        target = request.num_computed_tokens + num_new
        while True:
            block_ids = self.kv_cache.allocate(
                request.request_id,
                request.token_ids,
                target,
                extra_key=request.cache_salt,
                lora_int_id=request.lora_int_id,
            )
            if block_ids is not None:
                return block_ids
            victim = self.running.pop()  # the newest running request
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(
        self,
        budget: int,
        chunks: list[ScheduledChunk],
        failed: list[tuple[Request, BaseException]],
        decode_step: bool | None = None,
    ) -> int:
        """Admit from the head of the queue; with ``decode_step`` set, only while the head is
        of that kind (a resumed request with all but its last token cached is a decode).
        A request whose adapter finds no slot in this step is passed over, keeping its place."""
        passed_over: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self._lora_fits(request, chunks):
                passed_over.append(self.waiting.popleft())
                continue
            try:
                cached = self._cached_prefix(request)
                if decode_step is not None and _decodes_from(request, cached.num_tokens) != (
                    decode_step
                ):
                    break  # first come, first served: it waits for a step of its kind
                num_new = min(request.num_tokens - cached.num_tokens, budget)
                block_ids = self.kv_cache.allocate(
                    request.request_id,
                    request.token_ids,
                    cached.num_tokens + num_new,
                    cached,
                    extra_key=request.cache_salt,
                    lora_int_id=request.lora_int_id,
                )
            except Exception as exc:  # this request's bookkeeping failed: drop it alone
                self._fail(request, exc, failed)
                continue
            if block_ids is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = cached.num_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = cached.num_tokens
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
            self.running.append(request)
            chunks.append(self._chunk(request, num_new, block_ids))
            budget -= num_new
        self.waiting.extendleft(reversed(passed_over))
        return budget

    def _lora_fits(self, request: Request, chunks: list[ScheduledChunk]) -> bool:
        """Whether the request's adapter (if any) can run in the step so far: it is in the
        step already, or a slot is left."""
        lora = request.lora_int_id
        if lora is None:
            return True
        step = {c.request.lora_int_id for c in chunks} - {None}
        return lora in step or len(step) < self.config.max_loras

    def _cached_prefix(self, request: Request) -> CachedPrefix:
        # Prompt logprobs need every prompt position's logits, so such a request computes its
        # whole prompt (it still registers its blocks for others).
        if request.params.prompt_logprobs is not None:
            return _NO_PREFIX
        return self.kv_cache.find_cached_prefix(
            request.token_ids, request.cache_salt, request.lora_int_id
        )

    @staticmethod
    def _chunk(request: Request, num_new: int, block_ids: list[int]) -> ScheduledChunk:
        return ScheduledChunk(request, request.num_computed_tokens, num_new, tuple(block_ids))

    # -- after the step ---------------------------------------------------------------------
    def advance(self, output: SchedulerOutput) -> None:
        """Record that the step computed every scheduled chunk."""
        for chunk in output.chunks:
            chunk.request.num_computed_tokens = chunk.num_computed_tokens + chunk.num_new_tokens

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted) and release its blocks."""
        request.status = status
        request.metrics.finished_time = time.monotonic()
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.request_id)


def _decodes_from(request: Request, num_computed: int) -> bool:
    """With ``num_computed`` tokens in the cache, the request's next chunk is a decode: its
    prompt is cached and one token is left."""
    return num_computed >= request.num_prompt_tokens and request.num_tokens - num_computed == 1


def _is_decoding(request: Request) -> bool:
    return _decodes_from(request, request.num_computed_tokens)
