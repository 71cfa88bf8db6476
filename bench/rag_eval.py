"""Retrieval quality and speed: vector vs keyword vs hybrid vs hybrid+rerank,
int8 ONNX embeddings vs sentence-transformers, latency at 10k and 100k chunks.

    .venv/bin/python bench/rag_eval.py [--sizes 10000,100000] [--queries 200]
                                       [--skip-st] [--skip-latency]

Corpus: the Python language reference as each installed Python carries it
(`pydoc_data/topics.py` of the pyenv Pythons 3.8, 3.10, 3.12 and 3.13), one
markdown document per version (`python-3.12-reference.md`, a `##` section per
topic): four near-duplicate documents whose chunks mostly read alike.
Questions: bench/evalsets/rag_eval_questions.toml, written for this benchmark
(none of them is the issue's held-out set). Each names the passage that answers it (a string the
chunk must contain) and, when it asks about a version, the only document that
counts. Tags: `para` = paraphrased away from the text's words; `version` =
names a version among the near-duplicates; `ident` = hinges on an exact
identifier. "hard" = para or version or ident; "rest" = the others.

Reported, in one run (the same collection, the same process):
  recall@1, recall@5 (the answering passage in the top 1 / 5) and MRR@10 for
  vector, keyword, hybrid and hybrid+rerank; overall, hard and rest;
  embedding throughput, ONNX int8 vs sentence-transformers (interleaved
  rounds on the same chunk texts), and recall with either backend's vectors;
  search latency p50/p95 per mode at each size (query already embedded) and
  retrieve() end to end, with access control on (Alice's collections only).
Bulk chunks for the latency runs are real chunk texts of the corpus with
their words shuffled (realistic postings for the keyword index) and random
unit vectors (embedding 100k chunks would take most of an hour here).
Runs in a throw-away DATA_DIR (embedded Chroma, SQLite).
"""

from __future__ import annotations

import argparse
import itertools
import os
import runpy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from _common import evaluation_set, percentile, setup_django

# The prepared models (the ONNX embedding export) are read from the checkout;
# the embedding backend is the default one unless a run says otherwise.
setup_django("rag-eval", models=True, unset=("EMBEDDING_BACKEND",))

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

import numpy as np  # noqa: E402

VERSIONS = ("3.8", "3.10", "3.12", "3.13")


def title(version: str) -> str:
    return f"python-{version}-reference.md"


@dataclass(frozen=True)
class Q:
    question: str
    answer: str  # the answering chunk contains this (whitespace-normalised)
    version: str | None = None  # only this version's document counts
    tags: tuple[str, ...] = ()


QUESTIONS = [
    Q(row["question"], row["answer"], row.get("version"), tuple(row.get("tags", ())))
    for row in evaluation_set("rag_eval_questions")["question"]
]

MODE_RUNS = (
    ("vector", "vector", False),
    ("keyword", "keyword", False),
    ("hybrid", "hybrid", False),
    ("hybrid+rerank", "hybrid", True),
)


def norm(text: str) -> str:
    return " ".join(text.split())


def pyenv_topics(version: str) -> dict[str, str]:
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(root.glob(f"{version}.*"), reverse=True):
        path = candidate / "lib" / f"python{version}" / "pydoc_data" / "topics.py"
        if path.is_file():
            return runpy.run_path(str(path))["topics"]
    raise SystemExit(
        f"Python {version}'s pydoc_data/topics.py is not installed under {root}: "
        "this benchmark needs the pyenv Pythons 3.8, 3.10, 3.12 and 3.13"
    )


_UNDERLINE = {"*": "##", "=": "###", "-": "####"}


def as_markdown(version: str, topics: dict[str, str]) -> str:
    """One document: a `##` section per topic, its own headings kept."""
    out = [f"# Python {version} language reference", ""]
    for _key, text in sorted(topics.items()):
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            mark = nxt[:1]
            if (
                line.strip()
                and mark in _UNDERLINE
                and set(nxt.strip()) == {mark}
                and len(nxt.strip()) >= len(line.strip()) - 2
            ):
                out += ["", f"{_UNDERLINE[mark]} {line.strip()}", ""]
                i += 2
                continue
            if line.strip() and set(line.strip()) <= {"=", "*", "-"} and len(line.strip()) > 10:
                i += 1  # a rule between parts, not text
                continue
            out.append(line)
            i += 1
        out.append("")
    return "\n".join(out)


def relevant(q: Q, title_: str, text: str) -> bool:
    return (q.version is None or title_ == title(q.version)) and norm(q.answer) in norm(text)


