"""Saving answers while they stream, and the answers that outlived their socket.

- `StreamingSaver` (one per server process, `streaming_saver()`): the answers
  being streamed are saved together, in one database call every
  FLUSH_INTERVAL_SECONDS, so a crash loses at most that much of each.
- `detach(task)` / `finish_detached()`: an answer whose socket closed goes on
  being generated and saved (docs/architecture.md, *A closed socket does not
  stop the answer*); these are the tasks still running, which tests and a
  graceful shutdown wait for (or stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref

from channels.db import database_sync_to_async

from chat import services

log = logging.getLogger(__name__)

# The answer so far is saved at most this often while it streams.
FLUSH_INTERVAL_SECONDS = 0.5


class StreamingSaver:
    """Saves the answers being streamed in this process, all of them in one
    database call every FLUSH_INTERVAL_SECONDS, so a crash loses at most that
    much of each answer. One batched write instead of one per answer keeps the
    database thread (and the GIL) free for streaming when many answers run."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._pending: dict[int, list[str]] = {}
        self._task: asyncio.Task | None = None
        self._inflight: asyncio.Future | None = None

    def mark(self, message_id: int, parts: list[str]) -> None:
        """The answer `message_id` grew; `parts` is its live list of pieces."""
        self._pending[message_id] = parts
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def forget(self, message_id: int) -> None:
        """Stop saving this answer, and wait out a save of it already under way."""
        self._pending.pop(message_id, None)
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(inflight)

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self.interval)
            batch = {mid: "".join(parts) for mid, parts in self._pending.items()}
            self._pending.clear()
            if not batch:
                continue
            self._inflight = asyncio.ensure_future(
                database_sync_to_async(services.flush_contents)(batch)
            )
            try:
                await asyncio.shield(self._inflight)
            except Exception:
                log.exception("could not save %d streaming answers", len(batch))


_savers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamingSaver] = (
    weakref.WeakKeyDictionary()
)


def streaming_saver() -> StreamingSaver:
    """The saver of the running event loop (one per server process)."""
    loop = asyncio.get_running_loop()
    saver = _savers.get(loop)
    if saver is None:
        saver = _savers[loop] = StreamingSaver(FLUSH_INTERVAL_SECONDS)
    return saver


# Generations whose socket has gone, still being written and saved.
_detached: set[asyncio.Task] = set()


def detach(task: asyncio.Task) -> None:
    """Keep track of an answer whose socket closed until it ends."""
    _detached.add(task)
    task.add_done_callback(_detached.discard)


async def finish_detached(*, cancel: bool = False, wait_seconds: float = 30.0) -> None:
    """Wait for (or stop) the generations that outlived their socket: tests
    and graceful shutdowns use it."""
    tasks = list(_detached)
    if cancel:
        for task in tasks:
            task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=wait_seconds)
