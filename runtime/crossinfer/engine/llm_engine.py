"""The in-process engine: the engine core plus text (tokenising prompts, detokenising
outputs, stop strings). Synchronous; the offline ``LLM`` and the in-process server wrap it."""

from __future__ import annotations

from collections.abc import Sequence

from crossinfer.engine.core import EngineCore
from crossinfer.engine.grammar import check_constraint
from crossinfer.engine.output_processor import OutputProcessor
from crossinfer.engine.outputs import RequestOutput
from crossinfer.engine.setup import EngineConfig, EngineParts, LoadedModel, build_engine_parts
from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams


class LLMEngine:
    """Continuous batching over one model on one backend, in text and token ids.

    ``add_request`` queues work, ``step`` runs one forward pass and returns the outputs of the
    requests it advanced; ``abort_request`` ends a request and frees its blocks. A request that
    fails inside a step ends with ``RequestOutput.error`` set; the others are unaffected.
    """

    def __init__(self, parts: EngineParts) -> None:
        self.core = EngineCore(parts)
        self.parts = parts
        self.config = parts.config
        self.tokenizer = parts.loaded.tokenizer
        self.scheduler = self.core.scheduler
        self.runner = self.core.runner
        self.vocab_size = self.core.vocab_size
        self.processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_config(cls, config: EngineConfig, loaded: LoadedModel | None = None) -> LLMEngine:
        """Build an engine; pass ``loaded`` to reuse a model already on the device."""
        return cls(build_engine_parts(config, loaded))

    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        prompt_text: str | None = None,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (with the reason) when it can never run.

        ``prompt`` is text (tokenised here) or token ids; with token ids, ``prompt_text`` is
        the text they came from, if any (outputs carry it). ``cache_salt`` keeps the
        request's prefix-cache blocks apart from those of requests with another salt;
        ``lora_request`` runs it under that adapter.
        """
        check_constraint(params.structured_outputs)  # a bad schema fails here, not in a step
        if isinstance(prompt, str):
            prompt_text = prompt
            prompt_ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            prompt_ids = list(prompt)
        self.core.add_request(
            request_id, prompt_ids, params, cache_salt=cache_salt, lora_request=lora_request
        )
        self.processor.add(request_id, prompt_text, prompt_ids, params)

    def abort_request(self, request_id: str) -> None:
        """End a request and all its samples; frees their blocks. Unknown ids are ignored."""
        self.core.abort_request(request_id)
        self.processor.drop(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        return self.core.num_unfinished_requests

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (the engine cannot step after this)."""
        self.core.close()

    def lost_reason(self) -> str | None:
        """Why the engine can no longer step although nothing failed in it, or None."""
        return self.core.lost_reason()

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass. Returns the outputs of every request group it advanced or ended;
        a sample that reached a stop string is stopped in the core before the next step."""
        processed = self.processor.process(self.core.step())
        for request_id, index in processed.stops:
            self.core.stop_sample(request_id, index)
        for request_id in processed.failed:
            self.core.abort_request(request_id)
        return processed.outputs
