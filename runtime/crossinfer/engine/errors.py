"""How failures cross the engine's boundary.

A failure belongs to the request that caused it: the engine ends that request with an error,
frees its blocks and goes on with the others. Only a failure that leaves shared state
untrustworthy (the device lost) stops the engine.
"""

from __future__ import annotations


class RequestError(Exception):
    """A failure of one request whose message is safe to show its client (it names no
    internals). Any other exception inside the engine is shown as a generic internal error,
    and its traceback goes to the log."""


class RequestFailedError(RuntimeError):
    """What the consumer of a failed request sees: its id and the public message."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id = request_id
        self.message = message


class EngineFatalError(RuntimeError):
    """The engine cannot go on: the device or the shared bookkeeping is broken."""


def public_message(error: BaseException, request_id: str) -> str:
    """What a client may read about ``error``: its own message for a RequestError, else a
    generic line that points to the server log."""
    if isinstance(error, RequestError):
        return str(error)
    return f"internal error while generating (request {request_id}); see the server log"


class RecompileError(EngineFatalError):
    """A compiled backend compiled a graph after warm-up, and the engine was told to fail on
    that (``EngineConfig.fail_on_recompile``, for tests)."""
