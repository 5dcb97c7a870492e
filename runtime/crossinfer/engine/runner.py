"""Device work of one step: SchedulerOutput -> tensors -> model -> last-token logits -> tokens."""

from __future__ import annotations

import torch

from crossinfer.backend import Backend
from crossinfer.engine.batch import build_attention_batch
from crossinfer.engine.sampler import SampledToken, SamplingRow, sample
from crossinfer.engine.scheduler import ScheduledChunk, SchedulerOutput
from crossinfer.models.llama import LlamaForCausalLM


class ModelRunner:
    """Runs the model over the paged cache it owns, on one backend."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: Backend,
        kv_caches: list[torch.Tensor],
        block_size: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = backend.device()

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> list[list[SampledToken]]:
        """Run one step. Returns, for each chunk that samples (in chunk order), its tokens:
        one, or ``1 + num_children`` when a request forks its samples now."""
        if output.blocks_to_copy:
            pairs = torch.tensor(output.blocks_to_copy, dtype=torch.int64, device=self.device)
            self.backend.copy_blocks(self.kv_caches, pairs)
        if output.is_empty:
            return []
        input_ids, positions = self._inputs(output.chunks)
        batch = build_attention_batch(
            query_lens=[c.num_new_tokens for c in output.chunks],
            seq_lens=[c.num_computed_tokens + c.num_new_tokens for c in output.chunks],
            block_tables=[c.block_ids for c in output.chunks],
            block_size=self.block_size,
            device=self.device,
        )
        hidden = self.model(input_ids, positions, self.kv_caches, batch)

        sampling = [i for i, c in enumerate(output.chunks) if c.samples]
        if not sampling:
            return []
        last_rows = batch.query_start_loc[1:][torch.tensor(sampling, device=self.device)] - 1
        logits = self.model.compute_logits(hidden[last_rows])  # [num_sampling, vocab]
        rows, owners = self._sampling_rows([output.chunks[i] for i in sampling])
        tokens = sample(logits[torch.tensor(owners, device=self.device)], rows)
        grouped: list[list[SampledToken]] = [[] for _ in sampling]
        for owner, token in zip(owners, tokens, strict=True):
            grouped[owner].append(token)
        return grouped

    def _inputs(self, chunks: tuple[ScheduledChunk, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        for chunk in chunks:
            start, end = chunk.num_computed_tokens, chunk.num_computed_tokens + chunk.num_new_tokens
            ids += chunk.request.token_ids[start:end]
            positions += range(start, end)
        return (
            torch.tensor(ids, dtype=torch.int64, device=self.device),
            torch.tensor(positions, dtype=torch.int64, device=self.device),
        )

    @staticmethod
    def _sampling_rows(chunks: list[ScheduledChunk]) -> tuple[list[SamplingRow], list[int]]:
        """One row per sample to draw, and the index of the chunk whose logits it reads."""
        rows: list[SamplingRow] = []
        owners: list[int] = []
        for index, chunk in enumerate(chunks):
            request = chunk.request
            generators = [request.generator]
            if request.num_output_tokens == 0:  # first token: the forked samples draw too
                generators += request.child_generators
            for generator in generators:
                rows.append(
                    SamplingRow(
                        params=request.params,
                        prompt_token_ids=request.prompt_token_ids,
                        output_token_ids=request.output_token_ids,
                        generator=generator,
                        eos_token_ids=tuple(request.eos_token_ids),
                    )
                )
                owners.append(index)
        return rows, owners
