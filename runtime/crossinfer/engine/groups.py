"""The engine's view of one user request: its ``n`` samples, their text state, its prompt
logprobs, and how it ended; and the ``RequestOutput`` it reports after each step."""

from __future__ import annotations

from crossinfer.engine.detokenizer import IncrementalDetokenizer
from crossinfer.engine.outputs import CompletionOutput, RequestMetricsOutput, RequestOutput
from crossinfer.engine.prompt_logprobs import PromptScores
from crossinfer.engine.request import Request
from crossinfer.engine.sampler import SampledToken
from crossinfer.sampling_params import SamplingParams


class Sample:
    """One of a request group's samples: the request plus its text state."""

    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer) -> None:
        self.request = request
        self.detokenizer = detokenizer
        self.logprobs: list[SampledToken] = []
        self.delta = ""  # text added since the last output
        self.num_new_tokens = 0  # tokens added since the last output


class RequestGroup:
    """The ``n`` samples of one user request (forked from the first at its first token)."""

    def __init__(self, request_id: str, prompt: str | None, params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.samples: list[Sample] = []
        # Entry i scores prompt token i; the first has nothing before it (None).
        self.prompt_logprobs: list[SampledToken | None] | None = (
            None if params.prompt_logprobs is None else [None]
        )
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

    def output(self) -> RequestOutput:
        """The group as of now; then the per-step deltas start again."""
        first = self.samples[0].request
        completions = tuple(
            CompletionOutput(
                index=s.request.index,
                text=s.detokenizer.text,
                token_ids=tuple(s.request.output_token_ids),
                delta=s.delta,
                num_new_tokens=s.num_new_tokens,
                logprobs=tuple(s.logprobs) if self.params.logprobs is not None else None,
                finish_reason=s.request.status.value if s.request.finished else None,
                stop_reason=s.request.stop_reason,
            )
            for s in self.samples
        )
        for sample in self.samples:
            sample.delta, sample.num_new_tokens = "", 0
        metrics = first.metrics
        generated = sum(s.request.num_output_tokens for s in self.samples)
        scores = self.prompt_logprobs
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=tuple(first.prompt_token_ids),
            outputs=completions,
            finished=self.finished,
            metrics=RequestMetricsOutput(
                arrival_time=metrics.arrival_time,
                time_to_first_token=metrics.time_to_first_token,
                time_per_output_token=metrics.time_per_output_token(first.num_output_tokens),
                num_prompt_tokens=first.num_prompt_tokens,
                num_cached_tokens=first.num_cached_tokens,
                num_generated_tokens=generated,
            ),
            prompt_logprobs=tuple(scores) if scores is not None else None,
            error=self.error,
        )
