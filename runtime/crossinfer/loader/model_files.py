"""ModelFiles, the loader's one product, and open_model, which picks the format by path."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from crossinfer.loader.default_model import default_model_path
from crossinfer.loader.errors import ModelLoadError
from crossinfer.loader.gguf_file import open_gguf_file
from crossinfer.loader.hf_folder import open_hf_folder

# Set to "1" to silence the weight-loading progress bar (tests, scripts, log files).
NO_PROGRESS_ENV = "CROSSINFER_NO_PROGRESS"

# Which part of a tensor to read, given its name and stored shape: (dim, start, length), or
# None to skip it (a tensor-parallel rank's slice; models/shards.py).
Selector = Callable[[str, Sequence[int]], tuple[int, int, int] | None]


class WeightSource(Protocol):
    """One opened checkpoint format: its config, and its tensors read lazily, one at a time."""

    @property
    def config(self) -> PretrainedConfig: ...

    @property
    def num_tensors(self) -> int: ...

    def iter_tensors(self, select: Selector | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_parameter_name, float tensor)`` pairs, reading each when it is reached;
        with ``select``, only the selected part of each (skipped ones are not yielded)."""
        ...

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """Build the model's tokenizer, chat template included when the model has one."""
        ...


@dataclass(frozen=True)
class ModelFiles:
    """An opened model: its Hugging Face config, and its weights and tokenizer on demand.

    Opening reads only headers and metadata; weights are read (and GGUF blocks dequantised)
    one tensor at a time by ``iter_weights``, so peak memory is one tensor above the model.
    """

    path: str  # the folder or .gguf file that was opened
    config: PretrainedConfig  # config.architectures names the HF class, e.g. LlamaForCausalLM
    num_tensors: int  # how many tensors iter_weights yields
    source: WeightSource = field(repr=False, compare=False)  # the format-specific reader

    def iter_weights(self, select: Selector | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` with HF parameter names and float tensors.

        With ``select``, each tensor's selected part only: safetensors read just those bytes
        (so a tensor-parallel rank holds about 1/N of the model at its peak); GGUF tensors are
        sliced after dequantising, one at a time.
        Quantised GGUF tensors come out as fp32; safetensors keep their stored dtype.
        ``lm_head.weight`` appears only when the checkpoint stores it (not when tied).
        A progress bar goes to stderr unless ``CROSSINFER_NO_PROGRESS=1``.
        """
        disable = os.environ.get(NO_PROGRESS_ENV) == "1"
        yield from tqdm(
            self.source.iter_tensors(select),
            desc="Loading weights",
            total=self.num_tensors,
            unit="tensor",
            file=sys.stderr,
            disable=disable,
        )

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer, with ``chat_template`` set when the model has one."""
        return self.source.load_tokenizer()


def open_model(path: str | None) -> ModelFiles:
    """Open a Hugging Face model folder or a .gguf file; ``None`` opens the embedded default.

    Raises ModelLoadError, naming the file and the problem, for anything it cannot load.
    """
    if path is None:
        path = default_model_path()
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise ModelLoadError(
            f"{path}: no such file or folder; pass a Hugging Face model folder "
            f"(config.json + *.safetensors) or a .gguf file"
        )
    source: WeightSource = open_hf_folder(path) if os.path.isdir(path) else open_gguf_file(path)
    return ModelFiles(
        path=path, config=source.config, num_tensors=source.num_tensors, source=source
    )
