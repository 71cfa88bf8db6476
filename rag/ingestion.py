"""One ingestion run: parse -> chunk -> embed in batches -> write to Chroma.

Runs off the request path (the in-process worker thread, a Channels worker, or
the `ingest` command). The guarantees:

- A run claims its document by writing a fresh `ingest_token`; only a document
  in `queued` can be claimed, so a duplicate job is a no-op.
- Chunks are written only after every one is embedded, under the run's token
  (`generation` in their metadata). The document becomes `ready` only if the run
  still owns it; then the previous generation's chunks are removed. So a
  re-ingest swaps old chunks for new ones, and a run that was superseded (re-ingest
  requested again) or whose document was deleted removes what it wrote.
- A failure removes every chunk of the document before it is marked `failed`
  with a human reason, and any failure (also one while cleaning up) ends in
  `failed`: a document is never left `processing` by a run that is alive.
- Every chunk written is checked to be in the store before the document is
  `ready`: a collection lost between two batches of the write took the earlier
  batches with it, so the whole write is done again.
- While it runs, a heartbeat stamps the document every few seconds; the
  watchdog in rag.worker settles a document whose run died (crash, kill).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connections, transaction
from django.db.models import F
from django.utils import timezone

import numpy as np

from rag import store
from rag.chunking import chunk_pages
from rag.embeddings import get_embedder, index_version
from rag.events import push_status
from rag.models import Chunk, Document
from rag.parsing import NO_TEXT, FileRejected, parse

log = logging.getLogger(__name__)

EMBED_SLICE = 64  # chunks per progress step: ~2 s of embedding on 2 cores
PARSED_AT = 0.05  # progress once parsed and chunked
EMBEDDED_AT = 0.95  # progress once embedded (writing remains)

ProgressCallback = Callable[[Document, int, int], None]


class ChunksLost(RuntimeError):
    """The store kept losing the run's chunks while they were written."""


class _Superseded(Exception):
    """The run no longer owns its document (deleted, or re-ingest requested)."""


@dataclass(frozen=True)
class IngestionResult:
    document_id: int
    status: str  # ready | failed | skipped | superseded
    chunk_count: int = 0
    error: str = ""


def _set(document: Document, token: str, *, push: bool = True, **fields) -> None:
    """Update the document if this run still owns it, then push the event."""
    updated = Document.objects.filter(pk=document.pk, ingest_token=token).update(
        heartbeat_at=timezone.now(), **fields
    )
    if not updated:
        raise _Superseded
    for name, value in fields.items():
        setattr(document, name, value)
    if push:
        push_status(document)


def stall_seconds() -> float:
    """A run that has not shown a sign of life for this long is dead."""
    return float(settings.RAG_INGEST_STALL_SECONDS)


class _Heartbeat:
    """While a run is alive, a small thread stamps `heartbeat_at` every
    stall/6 seconds, so the watchdog can tell a slow step (a big PDF, a large
    write) from a run whose worker, thread or process died."""

    def __init__(self, document_id: int, token: str) -> None:
        self.document_id = document_id
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"rag-heartbeat-{document_id}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        interval = max(0.2, stall_seconds() / 6)
        try:
            while not self._stop.wait(interval):
                try:
                    Document.objects.filter(
                        pk=self.document_id,
                        ingest_token=self.token,
                        status=Document.Status.PROCESSING,
                    ).update(heartbeat_at=timezone.now())
                except Exception as exc:  # the database is away: the next beat may work
                    log.warning("document %s: heartbeat not stored (%s)", self.document_id, exc)
        finally:
            connections.close_all()  # this thread's connection only