def hard(q: Q) -> bool:
    return bool({"para", "version", "ident"} & set(q.tags))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--skip-st", action="store_true", help="no sentence-transformers run")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    call_command("migrate", verbosity=0)

    from rag import embeddings, store
    from rag.ingestion import ingest_document
    from rag.models import Chunk, Collection, Document
    from rag.retrieval import readable_collections, retrieve, search
    from rag.uploads import add_document, stage_chunks

    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    docs = {v: as_markdown(v, pyenv_topics(v)) for v in VERSIONS}
    n_para = sum("para" in q.tags for q in QUESTIONS)
    n_need = sum(bool({"version", "ident"} & set(q.tags)) for q in QUESTIONS)
    print(
        f"{len(QUESTIONS)} questions ({n_para} paraphrased, {n_need} needing a version or "
        f"identifier, {sum(hard(q) for q in QUESTIONS)} hard); {len(docs)} documents, "
        f"{sum(len(d) for d in docs.values()) / 1e6:.2f} M characters"
    )
    wrong = []
    for q in QUESTIONS:  # every answer exists where the question says
        where = [v for v, d in docs.items() if norm(q.answer) in norm(d)]
        if not where or (q.version is not None and q.version not in where):
            wrong.append((q.question, where))
    assert not wrong, wrong

    users = get_user_model().objects
    alice, bob = users.create_user("alice"), users.create_user("bob")
    admin = users.create_superuser("admin", "a@example.com", "x")

    def ingest_all(collection, owner) -> float:
        started = time.perf_counter()
        for version, text in docs.items():
            document = add_document(
                owner, collection, stage_chunks([text.encode()], title(version)), dispatch=False
            )
            result = ingest_document(document.pk)
            assert result.status == "ready", result
        return time.perf_counter() - started

    def evaluate(collections, user, embedder, label_prefix="") -> dict:
        vectors = embedder.embed([q.question for q in QUESTIONS])
        table = {}
        for label, mode, rerank in MODE_RUNS:
            ranks = []
            for q, vector in zip(QUESTIONS, vectors, strict=True):
                found = search(
                    collections, vector, k=10, query=q.question, mode=mode, rerank_override=rerank
                )
                rank = next(
                    (i + 1 for i, c in enumerate(found) if relevant(q, c.title, c.text)), None
                )
                ranks.append(rank)
            table[label_prefix + label] = ranks
        return table

    def summary(ranks: list[int | None], subset) -> tuple[float, float, float, int]:
        chosen = [r for r, q in zip(ranks, QUESTIONS, strict=True) if subset(q)]
        n = len(chosen)
        r1 = sum(1 for r in chosen if r == 1) / n
        r5 = sum(1 for r in chosen if r and r <= 5) / n
        mrr = sum(1 / r for r in chosen if r) / n
        return r1, r5, mrr, n

    def print_table(table: dict) -> None:
        subsets = [
            ("all", lambda q: True),
            ("hard", hard),
            ("rest", lambda q: not hard(q)),
        ]
        print("| mode | " + " | ".join(f"{s} R@1 | {s} R@5 | {s} MRR" for s, _ in subsets) + " |")
        print("|---|" + "---|" * (3 * len(subsets)))
        for label, ranks in table.items():
            cells = []
            for _, subset in subsets:
                r1, r5, mrr, n = summary(ranks, subset)
                cells += [f"{r1:.3f}", f"{r5:.3f} ({round(r5 * n)}/{n})", f"{mrr:.3f}"]
            print(f"| {label} | " + " | ".join(cells) + " |")

    # ---- quality with the default (ONNX) embeddings ------------------------------
    embedder = embeddings.get_embedder()
    print(f"\nembedding backend: {embedder.backend}")
    mine = Collection.personal_for(alice)
    seconds = ingest_all(mine, alice)
    n_chunks = Chunk.objects.filter(collection=mine).count()
    print(f"ingested {n_chunks} chunks in {seconds:.1f} s ({n_chunks / seconds:.1f} chunks/s)")
    unanswerable = []
    for q in QUESTIONS:
        rows = Chunk.objects.filter(collection=mine).values_list("document__title", "text")
        if not any(relevant(q, t, x) for t, x in rows):
            unanswerable.append(q.question)
    assert not unanswerable, f"no single chunk holds the answer: {unanswerable}"
    chosen = readable_collections(alice, [mine.pk])
    table = evaluate(chosen, alice, embedder)
    # The same questions with the keyword side answered by the top-k index in
    # memory (the default for collections of RAG_TOPK_MIN_CHUNKS and more).
    from django.conf import settings as django_settings

    from rag import topk

    default_min = django_settings.RAG_TOPK_MIN_CHUNKS
    django_settings.RAG_TOPK_MIN_CHUNKS = 1
    topk.build_inline = True
    answered = topk.answered
    for label, ranks in evaluate(chosen, alice, embedder).items():
        if label != "vector":
            table[f"{label} (top-k index)"] = ranks
    assert topk.answered > answered, "the top-k index did not answer"
    topk.build_inline = False
    django_settings.RAG_TOPK_MIN_CHUNKS = default_min
    print(f"\n### Retrieval quality ({embedder.backend} embeddings)\n")
    print_table(table)
    for label in ("vector", "hybrid+rerank"):
        missed = [
            q.question for q, r in zip(QUESTIONS, table[label], strict=True) if not r or r > 5
        ]
        print(f"\n{label} misses @5 ({len(missed)}):")
        for m in missed:
            print(f"  - {m}")

    # ---- ONNX vs sentence-transformers -------------------------------------------
    if not args.skip_st:
        from rag.embeddings import Embedder, model_path

        st_embedder = Embedder(model_path(), "sentence-transformers")
        texts = list(
            Chunk.objects.filter(collection=mine).order_by("pk").values_list("text", flat=True)
        )[:512]
        onnx_rates, st_rates = [], []
        for _ in range(3):  # interleaved rounds: the shared machine's load hits both
            t = time.perf_counter()
            embedder.embed(texts)
            onnx_rates.append(len(texts) / (time.perf_counter() - t))
            t = time.perf_counter()
            st_embedder.embed(texts)
            st_rates.append(len(texts) / (time.perf_counter() - t))
        q_onnx, q_st = [], []
        for q in QUESTIONS:
            t = time.perf_counter()
            embedder.embed([q.question])
            q_onnx.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            st_embedder.embed([q.question])
            q_st.append((time.perf_counter() - t) * 1000)
        a = embedder.embed(texts[:256])
        b = st_embedder.embed(texts[:256])
        cos = np.sum(a * b, axis=1)
        print(f"\n### Embeddings: ONNX int8 vs sentence-transformers ({len(texts)} chunks)\n")
        print("| backend | chunks/s (best of 3) | query p50 ms |")
        print("|---|---|---|")
        print(f"| sentence-transformers (torch fp32) | {max(st_rates):.1f} | "
              f"{statistics.median(q_st):.1f} |")  # fmt: skip
        print(f"| ONNX int8 | {max(onnx_rates):.1f} | {statistics.median(q_onnx):.1f} |")
        print(
            f"\nthroughput ratio ONNX / sentence-transformers: "
            f"**{max(onnx_rates) / max(st_rates):.2f}x** (rounds: "
            + ", ".join(f"{o / s:.2f}" for o, s in zip(onnx_rates, st_rates, strict=True))
            + f"); query latency ratio {statistics.median(q_st) / statistics.median(q_onnx):.2f}x"
        )
        print(f"vector agreement: cosine min {cos.min():.4f}, mean {cos.mean():.4f}")
        # The same corpus indexed with sentence-transformers vectors, same questions.
        st_coll = Collection.objects.create(name="st", owner=admin)
        embeddings._embedder, saved = st_embedder, embeddings._embedder
        try:
            st_seconds = ingest_all(st_coll, admin)
            st_table = evaluate([st_coll], admin, st_embedder)
        finally:
            embeddings._embedder = saved
        print(
            f"\ningestion end to end: ONNX {n_chunks / seconds:.1f} chunks/s, "
            f"sentence-transformers {n_chunks / st_seconds:.1f} chunks/s "
            f"(ratio {st_seconds / seconds:.2f}x)"
        )
        print("\n### Retrieval quality with sentence-transformers vectors\n")
        print_table({k: v for k, v in st_table.items() if k in ("vector", "hybrid+rerank")})
        for label in ("vector", "hybrid+rerank"):
            ours = summary(table[label], lambda q: True)
            theirs = summary(st_table[label], lambda q: True)
            print(
                f"{label} recall@5: ONNX {round(ours[1] * ours[3])} vs sentence-transformers "
                f"{round(theirs[1] * theirs[3])} of {ours[3]}"
            )
        Document.objects.filter(collection=st_coll).delete()
        st_coll.delete()

    if args.skip_latency:
        return
    # ---- latency at size, access control on --------------------------------------
    from django.conf import settings

    from rag import lexical, topk

    TOPK_DEFAULT = settings.RAG_TOPK_MIN_CHUNKS
    topk.SETTLE_SECONDS = 0  # each size's rows are all in before it is measured

    bobs = Collection.personal_for(bob)
    shared = Collection.objects.create(name="Shared", shared=True)
    layout = [(mine, alice, 0.5), (shared, admin, 0.4), (bobs, bob, 0.1)]
    pool = list(Chunk.objects.filter(collection=mine).values_list("text", flat=True))
    rng = np.random.default_rng(14)
    dim = embedder.dimension
    bulk_docs = {}
    for coll, owner, _ in layout:
        bulk_docs[coll.pk] = Document.objects.create(
            collection=coll, owner=owner, title=f"bulk-{coll.pk}.md", sha256=f"bulk{coll.pk}",
            status="ready", live_generation="bulk", index_version=embeddings.index_version(),
        )  # fmt: skip
    added = {coll.pk: 0 for coll, _, _ in layout}
    added[mine.pk] = n_chunks
    queries = [q.question for q in QUESTIONS]
    query_vectors = embedder.embed(queries)
    for size in sorted(int(s) for s in args.sizes.split(",")):
        started = time.perf_counter()
        for coll, _, share in layout:
            target = int(size * share)
            doc = bulk_docs[coll.pk]
            while added[coll.pk] < target:
                n = min(5000, target - added[coll.pk])
                first = added[coll.pk]
                vectors = rng.standard_normal((n, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                texts = []
                for i in range(n):
                    words = pool[(first + i) % len(pool)].split()
                    rng.shuffle(words)
                    texts.append(" ".join(words))
                ids = [f"{doc.pk}:bulk:{i}" for i in range(first, first + n)]
                store.add_chunks(
                    coll.chroma_name, ids, vectors, texts,
                    [{"document_id": doc.pk, "collection_id": coll.pk, "generation": "bulk",
                      "chunk_index": i} for i in range(first, first + n)],
                )  # fmt: skip
                Chunk.objects.bulk_create(
                    [
                        Chunk(document=doc, collection=coll, generation="bulk", chunk_index=i,
                              chroma_id=ids[i - first], context=doc.title, text=texts[i - first])
                        for i in range(first, first + n)
                    ],
                    batch_size=1000,
                )  # fmt: skip
                added[coll.pk] += n
        total = sum(store.collection(c.chroma_name).count() for c, _, _ in layout)
        print(
            f"\n### {total} chunks ({Chunk.objects.count()} keyword rows), built in "
            f"{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}\n"
        )
        # The keyword side two ways, same rows: FTS5 alone, and the top-k
        # index in memory that the default gives collections this large.
        for coll, _, _ in layout:
            settings.RAG_TOPK_MIN_CHUNKS = TOPK_DEFAULT
            lexical.search(coll.pk, "warm", 1)  # starts a build where the default wants one
        started = time.perf_counter()
        topk.wait_for_builds()
        print(f"top-k indexes built in {time.perf_counter() - started:.1f} s\n")
        print("| keyword index | mode | search p50 ms | search p95 ms | R@5 at this size |")
        print("|---|---|---|---|---|")
        for (label, mode, rerank), backend in itertools.product(MODE_RUNS, ("FTS5", "default")):
            if mode == "vector" and backend == "FTS5":
                continue
            settings.RAG_TOPK_MIN_CHUNKS = 0 if backend == "FTS5" else TOPK_DEFAULT
            chosen = readable_collections(alice, None)
            for v, q in zip(query_vectors[:10], queries[:10], strict=True):
                search(chosen, v, k=5, query=q, mode=mode, rerank_override=rerank)  # warm-up
            ms = []
            for i in range(args.queries):
                j = i % len(queries)
                t = time.perf_counter()
                chosen = readable_collections(alice, None)
                search(
                    chosen, query_vectors[j], k=5, query=queries[j], mode=mode,
                    rerank_override=rerank,
                )  # fmt: skip
                ms.append((time.perf_counter() - t) * 1000)
            hits = 0
            for q, v in zip(QUESTIONS, query_vectors, strict=True):
                found = search(
                    readable_collections(alice, None), v, k=5, query=q.question, mode=mode,
                    rerank_override=rerank,
                )  # fmt: skip
                hits += any(relevant(q, c.title, c.text) for c in found)
            print(
                f"| {backend} | {label} | {statistics.median(ms):.2f} | {percentile(ms, 95):.2f} | "
                f"{hits}/{len(QUESTIONS)} |"
            )
        settings.RAG_TOPK_MIN_CHUNKS = TOPK_DEFAULT
        ms = []
        for i in range(min(args.queries, 100)):
            t = time.perf_counter()
            retrieve(alice, queries[i % len(queries)], k=5)
            ms.append((time.perf_counter() - t) * 1000)
        print(
            f"\nretrieve() end to end (hybrid+rerank, query embedding included): "
            f"p50 {statistics.median(ms):.2f} ms, p95 {percentile(ms, 95):.2f} ms"
        )
        leaked = [s for q in queries[:20] for s in retrieve(bob, q, [mine.pk, shared.pk]).sources]
        assert all(s.collection_id == shared.pk for s in leaked), "access control broken"
        print("access control: Bob asking for Alice's collection gets none of her chunks")


if __name__ == "__main__":
    main()
