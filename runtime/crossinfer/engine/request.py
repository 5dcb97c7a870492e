"""A request as the engine tracks it: its tokens, how many are computed, and its state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed inside the engine; the others went on

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.monotonic``) of a request's milestones."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def time_per_output_token(self, num_output_tokens: int) -> float | None:
        """Mean time between output tokens after the first; None with fewer than two."""
        if self.first_token_time is None or self.finished_time is None or num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (num_output_tokens - 1)


@dataclass
class Request:
    """One sequence being generated.

    ``token_ids`` holds the prompt followed by the generated tokens. ``num_computed_tokens``
    counts the tokens whose keys and values are in the cache; each step it catches up with
    ``num_tokens`` by a chunk (a whole or partial prompt, or one decoded token).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """Generated tokens allowed, already capped by the model's context length."""
    eos_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    child_generators: list[torch.Generator | None] = field(default_factory=list)
    """One per extra sample (``n - 1``) to fork from this request at its first token."""
    parent_id: str | None = None
    """The request this one was forked from (n > 1), or None."""
    index: int = 0
    """Which of the parent's ``n`` samples this is."""
    cache_salt: str | None = None
    """Mixed into the prefix-cache hashes: requests share cached blocks only under the same
    salt (vLLM's ``cache_salt``; a tenant's own namespace)."""
    lora: LoRARequest | None = None
    """The adapter the request runs under, or None for the base model."""
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at first admission."""
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def lora_int_id(self) -> int | None:
        return None if self.lora is None else self.lora.lora_int_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status.finished
