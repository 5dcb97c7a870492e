"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a list
of strings, or a grammar (vLLM's ``StructuredOutputsParams``).

This is the request's side only, plain data that pickles and hashes (the schema is kept as
its compact JSON text, so equal schemas share one compiled grammar; the order of its
properties is kept, as it is the order in which they are generated). Turning it into a
grammar and a token mask is the engine's (engine/grammar.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint. ``json`` takes a schema (a mapping, or its JSON text);
    ``json_object`` any JSON object; ``regex`` a regular expression the whole output
    matches; ``choice`` one of the strings, exactly; ``grammar`` an EBNF grammar (GBNF, as
    llama.cpp and xgrammar write it) whose ``root`` rule the output matches."""

    json: str | Mapping[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.json is not None:
            object.__setattr__(self, "json", _canonical_schema(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, json_object, regex, choice, "
                f"grammar; got {', '.join(given) or 'none'}"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            ok = bool(self.choice) and all(isinstance(c, str) and c for c in self.choice)
            if not ok:
                raise ValueError("structured_outputs.choice must be a list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): equal keys compile to the same grammar."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "choice":
            return kind, json.dumps(list(value))
        return kind, "" if value is True else str(value)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema as a dict (``json`` only)."""
        return None if self.json is None else json.loads(str(self.json))


def _canonical_schema(schema: str | Mapping[str, Any]) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping) and not isinstance(schema, bool):
        raise ValueError("structured_outputs.json must be a JSON schema (an object)")
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
