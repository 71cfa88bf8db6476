"""A top-k keyword index in memory, per large collection, on the embedded
default (SQLite): BM25 scores precomputed per term (bm25s, a sparse matrix of
terms x chunks), so a query sums a few rows and picks its best k instead of
scoring every chunk that holds a query word, as FTS5 does.

The database stays the record. rag_chunk_fts (rag.lexical) is always kept in
step by triggers and answers every query this index cannot; this index is a
per-process cache of one collection's chunks that is used only while it is
exactly current:

- triggers on rag_chunk keep `rag_chunk_generation` (collection id ->
  generation, chunk count) in the same transaction as the chunk rows
  (installed with the FTS5 table by rag.lexical.INDEX);
- a query reads its collection's generation (one primary-key lookup) and uses
  the index only when it was built at that generation. Otherwise FTS5 answers
  and, when the collection holds at least `RAG_TOPK_MIN_CHUNKS` chunks and
  its generation has stayed the same for SETTLE_SECONDS (not while documents
  are still being added one after another), a background thread builds the
  index again, one build at a time in the process. A deleted or re-ingested
  document therefore never shows up as a stale hit: its collection's
  generation changed in the same commit;
- an index whose collection fell under the threshold, or was deleted, is
  dropped.

Words are read as rag.lexical reads them (the same `\\w+` words and stop list,
stemmed by the Snowball English stemmer, close to FTS5's Porter), the chunk's
context (title, section path) counted with its text; a dotted or underscored
identifier or version ("3.12", "os.path.join") is also one token of its own,
which stands in for FTS5's phrase match.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from django.db import close_old_connections, connections

import numpy as np

log = logging.getLogger(__name__)

GENERATION_TABLE = "rag_chunk_generation"


@dataclass(frozen=True)
class _Index:
    generation: int
    pks: np.ndarray  # the chunk row ids, in the order of the index's documents
    bm25: object  # bm25s.BM25


# A generation must have been seen unchanged this long before a build starts.
SETTLE_SECONDS = 3.0

_indexes: dict[int, _Index] = {}
_seen: dict[int, tuple[int, float]] = {}  # collection -> (generation, first seen)
_building: set[int] = set()
_lock = threading.Lock()
# Tests build in the query's own thread, and the query then uses the index.
build_inline = False
answered = 0  # queries this process answered from memory (tests, benchmarks)


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word)


def tokens(text: str) -> list[str]:
    """The index's tokens of `text`: stemmed words minus stop words, plus each
    compound identifier joined by "_"."""
    from rag.lexical import _COMPOUND, _TOKEN, STOPWORDS

    lowered = text.lower()
    words = [_stem(w) for w in _TOKEN.findall(lowered) if w not in STOPWORDS]
    compounds = ["_".join(_TOKEN.findall(c)) for c in _COMPOUND.findall(lowered)]
    return words + ["~" + c for c in compounds]  # "~": never a word of its own


def _state(cursor, collection_id: int) -> tuple[int, int]:
    """(generation, chunk count) of a collection as its triggers left them."""
    cursor.execute(
        "SELECT generation, chunks FROM rag_chunk_generation WHERE collection_id = %s",
        [int(collection_id)],
    )
    row = cursor.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def search(cursor, collection_id: int, query: str, limit: int) -> dict[int, float] | None:
    """{chunk pk: BM25 score} of the best `limit` chunks of the collection, or
    None when no current index exists (then FTS5 must answer)."""
    min_chunks = settings.RAG_TOPK_MIN_CHUNKS
    if not min_chunks:
        return None
    generation, count = _state(cursor, collection_id)
    index = _indexes.get(collection_id)
    if index is None or index.generation != generation:
        if count < min_chunks:
            if index is not None:
                forget(collection_id)
            return None
        if not build_inline:
            if _settled(collection_id, generation):
                _build_later(collection_id, cursor.db.alias)
            return None
        build(collection_id, cursor.db.alias)
        index = _indexes[collection_id]
    global answered
    answered += 1
    wanted = tokens(query)
    if not wanted or not index.pks.size:
        return {}
    scores = index.bm25.get_scores(wanted)
    k = min(int(limit), scores.size)
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return {int(index.pks[i]): float(scores[i]) for i in best if scores[i] > 0}


def _settled(collection_id: int, generation: int) -> bool:
    """Whether this generation of the collection has been seen unchanged for
    SETTLE_SECONDS (documents added one after another keep moving it)."""
    now = time.monotonic()
    seen = _seen.get(collection_id)
    if seen is None or seen[0] != generation:
        _seen[collection_id] = (generation, now)
        return SETTLE_SECONDS <= 0
    return now - seen[1] >= SETTLE_SECONDS


def build(collection_id: int, using: str = "default") -> None:
    """(Re)build a collection's index now. The generation is read before the
    rows, each in its own statement (no write lock held while 50k rows are
    read): rows newer than that generation can only make the index look older
    than it is, and an index that is not exactly current is never used."""
    import bm25s

    conn = connections[using]
    with conn.cursor() as cursor:
        generation, _ = _state(cursor, collection_id)
        cursor.execute(
            "SELECT id, context, text FROM rag_chunk WHERE collection_id = %s ORDER BY id",
            [int(collection_id)],
        )
        rows = cursor.fetchall()
    pks = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    corpus = [tokens(f"{context or ''}\n{text}") or ["~"] for _, context, text in rows]
    bm25 = bm25s.BM25(k1=1.2, b=0.75)
    if corpus:
        bm25.index(corpus, show_progress=False)
    with _lock:
        _indexes[collection_id] = _Index(generation, pks, bm25)
    log.info("keyword top-k index: collection %s, %d chunks", collection_id, len(rows))


def _build_later(collection_id: int, using: str) -> None:
    with _lock:
        if _building:  # one build at a time: it is CPU work in a web process
            return
        _building.add(collection_id)

    def run() -> None:
        try:
            build(collection_id, using)
        except Exception:
            log.exception("keyword top-k index of collection %s not built", collection_id)
        finally:
            close_old_connections()
            connections[using].close()
            with _lock:
                _building.discard(collection_id)

    threading.Thread(target=run, name=f"topk-{collection_id}", daemon=True).start()


def forget(collection_id: int | None = None) -> None:
    """Drop a collection's index (a deleted collection's), or every index of
    this process."""
    with _lock:
        if collection_id is None:
            _indexes.clear()
            _seen.clear()
        else:
            _indexes.pop(collection_id, None)
            _seen.pop(collection_id, None)


def wait_for_builds(timeout: float = 300.0) -> None:
    """Until no build is running (benchmarks and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _lock:
            if not _building:
                return
        time.sleep(0.05)
    raise TimeoutError("keyword top-k index builds still running")


# The generation table and its triggers (SQLite), part of rag.lexical.INDEX.
SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rag_chunk_generation ("
    "collection_id INTEGER PRIMARY KEY, generation INTEGER NOT NULL, chunks INTEGER NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS rag_chunk_generation_insert AFTER INSERT ON rag_chunk BEGIN "
    "INSERT INTO rag_chunk_generation(collection_id, generation, chunks) "
    "VALUES (new.collection_id, 1, 1) ON CONFLICT(collection_id) "
    "DO UPDATE SET generation = generation + 1, chunks = chunks + 1; END",
    "CREATE TRIGGER IF NOT EXISTS rag_chunk_generation_delete AFTER DELETE ON rag_chunk BEGIN "
    "UPDATE rag_chunk_generation SET generation = generation + 1, chunks = chunks - 1 "
    "WHERE collection_id = old.collection_id; END",
    "CREATE TRIGGER IF NOT EXISTS rag_chunk_generation_update AFTER UPDATE ON rag_chunk BEGIN "
    "UPDATE rag_chunk_generation SET generation = generation + 1, chunks = chunks - 1 "
    "WHERE collection_id = old.collection_id; "
    "INSERT INTO rag_chunk_generation(collection_id, generation, chunks) "
    "VALUES (new.collection_id, 1, 1) ON CONFLICT(collection_id) "
    "DO UPDATE SET generation = generation + 1, chunks = chunks + 1; END",
)
# When triggers were missing (a new table, or rag_chunk rebuilt by a
# migration): every count again, and every generation moves on.
SQLITE_RECOUNT = (
    "UPDATE rag_chunk_generation SET generation = generation + 1, chunks = 0",
    "INSERT INTO rag_chunk_generation(collection_id, generation, chunks) "
    "SELECT collection_id, 1, count(*) FROM rag_chunk WHERE true GROUP BY collection_id "
    "ON CONFLICT(collection_id) DO UPDATE SET chunks = excluded.chunks",
)
