"""A request's structured-output fields -> one ``StructuredOutputsParams``, or a 400.

Every way a client can ask is read here: OpenAI's ``response_format``, vLLM's
``structured_outputs`` and ``guided_*`` fields, TGI's ``grammar``, and a tool call the reply
must make (``tool_choice`` required or named, from server/tools.py). At most one may be
given; the constraint is parsed by xgrammar at once, so an invalid schema, regex or grammar
is a 400 naming the field and xgrammar's reason, before anything is queued.
"""

from __future__ import annotations

import re
from typing import Any

from crossinfer.engine.grammar import check_constraint
from crossinfer.server.errors import APIError
from crossinfer.server.protocol import SamplingFields
from crossinfer.server.structured_protocol import ResponseFormat, TGIGrammar
from crossinfer.structured_outputs import StructuredOutputsParams

_OWN_NAME = re.compile(r"^structured_outputs\.\w+: ")  # the request's own name replaces it


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _checked(param: str, **constraint: Any) -> StructuredOutputsParams:
    try:
        spec = StructuredOutputsParams(**constraint)
        check_constraint(spec)
    except ValueError as exc:
        raise _invalid(param, _OWN_NAME.sub("", str(exc))) from None
    return spec


def _response_format(value: ResponseFormat) -> StructuredOutputsParams | None:
    if value.type == "text":
        return None
    schema = value.json_schema.schema_ if value.json_schema is not None else None
    if schema is None:
        return _checked("response_format", json_object=True)
    return _checked("response_format.json_schema.schema", json=schema)


def _given(body: SamplingFields) -> dict[str, StructuredOutputsParams | None]:
    """Each structured-output field the body sets, by its name, as a constraint (None for
    ``response_format: text``)."""
    given: dict[str, StructuredOutputsParams | None] = {}
    if body.response_format is not None:
        given["response_format"] = _response_format(body.response_format)
    if body.structured_outputs is not None:
        fields = body.structured_outputs.model_dump(exclude_none=True)  # json as "json_"
        if "json_" in fields:
            fields["json"] = fields.pop("json_")
        given["structured_outputs"] = _checked("structured_outputs", **fields)
    if body.guided_json is not None:
        given["guided_json"] = _checked("guided_json", json=body.guided_json)
    if body.guided_regex is not None:
        given["guided_regex"] = _checked("guided_regex", regex=body.guided_regex)
    if body.guided_choice is not None:
        given["guided_choice"] = _checked("guided_choice", choice=body.guided_choice)
    if body.guided_grammar is not None:
        given["guided_grammar"] = _checked("guided_grammar", grammar=body.guided_grammar)
    return given


def request_constraint(
    body: SamplingFields, tool_constraint: StructuredOutputsParams | None = None
) -> StructuredOutputsParams | None:
    """The one constraint of an OpenAI-style body (``tool_constraint``: the call a
    ``tool_choice`` demands), or None; 400 when several are given."""
    given = _given(body)
    if tool_constraint is not None:
        try:
            check_constraint(tool_constraint)
        except ValueError as exc:
            message = _OWN_NAME.sub("", str(exc))
            raise _invalid(
                "tools", f"a function's parameters are no usable schema: {message}"
            ) from None
        given["tool_choice"] = tool_constraint
    if len(given) > 1:
        names = ", ".join(given)
        raise APIError(
            400,
            f"{names}: give at most one way to constrain the output",
            param=next(iter(given)),
            code="invalid_value",
        )
    return next(iter(given.values()), None)


def tgi_constraint(grammar: TGIGrammar | None) -> StructuredOutputsParams | None:
    """TGI's ``parameters.grammar`` as a constraint."""
    if grammar is None:
        return None
    param = "parameters.grammar.value"
    value = grammar.value
    if grammar.type == "regex":
        if not isinstance(value, str):
            raise _invalid(param, "a regex grammar takes a string")
        return _checked(param, regex=value)
    if grammar.type == "json_schema":
        if not isinstance(value, dict) or not isinstance(value.get("schema"), dict):
            raise _invalid(param, 'a json_schema grammar takes {"name": ..., "schema": {...}}')
        return _checked(param, json=value["schema"])
    return _checked(param, json=value)