def ingest_document(document_id: int, *, on_progress: ProgressCallback | None = None):
    """Run the ingestion of one queued document to `ready` or `failed`.

    `on_progress(document, chunks_embedded, chunks_total)` is called after each
    embedded slice (the `ingest` command drives its progress bar with it).

    Never leaves the document `processing`: every failure, including one while
    handling a failure, ends in `failed` with a reason. Only when the database
    itself cannot be written does the document stay `processing`; then the
    watchdog (rag.worker) settles it once its heartbeat is stale."""
    token = uuid.uuid4().hex
    claimed = Document.objects.filter(pk=document_id, status=Document.Status.QUEUED).update(
        status=Document.Status.PROCESSING,
        progress=0.0,
        error="",
        ingest_token=token,
        heartbeat_at=timezone.now(),
        attempts=F("attempts") + 1,
    )
    if not claimed:
        return IngestionResult(document_id, "skipped")
    with _Heartbeat(document_id, token):
        chroma_name = ""
        try:
            document = Document.objects.select_related("collection").get(pk=document_id)
            chroma_name = document.collection.chroma_name
            push_status(document)
            return _index(document, token, chroma_name, on_progress)
        except _Superseded:
            _clean_up_superseded(document_id, token, chroma_name)
            log.info("document %s: ingestion superseded or document deleted", document_id)
            return IngestionResult(document_id, "superseded")
        except Document.DoesNotExist:
            return IngestionResult(document_id, "superseded")
        except Exception as exc:
            if isinstance(exc, FileRejected):
                reason = exc.message
            elif isinstance(exc, ChunksLost):
                reason = f"{exc}; re-ingest"
                log.warning("document %s: %s", document_id, exc)
            elif isinstance(exc, store.StoreLocked):
                reason = f"the vector store is busy: {exc}; then re-ingest"
                log.warning("document %s: %s", document_id, exc)
            else:
                reason = _internal_reason(exc)
                log.exception("document %s: ingestion crashed", document_id)
            return _fail(document_id, token, chroma_name, reason)


def _index(
    document: Document, token: str, chroma_name: str, on_progress: ProgressCallback | None
) -> IngestionResult:
    started = time.perf_counter()
    parsed = parse(Path(document.file.path), document.title)
    embedder = get_embedder()
    chunks = chunk_pages(parsed.pages, embedder.count_tokens_many)
    if not chunks:
        raise FileRejected("no_text", NO_TEXT if parsed.kind == "pdf" else "no text found")
    _set(document, token, progress=PARSED_AT, page_count=parsed.page_count)

    total = len(chunks)
    vectors = []
    for at in range(0, total, EMBED_SLICE):
        part = chunks[at : at + EMBED_SLICE]
        vectors.append(embedder.embed([c.embedding_input(document.title) for c in part]))
        done = at + len(part)
        _set(document, token, progress=PARSED_AT + (EMBEDDED_AT - PARSED_AT) * done / total)
        if on_progress is not None:
            on_progress(document, done, total)

    ids = [f"{document.pk}:{token}:{i}" for i in range(total)]
    metadatas = []
    for i, chunk in enumerate(chunks):
        meta = {
            "document_id": document.pk,
            "collection_id": document.collection_id,
            "generation": token,
            "chunk_index": i,
            "start": chunk.start,
            "end": chunk.end,
            "heading": chunk.heading_path,
            "title": document.title,
        }
        if chunk.page is not None:
            meta["page"] = chunk.page
        metadatas.append(meta)
    _write_chunks(document, chroma_name, token, ids, np.concatenate(vectors), chunks, metadatas)
    rows = [
        Chunk(
            document_id=document.pk,
            collection_id=document.collection_id,
            generation=token,
            chunk_index=i,
            chroma_id=ids[i],
            page=chunk.page,
            section=chunk.heading_path,
            context=chunk.context(document.title),
            text=chunk.text,
        )
        for i, chunk in enumerate(chunks)
    ]
    # One transaction makes the new generation live in both indexes: the
    # document names it (vector hits of any other generation are dropped at
    # query time) and the keyword rows are swapped. Readers see the old
    # generation or the new one, never a mix, never a stale keyword hit.
    with transaction.atomic():
        _set(
            document,
            token,
            status=Document.Status.READY,
            progress=1.0,
            chunk_count=total,
            error="",
            live_generation=token,
            index_version=index_version(embedder.path),
            push=False,
        )
        Chunk.objects.filter(document_id=document.pk).delete()
        Chunk.objects.bulk_create(rows, batch_size=500)
    push_status(document)
    try:
        store.delete_document(chroma_name, document.pk, keep=token)
    except Exception:
        # The new chunks are in and the document is ready; the old generation
        # goes with the next re-ingest or the deletion of the document.
        log.exception("document %s: the previous generation's chunks stay for now", document.pk)
    log.info(
        "document %s indexed: %d chunks in %.1f s",
        document.pk,
        total,
        time.perf_counter() - started,
    )
    return IngestionResult(document.pk, "ready", chunk_count=total)


