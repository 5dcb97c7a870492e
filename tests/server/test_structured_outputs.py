"""Structured outputs and tool calls through the official openai SDK (and TGI's grammar):
every reply parses and validates, sampled at temperature 1, streamed, and with n = 3; bad
schemas, regexes and tool choices are 400s that name the problem."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import MODEL
from tests.server.structured_cases import CHOICES, REGEXES, SCHEMAS

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Give me an example as JSON."}]
MAX_TOKENS = 200

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 10}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": schema, "strict": True},
    }


def test_every_schema_parses_and_validates_sampled(base_url: str) -> None:
    async def all_schemas() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=base_url + "/v1", api_key="unused", max_retries=0
        ) as aclient:
            return await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model=MODEL,
                        messages=ASK,
                        temperature=1.0,
                        seed=i,
                        max_tokens=MAX_TOKENS,
                        response_format=_json_schema(schema),  # type: ignore[arg-type]
                    )
                    for i, schema in enumerate(SCHEMAS)
                )
            )

    assert len(SCHEMAS) >= 20
    for schema, reply in zip(SCHEMAS, asyncio.run(all_schemas()), strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_streamed_n3_replies_validate(client: openai.OpenAI) -> None:
    schema = SCHEMAS[0]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=MAX_TOKENS,
        stream=True,
        response_format=_json_schema(schema),  # type: ignore[arg-type]
    )
    texts = ["", "", ""]
    reasons: list[str | None] = [None, None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop"] * 3
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_vllm_fields_on_completions(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    for regex in REGEXES:
        for extra in ({"guided_regex": regex}, {"structured_outputs": {"regex": regex}}):
            r = client.completions.create(
                model=MODEL, prompt="Answer:", max_tokens=30, temperature=1.0, seed=3,
                extra_body=extra,
            )  # fmt: skip
            assert re.fullmatch(regex, r.choices[0].text), (regex, r.choices[0].text)
    for choices in CHOICES:
        r = client.completions.create(
            model=MODEL, prompt="Pick one:", max_tokens=10, temperature=1.0, n=3, seed=5,
            extra_body={"guided_choice": choices},
        )  # fmt: skip
        assert all(c.text in choices for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(
        model=MODEL, prompt="Count:", max_tokens=20, temperature=0,
        extra_body={"guided_grammar": 'root ::= "one" (", " ("two" | "three"))? "."'},
    )  # fmt: skip
    assert re.fullmatch(r"one(, (two|three))?\.", r.choices[0].text)
    r = client.completions.create(
        model=MODEL, prompt="Data:", max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"guided_json": SCHEMAS[0]},
    )  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[0])


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.beta.chat.completions.parse(
        model=MODEL, messages=ASK, temperature=0, max_tokens=MAX_TOKENS, response_format=Person
    )
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def _tgi(base_url: str, grammar: dict[str, Any]) -> str:
    body = {"inputs": "Data:", "parameters": {"max_new_tokens": 100, "grammar": grammar}}
    r = httpx.post(base_url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["generated_text"])


def test_tgi_grammar(base_url: str) -> None:
    text = _tgi(base_url, {"type": "json", "value": SCHEMAS[2]})
    jsonschema.validate(json.loads(text), SCHEMAS[2])
    text = _tgi(base_url, {"type": "json_schema", "value": {"name": "x", "schema": SCHEMAS[4]}})
    jsonschema.validate(json.loads(text), SCHEMAS[4])
    assert re.fullmatch(REGEXES[0], _tgi(base_url, {"type": "regex", "value": REGEXES[0]}))


def _args(call: Any, tool: dict[str, Any]) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return dict(arguments)


def test_named_and_required_tool_calls_round_trip(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice=named,  # type: ignore[list-item,arg-type]
        temperature=0, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls or []
    arguments = _args(call, WEATHER)

    r = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice="required",  # type: ignore[list-item]
        temperature=1.0, seed=2, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls or []
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for c in calls:
        _args(c, WEATHER if c.function.name == "get_weather" else TIME)

    # The call and its result go back in: the template renders them, the model answers.
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, **arguments})},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=follow, tools=[WEATHER], tool_choice="none",  # type: ignore[arg-type,list-item]
        temperature=0, max_tokens=12,
    )  # fmt: skip
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_streamed_tool_calls_assemble(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Weather in Rome, and the time in UTC?"}]
    for choice in ({"type": "function", "function": {"name": "get_time"}}, "required"):
        stream = client.chat.completions.create(
            model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice=choice,  # type: ignore[arg-type,list-item]
            temperature=0, max_tokens=MAX_TOKENS, stream=True,
        )  # fmt: skip
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in stream:
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                    entry["id"] += d.id or ""
                    entry["name"] += (d.function and d.function.name) or ""
                    entry["arguments"] += (d.function and d.function.arguments) or ""
        assert finish == "tool_calls" and calls
        for entry in calls.values():
            tool = WEATHER if entry["name"] == "get_weather" else TIME
            assert entry["id"].startswith("call_") and entry["name"] == tool["function"]["name"]
            jsonschema.validate(json.loads(entry["arguments"]), tool["function"]["parameters"])


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": _json_schema({"type": "nonsense"})}, "response_format", "nonsense"),
        ({"guided_json": "{not json"}, "guided_json", "JSON"),
        ({"guided_regex": "a(b"}, "guided_regex", "parenthesis"),
        ({"guided_grammar": "root ::= missing"}, "guided_grammar", "missing"),
        ({"guided_choice": []}, "guided_choice", ""),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex", "at most one"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
         "exactly one"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", ""),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "whitespace"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name", "nope"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex",
         "at most one"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400(
    base_url: str, body: dict[str, Any], param: str, words: str
) -> None:
    r = httpx.post(
        base_url + "/v1/chat/completions",
        json={"messages": ASK, "max_tokens": 5, **body},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert param in (error["param"] or "") or param in error["message"], error
    assert words in error["message"], error
