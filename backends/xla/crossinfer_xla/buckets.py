"""Bucket lists as the compiled-graph systems build them."""

from __future__ import annotations


def doubling(first: int, last: int) -> tuple[int, ...]:
    """first, 2 * first, ... below ``last``, then ``last`` itself (so the largest bucket is
    exactly the limit, never past it)."""
    values = []
    value = first
    while value < last:
        values.append(value)
        value *= 2
    return (*values, last)
