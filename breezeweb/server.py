"""What a serving process starts on its own, through the ASGI lifespan.

`on_serving` (the ingestion worker and its watchdog, which settle documents
a dead run left `processing`) runs when the server's event loop starts
serving: not at import (management commands such as `migrate`, and the
tests, import the application without serving it) and not on the first
request that happens to need it. uvicorn sends the lifespan's `startup`
once per process, on its event loop (so a callback can note the loop the
in-memory channel layer uses), before it accepts a connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


# Called once per process, on the server's event loop, when it starts
# serving; each must return at once (start threads for slow work).
on_serving: list[Callable[[], None]] = []


def serve_with(callback: Callable[[], None]) -> None:
    """Run `callback` when this process starts serving (idempotent)."""
    if callback not in on_serving:
        on_serving.append(callback)


def _serving_started() -> None:
    for callback in list(on_serving):
        try:
            callback()
        except Exception:
            log.exception("could not start %s with the server", callback)


async def lifespan(scope, receive, send) -> None:
    """The ASGI lifespan protocol: `on_serving` at startup; nothing to undo at
    shutdown (the workers are daemon threads)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _serving_started()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
