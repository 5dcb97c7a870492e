"""Comparing a backend's result with the CPU reference: normalised error under a per-dtype
tolerance, row by row as well as overall, and NaN / Inf where the reference is finite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import torch

from crossinfer_conformance.outcome import CheckFailed, NotSupported

TOLERANCES: MappingProxyType[str, float] = MappingProxyType(
    {
        # ||actual - reference|| / ||reference||, the reference computed in fp32 from the
        # same (already rounded) inputs; roughly the dtype's epsilon times a few.
        "fp32": 1e-5,
        "bf16": 2e-2,
        "fp16": 2e-3,
        "float8_e4m3fn": 1.5e-1,
        "float8_e5m2": 3e-1,
    }
)
ROW_FACTOR = 1.0
"""Each row (a query token's output) is held to this times the tolerance as well: one wrong
row in a long batch hardly moves the whole's error, and rounding does not grow per row."""


def tolerance(dtype: str) -> float:
    """The tolerance of a short dtype name; an unknown dtype cannot be judged."""
    if dtype not in TOLERANCES:
        raise NotSupported(f"the suite knows no tolerance for dtype {dtype}")
    return TOLERANCES[dtype]


@dataclass(frozen=True)
class Comparison:
    """How far ``actual`` is from ``expected``; rows are indices along the first dimension."""

    error: float
    tolerance: float
    bad_rows: tuple[int, ...]
    """Rows over ``ROW_FACTOR * tolerance`` or with NaN / Inf the reference lacks."""
    nonfinite_rows: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance and not self.bad_rows


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: str) -> Comparison:
    """Compare two tensors of one shape (any devices, any dtypes) in float64 on the host."""
    a = actual.detach().to("cpu", torch.float64).reshape(actual.shape[0], -1)
    b = expected.detach().to("cpu", torch.float64).reshape(expected.shape[0], -1)
    # Only positions where the reference is finite are judged; there, anything not finite
    # in the result is wrong whatever its neighbours.
    judged = torch.isfinite(b)
    nonfinite = (~torch.isfinite(a) & judged).any(dim=1)
    diff = torch.where(judged & torch.isfinite(a), a - b, 0.0)
    ref = torch.where(judged, b, 0.0)
    tol = tolerance(dtype)
    error = _ratio(diff.norm().item(), ref.norm().item())
    row_err = diff.norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    row_err = torch.where(ref.norm(dim=1) > 0, row_err, diff.norm(dim=1))
    bad = (row_err > ROW_FACTOR * tol) | nonfinite
    if nonfinite.any():
        error = float("inf")
    return Comparison(
        error=error,
        tolerance=tol,
        bad_rows=tuple(int(i) for i in bad.nonzero().flatten()),
        nonfinite_rows=tuple(int(i) for i in nonfinite.nonzero().flatten()),
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: str,
    what: str,
    describe_rows: Callable[[tuple[int, ...]], str] | None = None,
) -> None:
    """Raise CheckFailed naming the error, the tolerance and the rows that are off."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise CheckFailed(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    result = compare(actual, expected, dtype)
    if result.ok:
        return
    rows = describe_rows or _plain_rows
    if result.nonfinite_rows:
        detail = f"NaN/Inf where the reference is finite, in {rows(result.nonfinite_rows)}"
    else:
        detail = f"normalised error {result.error:.2e} (tolerance {result.tolerance:g} for {dtype})"
        if result.bad_rows:
            detail += f"; {len(result.bad_rows)} of {actual.shape[0]} rows are off: "
            detail += rows(result.bad_rows)
    raise CheckFailed(f"{what} differs from the CPU reference: {detail}")


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return num
    return num / den


def _plain_rows(rows: tuple[int, ...]) -> str:
    shown = ", ".join(map(str, rows[:8]))
    return f"rows {shown}" + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
