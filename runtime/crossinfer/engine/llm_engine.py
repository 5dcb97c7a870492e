"""The step loop: add requests, step, read outputs. Synchronous; the server wraps it."""

from __future__ import annotations

import time
from collections.abc import Sequence

from crossinfer.engine.detokenizer import IncrementalDetokenizer
from crossinfer.engine.outputs import CompletionOutput, RequestMetricsOutput, RequestOutput
from crossinfer.engine.request import Request, RequestStatus
from crossinfer.engine.sampler import SampledToken, make_generator
from crossinfer.engine.scheduler import Scheduler, SchedulerOutput
from crossinfer.engine.setup import EngineConfig, EngineParts, LoadedModel, build_engine_parts
from crossinfer.sampling_params import SamplingParams


class _Sample:
    """One of a request group's samples: the request plus its text state."""

    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer) -> None:
        self.request = request
        self.detokenizer = detokenizer
        self.logprobs: list[SampledToken] = []
        self.delta = ""
        self.num_new_tokens = 0


class _Group:
    """The ``n`` samples of one user request."""

    def __init__(self, request_id: str, prompt: str | None, params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.samples: list[_Sample] = []

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.params.n and all(s.request.finished for s in self.samples)


class LLMEngine:
    """Continuous batching over one model on one backend.

    ``add_request`` queues work, ``step`` runs one forward pass and returns the outputs of the
    requests it advanced; ``abort_request`` ends a request and frees its blocks.
    """

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        self.config = parts.config
        self.tokenizer = parts.loaded.tokenizer
        self.scheduler: Scheduler = parts.scheduler
        self.runner = parts.runner
        self._groups: dict[str, _Group] = {}
        self._samples: dict[str, tuple[_Group, _Sample]] = {}
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
    ) -> None:
        """Queue a request. Raises ValueError (with the reason) when it can never run."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            prompt_ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            text, prompt_ids = None, list(prompt)
        self._check_token_ids(prompt_ids)
        max_len = self.parts.max_model_len
        max_tokens = params.max_tokens or max(max_len - len(prompt_ids), 1)
        reason = self.scheduler.check_fits(len(prompt_ids), max_tokens)
        if reason is not None:
            raise ValueError(reason)

        seed = params.seed
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.parts.loaded.eos_token_ids,
            generator=make_generator(seed),
            child_generators=[
                make_generator(None if seed is None else seed + i) for i in range(1, params.n)
            ],
        )
        group = _Group(request_id, text, params)
        self._groups[request_id] = group
        self._track(group, request)
        self.scheduler.add(request)

    def _check_token_ids(self, prompt_ids: list[int]) -> None:
        vocab = self.runner.model.args.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def _track(self, group: _Group, request: Request) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params)
        sample = _Sample(request, detok)
        group.samples.append(sample)
        self._samples[request.request_id] = (group, sample)

    def abort_request(self, request_id: str) -> None:
        """End a request and all its samples; frees their blocks. Unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for sample in group.samples:
            if not sample.request.finished:
                self.scheduler.finish(sample.request, RequestStatus.FINISHED_ABORTED)
            self._samples.pop(sample.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass. Returns the outputs of every request group it advanced."""
        output = self.scheduler.schedule()
        sampled = self.runner.execute(output)
        self.scheduler.advance(output)
        self.num_steps += 1
        touched = self._apply_samples(output, sampled)
        results = [self._output(group) for group in touched]
        for group in touched:
            for sample in group.samples:
                sample.delta, sample.num_new_tokens = "", 0
            if group.finished:
                self._groups.pop(group.request_id, None)
                for sample in group.samples:
                    self._samples.pop(sample.request.request_id, None)
        return results

    def _apply_samples(
        self, output: SchedulerOutput, sampled: list[list[SampledToken]]
    ) -> list[_Group]:
        touched: dict[str, _Group] = {}
        now = time.monotonic()
        chunks = [c for c in output.chunks if c.samples]
        for chunk, tokens in zip(chunks, sampled, strict=True):
            request = chunk.request
            group, sample = self._samples[request.request_id]
            touched[group.request_id] = group
            forks = tokens[1:]
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            # Fork before the parent's own token can finish it and free the shared blocks.
            for index, token in enumerate(forks, start=1):
                self._fork(group, request, index, token)
            request.child_generators = []
            self._append(sample, tokens[0])
        return list(touched.values())

    def _fork(self, group: _Group, parent: Request, index: int, token: SampledToken) -> None:
        child = Request(
            request_id=f"{parent.request_id}#{index}",
            prompt_token_ids=parent.prompt_token_ids,
            params=parent.params,
            max_tokens=parent.max_tokens,
            eos_token_ids=parent.eos_token_ids,
            generator=parent.child_generators[index - 1],
            parent_id=parent.request_id,
            index=index,
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

    def _append(self, sample: _Sample, token: SampledToken) -> None:
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

    def _output(self, group: _Group) -> RequestOutput:
        first = group.samples[0].request
        completions = tuple(
            CompletionOutput(
                index=s.request.index,
                text=s.detokenizer.text,
                token_ids=tuple(s.request.output_token_ids),
                delta=s.delta,
                num_new_tokens=s.num_new_tokens,
                logprobs=tuple(s.logprobs) if group.params.logprobs is not None else None,
                finish_reason=s.request.status.value if s.request.finished else None,
                stop_reason=s.request.stop_reason,
            )
            for s in group.samples
        )
        metrics = first.metrics
        generated = sum(s.request.num_output_tokens for s in group.samples)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=tuple(first.prompt_token_ids),
            outputs=completions,
            finished=group.finished,
            metrics=RequestMetricsOutput(
                arrival_time=metrics.arrival_time,
                time_to_first_token=metrics.time_to_first_token,
                time_per_output_token=metrics.time_per_output_token(first.num_output_tokens),
                num_prompt_tokens=first.num_prompt_tokens,
                num_cached_tokens=first.num_cached_tokens,
                num_generated_tokens=generated,
            ),
        )
