"""The Chroma vector store: embedded PersistentClient under DATA_DIR, or an
HttpClient to a Chroma server when CHROMA_URL is set."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from django.conf import settings

import numpy as np

_client = None
_client_lock = threading.Lock()


def get_client():
    """The process-wide Chroma client (created on first use)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                import chromadb
                from chromadb.config import Settings as ChromaSettings

                chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
                if settings.CHROMA_URL:
                    url = urlparse(settings.CHROMA_URL)
                    _client = chromadb.HttpClient(
                        host=url.hostname or "localhost",
                        port=url.port or (443 if url.scheme == "https" else 8000),
                        ssl=url.scheme == "https",
                        settings=chroma_settings,
                    )
                else:
                    settings.CHROMA_PATH.mkdir(parents=True, exist_ok=True)
                    _client = chromadb.PersistentClient(
                        path=str(settings.CHROMA_PATH), settings=chroma_settings
                    )
    return _client


def reset_client() -> None:
    """Forget the cached client (tests that change CHROMA_PATH / CHROMA_URL)."""
    global _client
    with _client_lock:
        _client = None
    forget_handles()


def check_health() -> dict:
    """Heartbeat of the vector store, for /readyz."""
    started = time.perf_counter()
    get_client().heartbeat()
    mode = "server" if settings.CHROMA_URL else "embedded"
    return {
        "ok": True,
        "mode": mode,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


# --- collections, chunks and queries ---------------------------------------------
#
# One Chroma collection per BreezeWeb collection: choosing which collections to
# query *is* the access control, so a query never needs a metadata `where`
# filter (measured: 3.7 ms p95 bare vs 57 ms with a filter at 100k chunks).

_handles: dict[str, object] = {}
_handles_lock = threading.Lock()
_max_batch: int | None = None


@dataclass(frozen=True)
class Hit:
    """One chunk found by a query; `score` is cosine similarity (1 - distance)."""

    id: str
    text: str
    score: float
    metadata: dict


def collection(name: str):
    """The Chroma collection `name` (created in cosine space if missing).

    `embedding_function=None`: Chroma's default would download a model; every
    vector we store or query with is ours."""
    handle = _handles.get(name)
    if handle is None:
        with _handles_lock:
            handle = _handles.get(name)
            if handle is None:
                handle = get_client().get_or_create_collection(
                    name, embedding_function=None, metadata={"hnsw:space": "cosine"}
                )
                _handles[name] = handle
    return handle


def forget_handles() -> None:
    """Drop cached collection handles (after deleting or resetting collections)."""
    global _max_batch
    with _handles_lock:
        _handles.clear()
        _max_batch = None


def _batch_size() -> int:
    global _max_batch
    if _max_batch is None:
        try:
            _max_batch = int(get_client().get_max_batch_size())
        except Exception:  # older servers do not report it
            _max_batch = 1000
    return max(1, min(_max_batch, 5000))


def add_chunks(
    name: str,
    ids: Sequence[str],
    embeddings: np.ndarray,
    documents: Sequence[str],
    metadatas: Sequence[dict],
) -> None:
    """Write chunks (in batches the server accepts). Metadata values must not be None."""
    target = collection(name)
    step = _batch_size()
    for at in range(0, len(ids), step):
        target.add(
            ids=list(ids[at : at + step]),
            embeddings=embeddings[at : at + step],
            documents=list(documents[at : at + step]),
            metadatas=list(metadatas[at : at + step]),
        )


def delete_document(name: str, document_id: int, *, generation: str = "", keep: str = "") -> None:
    """Remove a document's chunks: all of them, only one `generation`, or all but `keep`."""
    where: dict = {"document_id": int(document_id)}
    if generation:
        where = {"$and": [where, {"generation": generation}]}
    elif keep:
        where = {"$and": [where, {"generation": {"$ne": keep}}]}
    collection(name).delete(where=where)


def count_document_chunks(name: str, document_id: int) -> int:
    found = collection(name).get(where={"document_id": int(document_id)}, include=[])
    return len(found["ids"])


def query(name: str, embedding: np.ndarray, n_results: int) -> list[Hit]:
    """Nearest chunks of one collection to a unit-length query vector."""
    target = collection(name)
    result = target.query(
        query_embeddings=np.asarray(embedding, dtype=np.float32).reshape(1, -1),
        n_results=max(1, n_results),
        include=["documents", "metadatas", "distances"],
    )
    ids = result["ids"][0] if result["ids"] else []
    docs = (result.get("documents") or [[]])[0]
    metas = (result.get("metadatas") or [[]])[0]
    dists = (result.get("distances") or [[]])[0]
    return [
        Hit(id=i, text=d or "", score=1.0 - float(dist), metadata=dict(m or {}))
        for i, d, m, dist in zip(ids, docs, metas, dists, strict=False)
    ]


def drop_collection(name: str) -> None:
    """Delete a whole Chroma collection (its BreezeWeb collection is gone)."""
    with _handles_lock:
        _handles.pop(name, None)
    try:
        get_client().delete_collection(name)
    except Exception as exc:  # already absent: nothing to do
        if "not" not in str(exc).lower():
            raise
