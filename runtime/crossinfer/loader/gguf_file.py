"""A GGUF file read with the gguf package: HF tensor names, dequantised one at a time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from crossinfer.loader.errors import ModelLoadError

if TYPE_CHECKING:
    from crossinfer.loader.model_files import Selector
from crossinfer.loader.gguf_config import GGUFMetadata, gguf_config
from crossinfer.loader.tokenizer import load_gguf_tokenizer

_Q = GGMLQuantizationType
# The storage types this loader dequantises (all through gguf.quants.dequantize).
SUPPORTED_TENSOR_TYPES = frozenset(
    {_Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0}
    | {_Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K}
)

_GGUF_MAGIC = b"GGUF"

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3 frequency factors: derived data the HF model does not hold (transformers drops it too).
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF parameter name for a GGUF tensor name, or None if it has none."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK_PARTS:
        return None
    return f"model.layers.{match[1]}.{_BLOCK_PARTS[match[2]]}.{match[3]}"


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor to load: where it is in the file, its HF name and how to undo llama.cpp."""

    hf_name: str
    stored: ReaderTensor
    # llama.cpp interleaves the rotary halves of each head of attn_q / attn_k for the llama
    # architecture; this many heads to undo it over, or None when the tensor was not permuted.
    permuted_heads: int | None


@dataclass(frozen=True)
class GGUFSource:
    """Reads a GGUF file's tensors lazily (the file is memory-mapped) as fp32 HF tensors."""

    path: str
    config: PretrainedConfig
    tensors: tuple[PlannedTensor, ...]
    chat_template: str | None  # tokenizer.chat_template, for when transformers drops it

    @property
    def num_tensors(self) -> int:
        """How many tensors iter_tensors yields."""
        return len(self.tensors)

    def iter_tensors(self, select: Selector | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield each tensor dequantised to fp32, in HF layout; with ``select``, its selected
        part (sliced after dequantising: GGUF blocks run along whole rows)."""
        for planned in self.tensors:
            tensor = load_planned_tensor(planned)
            if select is None or tensor.dim() == 0:
                yield planned.hf_name, tensor
                continue
            part = select(planned.hf_name, tensor.shape)
            if part is not None:
                dim, start, length = part
                yield planned.hf_name, tensor.narrow(dim, start, length)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer transformers builds from the file's metadata, with its chat template."""
        return load_gguf_tokenizer(self.path, self.chat_template)


def open_gguf_file(path: str) -> GGUFSource:
    """Read a GGUF file's metadata and tensor table; tensor data is read later.

    Raises ModelLoadError for a file that is not GGUF or is truncated, an unsupported
    architecture, or a tensor type this loader cannot dequantise.
    """
    reader = _read_gguf(path)
    meta = GGUFMetadata(path, reader)
    config = gguf_config(meta, {tensor.name for tensor in reader.tensors})
    tensors = tuple(_plan_tensors(path, reader, config))
    template = meta.get("tokenizer.chat_template")
    return GGUFSource(
        path=path,
        config=config,
        tensors=tensors,
        chat_template=str(template) if template is not None else None,
    )


def load_planned_tensor(planned: PlannedTensor) -> torch.Tensor:
    """Dequantise one stored tensor to fp32 and undo llama.cpp's row permutation if any."""
    stored = planned.stored
    values = np.asarray(dequantize(stored.data, stored.tensor_type), dtype=np.float32)
    if not values.flags.writeable:
        # F32 data comes back as a view of the read-only memory map.
        values = np.array(values)
    # GGUF lists dimensions fastest-first; torch wants them slowest-first.
    shape = tuple(int(dim) for dim in reversed(stored.shape.tolist()))
    tensor = torch.from_numpy(values).reshape(shape)
    if planned.permuted_heads is not None:
        tensor = unpermute_rotary_rows(tensor, planned.permuted_heads)
    return tensor


def unpermute_rotary_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's attn_q / attn_k permutation (rows, so weights and biases alike).

    llama.cpp stores each head's rows as interleaved (x0, x_half, x1, x_half+1, ...) pairs for
    its rotary kernel; HF keeps the two halves apart: [num_heads, 2, head_dim // 2] rows.
    """
    rows = tensor.shape[0]
    half = rows // num_heads // 2
    # [num_heads, head_dim // 2, 2, ...] -> [num_heads, 2, head_dim // 2, ...]
    grouped = tensor.reshape(num_heads, half, 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape).contiguous()


def _read_gguf(path: str) -> GGUFReader:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not {_GGUF_MAGIC!r}); pass a "
            f".gguf file or a Hugging Face model folder"
        )
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, OverflowError) as exc:
        # The reader slices a memory map; a short file shows up as arrays of the wrong size.
        raise ModelLoadError(
            f"{path}: truncated or corrupt GGUF file ({exc}); download it again"
        ) from exc


def _plan_tensors(
    path: str, reader: GGUFReader, config: PretrainedConfig
) -> Iterator[PlannedTensor]:
    permutes = config.architectures == ["LlamaForCausalLM"]
    for stored in reader.tensors:
        if stored.name in _IGNORED_TENSORS:
            continue
        hf_name = hf_tensor_name(stored.name)
        if hf_name is None:
            raise ModelLoadError(
                f"{path}: unexpected tensor {stored.name} for a {config.model_type} model"
            )
        _check_tensor_type(path, stored)
        heads = None
        if permutes and ".attn_q." in stored.name:
            heads = config.num_attention_heads
        elif permutes and ".attn_k." in stored.name:
            heads = config.num_key_value_heads
        # GGUF lists a tensor's dimensions fastest-first, so its row count comes last.
        if heads is not None and stored.shape[-1] % (2 * heads) != 0:
            raise ModelLoadError(
                f"{path}: tensor {stored.name} has {stored.shape[-1]} rows, not a multiple of "
                f"2 x {heads} heads"
            )
        yield PlannedTensor(hf_name=hf_name, stored=stored, permuted_heads=heads)


def _check_tensor_type(path: str, stored: ReaderTensor) -> None:
    if stored.tensor_type in SUPPORTED_TENSOR_TYPES:
        return
    supported = ", ".join(t.name for t in sorted(SUPPORTED_TENSOR_TYPES))
    raise ModelLoadError(
        f"{path}: tensor {stored.name} is stored as {stored.tensor_type.name}, which crossinfer "
        f"cannot dequantise; supported types: {supported}"
    )
