"""Incremental detokenisation for streaming, with stop strings.

Token ids become text through a sliding window, so the cost of a step does not grow with the
output length. The window holds a settled prefix (tokens already turned into text) followed
by the unsettled tokens; the text of the unsettled tokens is decode(window) minus
decode(prefix). Decoding them together with a prefix, instead of alone, keeps rules that apply
at the start of a text (SentencePiece drops the first token's leading space) away from the
new tokens. The first window starts with the last few prompt tokens for the same reason.

A byte-level or byte-fallback tokenizer can end a token in the middle of a UTF-8 character;
decode then ends with U+FFFD. Such trailing replacement characters are held back until later
tokens complete the character (or the request finishes).

Text that could be the start of a stop string is held back too, until it either completes the
stop string (the output is cut there) or cannot any more, so streamed deltas never contain
part of a stop string that later matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crossinfer.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens that open the first window: enough to cover a multi-token word or character.
_PROMPT_CONTEXT_TOKENS = 6


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer uses."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: Any
    ) -> str | list[str]:
        """Text of ``token_ids``."""
        ...


@dataclass(frozen=True)
class DetokenizerStep:
    """What one step adds to the streamed output."""

    delta: str  # new text since the previous step; may be empty while text is held back
    stop_reason: str | None  # the stop string that ended the output, or None


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas, step by step.

    The concatenated deltas equal ``tokenizer.decode(output_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)`` cut at the first stop string, provided the last
    step is called with ``final=True`` (which releases text held back for an unfinished
    character or a possible stop string). Tokenizer clean-up is off: it rewrites spaces
    across token boundaries, which an incremental decode cannot reproduce.
    With a SentencePiece tokenizer the output keeps the leading space of its first word,
    as it reads after the prompt.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._params = params
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        prefix_text = self._decode(context)
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character the output may complete: no context.
            context, prefix_text = [], ""
        self._window = context  # settled prefix tokens, then unsettled tokens
        self._num_settled = len(context)  # tokens of the window that are the prefix
        self._prefix_text = prefix_text  # decode(prefix tokens)
        self._num_unsettled_sent = 0  # chars of the unsettled text already passed on
        self._held = ""  # decoded text held back as a possible stop-string start
        self._chunks: list[str] = []  # the deltas so far
        self._num_output_tokens = 0
        self._stop_reason: str | None = None

    @property
    def text(self) -> str:
        """All output text streamed so far (cut at the stop string once one matched)."""
        return "".join(self._chunks)

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    def step(self, new_token_ids: Sequence[int], *, final: bool = False) -> DetokenizerStep:
        """Add this step's tokens; ``final=True`` on the request's last step flushes held text.

        After a stop string matched, further steps return an empty delta.
        """
        if self._stop_reason is not None:
            return DetokenizerStep("", self._stop_reason)
        self._num_output_tokens += len(new_token_ids)
        delta = self._apply_stop(self._decode_new(new_token_ids, final), final)
        self._chunks.append(delta)
        return DetokenizerStep(delta, self._stop_reason)

    def _decode(self, token_ids: list[int]) -> str:
        text = self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        if not isinstance(text, str):
            raise TypeError(f"tokenizer.decode returned {type(text).__name__}, expected str")
        return text

    def _decode_new(self, new_token_ids: Sequence[int], final: bool) -> str:
        """Text of the new tokens that is complete (no unfinished trailing character)."""
        self._window.extend(new_token_ids)
        unsettled = self._decode(self._window)[len(self._prefix_text) :]
        if unsettled.endswith(_REPLACEMENT_CHAR) and not final:
            # Later tokens may complete the character: pass on only what precedes it.
            ready = unsettled.rstrip(_REPLACEMENT_CHAR)
            new_text = ready[self._num_unsettled_sent :]
            self._num_unsettled_sent = max(self._num_unsettled_sent, len(ready))
            return new_text
        new_text = unsettled[self._num_unsettled_sent :]
        # Settle: the unsettled tokens become the next prefix; older tokens leave the window.
        del self._window[: self._num_settled]
        self._num_settled = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._num_unsettled_sent = 0
        return new_text

    def _apply_stop(self, new_text: str, final: bool) -> str:
        """The delta to stream: cut at a stop string, hold back a possible stop start."""
        params = self._params
        text = self._held + new_text
        self._held = ""
        if not params.stop:
            return text
        if self._num_output_tokens >= params.min_tokens:
            match = _find_stop(text, params.stop)
            if match is not None:
                start, stop = match
                self._stop_reason = stop
                return (
                    text[: start + len(stop)] if params.include_stop_str_in_output else text[:start]
                )
        if not final:
            num_held = _partial_stop_len(text, params.stop)
            if num_held:
                self._held = text[-num_held:]
                return text[:-num_held]
        return text


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest (start, stop string) in ``text``; the first listed wins a tie."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop)
    return best


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
