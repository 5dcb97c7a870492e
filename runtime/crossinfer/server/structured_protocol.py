"""Request and response models of structured outputs and tool calls: OpenAI's
``response_format``, ``tools`` / ``tool_choice`` and ``tool_calls``; vLLM's ``guided_*``
fields and ``structured_outputs`` object; TGI's ``grammar``.

What each asks of the output is turned into one ``StructuredOutputsParams`` in
server/constraints.py; here only the shapes are declared (unknown fields are refused, as
everywhere in the API).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_serializer, model_validator

from crossinfer.server.body import Body

# OpenAI's rule for function and schema names.
Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
Schema = dict[str, Any]


class JsonSchemaFormat(Body):
    """``response_format.json_schema``: the schema the reply must match."""

    name: Name
    description: str | None = None
    schema_: Schema | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(Body):
    """OpenAI's ``response_format``: free text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: given exactly when type is 'json_schema'")
        return self


class StructuredOutputsField(Body):
    """vLLM's ``structured_outputs`` object (exactly one member set)."""

    json_: Schema | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(Body):
    name: Name
    description: str | None = None
    parameters: Schema | None = None  # None: a function without arguments
    strict: bool | None = None  # calls are always constrained by the parameters' schema


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Body):
    name: Name


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class TGIGrammar(Body):
    """TGI's ``parameters.grammar``: a JSON schema (``json``; ``json_schema`` wraps it with a
    name) or a regex."""

    type: Literal["json", "json_schema", "regex"]
    value: Schema | str


# -- responses ------------------------------------------------------------------------------
class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text (as OpenAI sends it)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _NoNulls(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        # A streamed delta carries only what changed.
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_NoNulls):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_NoNulls):
    """A streamed piece of a tool call: the first names it (id, type, name), later ones
    carry more of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
