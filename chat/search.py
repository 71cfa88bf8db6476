"""Full-text search over what was said: message text and conversation titles.

The database's own engine, as rag.lexical does it for documents (and with its
words: `query_terms`, the FTS5 tokenizer, PostgreSQL's input and config):

- **Embedded default (SQLite)**: two FTS5 tables, `chat_message_fts` (rowid =
  the message's id) and `chat_title_fts` (rowid = the conversation's id), each
  with an `owner` column, `u<user id>`, that the query names, so FTS5 reads
  only the caller's postings before ranking; the message index has prefix
  indexes for the first letters typed. Triggers on
  `breezeweb_message` and `breezeweb_conversation` keep them in step in the
  same transaction as the row change: a message saved, streamed into, edited
  or deleted (a deleted conversation's messages included) is searchable, or
  not, at once. No trigger reads another Django table: SQLite checks a
  trigger's tables when a migration rebuilds one, so a trigger on messages
  that read conversations would break every later migration of that table;
  a message's owner is read from `chat_title_fts` instead.
  A migration that rebuilds either table ends with `install()` (as 0003
  does), and so does every `migrate` (post_migrate).
  Ranked by BM25; snippets by FTS5's `snippet()`.
- **Scale-out (PostgreSQL)**: stored generated `tsvector` columns on both
  tables with GIN indexes, ranked by `ts_rank_cd`; snippets by `ts_headline`.

Either way the query joins the conversation and checks its owner (and the
project, when one is asked) in SQL, before ranking: one user's search never
sees another's words, and a project's best matches are its own best, not
what is left of the user's best.

Words are matched stemmed, all of them (AND), the last one also as a prefix so
the sidebar finds "pyth" while the user is still typing "python".
"""

from __future__ import annotations

import json
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
# The caller's conversations (and one project's, when the third parameter is
# not NULL), a condition of every ranked query on both engines.
OWNED = "c.owner_id = %s AND (%s IS NULL OR c.project_id = %s)"
CANDIDATES = 500  # best-ranked messages read before grouping them by conversation
# FTS5 prefix indexes: the first letters typed ("p", "py", "pyt") read one
# prepared list instead of merging those of every word they start.
FTS5_PREFIXES = "1 2 3"


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


def search(
    user_id: int, query: str, *, project_id: int | None = None, limit: int = 50, using=None
) -> list[Hit] | None:
    """The user's conversations matching `query` (only those of one project
    with `project_id`), best first (at most `limit`). None when the query has
    no searchable word (only stop words or punctuation): the caller decides
    what that means."""
    terms = _terms(query)
    if not terms:
        return None
    conn = using or default_connection
    engine = _Postgres(terms) if conn.vendor == "postgresql" else _Sqlite(user_id, terms)
    # The owner and the project are conditions of the ranked queries themselves
    # (OWNED): the best `limit` of this user's (project's) chats, never a filter
    # applied to the best of a larger set.
    project = None if project_id is None else int(project_id)
    owned = [int(user_id), project, project]
    with conn.cursor() as cursor:
        messages = engine.messages(cursor, owned)
        titles = engine.titles(cursor, owned)
        best: dict[int, Hit] = {}
        for message_id, conversation_id, score in messages:
            if conversation_id not in best:  # rows come best first
                best[conversation_id] = Hit(conversation_id, score, message_id, "", ())
        for conversation_id, score, marked in titles:
            hit = best.get(conversation_id)
            if hit is None:
                text, ranges = split_marks(marked)
                best[conversation_id] = Hit(conversation_id, score, None, text, ranges)
            else:  # words in the title and the text: the title adds to the message's score
                best[conversation_id] = Hit(
                    conversation_id, hit.score + score, hit.message_id, "", ()
                )
        ranked = sorted(best.values(), key=lambda h: (-h.score, -h.conversation_id))[:limit]
        # Snippets (which re-read the text) only for the messages shown.
        snippets = engine.snippets(cursor, [h.message_id for h in ranked if h.message_id])
    return [
        Hit(h.conversation_id, h.score, h.message_id, *split_marks(snippets.get(h.message_id, "")))
        if h.message_id
        else h
        for h in ranked
    ]


