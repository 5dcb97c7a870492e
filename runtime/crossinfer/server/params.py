"""Request bodies -> SamplingParams, within the server's limits.

Types and static ranges were checked by the pydantic models; here the server's limits
(--max-n, --max-stop-sequences, --max-logprobs) are applied and the fields become a
SamplingParams, whose own checks raise ValueError, answered as a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any

from crossinfer.sampling_params import SamplingParams
from crossinfer.server.constraints import request_constraint, tgi_constraint
from crossinfer.server.errors import APIError, bad_request
from crossinfer.server.limits import ServerLimits
from crossinfer.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from crossinfer.server.tgi_protocol import TGIParameters
from crossinfer.server.tools import ToolPlan


def _too_many(param: str, value: int, limit: int, flag: str) -> APIError:
    return APIError(
        400,
        f"{param}: {value} is more than the limit of {limit} ({flag})",
        param=param,
        code="invalid_value",
    )


class ParamsBuilder:
    """Builds each route's SamplingParams under one server's limits."""

    def __init__(self, limits: ServerLimits, max_logprobs: int) -> None:
        self.limits = limits
        self.max_logprobs = max_logprobs

    def _check_count(self, param: str, value: int | None, limit: int, flag: str) -> None:
        if value is not None and value > limit:
            raise _too_many(param, value, limit, flag)

    def _check_stops(self, stop: list[str], stop_token_ids: list[int], prefix: str = "") -> None:
        limit = self.limits.max_stop_sequences
        self._check_count(f"{prefix}stop", len(stop), limit, "--max-stop-sequences")
        self._check_count("stop_token_ids", len(stop_token_ids), limit, "--max-stop-sequences")

    def _logprobs(self, param: str, value: int | None) -> None:
        self._check_count(param, value, self.max_logprobs, "--max-logprobs")

    def _common(self, body: SamplingFields, tools: ToolPlan | None = None) -> dict[str, Any]:
        n = 1 if body.n is None else body.n
        self._check_count("n", n, self.limits.max_n, "--max-n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
        self._check_stops(stop, list(body.stop_token_ids or ()))
        self._logprobs("prompt_logprobs", body.prompt_logprobs)
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        fields = {
            "n": n,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "min_p": body.min_p,
            "seed": body.seed,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "repetition_penalty": body.repetition_penalty,
            "logit_bias": bias,
            "stop": stop,
            "stop_token_ids": body.stop_token_ids,
            "ignore_eos": body.ignore_eos,
            "min_tokens": body.min_tokens,
            "include_stop_str_in_output": body.include_stop_str_in_output,
            "skip_special_tokens": body.skip_special_tokens,
            "prompt_logprobs": body.prompt_logprobs,
            "structured_outputs": request_constraint(body, tools.constraint() if tools else None),
        }
        return {k: v for k, v in fields.items() if v is not None}  # null = SamplingParams' default

    def completion(self, body: CompletionRequest) -> SamplingParams:
        """The sampling parameters of a /v1/completions request. ``echo`` with ``logprobs``
        scores the prompt too: its tokens' logprobs come before the completion's."""
        fields = self._common(body)
        n = fields["n"]
        if body.best_of is not None and body.best_of != n:
            raise APIError(
                400,
                f"best_of: must equal n ({n}); best-of ranking is not supported",
                param="best_of",
                code="unsupported_parameter",
            )
        self._logprobs("logprobs", body.logprobs)
        fields["max_tokens"] = body.max_tokens
        fields["logprobs"] = body.logprobs
        if body.echo and body.logprobs is not None:
            fields["prompt_logprobs"] = max(body.logprobs, body.prompt_logprobs or 0)
        return _build(fields)

    def chat(self, body: ChatCompletionRequest, tools: ToolPlan | None = None) -> SamplingParams:
        """The sampling parameters of a /v1/chat/completions request (``tools``: the call
        the reply must make, if any, constrains it)."""
        fields = self._common(body, tools)
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        fields["max_tokens"] = max_tokens  # None: the rest of the context
        if body.logprobs:
            self._logprobs("top_logprobs", body.top_logprobs)
            fields["logprobs"] = body.top_logprobs or 0
        elif body.top_logprobs:
            raise APIError(
                400,
                "top_logprobs: needs logprobs: true",
                param="top_logprobs",
                code="invalid_value",
            )
        names = {"logprobs": "top_logprobs"}
        if body.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return _build(fields, names)

    def tgi(self, parameters: TGIParameters) -> SamplingParams:
        """TGI semantics: greedy unless ``do_sample`` or a sampling knob is set; every token
        carries its logprob (TGI's token events always do)."""
        self._check_stops(parameters.stop, [], "parameters.")
        self._logprobs("parameters.top_n_tokens", parameters.top_n_tokens)
        sampling = parameters.do_sample or any(
            v is not None for v in (parameters.temperature, parameters.top_p, parameters.top_k)
        )
        fields: dict[str, Any] = {
            "temperature": _or(parameters.temperature, 1.0) if sampling else 0.0,
            "top_p": parameters.top_p,
            "top_k": parameters.top_k,
            "repetition_penalty": parameters.repetition_penalty,
            "frequency_penalty": parameters.frequency_penalty,
            "seed": parameters.seed,
            "stop": parameters.stop,
            "max_tokens": parameters.max_new_tokens,
            "logprobs": parameters.top_n_tokens or 0,
            "prompt_logprobs": 0 if parameters.decoder_input_details else None,
            "structured_outputs": tgi_constraint(parameters.grammar),
        }
        names = {"max_tokens": "parameters.max_new_tokens", "*": "inputs"}
        names |= {k: f"parameters.{k}" for k in fields if k != "max_tokens"}
        names["logprobs"] = "parameters.top_n_tokens"
        return _build({k: v for k, v in fields.items() if v is not None}, names)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _build(fields: dict[str, Any], names: dict[str, str] | None = None) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise bad_request(exc, names) from exc
