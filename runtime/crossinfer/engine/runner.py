"""Device work of one step: SchedulerOutput -> tensors -> model -> logits -> tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crossinfer.backend import Backend
from crossinfer.engine.batch import build_attention_batch
from crossinfer.engine.prompt_logprobs import PromptScores, score_tokens
from crossinfer.engine.sampler import SampledToken, SamplingError, SamplingRow, sample
from crossinfer.engine.scheduler import ScheduledChunk, SchedulerOutput
from crossinfer.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class StepResult:
    """What one forward pass produced, by request id."""

    sampled: dict[str, list[SampledToken]] = field(default_factory=dict)
    """For each chunk that samples: one token, or ``1 + num_children`` when the request
    forks its samples now."""
    prompt_scores: dict[str, PromptScores] = field(default_factory=dict)
    """Prompt-token logprobs of the chunks whose request asked for them."""
    unsampleable: tuple[str, ...] = ()
    """Requests whose logits had no finite value to sample from (they must fail)."""


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
    def execute(self, output: SchedulerOutput) -> StepResult:
        """Run one step: copy blocks, run the model over every chunk, score the prompt rows
        that were asked for, and sample each chunk that reaches the end of its tokens."""
        if output.blocks_to_copy:
            pairs = torch.tensor(output.blocks_to_copy, dtype=torch.int64, device=self.device)
            self.backend.copy_blocks(self.kv_caches, pairs)
        if output.is_empty:
            return StepResult()
        input_ids, positions = self._inputs(output.chunks)
        query_lens = [c.num_new_tokens for c in output.chunks]
        batch = build_attention_batch(
            query_lens=query_lens,
            seq_lens=[c.num_computed_tokens + c.num_new_tokens for c in output.chunks],
            block_tables=[c.block_ids for c in output.chunks],
            block_size=self.block_size,
            device=self.device,
        )
        hidden = self.model(input_ids, positions, self.kv_caches, batch)
        scores = self._prompt_scores(output.chunks, hidden, query_lens)

        sampling = [i for i, c in enumerate(output.chunks) if c.samples]
        if not sampling:
            return StepResult(prompt_scores=scores)
        last_rows = batch.query_start_loc[1:][torch.tensor(sampling, device=self.device)] - 1
        logits = self.model.compute_logits(hidden[last_rows])  # [num_sampling, vocab]
        chunks = [output.chunks[i] for i in sampling]
        sampled, unsampleable = self._sample(logits, chunks)
        return StepResult(sampled, scores, unsampleable)

    def _sample(
        self, logits: torch.Tensor, chunks: list[ScheduledChunk]
    ) -> tuple[dict[str, list[SampledToken]], tuple[str, ...]]:
        """Tokens per request; a chunk whose logits cannot be sampled is left out and named,
        and the others are sampled as if it had not been there (no draw happened yet)."""
        rows, owners = self._sampling_rows(chunks)
        keep = list(range(len(chunks)))
        try:
            tokens = sample(logits[torch.tensor(owners, device=self.device)], rows)
        except SamplingError as exc:
            bad = {owners[r] for r in exc.rows}
            keep = [i for i in keep if i not in bad]
            picked = [r for r, owner in enumerate(owners) if owner not in bad]
            owners = [owners[r] for r in picked]
            index = torch.tensor(owners, dtype=torch.long, device=self.device)
            tokens = sample(logits.index_select(0, index), [rows[r] for r in picked])
        sampled: dict[str, list[SampledToken]] = {chunks[i].request.request_id: [] for i in keep}
        for owner, token in zip(owners, tokens, strict=True):
            sampled[chunks[owner].request.request_id].append(token)
        failed = tuple(chunks[i].request.request_id for i in range(len(chunks)) if i not in keep)
        return sampled, failed

    def _prompt_scores(
        self, chunks: tuple[ScheduledChunk, ...], hidden: torch.Tensor, query_lens: list[int]
    ) -> dict[str, PromptScores]:
        """Row ``p`` of a prompt chunk scores prompt token ``p + 1``; the last prompt row
        belongs to the first sampled token instead."""
        scores: dict[str, PromptScores] = {}
        row = 0
        for chunk, num_rows in zip(chunks, query_lens, strict=True):
            request = chunk.request
            num_top = request.params.prompt_logprobs
            start = chunk.num_computed_tokens
            end = min(start + num_rows, request.num_prompt_tokens - 1)
            if num_top is not None and end > start:
                scores[request.request_id] = PromptScores(
                    start + 1,
                    score_tokens(
                        self.model.compute_logits,
                        hidden[row : row + end - start],
                        request.prompt_token_ids[start + 1 : end + 1],
                        num_top,
                    ),
                )
            row += num_rows
        return scores

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
