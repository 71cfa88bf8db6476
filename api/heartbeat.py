"""Keep long-lived streams alive through proxies.

Reverse proxies close a response that stays silent for a while (nginx:
60 s by default), which cuts answers short while a request waits in the local
runner's queue or a slow model thinks. `Heartbeat` wraps an async iterator and
produces `HEARTBEAT` whenever the source has been silent for `interval`
seconds; the caller turns it into something harmless on the wire (an SSE
comment line)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

HEARTBEAT = object()


class Heartbeat:
    """An async iterator over `source` with HEARTBEAT in its silences. It can be
    iterated from several loops in turn (e.g. first to prime, then to stream):
    a pending item is kept between them, never asked for twice."""

    def __init__(self, source: AsyncIterator[Any], interval: float) -> None:
        self._source = source
        self._iter = source.__aiter__()
        self._pending: asyncio.Future | None = None
        self.interval = interval

    def __aiter__(self) -> Heartbeat:
        return self

    async def __anext__(self) -> Any:
        if self._pending is None:
            # A fresh context: this step may have been started inside a view
            # whose thread-sensitive executor (asgiref) is gone by the time a
            # later step of the same stream touches the database.
            self._pending = asyncio.get_running_loop().create_task(
                self._next_item(), context=contextvars.Context()
            )
        done, _ = await asyncio.wait({self._pending}, timeout=self.interval)
        if not done:
            return HEARTBEAT
        pending, self._pending = self._pending, None
        return pending.result()  # StopAsyncIteration ends the loop

    async def _next_item(self) -> Any:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()
