"""Every field of the four generation routes, at and beyond its bounds, with wrong types and
unsupported neighbours: values beyond a bound get a 4xx in the route's error shape naming the
field, values at a bound are served, and after each case the server is healthy and a normal
completion still works. The cases are built from a table of each field's bounds, so every
bound and every field is covered by construction."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.server.conftest import MODEL
from tests.server.harness import serve_in_thread

pytestmark = pytest.mark.slow

VOCAB = 49152  # SmolLM2
LIMITS = {"max_n": 3, "max_stop_sequences": 3, "max_input_tokens": 40, "max_total_tokens": 48}
MAX_LOGPROBS = 20  # the engine's default --max-logprobs
MAX_BATCH = 4
STOP_CHARS = 1024
BIG = [2**63, -(2**63) - 1, 2**64, 2**100]
NON_FINITE = [math.nan, math.inf, -math.inf]
NOT_NUMBERS = ["1", True, [], {}]
COMPLETIONS, CHAT, GENERATE, GENERATE_STREAM = (
    "/v1/completions",
    "/v1/chat/completions",
    "/generate",
    "/generate_stream",
)
BASE: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
    CHAT: {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "temperature": 0,
    },
    GENERATE: {"inputs": "Hello", "parameters": {"max_new_tokens": 1}},
}


@dataclass(frozen=True)
class Case:
    path: str
    field: str  # dotted: parameters.top_k
    value: Any
    ok: bool  # True: at a bound, must be served

    @property
    def id(self) -> str:
        text = "<absent>" if self.value is _DROP else json.dumps(self.value)
        text = text if len(text) < 40 else text[:37] + "..."
        return f"{self.path}:{self.field}={text}:{'ok' if self.ok else 'refused'}"

    def body(self) -> dict[str, Any]:
        route = GENERATE if self.path == GENERATE_STREAM else self.path
        body = json.loads(json.dumps(BASE[route]))
        target = body
        *parents, name = self.field.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        if self.value is _DROP:
            target.pop(name, None)
        else:
            target[name] = self.value
        return body


_DROP = object()  # the field removed from the body


def numeric(at: list[Any], beyond: list[Any], integer: bool) -> tuple[list[Any], list[Any]]:
    """At-bound values, and beyond-bound ones plus what no number field may take."""
    wrong = NON_FINITE + NOT_NUMBERS + ([1.5] if integer else [])
    return at, beyond + wrong + (BIG if integer else [])


def sampling_fields(max_logprobs_field: str) -> dict[str, tuple[list[Any], list[Any]]]:
    """The OpenAI sampling fields both routes share."""
    n, stops = LIMITS["max_n"], LIMITS["max_stop_sequences"]
    return {
        "temperature": numeric([0, 1e-9, 2.0, 1e6], [-0.01, -1], False),
        "top_p": numeric([1e-9, 1], [0, -0.1, 1.000001, 2], False),
        "top_k": numeric([-1, 0, 1, 2**31 - 1], [-2, 2**31], True),
        "min_p": numeric([0, 1], [-0.01, 1.01], False),
        "presence_penalty": numeric([-2, 2], [-2.01, 2.01], False),
        "frequency_penalty": numeric([-2, 2], [-2.01, 2.01], False),
        "repetition_penalty": numeric([0.01, 100], [0.0099, 0, -1, 100.01], False),
        "seed": ([-(2**63), 0, 2**64 - 1], [-(2**63) - 1, 2**64, 2**100, 1.5, *NOT_NUMBERS]),
        "n": numeric([1, n], [0, -1, n + 1], True),
        "min_tokens": numeric([0, 1], [-1, 2], True),  # max_tokens is 1
        "prompt_logprobs": numeric([0, MAX_LOGPROBS], [-1, MAX_LOGPROBS + 1], True),
        "stop": (
            ["x", ["a"] * stops, ["y" * STOP_CHARS], []],
            ["", [""], ["a"] * (stops + 1), ["y" * (STOP_CHARS + 1)], [1], [None], 5, {}],
        ),
        "stop_token_ids": (
            [[VOCAB - 1], [0] * stops, []],
            [[-1], [VOCAB], [2**63], [0] * (stops + 1), [1.5], ["1"], [True], 5],
        ),
        "response_format": (
            [{"type": "text"}, {"type": "json_object"}, JSON_SCHEMA_FORMAT],
            [{"type": "json_schema"}, {"type": "xml"}, {"type": "text", "x": 1}, "json"],
        ),
        "structured_outputs": (
            [{"regex": "[a-z]+"}, {"choice": ["a", "b"]}, {"json": {"type": "object"}}],
            [{}, {"regex": "("}, {"regex": "a", "choice": ["b"]}, {"structural_tag": "x"}, "x"],
        ),
        "guided_json": ([{"type": "object"}, '{"type": "integer"}'], ["{oops", {"type": 5}, 5]),
        "guided_regex": (["[0-9]+"], ["(", "", 5]),
        "guided_choice": ([["a", "b"]], [[], [""], "a", [1]]),
        "guided_grammar": (['root ::= "a"'], ["root ::= b", 5]),
        "logit_bias": (
            [{"0": -100, str(VOCAB - 1): 100}, {}],
            [
                {"-1": 1},
                {"abc": 1},
                {str(VOCAB): 1},
                {"5": 100.01},
                {"5": -101},
                {"5": math.nan},
                {"5": "1"},
                {"5": True},
                {"5": None},
                {"1" * 30: 1},
                [],
                5,
            ],
        ),
        "ignore_eos": ([True, False], ["yes", 1, None]),
        "skip_special_tokens": ([False], ["no", 0]),
        "include_stop_str_in_output": ([True], [1]),
        "stream": ([False], ["true", 1]),
        "stream_options": ([None], [{"include_usage": True}]),  # only with stream: true
        "cache_salt": (["tenant-a", "s" * 1024], ["", "s" * 1025, 5, ["a"]]),
        "user": (["someone"], [5, {}]),
        "model": ([MODEL, None], [5, []]),
        max_logprobs_field: numeric([0, MAX_LOGPROBS], [-1, MAX_LOGPROBS + 1], True),
    }


UNSUPPORTED = ["suffix", "typical_p", "functions", "guided_whitespace_pattern"]
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "x", "schema": {"type": "object"}},
}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
UNKNOWN = ["foo", "temprature", "maxTokens"]


def completion_cases() -> Iterator[Case]:
    for field, (at, beyond) in sampling_fields("logprobs").items():
        yield from (Case(COMPLETIONS, field, v, True) for v in at)
        yield from (Case(COMPLETIONS, field, v, False) for v in beyond)
    max_new = LIMITS["max_total_tokens"] - 1  # "Hello" is one token
    for v in [0, 1, max_new]:
        yield Case(COMPLETIONS, "max_tokens", v, True)
    for v in [-1, max_new + 1, *BIG, 1.5, "1", True, [], *NON_FINITE]:
        yield Case(COMPLETIONS, "max_tokens", v, False)
    yield from (Case(COMPLETIONS, "best_of", v, True) for v in [1])
    yield from (Case(COMPLETIONS, "best_of", v, False) for v in [0, 2, LIMITS["max_n"] + 1, 2**63])
    yield from (Case(COMPLETIONS, "echo", v, True) for v in [True, False])
    yield from (Case(COMPLETIONS, "echo", v, False) for v in ["yes", 1])
    at_prompts = [
        "x",
        ["a", "b"],
        ["a"] * MAX_BATCH,
        [1, 2, 3],
        [VOCAB - 1],
        [[1], [2, 3]],
        [[5]] * MAX_BATCH,
        "word " * 39,
    ]
    beyond_prompts = [
        "",
        [],
        [[]],
        [""],
        ["a"] * (MAX_BATCH + 1),
        [[1]] * (MAX_BATCH + 1),
        [VOCAB],
        [-1],
        [2**64],
        [1, "a"],
        [[1], "a"],
        [[1, True]],
        [1.5],
        [[[1]]],
        5,
        True,
        None,
        {"text": "hi"},
        "\ud800",
        ["ok", "\udfff"],
        "word " * 41,
        [7] * 41,
        _DROP,
    ]
    yield from (Case(COMPLETIONS, "prompt", v, True) for v in at_prompts)
    yield from (Case(COMPLETIONS, "prompt", v, False) for v in beyond_prompts)
    for field in UNSUPPORTED + UNKNOWN + ["messages", "max_completion_tokens"]:
        yield Case(COMPLETIONS, field, "x", False)


def chat_cases() -> Iterator[Case]:
    for field, (at, beyond) in sampling_fields("top_logprobs").items():
        if field == "top_logprobs":  # needs logprobs: true, tested below
            continue
        yield from (Case(CHAT, field, v, True) for v in at)
        yield from (Case(CHAT, field, v, False) for v in beyond)
    for field in ("max_tokens", "max_completion_tokens"):
        yield from (Case(CHAT, field, v, True) for v in [1, None])
        yield from (Case(CHAT, field, v, False) for v in [0, -1, 48, *BIG, 1.5, "1", True])
    yield from (Case(CHAT, "logprobs", v, True) for v in [True, False])
    yield from (Case(CHAT, "logprobs", v, False) for v in [1, "true"])
    yield Case(CHAT, "top_logprobs", 1, False)  # without logprobs: true
    yield Case(CHAT, "tools", None, True)  # with tools the prompt outgrows this server's limit
    bad_tools = [[], "x", [{"type": "function"}], [TOOL, TOOL], [{"type": "code", "function": {}}]]
    yield from (Case(CHAT, "tools", v, False) for v in bad_tools)
    yield from (Case(CHAT, "tool_choice", v, True) for v in ["none", None])
    yield from (Case(CHAT, "tool_choice", v, False) for v in ["required", "sometimes", {}, 1])
    yield from (Case(CHAT, "parallel_tool_calls", v, True) for v in [True, False])
    yield from (Case(CHAT, "parallel_tool_calls", v, False) for v in ["yes", 1])
    yield from (Case(CHAT, "add_generation_prompt", v, True) for v in [False])
    yield from (Case(CHAT, "add_generation_prompt", v, False) for v in [0])
    user = {"role": "user", "content": "Hi"}
    at_messages = [
        [{"role": "system", "content": "Be brief."}, user],
        [{"role": "developer", "content": "Be brief."}, user],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        [{"role": "user", "content": "word " * 5}],
    ]
    beyond_messages = [
        [],
        [{"role": "bogus", "content": "hi"}],
        [{"content": "hi"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": "\ud800"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "word " * 60}],
        [{"role": 5, "content": "hi"}],
        ["hi"],
        "hi",
        None,
        _DROP,
    ]
    yield from (Case(CHAT, "messages", v, True) for v in at_messages)
    yield from (Case(CHAT, "messages", v, False) for v in beyond_messages)
    for field in UNSUPPORTED + UNKNOWN + ["echo", "prompt", "best_of", "logprobs_count"]:
        yield Case(CHAT, field, "x", False)


def tgi_cases(path: str) -> Iterator[Case]:
    stops, max_new = LIMITS["max_stop_sequences"], LIMITS["max_total_tokens"] - 1
    fields: dict[str, tuple[list[Any], list[Any]]] = {
        "temperature": numeric([1e-9, 1.0, 1e6], [0, -1], False),
        "top_p": numeric([1e-9, 0.999], [0, 1, 1.5], False),
        "top_k": numeric([1, 2**31 - 1], [0, -1, 2**31], True),
        "repetition_penalty": numeric([0.01, 100], [0, 100.01], False),
        "frequency_penalty": numeric([-2, 2], [-2.01, 2.01], False),
        "seed": ([0, 2**64 - 1], [-1, 2**64, 1.5, "1", True]),
        "max_new_tokens": numeric([1, max_new, None], [0, -1, max_new + 1], True),
        "truncate": numeric(
            [1, LIMITS["max_input_tokens"]], [0, LIMITS["max_input_tokens"] + 1], True
        ),
        "top_n_tokens": numeric([0, MAX_LOGPROBS], [-1, MAX_LOGPROBS + 1], True),
        "best_of": ([1, None], [0, 2, "1"]),
        "watermark": ([False], [True, "no"]),
        "stop": ([["a"] * stops, []], [["a"] * (stops + 1), [""], "stop", [1]]),
        "do_sample": ([True, False], ["yes", 1]),
        "details": ([True], [1]),
        "decoder_input_details": ([True], ["yes"]),
        "return_full_text": ([True], [1]),
        "adapter_id": ([None], ["", 5, ["a"]]),
        "grammar": (
            [{"type": "regex", "value": "[a-z]+"}, {"type": "json", "value": {"type": "object"}}],
            [{"type": "regex", "value": "("}, {"type": "xml", "value": "a"}, {"type": "json"}],
        ),
    }
    for field, (at, beyond) in fields.items():
        yield from (Case(path, f"parameters.{field}", v, True) for v in at)
        yield from (Case(path, f"parameters.{field}", v, False) for v in beyond)
    for field in ["typical_p", "foo"]:
        yield Case(path, f"parameters.{field}", 0.5, False)
    yield from (Case(path, "inputs", v, True) for v in ["x", "word " * 39])
    for v in ["", 5, None, ["a"], "\ud800", "word " * 41, _DROP]:
        yield Case(path, "inputs", v, False)
    yield from (Case(path, "parameters", v, False) for v in [5, [], "x"])
    yield Case(path, "stream", True, False)  # not a field of these routes


CASES = [
    *completion_cases(),
    *chat_cases(),
    *tgi_cases(GENERATE),
    *(c for c in tgi_cases(GENERATE_STREAM) if not c.ok),
]


@pytest.fixture(scope="module")
def url(server_engine: Any) -> Iterator[str]:
    """A server on the shared engine with tight limits, so every bound is cheap to reach."""
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings
    from crossinfer.server.limits import ServerLimits

    limits = ServerLimits(**LIMITS, max_client_batch_size=MAX_BATCH)
    settings = ServerSettings(served_model_name=MODEL, limits=limits)
    with serve_in_thread(build_app(server_engine, settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _expected_param(case: Case) -> str:
    """The field an error must name: the case's field, or its top-level parent."""
    return case.field


