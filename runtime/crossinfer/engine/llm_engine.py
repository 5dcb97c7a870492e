"""The step loop: add requests, step, read outputs. Synchronous; the server wraps it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from crossinfer.engine.detokenizer import IncrementalDetokenizer
from crossinfer.engine.errors import RecompileError, RequestError, public_message
from crossinfer.engine.groups import RequestGroup, Sample
from crossinfer.engine.isolation import execute_isolating
from crossinfer.engine.outputs import RequestOutput
from crossinfer.engine.request import Request, RequestStatus
from crossinfer.engine.runner import StepResult
from crossinfer.engine.sampler import SampledToken, make_generator
from crossinfer.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from crossinfer.engine.setup import EngineConfig, EngineParts, LoadedModel, build_engine_parts
from crossinfer.sampling_params import SamplingParams

logger = logging.getLogger("crossinfer.engine")

_SEED_MODULUS = 2**64  # torch generators take seeds in [0, 2^64); children count up from it


class LLMEngine:
    """Continuous batching over one model on one backend.

    ``add_request`` queues work, ``step`` runs one forward pass and returns the outputs of the
    requests it advanced; ``abort_request`` ends a request and frees its blocks. A request that
    fails inside a step ends with ``RequestOutput.error`` set; the others are unaffected.
    """

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        self.config = parts.config
        self.tokenizer = parts.loaded.tokenizer
        self.scheduler: Scheduler = parts.scheduler
        self.runner = parts.runner
        self.vocab_size = self.runner.model.args.vocab_size
        self._groups: dict[str, RequestGroup] = {}
        self._samples: dict[str, tuple[RequestGroup, Sample]] = {}
        self.num_steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig, loaded: LoadedModel | None = None) -> LLMEngine:
        """Build an engine; pass ``loaded`` to reuse a model already on the device."""
        return cls(build_engine_parts(config, loaded))

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        prompt_text: str | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (with the reason) when it can never run.

        ``prompt`` is text (tokenised here) or token ids; with token ids, ``prompt_text`` is
        the text they came from, if any (outputs carry it). ``cache_salt`` keeps the
        request's prefix-cache blocks apart from those of requests with another salt.
        """
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text = prompt
            prompt_ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            prompt_ids = list(prompt)
        max_tokens = self._check(prompt_ids, params)
        seed = params.seed
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.parts.loaded.eos_token_ids,
            generator=make_generator(None if seed is None else seed % _SEED_MODULUS),
            child_generators=[
                make_generator(None if seed is None else (seed + i) % _SEED_MODULUS)
                for i in range(1, params.n)
            ],
            cache_salt=cache_salt,
        )
        group = RequestGroup(request_id, prompt_text, params)
        self._groups[request_id] = group
        self._track(group, request)
        self.scheduler.add(request)

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Refuse what the model cannot do; returns the request's max_tokens."""
        vocab = self.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        bad = [t for t in params.token_ids_used if t >= vocab]
        if bad:
            field = "stop_token_ids" if bad[0] in params.stop_token_ids else "logit_bias"
            raise ValueError(f"{field} {bad[:5]} are outside the vocabulary [0, {vocab})")
        limit = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} must be at most {limit} (--max-logprobs), got {value}")
        max_len = self.parts.max_model_len
        room = max_len - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else max(room, 1)
        reason = self.scheduler.check_fits(len(prompt_ids), max_tokens)
        if reason is not None:
            raise ValueError(reason)
        if params.min_tokens > max_tokens:  # max_tokens was "the rest of the context"
            raise ValueError(
                f"min_tokens {params.min_tokens} does not fit: {len(prompt_ids)} prompt tokens "
                f"leave {room} of the maximum context length {max_len}"
            )
        return max_tokens

    def _track(self, group: RequestGroup, request: Request) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params)
        sample = Sample(request, detok)
        group.samples.append(sample)
        self._samples[request.request_id] = (group, sample)

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any, and leave their group (the engine cannot
        step after this)."""
        if self.runner.workers is None:
            return
        self.runner.workers.close()
        communicator = self.runner.model.tp.communicator
        if communicator is not None:
            communicator.close()

    def lost_reason(self) -> str | None:
        """Why the engine can no longer step although nothing failed in it (a
        tensor-parallel rank has exited), or None."""
        return None if self.runner.workers is None else self.runner.workers.dead()

    def abort_request(self, request_id: str) -> None:
        """End a request and all its samples; frees their blocks. Unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        if group is not None:
            self._end_group(group, RequestStatus.FINISHED_ABORTED)

    def _end_group(self, group: RequestGroup, status: RequestStatus) -> None:
        for sample in group.samples:
            if not sample.request.finished:
                self.scheduler.finish(sample.request, status)
            self._samples.pop(sample.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass. Returns the outputs of every request group it advanced or ended."""
        output = self.scheduler.schedule()
        result, failures = execute_isolating(self.runner, output)
        self._check_recompiles(output)
        failures += [(request.request_id, error) for request, error in output.failed]
        failures += [(rid, _no_finite_logit()) for rid in result.unsampleable]
        failed = {rid for rid, _ in failures}
        done = tuple(c for c in output.chunks if c.request.request_id not in failed)
        self.scheduler.advance(replace(output, chunks=done))
        self.num_steps += 1
        touched: dict[str, RequestGroup] = {}
        for chunk in done:
            try:
                self._apply(chunk, result, touched)
            except Exception as exc:  # detokenising, stop checks: this request's own state
                failures.append((chunk.request.request_id, exc))
        for request_id, error in failures:
            group = self._fail(request_id, error)
            if group is not None:
                touched[group.request_id] = group
        results = [group.output() for group in touched.values()]
        for group in touched.values():
            if group.finished:
                self._groups.pop(group.request_id, None)
                for sample in group.samples:
                    self._samples.pop(sample.request.request_id, None)
        return results

    def _check_recompiles(self, output: SchedulerOutput) -> None:
        grown = self.runner.new_graphs()
        if not grown:
            return
        shape = [(c.num_computed_tokens, c.num_new_tokens) for c in output.chunks]
        message = (
            f"{grown} graph(s) compiled after warm-up, in a step of {len(output.chunks)} "
            f"sequences (computed, new tokens: {shape[:8]})"
        )
        if self.config.fail_on_recompile:
            raise RecompileError(message)
        logger.warning("%s; every later step of that shape reuses it", message)

    def _apply(
        self, chunk: ScheduledChunk, result: StepResult, touched: dict[str, RequestGroup]
    ) -> None:
        request = chunk.request
        group, sample = self._samples[request.request_id]
        scores = result.prompt_scores.get(request.request_id)
        if scores is not None:
            group.add_prompt_scores(scores)
        tokens = result.sampled.get(request.request_id)
        if tokens is None:  # a prompt chunk that does not reach the end yet
            return
        touched[group.request_id] = group
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = time.monotonic()
        if request.max_tokens == 0:  # the prompt alone was asked for (its logprobs)
            self.scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
            return
        # Fork before the parent's own token can finish it and free the shared blocks.
        for index, token in enumerate(tokens[1:], start=1):
            self._fork(group, request, index, token)
        request.child_generators = []
        self._append(sample, tokens[0])

    def _fail(self, request_id: str, error: BaseException) -> RequestGroup | None:
        """End the group of a failed request with an error; the traceback goes to the log."""
        entry = self._samples.get(request_id)
        if entry is None:
            return None
        group = entry[0]
        logger.error("request %s failed", group.request_id, exc_info=error)
        group.error = public_message(error, group.request_id)
        self._end_group(group, RequestStatus.FINISHED_ERROR)
        return group

    def _fork(self, group: RequestGroup, parent: Request, index: int, token: SampledToken) -> None:
        child = Request(
            request_id=f"{parent.request_id}#{index}",
            prompt_token_ids=parent.prompt_token_ids,
            params=parent.params,
            max_tokens=parent.max_tokens,
            eos_token_ids=parent.eos_token_ids,
            generator=parent.child_generators[index - 1],
            parent_id=parent.request_id,
            index=index,
            cache_salt=parent.cache_salt,
        )
        child.metrics.first_token_time = parent.metrics.first_token_time
        child.num_cached_tokens = parent.num_cached_tokens
        self._track(group, child)
        _, sample = self._samples[child.request_id]
        # Share the prompt's blocks; the partly filled last one is copied next step.
        copies = self.scheduler.kv_cache.fork(
            parent.request_id, child.request_id, parent.num_computed_tokens
        )
        if copies is None:
            self.scheduler.add(child)  # out of blocks: recompute it later instead
        else:
            child.num_computed_tokens = parent.num_computed_tokens
            self.scheduler.add_running(child, copies)
        self._append(sample, token)

    def _append(self, sample: Sample, token: SampledToken) -> None:
        """Add one sampled token; finish the request when a stop condition holds."""
        request = sample.request
        request.token_ids.append(token.token_id)
        if request.params.logprobs is not None:
            sample.logprobs.append(token)
        status, reason = self._stop_by_token(request, token.token_id)
        step = sample.detokenizer.step([token.token_id], final=status is not None)
        if step.stop_reason is not None and status is None:
            status, reason = RequestStatus.FINISHED_STOPPED, step.stop_reason
            step = sample.detokenizer.step([], final=True)
        sample.delta += step.delta
        sample.num_new_tokens += 1
        if status is not None:
            request.stop_reason = reason
            self.scheduler.finish(request, status)

    @staticmethod
    def _stop_by_token(
        request: Request, token_id: int
    ) -> tuple[RequestStatus | None, str | int | None]:
        # The sampler bans these tokens until min_tokens is reached.
        params = request.params
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None


def _no_finite_logit() -> RequestError:
    return RequestError(
        "the model's next-token logits had no finite value to sample from (NaN, or every "
        "token banned)"
    )
