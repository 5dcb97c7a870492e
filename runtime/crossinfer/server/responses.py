"""Engine outputs -> OpenAI response bodies: choices, logprobs and usage. Pure functions,
shared by the whole responses and the streamed chunks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from crossinfer.engine.outputs import CompletionOutput, RequestOutput
from crossinfer.engine.sampler import SampledToken
from crossinfer.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    PromptLogprobs,
    PromptTokenLogprob,
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
    tokens: TokenText,
    sampled: Sequence[SampledToken | None],
    text_offset: int,
    num_top: int | None = None,
) -> CompletionLogprobs:
    """The legacy completions ``logprobs`` object; ``text_offset`` is where the first token's
    text starts in the choice's text. ``num_top`` cuts each token's alternatives (prompt
    scores may carry more than this choice asked for)."""
    result = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    offset = text_offset
    for token in sampled:
        if token is None:  # the first prompt token: nothing comes before it
            continue
        text = tokens.text(token.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(token.logprob)
        result.text_offset.append(offset)
        top = token.top_logprobs[:num_top] if num_top is not None else token.top_logprobs
        result.top_logprobs.append({tokens.text(t): lp for t, lp in top})
        offset += len(text)
    return result


def echo_logprobs(tokens: TokenText, output: RequestOutput, num_top: int) -> CompletionLogprobs:
    """The prompt's part of an echoed choice's ``logprobs``: its first token has null, as
    OpenAI and vLLM answer, then each token's logprob and best ``num_top`` alternatives."""
    scores = output.prompt_logprobs or ()
    rest = completion_logprobs(tokens, scores[1:], 0, num_top)
    first_id = output.prompt_token_ids[0]
    first = tokens.text(first_id)
    return CompletionLogprobs(
        text_offset=[0] + [o + len(first) for o in rest.text_offset],
        token_logprobs=[None, *rest.token_logprobs],
        tokens=[first, *rest.tokens],
        top_logprobs=[None, *rest.top_logprobs],
    )


def join_logprobs(head: CompletionLogprobs, tail: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        text_offset=head.text_offset + tail.text_offset,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        tokens=head.tokens + tail.tokens,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
    )


def vllm_prompt_logprobs(tokens: TokenText, output: RequestOutput, num_top: int) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: per prompt token, {token id: logprob, rank, text} for the
    token itself and its best ``num_top`` alternatives; the first token's is null."""
    result: PromptLogprobs = []
    for score in output.prompt_logprobs or ():
        if score is None:
            result.append(None)
            continue
        entry = {
            str(t): PromptTokenLogprob(logprob=lp, rank=rank, decoded_token=tokens.text(t))
            for rank, (t, lp) in enumerate(score.top_logprobs[:num_top], start=1)
        }
        entry.setdefault(
            str(score.token_id),
            PromptTokenLogprob(
                logprob=score.logprob if score.logprob is not None else float("-inf"),
                rank=score.rank,
                decoded_token=tokens.text(score.token_id),
            ),
        )
        result.append(entry)
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


@dataclass(frozen=True)
class ChoiceSpec:
    """What a completions choice shows besides the text: logprobs (with ``echo``, the
    prompt's first) and vLLM's ``prompt_logprobs``."""

    tokens: TokenText
    tokenizer: Any
    echo: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None


def completion_choice(
    spec: ChoiceSpec,
    output: RequestOutput,
    completion: CompletionOutput,
    index: int,
    *,
    first: bool = True,
    whole: bool = False,
    sent_chars: int = 0,
) -> CompletionChoice:
    """The choice for ``completion``'s latest step (a stream's chunk; ``first`` for the
    choice's first chunk, ``sent_chars`` the text sent before), or for all of it (``whole``:
    a whole response)."""
    delta = completion.text if whole else completion.delta
    text = delta
    if first and spec.echo:
        text = prompt_text(spec.tokenizer, output) + text
    logprobs = None
    if spec.logprobs is not None:
        start = sent_chars + len(text) - len(delta)
        sampled = (completion.logprobs or ()) if whole else new_logprobs(completion)
        logprobs = completion_logprobs(spec.tokens, sampled, start)
        if first and spec.echo:
            logprobs = join_logprobs(echo_logprobs(spec.tokens, output, spec.logprobs), logprobs)
    prompt_scores = None
    if first and spec.prompt_logprobs is not None:
        prompt_scores = vllm_prompt_logprobs(spec.tokens, output, spec.prompt_logprobs)
    return CompletionChoice(
        index=index,
        text=text,
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
        prompt_logprobs=prompt_scores,
    )
