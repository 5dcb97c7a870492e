"""The consumer's side of a batch of requests: an async iterator over their outputs that
aborts what is left when it is closed (see ``AsyncLLMEngine.add_requests``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from crossinfer.engine.errors import RequestFailedError
from crossinfer.engine.outputs import RequestOutput

# What the engine thread hands to a stream: an output, or the error that stopped the engine.
StreamItem = RequestOutput | BaseException
# Called with each output as the consumer receives it (the server's latency metrics).
Observer = Callable[[RequestOutput], None]


class OutputStream:
    """The outputs of one batch of requests, in the order the engine produced them.

    Iteration ends once every request has finished; a request that failed inside the engine
    raises ``RequestFailedError`` (and the stream ends). Closing the stream before that (or leaving
    its ``async with`` block) aborts the unfinished requests, which frees their KV blocks;
    call ``close`` in a ``finally`` so a cancelled consumer (a client that went away) does not
    leave work running.
    """

    def __init__(
        self,
        request_ids: Sequence[str],
        queue: asyncio.Queue[StreamItem],
        abort: Callable[[str], None],
        observer: Observer | None = None,
    ) -> None:
        self._unfinished = set(request_ids)
        self._queue = queue  # filled by the engine thread, through the queue's event loop
        self._abort = abort
        self._observer = observer
        self.request_ids = tuple(request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished.clear()
            raise item
        if item.error is not None:
            self._unfinished.discard(item.request_id)
            self.close()  # the batch failed with it: abort its other requests
            raise RequestFailedError(item.request_id, item.error)
        if item.finished:
            self._unfinished.discard(item.request_id)
        if self._observer is not None:
            self._observer(item)
        return item

    def close(self) -> None:
        """Abort every request of the stream that has not finished. Idempotent."""
        for request_id in self._unfinished:
            self._abort(request_id)
        self._unfinished.clear()

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
