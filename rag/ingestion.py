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
  with a human reason.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag import store
from rag.chunking import chunk_pages
from rag.embeddings import get_embedder
from rag.events import push_status
from rag.models import Document
from rag.parsing import NO_TEXT, FileRejected, parse

log = logging.getLogger(__name__)

EMBED_SLICE = 64  # chunks per progress step: ~2 s of embedding on 2 cores
PARSED_AT = 0.05  # progress once parsed and chunked
EMBEDDED_AT = 0.95  # progress once embedded (writing remains)

ProgressCallback = Callable[[Document, int, int], None]


class _Superseded(Exception):
    """The run no longer owns its document (deleted, or re-ingest requested)."""


@dataclass(frozen=True)
class IngestionResult:
    document_id: int
    status: str  # ready | failed | skipped | superseded
    chunk_count: int = 0
    error: str = ""


def _set(document: Document, token: str, **fields) -> None:
    """Update the document if this run still owns it, then push the event."""
    updated = Document.objects.filter(pk=document.pk, ingest_token=token).update(**fields)
    if not updated:
        raise _Superseded
    for name, value in fields.items():
        setattr(document, name, value)
    push_status(document)


def ingest_document(document_id: int, *, on_progress: ProgressCallback | None = None):
    """Run the ingestion of one queued document to `ready` or `failed`.

    `on_progress(document, chunks_embedded, chunks_total)` is called after each
    embedded slice (the `ingest` command drives its progress bar with it)."""
    token = uuid.uuid4().hex
    claimed = Document.objects.filter(pk=document_id, status=Document.Status.QUEUED).update(
        status=Document.Status.PROCESSING, progress=0.0, error="", ingest_token=token
    )
    if not claimed:
        return IngestionResult(document_id, "skipped")
    document = Document.objects.select_related("collection").get(pk=document_id)
    chroma_name = document.collection.chroma_name
    push_status(document)
    started = time.perf_counter()
    wrote = False
    try:
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
            vectors.append(embedder.embed([c.embedding_input() for c in part]))
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
        wrote = True
        store.add_chunks(
            chroma_name, ids, np.concatenate(vectors), [c.text for c in chunks], metadatas
        )
        _set(
            document,
            token,
            status=Document.Status.READY,
            progress=1.0,
            chunk_count=total,
            error="",
        )
        store.delete_document(chroma_name, document.pk, keep=token)
        log.info(
            "document %s indexed: %d chunks in %.1f s",
            document.pk,
            total,
            time.perf_counter() - started,
        )
        return IngestionResult(document.pk, "ready", chunk_count=total)
    except _Superseded:
        if not Document.objects.filter(pk=document_id).exists():
            # Deleted under our feet (perhaps by a cascade that never touched
            # Chroma): nothing of it may stay searchable.
            store.delete_document(chroma_name, document_id)
        elif wrote:
            store.delete_document(chroma_name, document_id, generation=token)
        log.info("document %s: ingestion superseded or document deleted", document_id)
        return IngestionResult(document_id, "superseded")
    except Exception as exc:
        reason = exc.message if isinstance(exc, FileRejected) else _internal_reason(exc)
        if not isinstance(exc, FileRejected):
            log.exception("document %s: ingestion crashed", document_id)
        return _fail(document, token, chroma_name, reason)


def _internal_reason(exc: Exception) -> str:
    return f"indexing failed ({type(exc).__name__}); see the server log, then re-ingest"


def _fail(document: Document, token: str, chroma_name: str, reason: str) -> IngestionResult:
    # No chunks may survive a failure; if the store cannot even delete them,
    # the document stays 'processing' so a restart retries instead of lying.
    store.delete_document(chroma_name, document.pk)
    try:
        _set(
            document,
            token,
            status=Document.Status.FAILED,
            progress=0.0,
            chunk_count=0,
            error=reason,
        )
    except _Superseded:
        return IngestionResult(document.pk, "superseded")
    log.info("document %s failed: %s", document.pk, reason)
    return IngestionResult(document.pk, "failed", error=reason)
