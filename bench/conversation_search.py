"""Conversation search (chat.search, the sidebar's box) at many users'
messages on the embedded default (SQLite FTS5), two ways interleaved in one
run on the same rows: `chat.search.search` as it is, and the query before it
(baseline): one FTS5 table of every user's messages, matched across all users,
joined to the conversations to keep the caller's, every match's snippet made
before sorting.

    .venv/bin/python bench/conversation_search.py [--users 200] [--messages 120000] [--rounds 3]

The corpus: the Python language reference as the installed Python carries it
(`pydoc_data/topics.py`), cut into chat-sized messages (12-60 words), its
words shuffled beyond its own length (realistic posting lists), spread over
`--users` users with 20 conversations each. The queries are what one user
types into the box: a word growing letter by letter ("f", "fu", "fun", ...,
the last word is a prefix while typing), whole words, and two words, each
asked by a few users. The baseline reads its own copy of the old index (the
old FTS5 table, filled from the same rows), so both run in the same process on
the same database. A second table times the ranking query alone on the
message index with its prefix indexes and on a copy without them.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from pathlib import Path

from _common import percentile, setup_django

BEFORE_SCHEMA = (
    "CREATE VIRTUAL TABLE bench_before_fts USING fts5(conv UNINDEXED, text, "
    "tokenize = 'porter unicode61 remove_diacritics 2')",
    "INSERT INTO bench_before_fts(rowid, conv, text) "
    "SELECT id, conversation_id, content FROM breezeweb_message",
)
NO_PREFIX_SCHEMA = (
    "CREATE VIRTUAL TABLE bench_noprefix_fts USING fts5(owner, conv UNINDEXED, text, "
    "tokenize = 'porter unicode61 remove_diacritics 2')",
    "INSERT INTO bench_noprefix_fts(rowid, owner, conv, text) "
    "SELECT rowid, owner, conv, text FROM chat_message_fts",
)
# chat.search's ranking query, on a table named in place of chat_message_fts.
RANKING = (
    "SELECT m.id, m.conversation_id, -bm25({t}, 0.0, 0.0, 1.0) FROM {t} "
    "JOIN breezeweb_message m ON m.id = {t}.rowid "
    "JOIN breezeweb_conversation c ON c.id = m.conversation_id "
    "WHERE {t} MATCH %s AND c.owner_id = %s "
    "ORDER BY bm25({t}, 0.0, 0.0, 1.0), m.id DESC LIMIT %s"
)
BEFORE = (
    "SELECT m.id, m.conversation_id, -bm25(bench_before_fts, 0.0, 1.0), "
    "snippet(bench_before_fts, 1, %s, %s, '…', %s) "
    "FROM bench_before_fts JOIN breezeweb_message m ON m.id = bench_before_fts.rowid "
    "JOIN breezeweb_conversation c ON c.id = m.conversation_id "
    "WHERE bench_before_fts MATCH %s AND c.owner_id = %s "
    "ORDER BY bm25(bench_before_fts, 0.0, 1.0), m.id DESC LIMIT %s"
)
TYPED = ("function", "exception", "class", "return", "iterator", "string")
WORDS = ("python", "module", "attribute", "value", "object", "lambda")
PAIRS = ("function call", "class attribute", "raise exception", "list comprehension")


def corpus(count: int) -> list[str]:
    import pydoc_data.topics

    words = re.findall(r"\w+", " ".join(pydoc_data.topics.topics.values()))
    rng = random.Random(1)
    out, at = [], 0
    for i in range(count):
        size = rng.randint(12, 60)
        if at + size > len(words):
            at = 0
        chunk = words[at : at + size]
        at += size
        if i * 36 > len(words):
            chunk = rng.sample(words, size)
        out.append(" ".join(chunk))
    return out


def queries() -> list[str]:
    typed = [word[:n] for word in TYPED for n in range(1, len(word) + 1)]
    return typed + list(WORDS) + list(PAIRS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=120_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--askers", type=int, default=3, help="users asking each query")
    args = parser.parse_args()
    setup_django("conversation-search")

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from chat import search
    from chat.models import Conversation, Message

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    users = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"u{i}") for i in range(args.users)]
    )
    conversations = Conversation.objects.bulk_create(
        [Conversation(owner=u, title=f"Notes {i}") for u in users for i in range(20)]
    )
    texts = corpus(args.messages)
    rng = random.Random(2)
    Message.objects.bulk_create(
        [
            Message(
                conversation=rng.choice(conversations),
                role="user" if i % 2 == 0 else "assistant",
                content=text,
            )
            for i, text in enumerate(texts)
        ],
        batch_size=5000,
    )
    with connection.cursor() as cursor:
        for statement in BEFORE_SCHEMA + NO_PREFIX_SCHEMA:
            cursor.execute(statement)
    print(
        f"{args.messages:,} messages of {args.users} users ({len(conversations):,} conversations) "
        f"indexed twice in {time.perf_counter() - started:.0f} s"
    )

    def before(user_id: int, query: str) -> int:
        terms = search._terms(query)
        with connection.cursor() as cursor:
            cursor.execute(
                BEFORE,
                [
                    search.MARK_START,
                    search.MARK_END,
                    search.SNIPPET_TOKENS,
                    search._fts5_words(terms),
                    user_id,
                    search.CANDIDATES,
                ],
            )
            return len({row[1] for row in cursor.fetchall()})

    def now(user_id: int, query: str) -> int:
        return len(search.search(user_id, query) or [])

    asked = [q for q in queries() if search._terms(q)]  # "f": no searchable word yet
    askers = [u.pk for u in rng.sample(users, args.askers)]
    paths = {"before (all users' matches, then the owner)": before, "chat.search.search": now}
    for query in asked:  # warm the pages; both find the same conversations
        for user_id in askers:
            counts = {name: min(fn(user_id, query), 50) for name, fn in paths.items()}
            if len(set(counts.values())) != 1:
                raise SystemExit(f"different answers for {query!r}: {counts}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for query in asked:
            for user_id in askers:
                for name, fn in paths.items():
                    t = time.perf_counter()
                    fn(user_id, query)
                    times[name].append((time.perf_counter() - t) * 1000)
    print(
        f"{len(asked)} queries (typed letter by letter, words, pairs) x {len(askers)} users "
        f"x {args.rounds} rounds, interleaved"
    )
    print("| query | p50 | p95 | max |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values):.2f} ms | {percentile(values, 95):.2f} ms "
            f"| {max(values):.2f} ms |"
        )
    b, n = times.values()
    print(
        f"ratios before / now: p50 {statistics.median(b) / statistics.median(n):.2f}x, "
        f"p95 {percentile(b, 95) / percentile(n, 95):.2f}x, max {max(b) / max(n):.2f}x"
    )
    prefix_indexes(connection, search, asked, askers, args.rounds)
    Path(connection.settings_dict["NAME"]).unlink(missing_ok=True)


def prefix_indexes(connection, search, asked: list[str], askers: list[int], rounds: int) -> None:
    """The ranking query alone, with the message index's prefix indexes and on
    a copy without them, by what was typed: what the prefix indexes buy."""
    tables = {"with prefix indexes": "chat_message_fts", "without": "bench_noprefix_fts"}
    times: dict[tuple[str, bool], list[float]] = {}
    for round_ in range(rounds + 1):  # the first round warms the pages
        for query in asked:
            short = len(query) <= 3
            for user_id in askers:
                match = search._Sqlite(user_id, search._terms(query)).match
                for name, table in tables.items():
                    with connection.cursor() as cursor:
                        t = time.perf_counter()
                        cursor.execute(RANKING.format(t=table), [match, user_id, search.CANDIDATES])
                        cursor.fetchall()
                    if round_:
                        ms = (time.perf_counter() - t) * 1000
                        times.setdefault((name, short), []).append(ms)
    print("ranking query alone, message index with and without prefix indexes:")
    print("| typed | index | p50 | p95 |")
    print("|---|---|---|---|")
    for short in (True, False):
        for name in tables:
            values = times[(name, short)]
            print(
                f"| {'1-3 letters' if short else '4+ letters, words'} | {name} "
                f"| {statistics.median(values):.2f} ms | {percentile(values, 95):.2f} ms |"
            )
        with_, without = (times[(name, short)] for name in tables)
        print(
            f"ratios without / with ({'1-3 letters' if short else '4+ letters, words'}): "
            f"p50 {statistics.median(without) / statistics.median(with_):.2f}x, "
            f"p95 {percentile(without, 95) / percentile(with_, 95):.2f}x"
        )


if __name__ == "__main__":
    main()
