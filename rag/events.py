"""Document status pushed live through the channel layer.

Every change of a document's status or progress is sent to the group
`documents.user.<owner_id>` as `{"type": "document.status", "document": {...}}`;
the chat websocket consumer subscribes to that group and forwards the frames.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from asgiref.sync import SyncToAsync, async_to_sync

log = logging.getLogger(__name__)

_home_loop: asyncio.AbstractEventLoop | None = None
_home_lock = threading.Lock()


def group_name(owner_id: int) -> str:
    """The channel-layer group that receives one user's document events."""
    return f"documents.user.{owner_id}"


def document_payload(document) -> dict:
    """The `document` object of a `document.status` message (and of the API)."""
    return {
        "id": document.pk,
        "title": document.title,
        "status": document.status,
        "progress": round(float(document.progress), 4),
        "error": document.error,
        "chunk_count": document.chunk_count,
        "collection_id": document.collection_id,
    }


def remember_event_loop() -> None:
    """Note the server's event loop, when called from it or from one of its
    sync_to_async threads. The in-memory channel layer is bound to that loop,
    so events from the ingestion thread must be sent on it."""
    global _home_loop
    loop = None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if loop is not None:
        with _home_lock:
            _home_loop = loop


def push_status(document) -> None:
    """Send a `document.status` event for `document` (never raises: a missed
    progress event must not fail an ingestion)."""
    from channels.layers import InMemoryChannelLayer, get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "document.status", "document": document_payload(document)}
    group = group_name(document.owner_id)
    try:
        loop = _home_loop
        if isinstance(layer, InMemoryChannelLayer):
            if loop is None or loop.is_closed() or not loop.is_running():
                # Nobody in this process can be listening yet (no server loop).
                return
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                loop.create_task(layer.group_send(group, message))
            else:
                asyncio.run_coroutine_threadsafe(layer.group_send(group, message), loop).result(5)
        else:
            async_to_sync(layer.group_send)(group, message)
    except Exception as exc:
        log.warning("document %s: status event not delivered (%s)", document.pk, exc)