class _Sqlite:
    """FTS5: the owner is a column of both indexes, so a query reads only the
    caller's postings (`owner : "u<id>" AND ...`) before BM25 ranks them."""

    def __init__(self, user_id: int, terms: list[str]):
        self.words = _fts5_words(terms)
        self.match = f'owner : "u{int(user_id)}" AND text : ({self.words})'

    def messages(self, cursor, owned: list) -> list[tuple[int, int, float]]:
        cursor.execute(
            "SELECT m.id, m.conversation_id, -bm25(chat_message_fts, 0.0, 0.0, 1.0) "
            "FROM chat_message_fts JOIN breezeweb_message m ON m.id = chat_message_fts.rowid "
            "JOIN breezeweb_conversation c ON c.id = m.conversation_id "
            "WHERE chat_message_fts MATCH %s AND " + OWNED + " "
            "ORDER BY bm25(chat_message_fts, 0.0, 0.0, 1.0), m.id DESC LIMIT %s",
            [self.match, *owned, CANDIDATES],
        )
        return cursor.fetchall()

    def titles(self, cursor, owned: list) -> list[tuple[int, float, str]]:
        cursor.execute(
            "SELECT c.id, -bm25(chat_title_fts, 0.0, 1.0), highlight(chat_title_fts, 1, %s, %s) "
            "FROM chat_title_fts JOIN breezeweb_conversation c ON c.id = chat_title_fts.rowid "
            "WHERE chat_title_fts MATCH %s AND " + OWNED + " LIMIT %s",
            [
                MARK_START,
                MARK_END,
                self.match.replace("text : (", "title : (", 1),
                *owned,
                CANDIDATES,
            ],
        )
        return cursor.fetchall()

    def snippets(self, cursor, message_ids: list[int]) -> dict[int, str]:
        if not message_ids:
            return {}
        cursor.execute(
            "SELECT rowid, snippet(chat_message_fts, 2, %s, %s, '…', %s) FROM chat_message_fts "
            "WHERE chat_message_fts MATCH %s AND +rowid IN (SELECT value FROM json_each(%s))",
            [MARK_START, MARK_END, SNIPPET_TOKENS, self.match, json.dumps(message_ids)],
        )
        return dict(cursor.fetchall())


class _Postgres:
    """Generated tsvector columns with GIN indexes, ranked by ts_rank_cd."""

    def __init__(self, terms: list[str]):
        self.tsquery = _pg_query(terms)

    def messages(self, cursor, owned: list) -> list[tuple[int, int, float]]:
        cursor.execute(
            "SELECT m.id, m.conversation_id, ts_rank_cd(m.search, q, 1) AS score "
            "FROM breezeweb_message m JOIN breezeweb_conversation c ON c.id = m.conversation_id, "
            "to_tsquery(%s::regconfig, %s) q "
            "WHERE m.search @@ q AND " + OWNED + " ORDER BY score DESC, m.id DESC LIMIT %s",
            [PG_CONFIG, self.tsquery, *owned, CANDIDATES],
        )
        return [(mid, cid, float(score)) for mid, cid, score in cursor.fetchall()]

    def titles(self, cursor, owned: list) -> list[tuple[int, float, str]]:
        cursor.execute(
            "SELECT c.id, ts_rank_cd(c.search, q, 1), ts_headline(%s::regconfig, c.title, q, %s) "
            "FROM breezeweb_conversation c, to_tsquery(%s::regconfig, %s) q "
            "WHERE c.search @@ q AND " + OWNED + " LIMIT %s",
            [PG_CONFIG, PG_HEADLINE, PG_CONFIG, self.tsquery, *owned, CANDIDATES],
        )
        return [(cid, float(score), marked) for cid, score, marked in cursor.fetchall()]

    def snippets(self, cursor, message_ids: list[int]) -> dict[int, str]:
        if not message_ids:
            return {}
        cursor.execute(
            "SELECT m.id, ts_headline(%s::regconfig, m.content, to_tsquery(%s::regconfig, %s), %s) "
            "FROM breezeweb_message m WHERE m.id = ANY(%s)",
            [PG_CONFIG, PG_CONFIG, self.tsquery, PG_HEADLINE, message_ids],
        )
        return dict(cursor.fetchall())