# Whole writes of one run's chunks before it gives up: each lost to a
# collection that vanished (and was recreated) while it was being written.
WRITE_ATTEMPTS = 3


def _write_chunks(document, chroma_name, token, ids, vectors, chunks, metadatas) -> None:
    """Write the run's chunks and check that the store holds every one of them.

    A write in several batches retries only the batch that found the collection
    gone (rag.store), so the batches written before it went with the old
    collection: counted afterwards, they are missing, and the whole write is
    done again (upserts: chunks already there are only rewritten)."""
    texts = [c.text for c in chunks]
    total = len(ids)
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        store.add_chunks(chroma_name, ids, vectors, texts, metadatas)
        stored = store.count_document_chunks(chroma_name, document.pk, generation=token)
        if stored == total:
            return
        log.warning(
            "document %s: %d of %d chunks are in the store after writing them (the "
            "collection was lost during the write); writing them again (%d of %d)",
            document.pk,
            stored,
            total,
            attempt,
            WRITE_ATTEMPTS,
        )
    raise ChunksLost(
        f"the vector store lost chunks while they were written, {WRITE_ATTEMPTS} times"
    )


def _clean_up_superseded(document_id: int, token: str, chroma_name: str) -> None:
    """A superseded run removes what it wrote; a deleted document (perhaps by a
    cascade that never touched Chroma) must not stay searchable."""
    if not chroma_name:
        return
    try:
        if not Document.objects.filter(pk=document_id).exists():
            store.delete_document(chroma_name, document_id)
        else:
            store.delete_document(chroma_name, document_id, generation=token)
    except Exception:
        log.exception("document %s: could not remove a superseded run's chunks", document_id)


def _internal_reason(exc: Exception) -> str:
    return f"indexing failed ({type(exc).__name__}); see the server log, then re-ingest"


def _fail(document_id: int, token: str, chroma_name: str, reason: str) -> IngestionResult:
    """Mark the document failed with `reason`; never raises.

    Every chunk of the document is removed first. If the store cannot even do
    that, the document is failed all the same: retrieval never returns chunks
    of a failed document, and the leftovers go with the next re-ingest (which
    replaces every older generation) or the document's deletion."""
    if chroma_name:
        try:
            store.delete_document(chroma_name, document_id)
        except Exception:
            log.exception(
                "document %s: its chunks could not be removed after the failure; "
                "they are never retrieved and go with a re-ingest or delete",
                document_id,
            )
    for attempt in range(3):
        try:
            with transaction.atomic():
                updated = Document.objects.filter(pk=document_id, ingest_token=token).update(
                    status=Document.Status.FAILED,
                    progress=0.0,
                    chunk_count=0,
                    error=reason,
                    heartbeat_at=None,
                    live_generation="",
                )
                if updated:  # the keyword rows go in the same step
                    Chunk.objects.filter(document_id=document_id).delete()
            break
        except Exception:
            log.exception("document %s: could not store the failure", document_id)
            close_old_connections()
            time.sleep(0.5 * (attempt + 1))
    else:
        # The database itself is failing; the watchdog settles the document
        # (its heartbeat stops with this run) once the database answers again.
        return IngestionResult(document_id, "failed", error=reason)
    if not updated:
        return IngestionResult(document_id, "superseded")
    try:
        document = Document.objects.filter(pk=document_id).first()
    except Exception:  # the status is stored; only the live event is lost
        document = None
    if document is not None:
        push_status(document)
    log.info("document %s failed: %s", document_id, reason)
    return IngestionResult(document_id, "failed", error=reason)
