"""Full-text search over what was said: message text and conversation titles.

The database's own engine, as rag.lexical does it for documents (and with its
words: `query_terms`, the FTS5 tokenizer, PostgreSQL's input and config):

- **Embedded default (SQLite)**: two FTS5 tables, `chat_message_fts` (rowid =
  the message's id) and `chat_title_fts` (rowid = the conversation's id, with
  an `owner` column, `u<user id>`, that the query names). Triggers on
  `breezeweb_message` and `breezeweb_conversation` keep them in step in the
  same transaction as the row change: a message saved, streamed into, edited
  or deleted (a deleted conversation's messages included) is searchable, or
  not, at once. Each trigger reads only its own table: SQLite checks a
  trigger's tables when a migration rebuilds one, so a trigger on messages
  that read conversations would break every later migration of that table.
  A migration that rebuilds either table ends with `install()` (as 0003
  does), and so does every `migrate` (post_migrate).
  Ranked by BM25; snippets by FTS5's `snippet()`.
- **Scale-out (PostgreSQL)**: stored generated `tsvector` columns on both
  tables with GIN indexes, ranked by `ts_rank_cd`; snippets by `ts_headline`.

Either way the query joins the conversation and checks its owner in SQL: one
user's search never sees another's words.

Words are matched stemmed, all of them (AND), the last one also as a prefix so
the sidebar finds "pyth" while the user is still typing "python".
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection as default_connection

from core.textindex import TextIndex
from rag.lexical import FTS5_TOKENIZE, PG_CONFIG, fts5_quoted, pg_words, query_terms

# Markers around the matched words in a snippet (Unicode private use: they
# never reach the client; `highlights` carries the offsets instead).
MARK_START, MARK_END = "\ue000", "\ue001"
SNIPPET_TOKENS = 16  # words around the match in a SQLite snippet
PG_HEADLINE = (
    f"StartSel={MARK_START}, StopSel={MARK_END}, MaxWords=24, MinWords=10, "
    "MaxFragments=1, FragmentDelimiter=' … '"
)
CANDIDATES = 500  # best-ranked messages read before grouping them by conversation


@dataclass(frozen=True)
class Hit:
    """A conversation that matches: its score (higher is better), and the best
    matching message (None when only the title matched) with a snippet of it."""

    conversation_id: int
    score: float
    message_id: int | None
    snippet: str
    highlights: tuple[tuple[int, int], ...]


def split_marks(marked: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """A snippet with MARK_START/MARK_END around matches -> (plain text,
    [(start, end) character offsets of each match]). A client shows the text
    as text and wraps the ranges itself: nothing here is ever HTML."""
    text: list[str] = []
    ranges: list[tuple[int, int]] = []
    start = None
    size = 0
    for char in marked:
        if char == MARK_START:
            start = size
        elif char == MARK_END:
            if start is not None and size > start:
                ranges.append((start, size))
            start = None
        else:
            text.append(char)
            size += 1
    return "".join(text), tuple(ranges)


def _terms(query: str) -> list[str]:
    terms, _ = query_terms(query)
    return terms


def _fts5_words(terms: list[str]) -> str:
    return " AND ".join(fts5_quoted(t, prefix=i == len(terms) - 1) for i, t in enumerate(terms))


def _pg_query(terms: list[str]) -> str:
    # \w+ words only: no tsquery syntax can come from the user's text.
    return " & ".join(f"'{t}'" + (":*" if i == len(terms) - 1 else "") for i, t in enumerate(terms))


def search(user_id: int, query: str, *, limit: int = 50, using=None) -> list[Hit] | None:
    """The user's conversations matching `query`, best first (at most `limit`).
    None when the query has no searchable word (only stop words or
    punctuation): the caller decides what that means."""
    terms = _terms(query)
    if not terms:
        return None
    conn = using or default_connection
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            messages, titles = _postgres(cursor, user_id, terms)
        else:
            messages, titles = _sqlite(cursor, user_id, terms)
    best: dict[int, Hit] = {}
    for message_id, conversation_id, score, marked in messages:
        if conversation_id not in best:  # rows come best first
            text, ranges = split_marks(marked)
            best[conversation_id] = Hit(conversation_id, score, message_id, text, ranges)
    for conversation_id, score, marked in titles:
        hit = best.get(conversation_id)
        if hit is None:
            text, ranges = split_marks(marked)
            best[conversation_id] = Hit(conversation_id, score, None, text, ranges)
        else:  # words in the title and the text: the title adds to the message's score
            best[conversation_id] = Hit(
                conversation_id, hit.score + score, hit.message_id, hit.snippet, hit.highlights
            )
    ranked = sorted(best.values(), key=lambda h: (-h.score, -h.conversation_id))
    return ranked[:limit]


def _sqlite(cursor, user_id: int, terms: list[str]):
    words = _fts5_words(terms)
    cursor.execute(
        "SELECT m.id, m.conversation_id, -bm25(chat_message_fts, 0.0, 1.0), "
        "snippet(chat_message_fts, 1, %s, %s, '…', %s) "
        "FROM chat_message_fts JOIN breezeweb_message m ON m.id = chat_message_fts.rowid "
        "JOIN breezeweb_conversation c ON c.id = m.conversation_id "
        "WHERE chat_message_fts MATCH %s AND c.owner_id = %s "
        "ORDER BY bm25(chat_message_fts, 0.0, 1.0), m.id DESC LIMIT %s",
        [MARK_START, MARK_END, SNIPPET_TOKENS, words, int(user_id), CANDIDATES],
    )
    messages = cursor.fetchall()
    cursor.execute(
        "SELECT c.id, -bm25(chat_title_fts, 0.0, 1.0), highlight(chat_title_fts, 1, %s, %s) "
        "FROM chat_title_fts JOIN breezeweb_conversation c ON c.id = chat_title_fts.rowid "
        "WHERE chat_title_fts MATCH %s AND c.owner_id = %s LIMIT %s",
        [
            MARK_START,
            MARK_END,
            f'owner : "u{int(user_id)}" AND title : ({words})',
            int(user_id),
            CANDIDATES,
        ],
    )
    return messages, cursor.fetchall()


def _postgres(cursor, user_id: int, terms: list[str]):
    tsquery = _pg_query(terms)
    # Ranked first on the index alone; headlines (which re-read the text) only
    # for the best message of each conversation.
    cursor.execute(
        "SELECT DISTINCT ON (conversation_id) id, conversation_id, score FROM ("
        "SELECT m.id, m.conversation_id, ts_rank_cd(m.search, q, 1) AS score "
        "FROM breezeweb_message m JOIN breezeweb_conversation c ON c.id = m.conversation_id, "
        "to_tsquery(%s::regconfig, %s) q "
        "WHERE c.owner_id = %s AND m.search @@ q ORDER BY score DESC, m.id DESC LIMIT %s"
        ") best ORDER BY conversation_id, score DESC, id DESC",
        [PG_CONFIG, tsquery, int(user_id), CANDIDATES],
    )
    best = cursor.fetchall()
    messages = []
    if best:
        cursor.execute(
            "SELECT m.id, ts_headline(%s::regconfig, m.content, to_tsquery(%s::regconfig, %s), %s) "
            "FROM breezeweb_message m WHERE m.id = ANY(%s)",
            [PG_CONFIG, PG_CONFIG, tsquery, PG_HEADLINE, [row[0] for row in best]],
        )
        headlines = dict(cursor.fetchall())
        messages = sorted(
            ((mid, cid, float(score), headlines.get(mid, "")) for mid, cid, score in best),
            key=lambda row: (-row[2], -row[0]),
        )
    cursor.execute(
        "SELECT c.id, ts_rank_cd(c.search, q, 1), ts_headline(%s::regconfig, c.title, q, %s) "
        "FROM breezeweb_conversation c, to_tsquery(%s::regconfig, %s) q "
        "WHERE c.owner_id = %s AND c.search @@ q LIMIT %s",
        [PG_CONFIG, PG_HEADLINE, PG_CONFIG, tsquery, int(user_id), CANDIDATES],
    )
    titles = [(cid, float(score), marked) for cid, score, marked in cursor.fetchall()]
    return messages, titles


# --- schema -------------------------------------------------------------------------

INDEX = TextIndex(
    label="conversation search",
    sqlite_tables=("chat_message_fts", "chat_title_fts"),
    sqlite_schema=(
        "CREATE VIRTUAL TABLE IF NOT EXISTS chat_message_fts USING fts5("
        f"conv UNINDEXED, text, tokenize = '{FTS5_TOKENIZE}')",
        "CREATE VIRTUAL TABLE IF NOT EXISTS chat_title_fts USING fts5("
        f"owner, title, tokenize = '{FTS5_TOKENIZE}')",
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_insert AFTER INSERT ON breezeweb_message "
        "BEGIN INSERT INTO chat_message_fts(rowid, conv, text) "
        "VALUES (new.id, new.conversation_id, new.content); END",
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_delete AFTER DELETE ON breezeweb_message "
        "BEGIN DELETE FROM chat_message_fts WHERE rowid = old.id; END",
        # Only when the text changes (a streaming answer is saved every ~0.5 s; its
        # status, timings and the like change too, and need no re-indexing).
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_update "
        "AFTER UPDATE OF content ON breezeweb_message BEGIN "
        "DELETE FROM chat_message_fts WHERE rowid = old.id; "
        "INSERT INTO chat_message_fts(rowid, conv, text) "
        "VALUES (new.id, new.conversation_id, new.content); END",
        "CREATE TRIGGER IF NOT EXISTS chat_title_fts_insert AFTER INSERT ON breezeweb_conversation "
        "BEGIN INSERT INTO chat_title_fts(rowid, owner, title) "
        "VALUES (new.id, 'u' || new.owner_id, new.title); END",
        "CREATE TRIGGER IF NOT EXISTS chat_title_fts_delete AFTER DELETE ON breezeweb_conversation "
        "BEGIN DELETE FROM chat_title_fts WHERE rowid = old.id; END",
        "CREATE TRIGGER IF NOT EXISTS chat_title_fts_update "
        "AFTER UPDATE OF title, owner_id ON breezeweb_conversation BEGIN "
        "DELETE FROM chat_title_fts WHERE rowid = old.id; "
        "INSERT INTO chat_title_fts(rowid, owner, title) "
        "VALUES (new.id, 'u' || new.owner_id, new.title); END",
    ),
    sqlite_reindex=(
        "DELETE FROM chat_message_fts",
        "INSERT INTO chat_message_fts(rowid, conv, text) "
        "SELECT id, conversation_id, content FROM breezeweb_message",
        "DELETE FROM chat_title_fts",
        "INSERT INTO chat_title_fts(rowid, owner, title) "
        "SELECT id, 'u' || owner_id, title FROM breezeweb_conversation",
    ),
    postgres_tables=("breezeweb_message", "breezeweb_conversation"),
    postgres_schema=(
        "ALTER TABLE breezeweb_message ADD COLUMN IF NOT EXISTS search tsvector "
        f"GENERATED ALWAYS AS (to_tsvector('{PG_CONFIG}', {pg_words('content')})) STORED",
        "CREATE INDEX IF NOT EXISTS breezeweb_message_search_gin "
        "ON breezeweb_message USING gin (search)",
        "ALTER TABLE breezeweb_conversation ADD COLUMN IF NOT EXISTS search tsvector "
        f"GENERATED ALWAYS AS (to_tsvector('{PG_CONFIG}', {pg_words('title')})) STORED",
        "CREATE INDEX IF NOT EXISTS breezeweb_conversation_search_gin "
        "ON breezeweb_conversation USING gin (search)",
    ),
)
install = INDEX.install
uninstall = INDEX.uninstall
