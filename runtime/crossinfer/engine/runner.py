"""Device work of one step: SchedulerOutput -> tensors -> model -> logits -> tokens.

Two paths: a dynamic backend gets each step's exact shapes; a compiled backend (one that
declares ``StaticShapes``) gets the step padded to its buckets (engine/static_batch.py),
logits at a padded list of rows, and sampling on the host. Each step is framed by the
backend's ``begin_step`` and ``end_step``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from crossinfer.backend import Backend, StaticShapes
from crossinfer.engine.batch import build_attention_batch
from crossinfer.engine.prompt_logprobs import ROWS_PER_SLICE, PromptScores, score_tokens
from crossinfer.engine.sampler import SampledToken, SamplingError, SamplingRow, sample
from crossinfer.engine.scheduler import ScheduledChunk, SchedulerOutput
from crossinfer.engine.static_batch import all_shapes, build_padded_step
from crossinfer.lora.manager import LoRAManager
from crossinfer.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from crossinfer.engine.grammar import GrammarStates
    from crossinfer.engine.workers import WorkerGroup

logger = logging.getLogger("crossinfer.engine")


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
        static: StaticShapes | None = None,
        max_logprobs: int = 20,
        samples: bool = True,
        lora: LoRAManager | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = backend.device()
        self.static = static
        self.max_logprobs = max_logprobs  # compiled backends take this many top logprobs
        # False on a tensor-parallel worker: its logits are computed (the LM head gathers
        # them, a collective every rank takes part in) and rank 0 alone samples.
        self.samples = samples
        self.lora = lora  # the model's adapters (--enable-lora), placed in slots each step
        self.workers: WorkerGroup | None = None  # ranks that mirror every call (rank 0 only)
        self.grammars: GrammarStates | None = None  # structured outputs' matchers (the core's)
        self._graphs_seen: int | None = None  # compiled graphs counted after the warm-up

    def _no_grad(self) -> torch.autograd.grad_mode.no_grad | torch.inference_mode:
        # Compiled-graph devices run under no_grad: torch-xla cannot take inference tensors
        # ("Cannot set version_counter for inference tensor"), and a compiler should see the
        # same kind of tensor at every step.
        return torch.no_grad() if self.static is not None else torch.inference_mode()

    def execute(self, output: SchedulerOutput) -> StepResult:
        """Run one step: copy blocks, run the model over every chunk, score the prompt rows
        that were asked for, and sample each chunk that reaches the end of its tokens."""
        if self.workers is None:
            with self._no_grad():
                return self._execute(output)
        self.workers.send("execute", output)
        try:
            with self._no_grad():
                result = self._execute(output)
        except Exception:
            self.workers.collect(local_failed=True)
            raise
        self.workers.collect()
        return result

    def _execute(self, output: SchedulerOutput) -> StepResult:
        self.backend.begin_step()
        if output.blocks_to_copy:
            pairs = torch.tensor(output.blocks_to_copy, dtype=torch.int64, device=self.device)
            self.backend.copy_blocks(self.kv_caches, pairs)
            if self.static is not None:  # the copies are a graph of their own (warmed up)
                self.backend.synchronize()
        if output.is_empty:
            self.backend.end_step()
            return StepResult()
        if self.static is not None:
            return self._execute_padded(output.chunks, self.static)
        input_ids, positions = self._inputs(output.chunks)
        query_lens = [c.num_new_tokens for c in output.chunks]
        if self.lora is not None:
            self.lora.prepare(
                [(c.request.lora, c.num_new_tokens) for c in output.chunks], self.device
            )
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
            self.backend.end_step()
            return StepResult(prompt_scores=scores)
        last_rows = batch.query_start_loc[1:][torch.tensor(sampling, device=self.device)] - 1
        logits = self.model.compute_logits(hidden[last_rows])  # [num_sampling, vocab]
        self.backend.end_step()
        chunks = [output.chunks[i] for i in sampling]
        sampled, unsampleable = self._sample(logits, chunks)
        return StepResult(sampled, scores, unsampleable)

    def _execute_padded(
        self, chunks: tuple[ScheduledChunk, ...], static: StaticShapes
    ) -> StepResult:
        step = build_padded_step(chunks, static, self.block_size, self.device)
        hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.batch)
        # [num_seqs bucket, vocab]: a row per sequence slot, the real ones first
        logits = self.model.compute_logits(hidden.index_select(0, step.logits_indices))
        self.backend.end_step()  # the step's graph ends here: model and logits
        query_lens = [c.num_new_tokens for c in chunks]
        scores = self._prompt_scores(chunks, hidden, query_lens, self.max_logprobs)
        if static.sample_on_host:
            logits = logits.cpu()
        sampling = [c for c in chunks if c.samples]
        if not sampling:
            return StepResult(prompt_scores=scores)
        sampled, unsampleable = self._sample(logits[: step.num_sampling], sampling)
        return StepResult(sampled, scores, unsampleable)

    # -- compiled backends: warm-up and the recompile check ---------------------------------
    def warm_up(self, progress: bool = True) -> tuple[int, float]:
        """Run every shape the backend declared once (all of it padding, written to the sink),
        so each graph is compiled before serving: the step at each shape, prompt scoring at
        each token bucket, a block copy. Then start counting graphs. Returns (shapes run,
        seconds)."""
        assert self.static is not None
        if self.workers is not None:
            self.workers.send("warm_up", None)
        with self._no_grad():
            shapes = self._warm_up(self.static, progress)
        if self.workers is not None:
            self.workers.collect()
        return shapes

    def _warm_up(self, static: StaticShapes, progress: bool) -> tuple[int, float]:
        start = time.monotonic()
        # Work still queued (weights and caches on a lazy device) would join the first step's
        # graph, making it a graph no later step repeats.
        self.backend.synchronize()
        shapes = all_shapes(static)
        scored: set[int] = set()
        for shape in tqdm(shapes, desc="compiling step shapes", disable=not progress):
            self.backend.begin_step()
            step = build_padded_step((), static, self.block_size, self.device, shape)
            hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.batch)
            logits = self.model.compute_logits(hidden.index_select(0, step.logits_indices))
            self.backend.end_step()
            if shape.num_tokens not in scored:  # prompt scoring reads this step's rows
                scored.add(shape.num_tokens)
                targets = [0] * min(ROWS_PER_SLICE, shape.num_tokens)
                top = self.max_logprobs
                score_tokens(self.model.compute_logits, hidden, 0, targets, top, top)
            if static.sample_on_host:
                logits.cpu()
        sink = static.pad_block
        pairs = torch.tensor([[sink, sink]], dtype=torch.int64, device=self.device)
        self.backend.copy_blocks(self.kv_caches, pairs)  # n > 1 forks copy blocks
        self.backend.synchronize()
        self._graphs_seen = self.backend.compiled_graph_count()
        return len(shapes), time.monotonic() - start

    def new_graphs(self) -> int:
        """Graphs compiled since the warm-up (or the last call); 0 for dynamic backends."""
        if self._graphs_seen is None:
            return 0
        count = self.backend.compiled_graph_count()
        if count is None:
            return 0
        grown, self._graphs_seen = count - self._graphs_seen, count
        return grown

    def _sample(
        self, logits: torch.Tensor, chunks: list[ScheduledChunk]
    ) -> tuple[dict[str, list[SampledToken]], tuple[str, ...]]:
        """Tokens per request; a chunk whose logits cannot be sampled is left out and named,
        and the others are sampled as if it had not been there (no draw happened yet)."""
        if not self.samples:
            return {}, ()
        rows, owners = self._sampling_rows(chunks)
        keep = list(range(len(chunks)))
        forked = owners != keep  # rows repeated for forked samples; else the logits as they are
        try:
            owned = logits[torch.tensor(owners, device=logits.device)] if forked else logits
            tokens = sample(owned, rows)
        except SamplingError as exc:
            bad = {owners[r] for r in exc.rows}
            keep = [i for i in keep if i not in bad]
            picked = [r for r, owner in enumerate(owners) if owner not in bad]
            owners = [owners[r] for r in picked]
            index = torch.tensor(owners, dtype=torch.long, device=logits.device)
            tokens = sample(logits.index_select(0, index), [rows[r] for r in picked])
        sampled: dict[str, list[SampledToken]] = {chunks[i].request.request_id: [] for i in keep}
        for owner, token in zip(owners, tokens, strict=True):
            sampled[chunks[owner].request.request_id].append(token)
        failed = tuple(chunks[i].request.request_id for i in range(len(chunks)) if i not in keep)
        return sampled, failed

    def _prompt_scores(
        self,
        chunks: tuple[ScheduledChunk, ...],
        hidden: torch.Tensor,
        query_lens: list[int],
        fixed_top: int | None = None,
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
                        hidden,
                        row,
                        request.prompt_token_ids[start + 1 : end + 1],
                        num_top,
                        fixed_top,
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

    def _sampling_rows(self, chunks: list[ScheduledChunk]) -> tuple[list[SamplingRow], list[int]]:
        """One row per sample to draw, and the index of the chunk whose logits it reads. A
        request under a grammar gets its mask (forked samples start from the same state)."""
        rows: list[SamplingRow] = []
        owners: list[int] = []
        masks = self._grammar_masks(chunks)
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
                        allowed=masks.get(request.request_id),
                    )
                )
                owners.append(index)
        return rows, owners

    def _grammar_masks(self, chunks: list[ScheduledChunk]) -> dict[str, torch.Tensor]:
        grammars = self.grammars
        if not grammars:
            return {}
        ids = [c.request.request_id for c in chunks if c.request.request_id in grammars]
        if not ids:
            return {}
        bitmask = grammars.masks(ids)
        return {request_id: bitmask[i] for i, request_id in enumerate(ids)}
