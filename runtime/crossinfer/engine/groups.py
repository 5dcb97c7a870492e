"""The engine core's view of one user request: its ``n`` samples, the tokens each gained since
the last output, its prompt logprobs, and how it ended; and the ``CoreOutput`` it reports."""

from __future__ import annotations

from crossinfer.engine.outputs import CoreOutput, RequestMetricsOutput, SampleDelta
from crossinfer.engine.prompt_logprobs import PromptScores
from crossinfer.engine.request import Request
from crossinfer.engine.sampler import SampledToken
from crossinfer.sampling_params import SamplingParams


class Sample:
    """One of a request group's samples: the request plus the tokens since the last output."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.new_tokens: list[SampledToken] = []


class RequestGroup:
    """The ``n`` samples of one user request (forked from the first at its first token)."""

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.samples: list[Sample] = []
        # Entry i scores prompt token i; the first has nothing before it (None).
        self.prompt_logprobs: list[SampledToken | None] | None = (
            None if params.prompt_logprobs is None else [None]
        )
        self._prompt_logprobs_sent = False
        self.error: str | None = None  # set when the group failed inside the engine

    @property
    def finished(self) -> bool:
        if self.error is not None:
            return True
        return len(self.samples) == self.params.n and all(s.request.finished for s in self.samples)

    def add_prompt_scores(self, scores: PromptScores) -> None:
        """Record scores from a step; a recomputed chunk (after preemption) repeats earlier
        positions, which are kept as they were."""
        assert self.prompt_logprobs is not None
        have = len(self.prompt_logprobs)
        if scores.start <= have:
            self.prompt_logprobs.extend(scores.tokens[have - scores.start :])

    def output(self) -> CoreOutput:
        """What changed since the last output; then the per-step lists start again. The prompt
        logprobs go out once, with the first output (complete: it follows the first sampled
        token)."""
        with_logprobs = self.params.logprobs is not None
        samples = tuple(
            SampleDelta(
                index=s.request.index,
                new_token_ids=tuple(t.token_id for t in s.new_tokens),
                new_logprobs=tuple(s.new_tokens) if with_logprobs else None,
                finish_reason=s.request.status.value if s.request.finished else None,
                stop_token_id=s.request.stop_reason
                if isinstance(s.request.stop_reason, int)
                else None,
            )
            for s in self.samples
        )
        for sample in self.samples:
            sample.new_tokens = []
        first = self.samples[0].request
        metrics = first.metrics
        scores = None
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            scores = tuple(self.prompt_logprobs)
            self._prompt_logprobs_sent = True
        return CoreOutput(
            request_id=self.request_id,
            samples=samples,
            finished=self.finished,
            metrics=RequestMetricsOutput(
                arrival_time=metrics.arrival_time,
                time_to_first_token=metrics.time_to_first_token,
                time_per_output_token=metrics.time_per_output_token(first.num_output_tokens),
                num_prompt_tokens=first.num_prompt_tokens,
                num_cached_tokens=first.num_cached_tokens,
                num_generated_tokens=sum(s.request.num_output_tokens for s in self.samples),
            ),
            prompt_logprobs=scores,
            error=self.error,
        )
