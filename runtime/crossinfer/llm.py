"""The offline API: ``LLM(...).generate(prompts, params)`` and ``.chat(messages, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from crossinfer.engine.errors import RequestFailedError
from crossinfer.engine.llm_engine import LLMEngine
from crossinfer.engine.outputs import RequestOutput
from crossinfer.engine.setup import EngineConfig, LoadedModel
from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams

Prompt = str | Sequence[int]
PromptInput = Prompt | Mapping[str, Any]
"""What ``generate`` takes per prompt: a Prompt, or vLLM's ``{"prompt": text}`` /
``{"prompt_token_ids": ids}``."""
Message = dict[str, Any]


class LLM:
    """One model on one backend, for batch generation in-process.

    ``model=None`` loads the embedded default (SmolLM2-135M-Instruct); every other keyword is
    an :class:`EngineConfig` field (``max_num_seqs``, ``kv_cache_memory``, ...). ``loaded``
    reuses a model already loaded by ``crossinfer.engine.setup.load_model`` (tests, benchmarks).
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        loaded: LoadedModel | None = None,
        **engine_args: Any,
    ):
        config = EngineConfig(model=model, device=device, **engine_args)
        self.engine = LLMEngine.from_config(config, loaded)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if the engine has any."""
        self.engine.close()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) together; outputs in prompt order.
        ``lora_request``: one adapter for every prompt, or one (or None: the base model) per
        prompt; needs ``LLM(enable_lora=True)``. Raises RequestFailedError, after the others
        finished, if a request failed."""
        prompt_list = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
        if len(param_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(param_list)} SamplingParams")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_list = [lora_request] * len(prompt_list)
        else:
            lora_list = list(lora_request)
        if len(lora_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(lora_list)} LoRA requests")
        ids = [str(next(self._ids)) for _ in prompt_list]
        for request_id, prompt, p, lora in zip(
            ids, prompt_list, param_list, lora_list, strict=True
        ):
            self.engine.add_request(request_id, prompt, p, lora_request=lora)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        outputs = [finished[i] for i in ids]
        for output in outputs:
            if output.error is not None:
                raise RequestFailedError(output.request_id, output.error)
        return outputs

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.apply_chat_template(list(c), add_generation_prompt)  # type: ignore[arg-type]
            for c in conversations
        ]
        return self.generate(prompts, params)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[Prompt]:
    """One prompt or many, as a list of prompts: text, token ids, or vLLM's prompt dicts
    (``{"prompt": text}``, ``{"prompt_token_ids": ids}``)."""
    if isinstance(prompts, str | Mapping):
        return [_one_prompt(prompts)]
    items = list(prompts)
    if items and all(isinstance(p, int) for p in items):
        return [[int(p) for p in items]]  # type: ignore[arg-type]
    return [_one_prompt(p) for p in items]


def _one_prompt(prompt: object) -> Prompt:
    if isinstance(prompt, Mapping):
        keys = set(prompt)
        if keys == {"prompt_token_ids"}:
            return [int(t) for t in prompt["prompt_token_ids"]]
        if keys == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        raise ValueError(
            f"a prompt dict takes exactly one of 'prompt' (text) or 'prompt_token_ids', not "
            f"{sorted(keys)}"
        )
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return prompt
    raise TypeError(
        f"a prompt is text, a list of token ids or a prompt dict, not {type(prompt).__name__}"
    )