def _check_refused(case: Case, r: httpx.Response) -> None:
    body = r.json()
    if case.path in (GENERATE, GENERATE_STREAM):
        assert r.status_code == 422, (case.id, r.text)
        assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
        name = case.field.split(".")[-1]
        assert name in body["error"] or case.field.split(".")[0] in body["error"], body
        return
    assert r.status_code == 400, (case.id, r.text)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    param = error["param"] or ""
    top = case.field.split(".")[0]
    # The field, one of its items (prompt[3]), or the cross-field rule's other field.
    related = {"min_tokens": {"max_tokens"}, "n": {"best_of"}, "best_of": {"n"}}
    assert param.split("[")[0].split(".")[0] in {top, *related.get(top, ())}, (case.id, error)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_field_bounds(client: httpx.Client, case: Case) -> None:
    content = json.dumps(case.body())  # NaN / Infinity go out as the bare tokens
    r = client.post(case.path, content=content, headers={"content-type": "application/json"})
    if case.ok:
        assert r.status_code == 200, (case.id, r.text)
        if case.path == GENERATE_STREAM:
            assert r.text.startswith("data: ")
    else:
        _check_refused(case, r)
    assert client.get("/health").json() == {"status": "ok"}
    normal = client.post(COMPLETIONS, json=BASE[COMPLETIONS])
    assert normal.status_code == 200 and normal.json()["usage"]["completion_tokens"] == 1


def test_the_table_covers_every_accepted_field() -> None:
    from crossinfer.server.protocol import ChatCompletionRequest, CompletionRequest
    from crossinfer.server.tgi_protocol import TGIParameters

    covered = {(c.path, c.field.split(".")[-1]) for c in CASES}
    for path, model in ((COMPLETIONS, CompletionRequest), (CHAT, ChatCompletionRequest)):
        missing = {f for f in model.model_fields if (path, f) not in covered}
        assert not missing, (path, missing)
    missing = {f for f in TGIParameters.model_fields if (GENERATE, f) not in covered}
    assert not missing
