"""Normalised error, per-dtype tolerance, NaN, and rows named by sequence and position."""

from __future__ import annotations

import pytest
import torch

from crossinfer_conformance.checks.attention import row_describer
from crossinfer_conformance.compare import assert_close, compare
from crossinfer_conformance.outcome import CheckFailed, NotSupported


def _rows(n: int, width: int = 8) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(n))


def test_bf16_rounding_passes_and_a_real_error_does_not() -> None:
    expected = _rows(16)
    assert_close(expected.bfloat16(), expected, "bf16", "attention")
    with pytest.raises(
        CheckFailed, match=r"normalised error 1\.00e-01 \(tolerance 0\.02 for bf16\)"
    ):
        assert_close(expected * 1.1, expected, "bf16", "attention")


def test_one_wrong_row_in_a_long_batch_fails_on_its_own() -> None:
    expected = _rows(400)
    actual = expected.clone()
    actual[123] *= 1.05  # 5% off in one row: the whole moves by far less than bf16's 2e-2
    result = compare(actual, expected, "bf16")
    assert result.error < 0.02 and result.bad_rows == (123,)
    with pytest.raises(CheckFailed, match=r"1 of 400 rows are off: rows 123$"):
        assert_close(actual, expected, "bf16", "attention")


def test_nan_where_the_reference_is_finite_fails() -> None:
    expected = _rows(4)
    actual = expected.clone()
    actual[2, 5] = float("nan")
    with pytest.raises(CheckFailed) as err:
        assert_close(actual, expected, "fp32", "attention")
    assert str(err.value) == (
        "attention differs from the CPU reference: NaN/Inf where the reference is finite, in rows 2"
    )


def test_shape_and_unknown_dtype() -> None:
    with pytest.raises(CheckFailed, match=r"attention: shape \(3, 8\), expected \(4, 8\)"):
        assert_close(_rows(3), _rows(4), "fp32", "attention")
    with pytest.raises(NotSupported, match="no tolerance for dtype int8"):
        compare(_rows(4), _rows(4), "int8")


def test_attention_rows_are_named_by_sequence_and_position() -> None:
    describe = row_describer(((0, 3), (5, 1), (10, 2)))
    assert describe((2, 3, 5)) == (
        "seq 0 pos 2 (last), seq 1 pos 5 (last), seq 2 pos 11 (last) "
        "-- each is the last token of its sequence (3 of 3)"
    )
    assert describe((0, 4)) == "seq 0 pos 0, seq 2 pos 10"
