"""Tool calling: what ``tools`` and ``tool_choice`` put in the prompt, what they constrain, and
how the reply becomes ``tool_calls``.

- ``none`` (the default without tools): no tools in the prompt, a plain reply.
- ``auto`` (the default with tools): the tools go to the chat template; the model may answer
  in text or call tools in the Hermes format that SmolLM2, Qwen2 and Hermes templates use,
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, which is parsed out of it.
- ``required``: the reply is constrained to a JSON list of calls, each ``{"name": one of the
  tools, "arguments": matching that tool's parameters}`` (one call without
  ``parallel_tool_calls``).
- a named function: the reply is constrained to that function's arguments.

A chat template that does not mention ``tools`` (SmolLM2's does not) gets them in a system
message instead, with the format to call them in, so the model learns of them either way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from crossinfer.server.errors import APIError
from crossinfer.server.protocol import ChatCompletionRequest
from crossinfer.server.structured_protocol import FunctionCall, Tool, ToolCall
from crossinfer.structured_outputs import StructuredOutputsParams

Mode = Literal["none", "auto", "required", "named"]
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(
    re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|$)", re.S
)
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools and tool_choice ask for."""

    mode: Mode = "none"
    tools: tuple[Tool, ...] = ()
    name: str | None = None  # the function a named tool_choice calls
    parallel: bool = True

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (OpenAI's shape), or None."""
        if self.mode == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def constraint(self) -> StructuredOutputsParams | None:
        """The JSON a required or named call must be, or None."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return StructuredOutputsParams(json=tool.function.parameters or _NO_ARGUMENTS)
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or _NO_ARGUMENTS,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)


def plan_tools(body: ChatCompletionRequest) -> ToolPlan:
    """The request's tool plan; 400 for a choice that names no given tool."""
    tools = tuple(body.tools or ())
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise _invalid("tool_choice", "needs tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise _invalid("tools", "function names must be unique")
    if isinstance(choice, str):
        return ToolPlan(choice, tools, parallel=body.parallel_tool_calls)
    if choice.function.name not in names:
        raise _invalid(
            "tool_choice.function.name", f"{choice.function.name!r} is not one of the tools"
        )
    return ToolPlan("named", tools, choice.function.name, body.parallel_tool_calls)


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The tools, and how to call them, for a template that cannot show them itself."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call functions to answer. These are the functions, as JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call one, reply with a JSON object of its name and arguments between tags: "
        f'{TOOL_CALL_START}{{"name": "<function name>", "arguments": {{...}}}}{TOOL_CALL_END}'
    )


def _call(name: object, arguments: object) -> ToolCall | None:
    if not isinstance(name, str):
        return None
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=text))


def _hermes_calls(text: str) -> tuple[str | None, list[ToolCall]] | None:
    """Content before the first ``<tool_call>``, and the calls; None if a call is not JSON
    of a name and arguments (then the reply stays text, as vLLM's parsers leave it)."""
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return None
    calls = []
    for match in _HERMES_CALL.finditer(text, start):
        try:
            value = json.loads(match.group(1))
        except json.JSONDecodeError:
            return None
        call = (
            _call(value.get("name"), value.get("arguments", {}))
            if isinstance(value, dict)
            else None
        )
        if call is None:
            return None
        calls.append(call)
    content = text[:start].strip()
    return content or None, calls


def parse_reply(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished reply's content and tool calls under ``plan``. A reply that does not parse
    (cut off by max_tokens, or an auto reply that is not a call) stays content."""
    if plan.mode == "named":
        assert plan.name is not None
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [
            ToolCall(id=new_call_id(), function=FunctionCall(name=plan.name, arguments=text))
        ]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        calls = [_call(i.get("name"), i.get("arguments")) for i in items if isinstance(i, dict)]
        return None, [c for c in calls if c is not None]
    if plan.mode == "auto":
        parsed = _hermes_calls(text)
        if parsed is not None:
            return parsed
    return text, []


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` for a reply that ended by itself in calls."""
    return "tool_calls" if called and reason == "stop" else reason


def held_back(text: str) -> int:
    """How many characters at the end of ``text`` may begin ``<tool_call>``: an auto reply
    streams its content up to them, and waits."""
    for size in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-size:]):
            return size
    return 0
