"""Retrieval latency at 10k and 100k chunks with access control on, and
retrieval quality (recall@5) on questions about generated documents.

    .venv/bin/python bench/rag_retrieval.py [--sizes 10000,100000] [--queries 200]

Layout per size N: user A's personal collection (50% of N), a shared
collection (40%) and user B's personal collection (10%, unreadable by A). A
query by A goes through rag.retrieval: choose A's readable collections (the
access control), query each Chroma collection, de-duplicate, assemble.

Bulk chunks use random unit vectors (said plainly: embedding 100k real chunks
would take over an hour on 2 cores); the real documents of the quality check
and every query are embedded with the real model. Reported:
  search:   retrieval with the query already embedded (collections chosen by
            access control, Chroma queries, de-dup, context assembly)  <- goal p95 < 10 ms
  retrieve: rag.retrieval.retrieve() end to end, query embedding included
Runs in a throw-away DATA_DIR (embedded Chroma, SQLite).
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import percentile, setup_django

setup_django("retrieval")

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    call_command("migrate", verbosity=0)

    from rag import store
    from rag.embeddings import get_embedder
    from rag.ingestion import ingest_document
    from rag.models import Collection, Document
    from rag.retrieval import assemble, readable_collections, retrieve, search
    from rag.uploads import add_document, stage_chunks
    from tests.support import documents as docs

    users = get_user_model().objects
    alice, bob = users.create_user("alice"), users.create_user("bob")
    admin = users.create_superuser("admin", "a@example.com", "x")
    mine, bobs = Collection.personal_for(alice), Collection.personal_for(bob)
    shared = Collection.objects.create(name="Shared", shared=True)
    layout = [(mine, alice, 0.5), (shared, admin, 0.4), (bobs, bob, 0.1)]
    bulk_docs = {
        coll.pk: Document.objects.create(
            collection=coll, owner=owner, title=f"bulk-{coll.pk}", sha256=f"bulk{coll.pk}",
            status="ready",
        )
        for coll, owner, _ in layout
    }  # fmt: skip

    # Real documents for the quality check, in A's collection.
    questions: list[tuple[str, str, int | None]] = []
    for fact_doc in [
        docs.FactDocument(
            "lighthouse.pdf", docs.lighthouse_pdf(), tuple(docs.LIGHTHOUSE_QUESTIONS)
        ),
        *docs.fact_documents(),
    ]:
        document = add_document(
            alice, mine, stage_chunks([fact_doc.data], fact_doc.filename), dispatch=False
        )
        assert ingest_document(document.pk).status == "ready"
        questions += [(q, fact_doc.filename, page) for q, page in fact_doc.questions]

    embedder = get_embedder()
    query_texts = [q for q, _, _ in questions]
    query_vectors = embedder.embed(query_texts)
    rng = np.random.default_rng(11)
    dim = embedder.dimension
    added = {coll.pk: 0 for coll, _, _ in layout}
    n_docs = len({f for _, f, _ in questions})
    print(f"{len(questions)} questions over {n_docs} real documents; bulk vectors are random")

    for size in sizes:
        started = time.perf_counter()
        for coll, _, share in layout:
            target = int(size * share)
            while added[coll.pk] < target:
                n = min(5000, target - added[coll.pk])
                vectors = rng.standard_normal((n, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                first = added[coll.pk]
                store.add_chunks(
                    coll.chroma_name,
                    [f"bulk-{coll.pk}-{i}" for i in range(first, first + n)],
                    vectors,
                    [f"bulk chunk {i}" for i in range(first, first + n)],
                    [
                        {
                            "document_id": bulk_docs[coll.pk].pk,
                            "collection_id": coll.pk,
                            "generation": "bulk",
                            "page": 1 + i % 50,
                        }
                        for i in range(first, first + n)
                    ],
                )
                added[coll.pk] += n
        total = sum(store.collection(c.chroma_name).count() for c, _, _ in layout)
        print(f"\n== {total} chunks in Chroma (built in {time.perf_counter() - started:.0f} s)")

        def search_once(vector):
            chosen = readable_collections(alice, None)
            return assemble(search(chosen, vector, k=5), budget_tokens=1024)

        for v in query_vectors[:10]:
            search_once(v)  # warm-up (HNSW index load)
        search_ms, retrieve_ms = [], []
        for i in range(args.queries):
            v = query_vectors[i % len(query_vectors)]
            t = time.perf_counter()
            search_once(v)
            search_ms.append((time.perf_counter() - t) * 1000)
        for i in range(min(args.queries, 100)):
            t = time.perf_counter()
            retrieve(alice, query_texts[i % len(query_texts)], k=5)
            retrieve_ms.append((time.perf_counter() - t) * 1000)
        print(
            "search   (access-controlled, query embedded): "
            f"p50 {statistics.median(search_ms):.2f} ms"
            f"  p95 {percentile(search_ms, 95):.2f} ms  (goal p95 < 10 ms)"
        )
        print(
            "retrieve (end to end, embedding included):    "
            f"p50 {statistics.median(retrieve_ms):.2f} ms"
            f"  p95 {percentile(retrieve_ms, 95):.2f} ms"
        )
        # Access control holds at this size: B never sees A's or others' private chunks.
        leaked = [s for q in query_texts[:10] for s in retrieve(bob, q, [mine.pk], k=5).sources]
        assert not leaked, leaked
        hits = 0
        for (_q, filename, page), v in zip(questions, query_vectors, strict=True):
            sources = search_once(v).sources
            if any(s.title == filename and (page is None or s.page == page) for s in sources):
                hits += 1
        print(f"recall@5: {hits}/{len(questions)} = {hits / len(questions):.2f}")


if __name__ == "__main__":
    main()
