"""Keyword search at N chunks, three ways interleaved in one run on the same
rows: the top-k index in memory (rag.topk, what `rag.lexical.search` uses for
a large collection on SQLite once built), FTS5 with the best ids first and
then only their rows (what it uses otherwise), and the FTS5 query before that
(the chunk rows joined before ORDER BY ... LIMIT, reading every match's text).

    .venv/bin/python bench/keyword_search.py [--chunks 100000] [--rounds 3]

The corpus: the Python language reference as the installed Python carries it
(`pydoc_data/topics.py`), cut into 120-word chunks; beyond its own chunks, its
chunks with their words shuffled (realistic posting lists). Half the chunks
are in the searched collection. Questions: those of bench/evalsets' retrieval
set. Both queries use `rag.lexical`'s own term selection and match expression.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from pathlib import Path

from _common import evaluation_set, percentile, setup_django

BEFORE = (
    "SELECT c.id, c.chroma_id, c.document_id, c.collection_id, c.page, c.section, "
    "c.text, -bm25(rag_chunk_fts, 0.0, 1.0, 1.0) AS score FROM rag_chunk_fts "
    "JOIN rag_chunk c ON c.id = rag_chunk_fts.rowid "
    "WHERE rag_chunk_fts MATCH %s ORDER BY bm25(rag_chunk_fts, 0.0, 1.0, 1.0) LIMIT %s"
)


def corpus(count: int) -> list[str]:
    import pydoc_data.topics

    words = re.findall(r"\w+", " ".join(pydoc_data.topics.topics.values()))
    chunks = [" ".join(words[i : i + 120]) for i in range(0, len(words), 120)]
    rng = random.Random(1)
    out = []
    for i in range(count):
        chunk = chunks[i % len(chunks)].split()
        if i >= len(chunks):
            rng.shuffle(chunk)
        out.append(" ".join(chunk))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setup_django("keyword-search")

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from rag import lexical, topk
    from rag.models import Chunk, Collection, Document

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create_user("bench")
    mine, other = (Collection.objects.create(name=n, owner=owner) for n in ("mine", "other"))
    documents = {
        c.pk: Document.objects.create(
            collection=c, owner=owner, title=f"{c.name}.md", sha256=c.name, size=1
        )
        for c in (mine, other)
    }
    started = time.perf_counter()
    texts = corpus(args.chunks)
    rows = []
    for i, text in enumerate(texts):
        collection = mine if i % 2 == 0 else other
        rows.append(
            Chunk(
                document=documents[collection.pk],
                collection=collection,
                generation="g",
                chunk_index=i,
                chroma_id=f"c{i}",
                context=f"{collection.name}.md section {i % 7}",
                text=text,
            )
        )
    Chunk.objects.bulk_create(rows, batch_size=5000)
    print(f"{args.chunks:,} chunks indexed in {time.perf_counter() - started:.0f} s")

    questions = [q["question"] for q in evaluation_set("rag_eval_questions")["question"]]

    def before(question: str) -> None:
        terms, phrases = lexical.query_terms(question)
        with connection.cursor() as cursor:
            terms, phrases = lexical._selective(cursor, terms, phrases)
            if terms:
                cursor.execute(BEFORE, [lexical._fts5_match(mine.pk, terms, phrases), 10])
                cursor.fetchall()

    def fts5(question: str) -> None:
        settings.RAG_TOPK_MIN_CHUNKS = 0
        lexical.search(mine.pk, question, 10)

    def in_memory(question: str) -> None:
        settings.RAG_TOPK_MIN_CHUNKS = 1
        lexical.search(mine.pk, question, 10)

    topk.SETTLE_SECONDS = 0  # the rows are all in: build at the first query
    started = time.perf_counter()
    in_memory(questions[0])  # starts the build of the collection's index
    topk.wait_for_builds()
    built = time.perf_counter() - started
    print(f"top-k index of {args.chunks // 2:,} chunks built in {built:.1f} s")
    for question in questions:  # warm the document-frequency cache and the pages
        before(question)
        fts5(question)
        in_memory(question)
    answered = topk.answered
    paths = {"FTS5 before (join, then sort)": before, "FTS5 (ids, then rows)": fts5}
    paths["top-k index in memory"] = in_memory
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for question in questions:
            for name, fn in paths.items():
                t = time.perf_counter()
                fn(question)
                times[name].append((time.perf_counter() - t) * 1000)
    assert topk.answered - answered == args.rounds * len(questions), "the index was not used"
    print(f"{len(questions)} questions x {args.rounds} rounds, interleaved, top 10, one collection")
    print("| query | p50 | p95 |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} ms | {percentile(values, 95):.2f} ms |")
    b, f, m = (statistics.median(v) for v in times.values())
    print(f"p50 ratios: FTS5 before / FTS5 {b / f:.2f}x, FTS5 / top-k {f / m:.2f}x")
    b, f, m = (percentile(v, 95) for v in times.values())
    print(f"p95 ratios: FTS5 before / FTS5 {b / f:.2f}x, FTS5 / top-k {f / m:.2f}x")
    Path(connection.settings_dict["NAME"]).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
