"""Engine outputs -> OpenAI response bodies: choices, logprobs and usage. Pure functions,
shared by the whole responses and the streamed chunks."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from crossinfer.engine.outputs import CompletionOutput, RequestOutput
from crossinfer.engine.sampler import SampledToken
from crossinfer.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
    UsageInfo,
)


def usage(outputs: Sequence[RequestOutput]) -> UsageInfo:
    """Prompt tokens once per prompt, plus every sample's generated tokens."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def prompt_text(tokenizer: Any, output: RequestOutput) -> str:
    """The prompt as text, for ``echo`` (decoded when it was sent as token ids)."""
    if output.prompt is not None:
        return output.prompt
    return str(tokenizer.decode(list(output.prompt_token_ids), skip_special_tokens=False))


def new_logprobs(completion: CompletionOutput) -> Sequence[SampledToken]:
    """The logprobs of the tokens the latest step added."""
    if not completion.logprobs or completion.num_new_tokens == 0:
        return ()
    return completion.logprobs[-completion.num_new_tokens :]


class TokenText:
    """Token id -> the text and UTF-8 bytes of that one token, cached."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)

    def _text(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False))

    def bytes(self, token_id: int) -> list[int]:
        return list(self.text(token_id).encode("utf-8"))


def completion_logprobs(
    tokens: TokenText, sampled: Sequence[SampledToken], text_offset: int
) -> CompletionLogprobs:
    """The legacy completions ``logprobs`` object; ``text_offset`` is where the first token's
    text starts in the choice's text."""
    result = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    offset = text_offset
    for token in sampled:
        text = tokens.text(token.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(token.logprob)
        result.text_offset.append(offset)
        result.top_logprobs.append({tokens.text(t): lp for t, lp in token.top_logprobs})
        offset += len(text)
    return result


def chat_logprobs(tokens: TokenText, sampled: Sequence[SampledToken]) -> ChatLogprobs:
    """The chat ``logprobs`` object: per token its text, logprob, bytes and the top ones."""
    content = [
        ChatTokenLogprob(
            token=tokens.text(token.token_id),
            logprob=token.logprob if token.logprob is not None else float("-inf"),
            bytes=tokens.bytes(token.token_id),
            top_logprobs=[
                TopLogprob(token=tokens.text(t), logprob=lp, bytes=tokens.bytes(t))
                for t, lp in token.top_logprobs
            ],
        )
        for token in sampled
    ]
    return ChatLogprobs(content=content)
