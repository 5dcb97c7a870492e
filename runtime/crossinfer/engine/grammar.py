"""Structured outputs on xgrammar: a request's constraint -> a compiled grammar -> each step's
token mask.

Why xgrammar (llguidance was measured beside it, docs/architecture.md): its masks are
precomputed per grammar state at compile time, so filling one during a step is a lookup
(4 us for SmolLM2's 49,152 tokens, against 28 us for llguidance), compilation of a typical
schema takes ~10 ms, and it is what vLLM uses by default, so grammars behave as vLLM users
know them.

- ``check_constraint`` parses the constraint without the tokenizer (cheap): a bad schema,
  regex or grammar is refused when the request is made, with xgrammar's reason.
- ``GrammarCompiler`` compiles on a thread of its own, so the step loop never waits for a
  compilation; equal constraints share one compilation (cached by their key).
- ``GrammarStates`` holds one matcher per request being generated: it fills the rows of the
  step's bitmask and advances with each sampled token.

JSON is compiled without free whitespace between tokens (``any_whitespace=False``): a model
may otherwise fill its budget with spaces and newlines inside an object and never close it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import xgrammar as xgr

from crossinfer.structured_outputs import StructuredOutputsParams

_ANY_OBJECT = '{"type": "object"}'
_CACHED_GRAMMARS = 512  # compilations kept (xgrammar keeps its own cache below this one)
# xgrammar's messages start with a time stamp and a source position: not the user's business
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: (Check failed: \(.*?\) is false: )?")


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _LOG_PREFIX.sub("", text)


def _grammar(spec: StructuredOutputsParams) -> xgr.Grammar:
    kind = spec.kind
    if kind == "json":
        return xgr.Grammar.from_json_schema(str(spec.json), any_whitespace=False)
    if kind == "json_object":  # any object (OpenAI's json_object), not any JSON value
        return xgr.Grammar.from_json_schema(_ANY_OBJECT, any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(str(spec.regex))
    if kind == "choice":
        alternatives = " | ".join(_ebnf_string(c) for c in spec.choice or ())
        return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
    return xgr.Grammar.from_ebnf(str(spec.grammar))


def _ebnf_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


def build_grammar(spec: StructuredOutputsParams) -> xgr.Grammar:
    """The constraint as an xgrammar grammar; ValueError naming the problem when it is not
    one xgrammar can build (an invalid schema, regex or grammar, or a feature it lacks)."""
    try:
        return _grammar(spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"structured_outputs.{spec.kind}: {_reason(exc)}") from None


def check_constraint(spec: StructuredOutputsParams | None) -> None:
    """Raise ValueError when ``spec`` cannot be compiled (None: nothing to check)."""
    if spec is not None:
        build_grammar(spec)


class GrammarCompiler:
    """Compiles constraints against one tokenizer on a worker thread, cached by key."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Collection[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None  # made on the thread: ~0.2 s
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossinfer-grammar")
        self._compiled: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()

    def submit(self, spec: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compilation of ``spec``, started now unless an equal one was."""
        key = spec.key
        future = self._compiled.get(key)
        if future is None:
            future = self._worker.submit(self._compile, spec)
            self._compiled[key] = future
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return future

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        grammar = build_grammar(spec)
        return self._compiler.compile_grammar(grammar)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


class GrammarStates:
    """The grammar matcher of each request that has one, by request id."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._matchers: dict[str, xgr.GrammarMatcher] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._matchers

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def start(self, request_id: str, compiled: xgr.CompiledGrammar) -> None:
        self._matchers[request_id] = xgr.GrammarMatcher(compiled)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child continues from the parent's state (n > 1 forks at the first token)."""
        parent = self._matchers.get(parent_id)
        if parent is not None:
            self._matchers[child_id] = parent.fork()

    def masks(self, request_ids: list[str]) -> torch.Tensor:
        """Allowed next tokens of each request, as xgrammar's bitmask: int32
        ``[len(request_ids), ceil(vocab / 32)]``, bit ``t % 32`` of word ``t // 32`` set
        when token ``t`` is allowed."""
        bitmask = xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)
        for row, request_id in enumerate(request_ids):
            self._matchers[request_id].fill_next_token_bitmask(bitmask, row)
        return bitmask

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance by a sampled token; True when the grammar is complete after it. Raises
        ValueError if the token breaks the grammar (the mask allowed only tokens that keep
        it, so this means the state and the mask disagree)."""
        matcher = self._matchers[request_id]
        if not matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not continue the request's grammar")
        return bool(matcher.is_terminated())

    def drop(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
