"""The base of every request body: strict types, unknown fields refused by name, text checked
to be Unicode; and the finite-float field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _strings_are_unicode(value: Any) -> None:
    """Refuse lone UTF-16 surrogates ("\\ud800" in JSON) anywhere in a body: they are not
    Unicode, so no tokenizer can read them and no response can contain them."""
    if isinstance(value, str):
        if _has_surrogate(value):
            raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode")
    elif isinstance(value, list | tuple):
        for item in value:
            _strings_are_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _strings_are_unicode(key)
            _strings_are_unicode(item)
    elif isinstance(value, BaseModel):
        for _, item in value:
            _strings_are_unicode(item)
        _strings_are_unicode(value.model_extra or {})


class Body(BaseModel):
    """A request body: strict types, unknown fields refused, text checked to be Unicode."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="after")
    def _unicode_only(self) -> Body:
        for name, value in self:
            try:
                _strings_are_unicode(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self


def finite(**constraints: Any) -> Any:
    """A float Field with ``constraints`` that refuses NaN and the infinities."""
    return Field(allow_inf_nan=False, **constraints)
