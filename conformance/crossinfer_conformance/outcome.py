"""What one case can come to, and how a check says so. No torch: the pytest side imports it."""

from __future__ import annotations

from dataclasses import dataclass

PASSED = "passed"
FAILED = "failed"
NOT_SUPPORTED = "not-supported"
CRASHED = "crashed"
OUTCOMES: tuple[str, ...] = (PASSED, FAILED, CRASHED, NOT_SUPPORTED)


class CheckFailed(AssertionError):
    """A check found the backend wrong; the message says where and what was expected."""


class NotSupported(Exception):  # noqa: N818 - a verdict, not an error
    """The backend does not support this case (its Capabilities or an optional member)."""


@dataclass(frozen=True)
class CaseResult:
    """The verdict on one case, sent from the worker process to the pytest process."""

    outcome: str
    """One of :data:`OUTCOMES`."""
    message: str = ""
    """Empty when passed; otherwise what went wrong or why the case is not supported."""
    duration_s: float = 0.0
    """Wall time of the case, measured by the pytest process."""


def describe_exc(exc: BaseException) -> str:
    """``Type: message``, the way every check quotes an exception it caught."""
    return f"{type(exc).__name__}: {exc}".rstrip(": ")
