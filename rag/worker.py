"""Where ingestion jobs run.

- Default (no Redis): one daemon thread per process with a FIFO queue, started
  on first use. One thread is enough: embedding is CPU bound and the model is
  serialised anyway.
- With `RAG_INGEST_WORKER=channels` (the default when REDIS_URL is set): jobs go
  to the Channels channel `ingest`, consumed by `python manage.py runworker
  ingest` processes (rag.consumers.IngestWorker).

Resuming: documents left `queued` or `processing` by a stopped process are
re-queued when the worker starts (first upload, first documents API call, the
admin's document list, `manage.py resume_ingestion`), never in
AppConfig.ready.
"""

from __future__ import annotations

import logging
import queue
import threading

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, connections, transaction

from asgiref.sync import async_to_sync

from rag.events import push_status, remember_event_loop
from rag.models import Document

log = logging.getLogger(__name__)

INGEST_CHANNEL = "ingest"
_RESUME_LOCK_KEY = "rag:resume-ingestion"
_RESUME_LOCK_SECONDS = 300

_jobs: queue.Queue[int] = queue.Queue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_resumed = False


def mode() -> str:
    """`thread` (in-process) or `channels` (runworker ingest)."""
    configured = getattr(settings, "RAG_INGEST_WORKER", "") or ""
    if configured:
        return configured
    return "channels" if settings.REDIS_URL else "thread"


def _run_forever() -> None:
    from rag.ingestion import ingest_document

    while True:
        document_id = _jobs.get()
        try:
            close_old_connections()
            ingest_document(document_id)
        except Exception:
            log.exception("ingestion worker: job for document %s crashed", document_id)
        finally:
            # Never keep a connection open between jobs (idle PostgreSQL
            # sessions, test databases that must be dropped).
            connections.close_all()
            _jobs.task_done()


def _start_thread() -> None:
    global _thread
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run_forever, name="rag-ingest", daemon=True)
            _thread.start()


def ensure_started() -> None:
    """Start the worker if needed and, once per process, resume unfinished work."""
    global _resumed
    remember_event_loop()
    if mode() == "thread":
        _start_thread()
    if not _resumed:
        with _start_lock:
            if _resumed:
                return
            _resumed = True
        try:
            resume_unfinished()
        except Exception:
            log.exception("could not resume unfinished ingestion")


def resume_unfinished(*, force: bool = False) -> list[int]:
    """Re-queue documents left `queued` or `processing` (by a stopped process).

    In channels mode several web processes may start at once: a cache lock
    (shared through Redis) lets one of them do it, unless `force`."""
    if (
        mode() == "channels"
        and not force
        and not cache.add(_RESUME_LOCK_KEY, "1", _RESUME_LOCK_SECONDS)
    ):
        return []
    unfinished = Document.objects.filter(
        status__in=[Document.Status.QUEUED, Document.Status.PROCESSING]
    ).order_by("created_at", "pk")
    ids = list(unfinished.values_list("pk", flat=True))
    if ids:
        # Clearing the token makes any run still alive elsewhere stand down.
        Document.objects.filter(pk__in=ids).update(
            status=Document.Status.QUEUED, progress=0.0, ingest_token=""
        )
        log.info("resuming ingestion of %d document(s)", len(ids))
    for document_id in ids:
        _dispatch(document_id)
    return ids


def _dispatch(document_id: int) -> None:
    if mode() == "channels":
        from channels.layers import get_channel_layer

        async_to_sync(get_channel_layer().send)(
            INGEST_CHANNEL, {"type": "ingest.document", "document_id": document_id}
        )
    else:
        _start_thread()
        _jobs.put(document_id)


def enqueue(document: Document) -> None:
    """Queue `document` (status `queued`) for ingestion once the current
    transaction commits, so the worker sees the row."""
    ensure_started()
    document_id = document.pk
    transaction.on_commit(lambda: _dispatch(document_id))
    push_status(document)


def requeue(document: Document) -> Document:
    """Re-ingest: back to `queued`. Its chunks stay searchable until the new
    run replaces them; a run in progress for it stands down."""
    Document.objects.filter(pk=document.pk).update(
        status=Document.Status.QUEUED, progress=0.0, error="", ingest_token=""
    )
    document.refresh_from_db()
    enqueue(document)
    return document


def wait_until_idle(timeout: float = 120.0) -> bool:
    """Block until the in-process queue is drained (tests, the ingest command)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _jobs.unfinished_tasks == 0:
            return True
        time.sleep(0.05)
    return False


def reset_for_tests() -> None:
    """Forget that resuming already happened (a test simulates a restart)."""
    global _resumed
    _resumed = False
