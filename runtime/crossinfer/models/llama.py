"""The Llama family (Llama, Mistral, Qwen2, SmolLM): one plain model over a ragged batch.

Tokens of all sequences in a step are packed into one ``[num_tokens]`` batch; attention is the
backend's paged attention, everything else is plain PyTorch. Projections that read the same
input are fused (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) so a step runs two
matrix multiplies fewer per layer; ``load_weights`` maps checkpoint names onto the fused ones.

Tensor parallelism (``TensorParallel``): each rank holds its query heads, KV heads and MLP
columns (``models/shards.py``) and reduces through the backend's communicator after
``o_proj`` and ``down_proj`` (``layers/parallel.py``); the embedding and the LM head are split
by vocabulary. At size 1 every layer is the plain one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from crossinfer.backend import AttentionBatch, Backend
from crossinfer.distributed.tensor_parallel import TensorParallel
from crossinfer.layers.activation import SiluAndMul
from crossinfer.layers.norm import RMSNorm
from crossinfer.layers.parallel import inner, lm_head, row_linear, vocab_embedding
from crossinfer.layers.rotary import RotaryEmbedding, Rotate
from crossinfer.models.shards import VOCAB_TENSORS, RankShards, narrow


@dataclass(frozen=True)
class LlamaArgs:
    """The numbers the model is built from, read once from the HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of one decoder layer's matrix multiplies: q/k/v, o, gate/up and down."""
        attention = (2 * self.num_heads + 2 * self.num_kv_heads) * self.head_dim * self.hidden_size
        return attention + 3 * self.hidden_size * self.intermediate_size

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> LlamaArgs:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        is_qwen2 = config.model_type == "qwen2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; the Llama family uses 'silu'")
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [num_tokens, 1, head_dim // 2] each


class LlamaAttention(nn.Module):
    def __init__(
        self, args: LlamaArgs, backend: Backend, shards: RankShards, tp: TensorParallel
    ) -> None:
        super().__init__()
        self.backend = backend
        q_size, kv_size = shards.q[1], shards.kv[1]  # this rank's
        self.num_heads = q_size // args.head_dim
        self.num_kv_heads = kv_size // args.head_dim
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.qkv_proj = nn.Linear(args.hidden_size, q_size + 2 * kv_size, bias=args.qkv_bias)
        self.o_proj = row_linear(q_size, args.hidden_size, args.o_bias, tp)
        self.rotate = Rotate()

    def forward(
        self,
        rope: Rope,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention output, and the layer's cache after the write (a new tensor when the
        backend updates functionally)."""
        num_tokens = hidden.shape[0]
        # [num_tokens, num_heads + 2 * num_kv_heads, head_dim]: q heads, then k, then v
        qkv = self.qkv_proj(hidden).view(num_tokens, -1, self.head_dim)
        num_qk = self.num_heads + self.num_kv_heads
        qk = self.rotate(qkv[:, :num_qk], *rope)  # q and k rotate in one pass
        q, k, v = qk[:, : self.num_heads], qk[:, self.num_heads :], qkv[:, num_qk:]
        written = self.backend.write_kv(k, v, kv_cache, batch.slot_mapping)
        if written is not None:  # a functional update: the new cache replaces the old
            kv_cache = written
        out = self.backend.attention(q, kv_cache, batch, self.scale)
        return self.o_proj(out.view(num_tokens, -1)), kv_cache


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs, shards: RankShards, tp: TensorParallel) -> None:
        super().__init__()
        columns = shards.mlp[1]  # this rank's
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * columns, bias=args.mlp_bias)
        self.down_proj = row_linear(columns, args.hidden_size, args.mlp_bias, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, args: LlamaArgs, backend: Backend, shards: RankShards, tp: TensorParallel
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, backend, shards, tp)
        self.mlp = LlamaMLP(args, shards, tp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        rope: Rope,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The residual stream is carried beside the layer's output and added at the next norm
        (``residual`` is None at the first layer): one fused add-and-norm per sublayer. Also
        returns the layer's cache after this step's write."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden, kv_cache = self.self_attn(rope, hidden, kv_cache, batch)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual, kv_cache


# checkpoint suffix -> (fused parameter suffix, shard index)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM whose attention runs on a crossinfer backend."""

    def __init__(
        self,
        config: PretrainedConfig,
        backend: Backend,
        dtype: torch.dtype,
        max_positions: int | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.args = args = LlamaArgs.from_config(config)
        self.dtype = dtype
        self.tp = tp = tp or TensorParallel()
        self.shards = shards = RankShards.build(
            tp, args.num_heads, args.num_kv_heads, args.head_dim, args.intermediate_size,
            args.vocab_size,
        )  # fmt: skip
        self.rotary = RotaryEmbedding(
            config,
            args.head_dim,
            max_positions or args.max_position_embeddings,
            dtype,
            backend.device(),
        )
        self.embed_tokens = vocab_embedding(args.vocab_size, args.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, backend, shards, tp) for _ in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = lm_head(args.hidden_size, args.vocab_size, tp)
        self.tie_weights()

    @property
    def num_local_kv_heads(self) -> int:
        """The KV heads this rank's cache holds."""
        return self.shards.kv[1] // self.args.head_dim

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (both are split
        the same way)."""
        if self.args.tie_word_embeddings:
            inner(self.lm_head).weight = inner(self.embed_tokens).weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """input_ids, positions: [num_tokens]. Returns hidden states [num_tokens, hidden].
        A backend that updates its cache functionally gets the new caches stored back into
        ``kv_caches`` (the list is the engine's)."""
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual, kv_cache = layer(rope, hidden, residual, kv_caches[i], batch)
            if kv_cache is not kv_caches[i]:
                kv_caches[i] = kv_cache
        if residual is None:  # a model without layers
            return self.norm(hidden)
        return self.norm.add_and_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> [num_rows, vocab] in fp32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], whole: bool = True) -> None:
        """Copy checkpoint tensors (HF names) into the parameters; every parameter must be set.
        ``whole``: the tensors are the checkpoint's whole tensors, and this rank takes its part
        of each; False: they are this rank's parts already, as a loader reads them with
        ``select=self.shards.select`` (without reading the rest)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (
                name.startswith("lm_head") and self.args.tie_word_embeddings
            ):
                continue
            if whole:
                part = self.shards.select(name, tensor.shape)
                if part is None:  # held by another rank
                    continue
                tensor = narrow(tensor, part)
            target, shard = self._map_name(name)
            target = target if target in params else _inner_name(target)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
            param = params[target]
            view = self._shard_view(param, target, shard) if shard is not None else param
            if self.tp.size > 1 and name.endswith(VOCAB_TENSORS):
                view = self._vocab_rows(view, tensor.shape[0])
            if view.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(view.shape)}"
                )
            with torch.no_grad():
                view.copy_(tensor)
            loaded.add(f"{target}#{shard}" if shard is not None else target)
        self._check_all_loaded(params, loaded)

    @staticmethod
    def _vocab_rows(param: torch.Tensor, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of a vocabulary shard (the last rank's may hold fewer real
        rows than its size: the rest are zeroed padding)."""
        with torch.no_grad():
            param.narrow(0, rows, param.shape[0] - rows).zero_()
        return param.narrow(0, 0, rows)

    @staticmethod
    def _map_name(name: str) -> tuple[str, int | None]:
        name = name.removeprefix("model.")
        for suffix, (fused, shard) in _FUSED.items():
            marker = f".{suffix}."
            if marker in name:
                return name.replace(marker, f".{fused}."), shard
        return name, None

    def _shard_view(self, param: torch.Tensor, target: str, shard: int) -> torch.Tensor:
        if ".qkv_proj." in target:
            sizes = [self.shards.q[1], self.shards.kv[1], self.shards.kv[1]]
        else:
            sizes = [self.shards.mlp[1]] * 2
        start = sum(sizes[:shard])
        return param.narrow(0, start, sizes[shard])

    def _check_all_loaded(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name.startswith("lm_head") and self.args.tie_word_embeddings:
                continue
            shards = 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 0
            wanted = [f"{name}#{i}" for i in range(shards)] if shards else [name]
            missing += [w for w in wanted if w not in loaded]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"the checkpoint is missing {len(missing)} tensors: {shown}")


def _inner_name(target: str) -> str:
    """``a.b.weight`` -> ``a.b.inner.weight``: the shard inside a tensor-parallel wrapper."""
    module, _, leaf = target.rpartition(".")
    return f"{module}.inner.{leaf}"