# --- schema -------------------------------------------------------------------------


INDEX = TextIndex(
    label="conversation search",
    sqlite_tables=("chat_message_fts", "chat_title_fts"),
    sqlite_schema=(
        "CREATE VIRTUAL TABLE IF NOT EXISTS chat_title_fts USING fts5("
        f"owner, title, tokenize = '{FTS5_TOKENIZE}')",
        "CREATE VIRTUAL TABLE IF NOT EXISTS chat_message_fts USING fts5("
        f"owner, conv UNINDEXED, text, tokenize = '{FTS5_TOKENIZE}', prefix = '{FTS5_PREFIXES}')",
        # A message's owner is read from the title index (whose rowid is the
        # conversation's id), never from breezeweb_conversation (see above).
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_insert AFTER INSERT ON breezeweb_message "
        "BEGIN INSERT INTO chat_message_fts(rowid, owner, conv, text) VALUES (new.id, "
        "(SELECT owner FROM chat_title_fts WHERE rowid = new.conversation_id), "
        "new.conversation_id, new.content); END",
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_delete AFTER DELETE ON breezeweb_message "
        "BEGIN DELETE FROM chat_message_fts WHERE rowid = old.id; END",
        # Only when the text changes (a streaming answer is saved every ~0.5 s; its
        # status, timings and the like change too, and need no re-indexing).
        "CREATE TRIGGER IF NOT EXISTS chat_message_fts_update "
        "AFTER UPDATE OF content ON breezeweb_message BEGIN "
        "DELETE FROM chat_message_fts WHERE rowid = old.id; "
        "INSERT INTO chat_message_fts(rowid, owner, conv, text) VALUES (new.id, "
        "(SELECT owner FROM chat_title_fts WHERE rowid = new.conversation_id), "
        "new.conversation_id, new.content); END",
        "CREATE TRIGGER IF NOT EXISTS chat_title_fts_insert AFTER INSERT ON breezeweb_conversation "
        "BEGIN INSERT INTO chat_title_fts(rowid, owner, title) "
        "VALUES (new.id, 'u' || new.owner_id, new.title); END",
        "CREATE TRIGGER IF NOT EXISTS chat_title_fts_delete AFTER DELETE ON breezeweb_conversation "
        "BEGIN DELETE FROM chat_title_fts WHERE rowid = old.id; END",
        # A new owner (never done by the app) also moves the messages' owner; the
        # condition is constant, so a rename does not scan the message index.
        "CREATE TRIGGER IF NOT EXISTS chat_title_fts_update "
        "AFTER UPDATE OF title, owner_id ON breezeweb_conversation BEGIN "
        "DELETE FROM chat_title_fts WHERE rowid = old.id; "
        "INSERT INTO chat_title_fts(rowid, owner, title) "
        "VALUES (new.id, 'u' || new.owner_id, new.title); "
        "UPDATE chat_message_fts SET owner = 'u' || new.owner_id "
        "WHERE old.owner_id IS NOT new.owner_id AND conv = new.id; END",
    ),
    sqlite_reindex=(
        "DELETE FROM chat_title_fts",
        "INSERT INTO chat_title_fts(rowid, owner, title) "
        "SELECT id, 'u' || owner_id, title FROM breezeweb_conversation",
        "DELETE FROM chat_message_fts",
        "INSERT INTO chat_message_fts(rowid, owner, conv, text) "
        "SELECT m.id, 'u' || c.owner_id, m.conversation_id, m.content FROM breezeweb_message m "
        "JOIN breezeweb_conversation c ON c.id = m.conversation_id",
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
