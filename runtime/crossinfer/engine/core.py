"""The engine core: continuous batching over token ids. Add requests, step, read each
group's new tokens. Text (tokenising, detokenising, stop strings) is not its business: the
``LLMEngine`` adds it in-process, the API server adds it in front of an engine-core process."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace

import xgrammar as xgr

from crossinfer.engine.errors import RecompileError, RequestError, public_message
from crossinfer.engine.grammar import GrammarCompiler, GrammarStates
from crossinfer.engine.groups import RequestGroup, Sample
from crossinfer.engine.isolation import execute_isolating
from crossinfer.engine.outputs import CoreOutput
from crossinfer.engine.request import Request, RequestStatus
from crossinfer.engine.runner import StepResult
from crossinfer.engine.sampler import SampledToken, make_generator
from crossinfer.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from crossinfer.engine.setup import EngineParts
from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams

logger = logging.getLogger("crossinfer.engine")

_SEED_MODULUS = 2**64  # torch generators take seeds in [0, 2^64); children count up from it
_GRAMMAR_WAIT_S = 0.01  # with nothing else to run, how long a step waits for a compilation


class EngineCore:
    """Continuous batching over one model on one backend, in token ids.

    ``add_request`` queues work, ``step`` runs one forward pass and returns the change of
    every group it advanced or ended; ``abort_request`` ends a group and frees its blocks;
    ``stop_sample`` ends one sample whose text reached a stop string. A request that fails
    inside a step ends with ``CoreOutput.error`` set; the others are unaffected.

    A request with structured outputs waits outside the scheduler until its grammar is
    compiled (on the compiler's thread: a step never waits for it while other work can run);
    then its matcher masks each sampled token and advances with it, and a completed grammar
    stops the request.
    """

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        self.config = parts.config
        self.scheduler: Scheduler = parts.scheduler
        self.runner = parts.runner
        self.vocab_size = self.runner.model.args.vocab_size
        self._groups: dict[str, RequestGroup] = {}
        self._samples: dict[str, tuple[RequestGroup, Sample]] = {}
        self.num_steps = 0
        self.grammars = GrammarStates(self.vocab_size)
        self.runner.grammars = self.grammars  # the runner reads the masks when it samples
        self._compiler: GrammarCompiler | None = None  # made at the first structured request
        self._compiling: dict[str, tuple[Request, Future[xgr.CompiledGrammar]]] = {}

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (with the reason) when it can never run.
        ``cache_salt`` keeps the request's prefix-cache blocks apart from those of requests
        with another salt; ``lora_request`` runs it under that adapter (read now if it is
        not in host memory)."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = list(prompt_ids)
        max_tokens = self._check(prompt_ids, params)
        if lora_request is not None:
            self.add_lora(lora_request)
        seed = params.seed
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.parts.loaded.eos_token_ids,
            generator=make_generator(None if seed is None else seed % _SEED_MODULUS),
            child_generators=[
                make_generator(None if seed is None else (seed + i) % _SEED_MODULUS)
                for i in range(1, params.n)
            ],
            cache_salt=cache_salt,
            lora=lora_request,
        )
        group = RequestGroup(request_id, params)
        self._groups[request_id] = group
        self._track(group, request)
        if params.structured_outputs is None:
            self.scheduler.add(request)
        else:
            future = self._grammar_compiler().submit(params.structured_outputs)
            self._compiling[request_id] = (request, future)

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            loaded = self.parts.loaded
            self._compiler = GrammarCompiler(
                loaded.tokenizer, self.vocab_size, loaded.eos_token_ids
            )
        return self._compiler

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Refuse what the model cannot do; returns the request's max_tokens."""
        vocab = self.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        bad = [t for t in params.token_ids_used if t >= vocab]
        if bad:
            field = "stop_token_ids" if bad[0] in params.stop_token_ids else "logit_bias"
            raise ValueError(f"{field} {bad[:5]} are outside the vocabulary [0, {vocab})")
        limit = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} must be at most {limit} (--max-logprobs), got {value}")
        max_len = self.parts.max_model_len
        room = max_len - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else max(room, 1)
        reason = self.scheduler.check_fits(len(prompt_ids), max_tokens)
        if reason is not None:
            raise ValueError(reason)
        if params.min_tokens > max_tokens:  # max_tokens was "the rest of the context"
            raise ValueError(
                f"min_tokens {params.min_tokens} does not fit: {len(prompt_ids)} prompt tokens "
                f"leave {room} of the maximum context length {max_len}"
            )
        return max_tokens

    def add_lora(self, lora: LoRARequest) -> None:
        """Read and check an adapter and keep it in host memory; raises ValueError naming the
        file and the reason when it cannot run on this model, or when LoRA is off."""
        manager = self.runner.lora
        if manager is None:
            raise ValueError(
                f"LoRA adapter {lora.lora_name!r}: LoRA is not enabled; start the engine with "
                "--enable-lora (LLM(enable_lora=True))"
            )
        manager.add(lora)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter's weights in host memory; False if they were not there."""
        return self.runner.lora is not None and self.runner.lora.remove(lora_int_id)

    def _track(self, group: RequestGroup, request: Request) -> None:
        sample = Sample(request)
        group.samples.append(sample)
        self._samples[request.request_id] = (group, sample)

    def abort_request(self, request_id: str) -> None:
        """End a request and all its samples; frees their blocks. Unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        if group is not None:
            self._end_group(group, RequestStatus.FINISHED_ABORTED)

    def stop_sample(self, request_id: str, index: int) -> None:
        """End sample ``index`` of a request: its text reached a stop string. Unknown or
        finished samples are ignored (the sample may have ended on its own meanwhile)."""
        group = self._groups.get(request_id)
        if group is None:
            return
        for sample in group.samples:
            if sample.request.index == index and not sample.request.finished:
                self.scheduler.finish(sample.request, RequestStatus.FINISHED_STOPPED)
        if group.finished:
            self._forget(group)

    def _end_group(self, group: RequestGroup, status: RequestStatus) -> None:
        for sample in group.samples:
            if not sample.request.finished:
                self.scheduler.finish(sample.request, status)
            self._untrack(sample.request.request_id)

    def _forget(self, group: RequestGroup) -> None:
        self._groups.pop(group.request_id, None)
        for sample in group.samples:
            self._untrack(sample.request.request_id)

    def _untrack(self, request_id: str) -> None:
        self._samples.pop(request_id, None)
        self._compiling.pop(request_id, None)
        self.grammars.drop(request_id)

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any, and leave their group (the engine cannot
        step after this)."""
        if self._compiler is not None:
            self._compiler.close()
        if self.runner.workers is None:
            return
        self.runner.workers.close()
        communicator = self.runner.model.tp.communicator
        if communicator is not None:
            communicator.close()

    def lost_reason(self) -> str | None:
        """Why the engine can no longer step although nothing failed in it (a
        tensor-parallel rank has exited), or None."""
        return None if self.runner.workers is None else self.runner.workers.dead()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._compiling)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        """One forward pass. Returns the change of every request group it advanced or ended."""
        compile_failures = self._admit_compiled()
        output = self.scheduler.schedule()
        result, failures = execute_isolating(self.runner, output)
        failures += compile_failures
        self._check_recompiles(output)
        failures += [(request.request_id, error) for request, error in output.failed]
        failures += [(rid, _no_finite_logit()) for rid in result.unsampleable]
        failed = {rid for rid, _ in failures}
        done = tuple(c for c in output.chunks if c.request.request_id not in failed)
        self.scheduler.advance(replace(output, chunks=done))
        self.num_steps += 1
        touched: dict[str, RequestGroup] = {}
        for chunk in done:
            try:
                self._apply(chunk, result, touched)
            except Exception as exc:  # this request's own state
                failures.append((chunk.request.request_id, exc))
        for request_id, error in failures:
            group = self._fail(request_id, error)
            if group is not None:
                touched[group.request_id] = group
        results = [group.output() for group in touched.values()]
        for group in touched.values():
            if group.finished:
                self._forget(group)
        return results

    def _admit_compiled(self) -> list[tuple[str, BaseException]]:
        """Queue the requests whose grammar is compiled; returns those whose grammar failed.
        With nothing else to run, wait a little for a compilation rather than spin."""
        if not self._compiling:
            return []
        if not self.scheduler.has_unfinished:
            wait([f for _, f in self._compiling.values()], _GRAMMAR_WAIT_S, FIRST_COMPLETED)
        failures: list[tuple[str, BaseException]] = []
        for request_id, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            error = future.exception()
            if error is not None:
                failures.append((request_id, RequestError(f"the grammar failed: {error}")))
                continue
            self.grammars.start(request_id, future.result())
            self.scheduler.add(request)
        return failures

    def _check_recompiles(self, output: SchedulerOutput) -> None:
        grown = self.runner.new_graphs()
        if not grown:
            return
        shape = [(c.num_computed_tokens, c.num_new_tokens) for c in output.chunks]
        message = (
            f"{grown} graph(s) compiled after warm-up, in a step of {len(output.chunks)} "
            f"sequences (computed, new tokens: {shape[:8]})"
        )
        if self.config.fail_on_recompile:
            raise RecompileError(message)
        logger.warning("%s; every later step of that shape reuses it", message)

    def _apply(
        self, chunk: ScheduledChunk, result: StepResult, touched: dict[str, RequestGroup]
    ) -> None:
        request = chunk.request
        group, sample = self._samples[request.request_id]
        scores = result.prompt_scores.get(request.request_id)
        if scores is not None:
            group.add_prompt_scores(scores)
        tokens = result.sampled.get(request.request_id)
        if tokens is None:  # a prompt chunk that does not reach the end yet
            return
        touched[group.request_id] = group
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = time.monotonic()
        if request.max_tokens == 0:  # the prompt alone was asked for (its logprobs)
            self.scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
            return
        # Fork before the parent's own token can finish it and free the shared blocks.
        for index, token in enumerate(tokens[1:], start=1):
            self._fork(group, request, index, token)
        request.child_generators = []
        self._append(sample, tokens[0])

    def _fail(self, request_id: str, error: BaseException) -> RequestGroup | None:
        """End the group of a failed request with an error; the traceback goes to the log."""
        entry = self._samples.get(request_id)
        if entry is None:
            return None
        group = entry[0]
        logger.error("request %s failed", group.request_id, exc_info=error)
        group.error = public_message(error, group.request_id)
        self._end_group(group, RequestStatus.FINISHED_ERROR)
        return group

    def _fork(self, group: RequestGroup, parent: Request, index: int, token: SampledToken) -> None:
        child = Request(
            request_id=f"{parent.request_id}#{index}",
            prompt_token_ids=parent.prompt_token_ids,
            params=parent.params,
            max_tokens=parent.max_tokens,
            eos_token_ids=parent.eos_token_ids,
            generator=parent.child_generators[index - 1],
            parent_id=parent.request_id,
            index=index,
            cache_salt=parent.cache_salt,
            lora=parent.lora,
        )
        child.metrics.first_token_time = parent.metrics.first_token_time
        child.num_cached_tokens = parent.num_cached_tokens
        self._track(group, child)
        self.grammars.fork(parent.request_id, child.request_id)
        _, sample = self._samples[child.request_id]
        # Share the prompt's blocks; the partly filled last one is copied next step.
        copies = self.scheduler.kv_cache.fork(
            parent.request_id, child.request_id, parent.num_computed_tokens
        )
        if copies is None:
            self.scheduler.add(child)  # out of blocks: recompute it later instead
        else:
            child.num_computed_tokens = parent.num_computed_tokens
            self.scheduler.add_running(child, copies)
        self._append(sample, token)

    def _append(self, sample: Sample, token: SampledToken) -> None:
        """Add one sampled token; finish the request when a stop token, the length or its
        completed grammar says so (stop strings are the output processor's: it calls
        ``stop_sample``)."""
        request = sample.request
        request.token_ids.append(token.token_id)
        sample.new_tokens.append(token)
        status, reason = self._stop_by_token(request, token.token_id)
        if request.request_id in self.grammars:
            complete = self.grammars.accept(request.request_id, token.token_id)
            if complete and status is None:
                status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            request.stop_reason = reason
            self.scheduler.finish(request, status)

    @staticmethod
    def _stop_by_token(request: Request, token_id: int) -> tuple[RequestStatus | None, int | None]:
        # The sampler bans these tokens until min_tokens is reached.
        params = request.params
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None


def _no_finite_logit() -> RequestError:
    return RequestError(
        "the model's next-token logits had no finite value to sample from (NaN, or every "
        "token banned)"
    )
