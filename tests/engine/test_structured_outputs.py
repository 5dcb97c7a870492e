"""Structured outputs in the engine: the mask is xgrammar's, grammars compile off the step
loop and are shared by key, outputs match their constraint offline (n = 3, sampled), rows
without a grammar sample as before, and bad constraints fail when the request is made."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr

from crossinfer import LLM, SamplingParams, StructuredOutputsParams
from crossinfer.engine.grammar import GrammarCompiler, check_constraint
from crossinfer.engine.sampler import SamplingRow, sample, unpack_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(smollm2_loaded: Any) -> LLM:
    return LLM(device="cpu", loaded=smollm2_loaded, max_model_len=512, kv_cache_memory=64 << 20)


def test_unpacked_mask_is_xgrammars() -> None:
    vocab = 100
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32)
    logits = torch.randn(3, vocab)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab)
    ours = logits.masked_fill(~unpack_bitmask(bitmask, vocab), float("-inf"))
    assert torch.equal(ours, expected)


def test_masked_rows_leave_the_others_alone() -> None:
    logits = torch.randn(3, 64)
    greedy = SamplingParams(temperature=0)
    rows = [SamplingRow(greedy, [1], [], None) for _ in range(3)]
    plain = [t.token_id for t in sample(logits, rows)]
    only_5 = torch.zeros(2, dtype=torch.int32)
    only_5[0] = 1 << 5
    rows[1] = SamplingRow(greedy, [1], [], None, allowed=only_5)
    masked = [t.token_id for t in sample(logits, rows)]
    assert masked == [plain[0], 5, plain[2]]


def test_constraints_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{oops")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=["a", ""])
    with pytest.raises(ValueError, match="regex: .*parenthesis"):
        check_constraint(StructuredOutputsParams(regex="(a"))
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})  # type: ignore[arg-type]
    # the key keeps the schema's property order (it is the order of generation)
    a = StructuredOutputsParams(json={"b": 1, "a": 2})
    assert (
        a.key == ("json", '{"b":1,"a":2}') == StructuredOutputsParams(json='{"b": 1, "a": 2}').key
    )


def test_offline_outputs_match_their_constraints(llm: LLM) -> None:
    prompt = llm.apply_chat_template([{"role": "user", "content": "A person as JSON."}])
    specs = [
        StructuredOutputsParams(json=SCHEMA),
        StructuredOutputsParams(regex=r"[a-z]{3}-[0-9]{2}"),
        StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
        StructuredOutputsParams(grammar='root ::= "x" ("y" | "z") "!"'),
        StructuredOutputsParams(json_object=True),
    ]
    params = [
        SamplingParams(temperature=1.0, n=3, seed=i, max_tokens=120, structured_outputs=s)
        for i, s in enumerate(specs)
    ]
    unconstrained = SamplingParams(temperature=0, max_tokens=8)
    outputs = llm.generate([prompt] * (len(specs) + 1), [*params, unconstrained])
    free = llm.generate([prompt], unconstrained)[0].outputs[0]
    assert outputs[-1].outputs[0].token_ids == free.token_ids  # untouched by its neighbours
    for spec, output in zip(specs, outputs, strict=False):
        assert len(output.outputs) == 3
        for completion in output.outputs:
            text = completion.text
            assert completion.finish_reason == "stop", (spec, text)
            if spec.kind == "json":
                jsonschema.validate(json.loads(text), SCHEMA)
            elif spec.kind == "json_object":
                assert isinstance(json.loads(text), dict)
            elif spec.kind == "regex":
                assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", text)
            elif spec.kind == "choice":
                assert text in ("alpha", "beta", "gamma")
            else:
                assert re.fullmatch(r"x[yz]!", text)


def test_bad_constraint_is_refused_by_generate(llm: LLM) -> None:
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "nonsense"}))
    with pytest.raises(ValueError, match="nonsense"):
        llm.generate(["hi"], bad)
    assert not llm.engine.has_unfinished_requests()


def test_compilations_are_shared_by_key(smollm2_loaded: Any) -> None:
    compiler = GrammarCompiler(smollm2_loaded.tokenizer, 49152, smollm2_loaded.eos_token_ids)
    try:
        first = compiler.submit(StructuredOutputsParams(json=SCHEMA))
        again = compiler.submit(StructuredOutputsParams(json=json.dumps(SCHEMA)))
        other = compiler.submit(StructuredOutputsParams(regex="a+"))
        assert first is again and other is not first
        assert isinstance(first.result(timeout=30), xgr.CompiledGrammar)
    finally:
        compiler.close()


def test_steps_run_while_a_grammar_compiles(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compilation that takes long holds back its own request only."""
    release = threading.Event()
    compile_ = GrammarCompiler._compile

    def slow(self: GrammarCompiler, spec: StructuredOutputsParams) -> Any:
        assert release.wait(30)
        return compile_(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow)
    engine = llm.engine
    spec = StructuredOutputsParams(regex="[0-9]{2}-slow")  # a key no other test compiled
    engine.add_request("slow", "Number:", SamplingParams(max_tokens=8, structured_outputs=spec))
    engine.add_request("free", "Hello", SamplingParams(temperature=0, max_tokens=4))
    finished: dict[str, str] = {}
    while "free" not in finished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].text
    assert "slow" not in finished  # its grammar is still compiling; the other one ran
    release.set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].text
    assert re.fullmatch("[0-9]{2}-slow", finished["slow"])
