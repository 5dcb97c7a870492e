"""A tiny random Llama with a word-level tokenizer, saved as a Hugging Face folder, built
offline in a second: the model every L5 case runs through the engine."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 256
NUM_SPECIAL = 3  # <unk>, <s>, </s>; prompts draw from the other ids


def build_tiny_model(folder: Path, head_size: int, seed: int) -> Path:
    """Save a 2-layer Llama (2 query heads sharing 1 KV head of ``head_size``) and its
    tokenizer into ``folder``; return the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=2 * head_size,
        intermediate_size=4 * head_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_size,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Wider than the default 0.02, so logits spread out and greedy choices have margins
        # far above any backend's rounding.
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(NUM_SPECIAL, VOCAB_SIZE)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return folder
