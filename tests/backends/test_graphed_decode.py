"""GraphedDecode's static buffers and padding, with a stand-in for graph capture that replays
by calling the captured function again on the same buffers (no GPU here), over the emulated
cuda backend's kernels. What this checks is the wrapper's bookkeeping: static buffers, padding
rows that write nothing, one capture per size, eager fallback."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaConfig

from crossinfer.backend import KVCacheSpec
from crossinfer.engine.batch import build_attention_batch
from crossinfer.models.registry import build_model
from crossinfer_cuda import CudaBackend
from crossinfer_triton.graphs import GraphedDecode

CONFIG = LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=40,
    architectures=["LlamaForCausalLM"],
)
BLOCK_SIZE = 4


class ReplayByCalling:
    """Captures by remembering the function; replays by calling it on the static buffers."""

    def __init__(self) -> None:
        self.captures = 0

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        self.captures += 1
        out = fn()
        return out, lambda: out.copy_(fn())


def _model_and_caches(backend: CudaBackend) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(CONFIG, backend, torch.float32)
    model.load_weights((name, torch.randn_like(p)) for name, p in _hf_shapes().items())
    spec = KVCacheSpec(2, 2, 8, BLOCK_SIZE, torch.float32)
    return model, backend.allocate_kv_cache(spec, 12)


def _hf_shapes() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(CONFIG).state_dict()


def _decode(context: list[int], tables: list[list[int]], ids: list[int]):
    batch = build_attention_batch(
        [1] * len(context), [c + 1 for c in context], tables, BLOCK_SIZE, torch.device("cpu")
    )
    return torch.tensor(ids), torch.tensor(context), batch


@torch.inference_mode()
def test_padded_decode_replays_equal_eager_and_write_only_real_slots(
    emulated_cuda: CudaBackend,
) -> None:
    model, caches = _model_and_caches(emulated_cuda)
    capture = ReplayByCalling()
    graphed = GraphedDecode(model, capture, sizes=(1, 4))
    # A prefill runs eagerly and fills the caches both paths start from.
    prefill = build_attention_batch(
        [5, 9, 3], [5, 9, 3], [[3, 2], [7, 1, 9], [5]], BLOCK_SIZE, torch.device("cpu")
    )
    ids = torch.randint(0, 61, (17,))
    positions = torch.tensor([*range(5), *range(9), *range(3)])
    graphed(ids, positions, caches, prefill)
    assert capture.captures == 0

    eager_caches = [c.clone() for c in caches]
    tables = [[3, 2], [7, 1, 9], [5, 6]]
    written = torch.zeros(12 * BLOCK_SIZE, dtype=torch.bool)  # slots the real rows wrote
    for step in range(3):  # 3 sequences padded to 4; the second replay reuses the capture
        context = [5 + step, 9 + step, 3 + step]
        inputs = _decode(context, tables, [11 + step, 12, 13])
        expected = model(*inputs[:2], eager_caches, inputs[2])
        got = graphed(*inputs[:2], caches, inputs[2])
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
        written[inputs[2].slot_mapping] = True
        for graph_cache, eager_cache in zip(caches, eager_caches, strict=True):
            # [2, blocks, block_size, kv_heads, head] -> [2, slots, kv_heads * head]
            graph_slots, eager_slots = (
                c.flatten(1, 2).flatten(2) for c in (graph_cache, eager_cache)
            )
            # Padding wrote nothing: every other slot is exactly as the eager run left it.
            assert torch.equal(graph_slots[:, ~written], eager_slots[:, ~written])
            # The real rows' keys and values agree up to the GEMM's rounding, which may
            # differ between 3 and 4 rows.
            assert torch.allclose(graph_slots[:, written], eager_slots[:, written], atol=1e-5)
    assert capture.captures == 1

    one = _decode([8], [[3, 2, 11]], [4])
    single = graphed(*one[:2], caches, one[2])
    assert single.shape == (1, 32) and capture.captures == 2
    five = _decode([1, 1, 1, 1, 1], [[0], [4], [6], [8], [10]], [1, 2, 3, 4, 5])
    graphed(*five[:2], caches, five[2])  # larger than every captured size: eager
    assert capture.captures == 2
