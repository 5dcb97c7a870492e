"""The limits a server puts on requests, as flags with TGI's names where TGI has one (and
vLLM's --max-logprobs, an engine flag). A request beyond a limit is refused with a 4xx before
it reaches the engine."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. None: derived from the model (see ``resolve``)."""

    max_n: int = 16
    """Samples per prompt (``n``, ``best_of``)."""
    max_stop_sequences: int = 16
    """Stop strings, and separately stop token ids, per request."""
    max_input_tokens: int | None = None
    """Prompt tokens; default: the model's context length minus one."""
    max_total_tokens: int | None = None
    """Prompt tokens plus max_tokens; default: the model's context length."""
    max_concurrent_requests: int = 128
    """HTTP generation requests in flight; more get 429 with Retry-After."""
    max_client_batch_size: int = 128
    """Prompts in one /v1/completions request."""

    def resolve(self, max_model_len: int) -> ServerLimits:
        """These limits with the model's defaults filled in; ValueError when inconsistent."""
        total = self.max_total_tokens or max_model_len
        given_input = self.max_input_tokens
        limits = replace(self, max_total_tokens=total, max_input_tokens=given_input or total - 1)
        if total > max_model_len:
            raise ValueError(
                f"--max-total-tokens {total} exceeds the model's context length {max_model_len}"
            )
        if not 0 < limits.input_tokens < total:
            raise ValueError(
                f"--max-input-tokens {limits.input_tokens} must be at least 1 and below "
                f"--max-total-tokens {total}"
            )
        for name in ("max_n", "max_stop_sequences", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_client_batch_size < 1:
            raise ValueError("--max-client-batch-size must be at least 1")
        return limits

    @property
    def input_tokens(self) -> int:
        assert self.max_input_tokens is not None, "call resolve() first"
        return self.max_input_tokens

    @property
    def total_tokens(self) -> int:
        assert self.max_total_tokens is not None, "call resolve() first"
        return self.max_total_tokens


# (flags, ServerLimits field, help); a help's {} is the field's default.
_FLAGS = (
    (("--max-n", "--max-best-of"), "max_n", "most samples per prompt, n or best_of (default {})"),
    (
        ("--max-stop-sequences",),
        "max_stop_sequences",
        "most stop strings, and stop token ids, per request (default {})",
    ),
    (
        ("--max-input-tokens",),
        "max_input_tokens",
        "most prompt tokens (default: the context minus one)",
    ),
    (
        ("--max-total-tokens",),
        "max_total_tokens",
        "most prompt plus generated tokens (default: the context length)",
    ),
    (
        ("--max-concurrent-requests",),
        "max_concurrent_requests",
        "generation requests in flight before 429 (default {})",
    ),
    (
        ("--max-client-batch-size",),
        "max_client_batch_size",
        "most prompts in one completions request (default {})",
    ),
)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-n`` ... ``--max-client-batch-size``."""
    defaults = ServerLimits()
    group = parser.add_argument_group("request limits")
    for flags, field, text in _FLAGS:
        default = getattr(defaults, field)
        group.add_argument(*flags, dest=field, type=int, default=default, help=text.format(default))


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{field: getattr(args, field) for _, field, _ in _FLAGS})
