"""Tool calls out of replies: the Hermes format of ``auto``, the lists of ``required``, the
arguments of a named call, whole and streamed, and the prompt of a template without tools."""

from __future__ import annotations

import json
from typing import Any

import pytest

from crossinfer.server.protocol import ChatCompletionRequest
from crossinfer.server.tool_stream import ToolStream
from crossinfer.server.tools import ToolPlan, held_back, parse_reply, plan_tools

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _plan(choice: Any = None, parallel: bool = True) -> ToolPlan:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "tools": [TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    body["parallel_tool_calls"] = parallel
    return plan_tools(ChatCompletionRequest.model_validate(body))


def test_auto_parses_hermes_calls() -> None:
    text = 'Let me check.\n<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n'
    text += '<tool_call>{"name": "f", "arguments": {"b": [2]}}</tool_call>'
    content, calls = parse_reply(_plan(), text)
    assert content == "Let me check."
    assert [json.loads(c.function.arguments) for c in calls] == [{"a": 1}, {"b": [2]}]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize(
    "text",
    ["no call here", "<tool_call>{not json}</tool_call>", '<tool_call>["f"]</tool_call>'],
)
def test_auto_replies_that_are_not_calls_stay_content(text: str) -> None:
    assert parse_reply(_plan(), text) == (text, [])


def test_an_unclosed_last_call_still_parses() -> None:
    _, calls = parse_reply(_plan(), '<tool_call>{"name": "f", "arguments": {}}')
    assert [c.function.name for c in calls] == ["f"]


def test_required_and_named() -> None:
    required = _plan("required")
    _, calls = parse_reply(required, '[{"name": "f", "arguments": {"x": "y"}}]')
    assert calls[0].function.arguments == '{"x": "y"}'
    assert required.constraint() is not None
    assert (required.constraint().schema or {})["items"]["anyOf"][0]["properties"]["name"] == {  # type: ignore[union-attr]
        "const": "f"
    }
    assert "maxItems" in (_plan("required", parallel=False).constraint().schema or {})  # type: ignore[union-attr]
    named = _plan({"type": "function", "function": {"name": "f"}})
    assert parse_reply(named, '{"q": 1}')[1][0].function.arguments == '{"q": 1}'
    assert parse_reply(named, '{"q": ')[0] == '{"q": '  # cut off: stays content
    assert _plan("none").template_tools is None and _plan().template_tools == [TOOL]


def _stream(plan: ToolPlan, pieces: list[str]) -> tuple[str, list[Any]]:
    stream, content, deltas = ToolStream(plan), "", []
    for i, piece in enumerate(pieces):
        text, calls = stream.feed(piece, i == len(pieces) - 1)
        content += text or ""
        deltas += calls or []
    return content, deltas


def test_streamed_auto_holds_back_a_tag_split_over_deltas() -> None:
    pieces = ["Sure", ". <tool", '_call>{"name": "f", ', '"arguments": {}}', "</tool_call>"]
    content, deltas = _stream(_plan(), pieces)
    assert content == "Sure. " and [d.function.name for d in deltas] == ["f"]
    assert _stream(_plan(), ["a <to", "day"]) == ("a <today", [])
    assert held_back("x <tool_c") == len("<tool_c") and held_back("x <b") == 0


def test_streamed_named_call_opens_then_appends() -> None:
    _, deltas = _stream(
        _plan({"type": "function", "function": {"name": "f"}}), ['{"a"', ": 1}", ""]
    )
    assert deltas[0].id and deltas[0].function.name == "f"
    assert "".join(d.function.arguments for d in deltas) == '{"a": 1}'
    assert all(d.id is None for d in deltas[1:])
