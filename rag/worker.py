"""Where ingestion jobs run.

- Default (no Redis): one daemon thread per process with a FIFO queue, started
  when the server starts serving (or on first use). One thread is enough:
  embedding is CPU bound and the model is serialised anyway.
- With `RAG_INGEST_WORKER=channels` (the default when REDIS_URL is set): jobs go
  to the Channels channel `ingest`, consumed by `python manage.py runworker
  ingest` processes (rag.consumers.IngestWorker).

Resuming: documents left `queued` or `processing` by a stopped process are
re-queued when the worker starts: when the server starts serving
(`start_serving`, from breezeweb.server's ASGI lifespan), or on first use elsewhere (an
upload, the documents API, the admin's document list, `manage.py
resume_ingestion`), never in AppConfig.ready nor at import.

The watchdog: a daemon thread started with the worker (in every web process,
from the moment it serves) sweeps every RAG_INGEST_STALL_SECONDS / 4. A
`processing` document whose run has not beaten its heartbeat for
RAG_INGEST_STALL_SECONDS (its worker, thread or process died) goes back to
`queued` and is dispatched again, or is `failed` with a reason once
MAX_ATTEMPTS runs have died on it; a `queued` document whose
job was lost (a dead thread, an expired channel message) is dispatched again.
Sweeps are conditional updates, so any number of processes may run them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, connections, transaction
from django.db.models import Q
from django.utils import timezone

from asgiref.sync import async_to_sync

from rag.events import push_status, remember_event_loop
from rag.models import Document

log = logging.getLogger(__name__)

INGEST_CHANNEL = "ingest"
_RESUME_LOCK_KEY = "rag:resume-ingestion"
_RESUME_LOCK_SECONDS = 300

# Runs started on a document (since a person last asked for it) that may die
# before it is failed instead of retried: a file that crashes the worker every
# time must not be retried forever.
MAX_ATTEMPTS = 3
STALLED_REASON = (
    "indexing stopped {attempts} times without finishing (the worker crashed or was "
    "stopped, perhaps on this file); see the server log, then re-ingest"
)

_jobs: queue.Queue[int] = queue.Queue()
_pending: set[int] = set()  # ids queued or running in this process's thread
_pending_lock = threading.Lock()
_thread: threading.Thread | None = None
_watchdog: threading.Thread | None = None
_watchdog_stop = threading.Event()
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
            with _pending_lock:
                _pending.discard(document_id)
            _jobs.task_done()


def _start_thread() -> None:
    global _thread
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run_forever, name="rag-ingest", daemon=True)
            _thread.start()


def ensure_started() -> None:
    """Start the worker and the watchdog if needed and, once per process,
    resume unfinished work."""
    global _resumed
    remember_event_loop()
    if mode() == "thread":
        _start_thread()
    start_watchdog()
    if not _resumed:
        with _start_lock:
            if _resumed:
                return
            _resumed = True
        try:
            resume_unfinished()
        except Exception:
            log.exception("could not resume unfinished ingestion")
        try:
            requeue_outdated()
        except Exception:
            log.exception("could not queue outdated documents for re-indexing")


def start_serving() -> None:
    """A web process starts serving (breezeweb.server calls this on the
    server's event loop): note that loop, then start the worker and the watchdog and
    resume unfinished work in a thread of its own, so documents a dead run
    left `processing` are settled without waiting for anyone to use the
    documents API."""
    remember_event_loop()
    threading.Thread(target=_start_for_serving, name="rag-ingest-start", daemon=True).start()


def _start_for_serving() -> None:
    try:
        ensure_started()
    except Exception:
        log.exception("could not start document ingestion")
    finally:
        connections.close_all()


def outdated_documents():
    """Ready documents whose chunks were made differently from how they would
    be now (an older chunk format, other embedding weights, or indexed before
    hybrid search): their vectors would change, so they are re-indexed."""
    from rag.embeddings import index_version

    return Document.objects.filter(status=Document.Status.READY).exclude(
        index_version=index_version()
    )


def requeue_outdated(*, force: bool = False) -> list[int]:
    """Queue every outdated document for re-indexing from its stored file.
    Each shows `queued`, its progress, then `ready`; its old chunks answer
    (vector side) until the new generation replaces them in one step. In
    channels mode one web process per 5 minutes does it (a cache lock)."""
    if (
        mode() == "channels"
        and not force
        and not cache.add(_RESUME_LOCK_KEY + ":outdated", "1", _RESUME_LOCK_SECONDS)
    ):
        return []
    now = timezone.now()
    queued = []
    for document in outdated_documents().order_by("created_at", "pk"):
        if _queue_if_ready(document, now, index_version=document.index_version):
            queued.append(document.pk)
    if queued:
        log.info("re-indexing %d document(s) whose vectors would change", len(queued))
    for document_id in queued:
        _dispatch(document_id)
    return queued


def resume_unfinished(*, force: bool = False) -> list[int]:
    """Re-queue documents left `queued` or `processing` by a stopped process.

    In thread mode this process is the only one ingesting, so every
    `processing` document was left by a stopped one. In channels mode a
    `runworker` may be busy with one right now: only those whose heartbeat is
    stale are taken (the watchdog takes the rest when they go stale).
    A document whose runs already died MAX_ATTEMPTS times is failed instead.

    In channels mode several web processes may start at once: a cache lock
    (shared through Redis) lets one of them do it, unless `force`."""
    if (
        mode() == "channels"
        and not force
        and not cache.add(_RESUME_LOCK_KEY, "1", _RESUME_LOCK_SECONDS)
    ):
        return []
    if mode() == "channels":
        return settle_stalled()
    unfinished = Document.objects.filter(
        status__in=[Document.Status.QUEUED, Document.Status.PROCESSING]
    ).order_by("created_at", "pk")
    ids = []
    for document_id, status, token, attempts in unfinished.values_list(
        "pk", "status", "ingest_token", "attempts"
    ):
        if status == Document.Status.PROCESSING and attempts >= MAX_ATTEMPTS:
            _fail_stalled(document_id, token, attempts)
            continue
        # Clearing the token makes any run still alive elsewhere stand down.
        if Document.objects.filter(pk=document_id, status=status, ingest_token=token).update(
            status=Document.Status.QUEUED,
            progress=0.0,
            ingest_token="",
            heartbeat_at=timezone.now(),
        ):
            ids.append(document_id)
    if ids:
        log.info("resuming ingestion of %d document(s)", len(ids))
    for document_id in ids:
        _dispatch(document_id)
    return ids


# --- the watchdog -------------------------------------------------------------------


def _stall_cutoff():
    return timezone.now() - timedelta(seconds=settings.RAG_INGEST_STALL_SECONDS)


def _stale(cutoff) -> Q:
    """No sign of life since `cutoff` (heartbeat, else the last save)."""
    return Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, updated_at__lt=cutoff)


def _push(document_id: int) -> None:
    document = Document.objects.filter(pk=document_id).first()
    if document is not None:
        push_status(document)


def _fail_stalled(document_id: int, token: str, attempts: int) -> bool:
    """Fail a document whose runs keep dying (only if nobody took it meanwhile)."""
    failed = Document.objects.filter(
        pk=document_id, status=Document.Status.PROCESSING, ingest_token=token
    ).update(
        status=Document.Status.FAILED,
        progress=0.0,
        chunk_count=0,
        ingest_token="",
        heartbeat_at=None,
        error=STALLED_REASON.format(attempts=attempts),
    )
    if not failed:
        return False
    log.warning("document %s failed: %d runs died before finishing", document_id, attempts)
    document = Document.objects.select_related("collection").filter(pk=document_id).first()
    if document is not None:
        from rag import store

        try:  # no chunks of a failed document may stay (they are never retrieved anyway)
            store.delete_document(document.collection.chroma_name, document_id)
        except Exception as exc:
            log.warning("document %s: chunks not removed (%s)", document_id, exc)
        push_status(document)
    return True


def settle_stalled() -> list[int]:
    """One sweep of the watchdog; returns the ids dispatched again."""
    cutoff = _stall_cutoff()
    now = timezone.now()
    dispatched: list[int] = []
    stalled = Document.objects.filter(_stale(cutoff), status=Document.Status.PROCESSING)
    for document_id, token, attempts in stalled.values_list("pk", "ingest_token", "attempts"):
        if attempts >= MAX_ATTEMPTS:
            _fail_stalled(document_id, token, attempts)
            continue
        # Conditional on the dead run's token: one sweeper wins, and a run
        # that was only slow stands down (its next write finds another token).
        retried = Document.objects.filter(
            pk=document_id, status=Document.Status.PROCESSING, ingest_token=token
        ).update(status=Document.Status.QUEUED, progress=0.0, ingest_token="", heartbeat_at=now)
        if retried:
            log.warning(
                "document %s: its ingestion run stopped beating (attempt %d); queued again",
                document_id,
                attempts,
            )
            _push(document_id)
            _dispatch(document_id)
            dispatched.append(document_id)
    # Queued documents whose job was lost (a dead thread, an expired channel
    # message). A duplicate job is a no-op, so sending one again is safe.
    lost = Document.objects.filter(_stale(cutoff), status=Document.Status.QUEUED)
    if mode() == "thread":
        with _pending_lock:
            waiting = set(_pending)
        lost = lost.exclude(pk__in=waiting)
    for document_id in lost.values_list("pk", flat=True):
        if Document.objects.filter(_stale(cutoff), pk=document_id).update(heartbeat_at=now):
            log.warning("document %s: queued but nobody was working on it; sent again", document_id)
            _dispatch(document_id)
            dispatched.append(document_id)
    return dispatched


def _sweep_period() -> float:
    return max(0.25, settings.RAG_INGEST_STALL_SECONDS / 4)


def _watch_forever(stop: threading.Event) -> None:
    last = time.monotonic()
    # Short naps, so a changed setting takes effect at once.
    while not stop.wait(min(1.0, _sweep_period())):
        if time.monotonic() - last < _sweep_period():
            continue
        last = time.monotonic()
        try:
            close_old_connections()
            settle_stalled()
        except Exception:
            log.exception("ingestion watchdog: sweep failed")
        finally:
            connections.close_all()


def start_watchdog() -> None:
    """Start this process's watchdog thread (once; again if it died)."""
    global _watchdog, _watchdog_stop
    with _start_lock:
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog_stop = threading.Event()
            _watchdog = threading.Thread(
                target=_watch_forever,
                args=(_watchdog_stop,),
                name="rag-ingest-watchdog",
                daemon=True,
            )
            _watchdog.start()


def stop_watchdog(timeout: float = 5.0) -> None:
    """Stop the watchdog thread, if running, and wait for its sweep to end."""
    global _watchdog
    with _start_lock:
        thread, _watchdog = _watchdog, None
        _watchdog_stop.set()
    if thread is not None:
        thread.join(timeout)


def _queue_if_ready(document, now, **still) -> bool:
    """Queue a `ready` document for indexing again, if it is still ready (and
    matches `still`) when the row is updated; tell its owner. Whether it was."""
    if not Document.objects.filter(pk=document.pk, status=Document.Status.READY, **still).update(
        status=Document.Status.QUEUED,
        progress=0.0,
        error="",
        ingest_token="",
        heartbeat_at=now,
        attempts=0,
    ):
        return False
    document.status, document.progress = Document.Status.QUEUED, 0.0
    push_status(document)
    return True


# --- healing a lost Chroma collection ------------------------------------------------


def rebuild_collection(chroma_name: str) -> list[int]:
    """The Chroma collection `chroma_name` was lost (recreated empty): queue
    every document the database says was indexed in it, so it is rebuilt from
    the stored files (each document shows `queued`, then its progress)."""
    from rag.models import Collection

    prefix = "bw_collection_"
    if not chroma_name.startswith(prefix) or not chroma_name[len(prefix) :].isdigit():
        return []
    owner = Collection.objects.filter(pk=int(chroma_name[len(prefix) :])).first()
    if owner is None:
        return []
    lost = list(
        Document.objects.filter(
            collection=owner, status=Document.Status.READY, chunk_count__gt=0
        ).order_by("created_at", "pk")
    )
    if not lost:
        return []
    log.warning(
        "Chroma collection %s was lost: re-ingesting its %d document(s) from the stored files",
        chroma_name,
        len(lost),
    )
    now = timezone.now()
    queued = []
    for document in lost:
        # Not requeue(): that would also resume other work in this process,
        # which may be a command in the middle of its own run.
        if _queue_if_ready(document, now):
            transaction.on_commit(lambda i=document.pk: _dispatch(i))
            queued.append(document.pk)
    return queued


def _dispatch(document_id: int) -> None:
    if mode() == "channels":
        from channels.layers import get_channel_layer

        async_to_sync(get_channel_layer().send)(
            INGEST_CHANNEL, {"type": "ingest.document", "document_id": document_id}
        )
    else:
        _start_thread()
        with _pending_lock:
            _pending.add(document_id)
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
        status=Document.Status.QUEUED,
        progress=0.0,
        error="",
        ingest_token="",
        heartbeat_at=timezone.now(),
        attempts=0,
    )
    document.refresh_from_db()
    enqueue(document)
    return document


def wait_until_idle(timeout: float = 120.0) -> bool:
    """Block until the in-process queue is drained (tests, the ingest command)."""
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
