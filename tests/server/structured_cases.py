"""JSON schemas, regexes and choices the structured-output tests generate under. Strings and
arrays carry bounds where a small model sampled at temperature 1 could otherwise run past
max_tokens (a cut-off reply is not JSON); the other features are all exercised: nested
objects, arrays, enums, const, required and optional fields, numbers with bounds, anyOf,
$defs with $ref, patterns, a format and nullable values."""

from __future__ import annotations

from typing import Any


def _s(n: int = 24, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": n, **kw}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: list[dict[str, Any]] = [
    _obj({"name": _s(), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"city": _s(), "population": {"type": "integer", "minimum": 1}}),
    _obj({"colour": {"type": "string", "enum": ["red", "green", "blue"]}}),
    _obj({"ok": {"type": "boolean"}, "note": _s(12)}, required=["ok"]),
    _obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}}),
    _obj({"tags": {"type": "array", "items": _s(10), "minItems": 1, "maxItems": 3}}),
    _obj(
        {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 10},
                "maxItems": 4,
            }
        }
    ),  # fmt: skip
    _obj({"person": _obj({"first": _s(12), "last": _s(12)}), "id": {"type": "integer"}}),
    _obj({"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 1, "maximum": 9}})})}),
    _obj({"kind": {"const": "point"}, "x": {"type": "integer"}, "y": {"type": "integer"}}),
    _obj({"value": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}}),
    _obj({"maybe": {"anyOf": [_s(8), {"type": "null"}]}}),
    _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    _obj({"date": {"type": "string", "format": "date"}}),
    _obj(
        {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": _obj(
                    {"sku": _s(8), "qty": {"type": "integer", "minimum": 1, "maximum": 99}}
                ),
            }
        }
    ),  # fmt: skip
    _obj({"ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}),
    _obj({"level": {"type": "integer", "enum": [1, 2, 3]}, "label": _s(10)}),
    _obj(
        {"title": _s(30), "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
        required=["title"],
    ),  # fmt: skip
    {
        "$defs": {"pet": _obj({"species": {"enum": ["cat", "dog"]}, "name": _s(10)})},
        **_obj({"pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}, "maxItems": 2}}),
    },
    _obj(
        {
            "matrix": {
                "type": "array",
                "maxItems": 2,
                "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
            }
        }
    ),
    _obj({"email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}[.](com|org)$"}}),
    _obj(
        {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        }
    ),  # fmt: skip
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 2,
        "maxItems": 3,
    },  # fmt: skip
]

REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8} [0-9]{1,2}", r"0x[0-9a-f]{4}"]
CHOICES = [["red", "green", "blue"], ["Paris", "London", "Rome", "New York"], ['a"b', "c\\d"]]
