"""Text for the engine core's token outputs: incremental detokenising and stop strings.

The engine core reports token ids (``CoreOutput``); this turns them into the
``RequestOutput`` callers read, with each sample's text and streamed delta. A stop string ends
a sample here, so the processor tells its caller which samples the core must stop: in-process
(``LLMEngine``) that happens before the next step, so no token is wasted; in front of an
engine-core process the core may have sampled a token or two more, which are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from crossinfer.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from crossinfer.engine.errors import public_message
from crossinfer.engine.outputs import (
    CompletionOutput,
    CoreOutput,
    RequestOutput,
    SampleDelta,
)
from crossinfer.engine.sampler import SampledToken
from crossinfer.sampling_params import SamplingParams

logger = logging.getLogger("crossinfer.engine")


class _SampleText:
    def __init__(self, detokenizer: IncrementalDetokenizer) -> None:
        self.detokenizer = detokenizer
        self.token_ids: list[int] = []
        self.logprobs: list[SampledToken] = []
        self.delta = ""  # text added since the last output
        self.num_new_tokens = 0  # tokens added since the last output
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None


class _GroupText:
    def __init__(self, prompt: str | None, prompt_ids: Sequence[int], params: SamplingParams):
        self.prompt = prompt
        self.prompt_ids = tuple(prompt_ids)
        self.params = params
        self.samples: dict[int, _SampleText] = {}
        self.prompt_logprobs: tuple[SampledToken | None, ...] | None = None
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        if self.error is not None:
            return True
        done = [s.finish_reason is not None for s in self.samples.values()]
        return len(done) == self.params.n and all(done)


@dataclass
class Processed:
    """One batch of core outputs as text, and what the core must be told."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stops: list[tuple[str, int]] = field(default_factory=list)
    """(request id, sample index) whose text reached a stop string: ``stop_sample`` them."""
    failed: list[str] = field(default_factory=list)
    """Request ids whose text could not be made (the group failed): abort them in the core."""


class OutputProcessor:
    """Per request group: one incremental detokenizer per sample, the tokens so far and the
    finish state as the text sees it (a stop string) or the core reported it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._groups: dict[str, _GroupText] = {}

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        group = self._groups[request_id] = _GroupText(prompt, prompt_ids, params)
        self._sample(group, 0)

    def _sample(self, group: _GroupText, index: int) -> _SampleText:
        sample = group.samples.get(index)
        if sample is None:  # the first sample at once, the others when the core forks them
            detokenizer = IncrementalDetokenizer(self.tokenizer, group.prompt_ids, group.params)
            sample = group.samples[index] = _SampleText(detokenizer)
        return sample

    def drop(self, request_id: str) -> None:
        """Forget a request (aborted or refused); later outputs for it are ignored."""
        self._groups.pop(request_id, None)

    def process(self, core_outputs: Sequence[CoreOutput]) -> Processed:
        processed = Processed()
        for core in core_outputs:
            group = self._groups.get(core.request_id)
            if group is None:  # dropped, or already finished by a stop string
                continue
            try:
                for delta in core.samples:
                    if self._apply(group, delta):
                        processed.stops.append((core.request_id, delta.index))
            except Exception as exc:  # this request's own text state
                logger.error("request %s failed", core.request_id, exc_info=exc)
                group.error = public_message(exc, core.request_id)
                processed.failed.append(core.request_id)
            if core.prompt_logprobs is not None:
                group.prompt_logprobs = core.prompt_logprobs
            if core.error is not None:
                group.error = core.error
            if group.error is not None:
                for sample in group.samples.values():
                    sample.finish_reason = sample.finish_reason or "error"
            processed.outputs.append(self._output(core, group))
            if group.finished:
                del self._groups[core.request_id]
        return processed

    def _apply(self, group: _GroupText, delta: SampleDelta) -> bool:
        """Add one sample's new tokens; True when a stop string ended it here (the core does
        not know yet)."""
        sample = self._sample(group, delta.index)
        if sample.finish_reason is not None:  # tokens sampled after a stop string: dropped
            return False
        last = len(delta.new_token_ids) - 1
        for position, token_id in enumerate(delta.new_token_ids):
            sample.token_ids.append(token_id)
            if delta.new_logprobs is not None:
                sample.logprobs.append(delta.new_logprobs[position])
            sample.num_new_tokens += 1
            ends_here = position == last and delta.finish_reason is not None
            step = sample.detokenizer.step([token_id], final=ends_here)
            sample.delta += step.delta
            if step.stop_reason is not None and not ends_here:
                sample.delta += sample.detokenizer.step([], final=True).delta
                sample.finish_reason, sample.stop_reason = "stop", step.stop_reason
                return True
        if delta.finish_reason is not None:
            sample.finish_reason, sample.stop_reason = delta.finish_reason, delta.stop_token_id
        return False

    def _output(self, core: CoreOutput, group: _GroupText) -> RequestOutput:
        """The group as of now; then the per-step deltas start again."""
        with_logprobs = group.params.logprobs is not None
        completions = []
        for index in sorted(group.samples):
            s = group.samples[index]
            completions.append(
                CompletionOutput(
                    index=index,
                    text=s.detokenizer.text,
                    token_ids=tuple(s.token_ids),
                    delta=s.delta,
                    num_new_tokens=s.num_new_tokens,
                    logprobs=tuple(s.logprobs) if with_logprobs else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
            s.delta, s.num_new_tokens = "", 0
        metrics = core.metrics
        generated = sum(len(s.token_ids) for s in group.samples.values())
        if generated != metrics.num_generated_tokens:  # tokens after a stop string: dropped
            metrics = replace(metrics, num_generated_tokens=generated)
        return RequestOutput(
            request_id=core.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_ids,
            outputs=tuple(completions),
            finished=group.finished,
            metrics=metrics,
            prompt_logprobs=group.prompt_logprobs,
            error=group.error,
        )
