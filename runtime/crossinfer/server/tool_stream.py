"""A streamed chat choice under a tool plan: text deltas -> content and ``tool_calls``
deltas, as the OpenAI SDK assembles them.

- named: the first delta opens call 0 (id, type, name), each later one adds to its
  arguments as the constrained JSON is generated;
- required: the list of calls is complete only at the end, so the calls go out then, one
  delta each with its whole arguments;
- auto: content streams until ``<tool_call>`` appears (a tail that may begin it waits), then
  the rest waits for the end and goes out as calls, or as content if it does not parse.
"""

from __future__ import annotations

from crossinfer.server.structured_protocol import DeltaFunctionCall, DeltaToolCall, ToolCall
from crossinfer.server.tools import TOOL_CALL_START, ToolPlan, held_back, new_call_id, parse_reply


def _opened(call: ToolCall, index: int) -> DeltaToolCall:
    function = DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments)
    return DeltaToolCall(index=index, id=call.id, type="function", function=function)


class ToolStream:
    """One choice's stream: ``feed`` each text delta, get what to send now."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self._sent = 0  # characters of text sent as content
        self._call_id: str | None = None  # the named call, once opened
        self.called = False  # tool calls were sent (finish_reason "tool_calls")

    def feed(self, delta: str, finished: bool) -> tuple[str | None, list[DeltaToolCall] | None]:
        """(content, tool-call deltas) to send for ``delta``; None where there are none."""
        self.text += delta
        if self.plan.mode == "named":
            return None, self._named(delta)
        if self.plan.mode == "auto" and not finished:
            return self._content_before_calls(), None
        if not finished:
            return None, None  # required: the list is parsed at the end
        content, calls = parse_reply(self.plan, self.text[self._sent :])
        if not calls:
            return self._rest(), None
        self.called = True
        deltas = [_opened(call, i) for i, call in enumerate(calls)]
        return content, deltas

    def _named(self, delta: str) -> list[DeltaToolCall] | None:
        if self._call_id is None:
            self._call_id = new_call_id()
            self.called = True
            function = DeltaFunctionCall(name=self.plan.name, arguments=delta)
            return [DeltaToolCall(index=0, id=self._call_id, type="function", function=function)]
        if not delta:
            return None
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))]

    def _content_before_calls(self) -> str | None:
        start = self.text.find(TOOL_CALL_START)
        end = start if start >= 0 else len(self.text) - held_back(self.text)
        if end <= self._sent:
            return None
        content, self._sent = self.text[self._sent : end], end
        return content

    def _rest(self) -> str | None:
        rest, self._sent = self.text[self._sent :], len(self.text)
        return rest or None
