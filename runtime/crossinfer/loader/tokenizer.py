"""Tokenizers, with their chat templates, for a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from crossinfer.loader.errors import ModelLoadError

# Any one of these means the folder ships a tokenizer that AutoTokenizer can try to read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_folder_tokenizer(folder: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a Hugging Face model folder (tokenizer.json and friends)."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
            f"copy them from the model's repository into this folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer in this folder: {exc}") from exc
    return tokenizer


def load_gguf_tokenizer(path: str, chat_template: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer that transformers builds from a GGUF file's ``tokenizer.*`` metadata.

    ``chat_template`` is the file's ``tokenizer.chat_template``; it is set on the tokenizer when
    transformers did not set one itself.
    """
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{path}: cannot build a tokenizer from this GGUF file's metadata: {exc}"
        ) from exc
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer
