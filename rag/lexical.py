"""The keyword index: the database's own full-text search over `rag_chunk`.

- **Embedded default (SQLite)**: an FTS5 table `rag_chunk_fts` (columns `coll`,
  `context`, `text`; rowid = the chunk row's id) with the Porter stemmer,
  ranked by FTS5's Okapi BM25. Triggers on `rag_chunk` keep it in step, inside
  the same transaction as the row change (a cascade from a deleted document or
  collection included).
- **Scale-out (PostgreSQL)**: a stored generated `tsvector` column on
  `rag_chunk` (English snowball stemming; the context weighted A, the text B)
  with a GIN index, ranked by `ts_rank_cd` (cover density; PostgreSQL has no
  BM25). Every web process and worker shares it through the database, so a
  Chroma server plus PostgreSQL scale out with no per-process index.

Access control is the same as for vectors: the caller passes the collections
it already chose in SQL, and each query is restricted to one of them (the
collection is a column of the FTS5 table, so FTS5 intersects posting lists
instead of scoring other collections' chunks).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass

from django.db import connection as default_connection

from core.textindex import TextIndex
from rag import topk

FTS_TABLE = "rag_chunk_fts"
# Shared with chat.search (message and title search), so both indexes read
# words the same way: FTS5's tokenizer, and PostgreSQL's input with
# punctuation turned into spaces first (see INDEX.postgres_schema).
FTS5_TOKENIZE = "porter unicode61 remove_diacritics 2"
PG_CONFIG = "english"


def pg_words(column: str) -> str:
    """SQL for a text column as PostgreSQL should index it: punctuation becomes
    spaces first, as in query_terms(); PostgreSQL's parser would otherwise read
    "guide-v2.md" as one host name, "3.11" as one number."""
    return f"regexp_replace(coalesce({column}, ''), '[^[:alnum:]_]+', ' ', 'g')"


def fts5_quoted(term: str, *, prefix: bool = False) -> str:
    """One query word for an FTS5 MATCH: quoted, so FTS5 never reads AND/OR/NEAR
    or punctuation from the user's text as syntax (query_terms' \\w+ words hold
    no double quote); `prefix` also matches longer words ("pyth" -> "python")."""
    return f'"{term}"' + ("*" if prefix else "")


# BM25 column weights (coll, context, text): the title and section path count
# as much as the text; the collection column only filters.

# Small English stop list: FTS5 has none, and "the"/"what" would make every
# chunk a match (slow and meaningless). PostgreSQL's english config drops its own.
_STOP_LIST = """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers him his how i if in into
    is it its itself just me more most my no nor not of off on once only or other our
    ours out over own same she should so some such than that the their theirs them then
    there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours"""
STOPWORDS = frozenset(_STOP_LIST.split())
_TOKEN = re.compile(r"\w+")
# Dotted or underscored identifiers and version numbers: "3.11", "socket.settimeout",
# "os.path.join", "max_workers". Kept as a phrase so adjacency counts.
_COMPOUND = re.compile(r"\w+(?:[._:-]\w+)+")
MAX_TERMS = 32
# Terms in more than this share of all chunks are left out of the FTS5 query
# (the rarest two are always kept): their BM25 weight is small, and their long
# posting lists made a query at 100k chunks ~100 ms. The re-ranking stage
# still counts them. Document frequencies are cached per process for a while.
COMMON_SHARE = 0.05
KEEP_RAREST = 2
_DF_TTL = 300.0
_df_cache: dict[str, tuple[float, int]] = {}
_df_lock = threading.Lock()


@dataclass(frozen=True)
class KeywordHit:
    chunk_pk: int
    chroma_id: str
    document_id: int
    collection_id: int
    page: int | None
    section: str
    text: str
    score: float  # higher is better (BM25, or ts_rank_cd on PostgreSQL)


def query_terms(query: str) -> tuple[list[str], list[list[str]]]:
    """(terms, phrases): lower-cased words minus stop words, and the compound
    identifiers of the query split into their parts (matched as phrases)."""
    terms: list[str] = []
    for word in _TOKEN.findall(query.lower()):
        if word not in STOPWORDS and word not in terms:
            terms.append(word)
    phrases = []
    for compound in _COMPOUND.findall(query.lower()):
        parts = _TOKEN.findall(compound)
        if len(parts) > 1 and parts not in phrases:
            phrases.append(parts)
    return terms[:MAX_TERMS], phrases[:8]


def _cached(key: str, compute) -> int:
    now = time.monotonic()
    with _df_lock:
        hit = _df_cache.get(key)
    if hit and now - hit[0] < _DF_TTL:
        return hit[1]
    value = int(compute())
    with _df_lock:
        if len(_df_cache) > 50_000:
            _df_cache.clear()
        _df_cache[key] = (now, value)
    return value


def _selective(cursor, terms: list[str], phrases: list[list[str]]):
    """Drop the single terms that many chunks contain (phrases stay)."""

    def count(expression: str) -> int:
        cursor.execute(
            "SELECT count(*) FROM rag_chunk_fts WHERE rag_chunk_fts MATCH %s", [expression]
        )
        return cursor.fetchone()[0]

    total = _cached(
        " total",
        lambda: (cursor.execute("SELECT count(*) FROM rag_chunk"), cursor.fetchone()[0])[1],
    )
    if total < 2000:
        return terms, phrases
    df = {t: _cached(t, lambda t=t: count(f'"{t}"')) for t in terms}
    ranked = sorted(terms, key=lambda t: df[t])
    keep = set(ranked[:KEEP_RAREST]) | {t for t in terms if df[t] <= COMMON_SHARE * total}
    # Identifiers and version numbers ("3.12") stay as phrases even when their
    # parts are common: their adjacency is what tells near-duplicates apart.
    return [t for t in terms if t in keep], phrases


def _fts5_match(collection_id: int, terms: list[str], phrases: list[list[str]]) -> str:
    clauses = [fts5_quoted(t) for t in terms] + [fts5_quoted(" ".join(p)) for p in phrases]
    return f'coll : "c{int(collection_id)}" AND ({" OR ".join(clauses)})'


def _fts5_best(cursor, collection_id: int, terms, phrases, limit: int) -> dict[int, float]:
    """{chunk pk: BM25 score} of the best `limit` chunks, by FTS5."""
    terms, phrases = _selective(cursor, terms, phrases)
    # The best ids first, then their rows: joining before the LIMIT would
    # read the text of every match (1.4-1.7x slower at 100k).
    cursor.execute(
        "SELECT rowid, -bm25(rag_chunk_fts, 0.0, 1.0, 1.0) FROM rag_chunk_fts "
        "WHERE rag_chunk_fts MATCH %s ORDER BY bm25(rag_chunk_fts, 0.0, 1.0, 1.0) LIMIT %s",
        [_fts5_match(collection_id, terms, phrases), int(limit)],
    )
    return dict(cursor.fetchall())


def search(collection_id: int, query: str, limit: int, *, using=None) -> list[KeywordHit]:
    """The best `limit` chunks of one (already access-checked) collection."""
    terms, phrases = query_terms(query)
    if not terms or limit <= 0:
        return []
    conn = using or default_connection
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(
                "SELECT c.id, c.chroma_id, c.document_id, c.collection_id, c.page, c.section, "
                "c.text, ts_rank_cd(c.search, q, 1) AS score "
                "FROM rag_chunk c, to_tsquery('english', %s) q "
                "WHERE c.collection_id = %s AND c.search @@ q ORDER BY score DESC LIMIT %s",
                [" | ".join(terms), int(collection_id), int(limit)],
            )
        else:
            # A large collection's top-k index in memory when it is current
            # (rag.topk), else FTS5.
            scores = topk.search(cursor, collection_id, query, limit)
            if scores is None:
                scores = _fts5_best(cursor, collection_id, terms, phrases, limit)
            if not scores:
                return []
            cursor.execute(
                "SELECT id, chroma_id, document_id, collection_id, page, section, text "
                "FROM rag_chunk WHERE id IN (SELECT value FROM json_each(%s))",
                [json.dumps(list(scores))],
            )
            found = {row[0]: row for row in cursor.fetchall()}
            # A chunk deleted between the two reads is simply left out.
            return [_hit(found[pk], score) for pk, score in scores.items() if pk in found]
        rows = cursor.fetchall()
    return [_hit(row[:7], row[7]) for row in rows]


def _hit(row, score: float) -> KeywordHit:
    pk, chroma_id, document_id, collection_id, page, section, text = row
    return KeywordHit(
        chunk_pk=pk,
        chroma_id=chroma_id,
        document_id=document_id,
        collection_id=collection_id,
        page=page,
        section=section or "",
        text=text,
        score=float(score),
    )


# --- schema -------------------------------------------------------------------------

INDEX = TextIndex(
    label="keyword index",
    # rag_chunk_generation: what rag.topk checks its indexes against.
    sqlite_tables=(FTS_TABLE, topk.GENERATION_TABLE),
    sqlite_schema=(
        "CREATE VIRTUAL TABLE IF NOT EXISTS rag_chunk_fts USING fts5("
        f"coll, context, text, tokenize = '{FTS5_TOKENIZE}')",
        "CREATE TRIGGER IF NOT EXISTS rag_chunk_fts_insert AFTER INSERT ON rag_chunk BEGIN "
        "INSERT INTO rag_chunk_fts(rowid, coll, context, text) "
        "VALUES (new.id, 'c' || new.collection_id, new.context, new.text); END",
        "CREATE TRIGGER IF NOT EXISTS rag_chunk_fts_delete AFTER DELETE ON rag_chunk BEGIN "
        "DELETE FROM rag_chunk_fts WHERE rowid = old.id; END",
        "CREATE TRIGGER IF NOT EXISTS rag_chunk_fts_update AFTER UPDATE ON rag_chunk BEGIN "
        "DELETE FROM rag_chunk_fts WHERE rowid = old.id; "
        "INSERT INTO rag_chunk_fts(rowid, coll, context, text) "
        "VALUES (new.id, 'c' || new.collection_id, new.context, new.text); END",
        *topk.SQLITE_SCHEMA,
    ),
    sqlite_reindex=(
        "DELETE FROM rag_chunk_fts",
        "INSERT INTO rag_chunk_fts(rowid, coll, context, text) "
        "SELECT id, 'c' || collection_id, context, text FROM rag_chunk",
        *topk.SQLITE_RECOUNT,
    ),
    postgres_tables=("rag_chunk",),
    postgres_schema=(
        "ALTER TABLE rag_chunk ADD COLUMN IF NOT EXISTS search tsvector GENERATED ALWAYS AS ("
        f"setweight(to_tsvector('{PG_CONFIG}', {pg_words('context')}), 'A') || "
        f"setweight(to_tsvector('{PG_CONFIG}', {pg_words('text')}), 'B')) STORED",
        "CREATE INDEX IF NOT EXISTS rag_chunk_search_gin ON rag_chunk USING gin (search)",
    ),
)
install = INDEX.install
uninstall = INDEX.uninstall
