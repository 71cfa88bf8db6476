"""Hybrid retrieval end to end with real files, real embeddings, real Chroma and
the database's real full-text index: exact identifiers, keyword-only and
meaning-only questions, both indexes swapped or emptied in one step on
re-ingest, failure and delete, access control in both indexes, /api/search.

The tests marked `scaleout` run again in `make test`'s second pass on
PostgreSQL + Redis; in that pass the vector store is a real Chroma server
(`chroma run` from the installed chromadb, started here on a free port)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from rag import store, topk, worker
from rag.embeddings import get_embedder, index_version
from rag.ingestion import ingest_document
from rag.models import Chunk, Collection, Document
from rag.retrieval import retrieve
from rag.uploads import delete_document, reingest
from tests.support import documents as docs
from tests.support.documents import add_and_ingest
from tests.support.processes import chroma_server

SCALEOUT_PASS = os.environ.get("BREEZEWEB_SCALEOUT_PASS") == "1"

# A maintenance manual whose sections say nearly the same thing; the fault
# codes differ only in the order of their digits (MiniLM ranks the one asked
# about 6th of 8 by meaning).
FAULTS = [
    ("E-40172", "the intake valve sticks after a cold start"),
    ("E-40127", "the pressure sensor reports a drift above two percent"),
    ("E-41072", "the drain pump runs dry for more than a minute"),
    ("E-40712", "the heating element trips its thermal fuse"),
    ("E-47012", "the flow meter loses its calibration"),
    ("E-40271", "the door latch does not engage"),
    ("E-42017", "the filter cartridge is overdue for replacement"),
    ("E-40217", "the control board restarts without warning"),
]
MANUAL = "# Dishwasher service manual\n\n" + "\n\n".join(
    f"## Fault report\n\nWhen the unit shows fault {code}, {cause}. The technician "
    "should power the unit down, wait for the display to clear, inspect the parts named in "
    "the fault table and restart the cycle once the cause is fixed."
    for code, cause in FAULTS
)

LIGHTHOUSE = (
    "# Aldermoor notes\n\n## The lighthouse\n\nThe Aldermoor lighthouse was built in 1887 by "
    "the engineer Thomas Vell. Its keeper climbed 214 steps to wind the clockwork every "
    "four hours.\n\n## The harbour\n\nFishing boats moor at the north quay; a mooring costs "
    "twelve euros a night and the harbour master collects the fee at dawn.\n"
)


@pytest.fixture(scope="module")
def vector_store(tmp_path_factory):
    """Embedded Chroma normally; a real Chroma server in the scale-out pass."""
    if not SCALEOUT_PASS:
        yield "embedded"
        return
    process, url = chroma_server(tmp_path_factory.mktemp("chroma-server"))
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(autouse=True)
def _isolation(settings, vector_store):
    settings.RAG_INGEST_WORKER = "thread"
    if vector_store != "embedded":
        settings.CHROMA_URL = vector_store
        store.reset_client()
    yield
    worker.wait_until_idle(timeout=60)
    docs.drop_all_chroma_collections()
    if vector_store != "embedded":
        store.reset_client()


@pytest.fixture(params=["fts5"] if SCALEOUT_PASS else ["fts5", "topk"])
def keyword_index(request, settings):
    """Both ways the embedded default answers keyword queries: FTS5 alone, and
    the top-k index in memory (rag.topk) built for every collection, checked
    to have answered. PostgreSQL has only its own index ("fts5" stands for it
    in the scale-out pass)."""
    if request.param == "fts5":
        yield request.param
        return
    settings.RAG_TOPK_MIN_CHUNKS = 1
    topk.forget()
    topk.build_inline = True
    before = topk.answered
    try:
        yield request.param
    finally:
        topk.build_inline = False
        topk.forget()
    assert topk.answered > before


def _titles(context) -> list[str]:
    return [s.title for s in context.sources]


def _keyword_rows(document) -> int:
    return Chunk.objects.filter(document_id=document.pk).count()


@pytest.mark.django_db
@pytest.mark.scaleout
def test_hybrid_finds_an_exact_identifier_that_vector_search_misses(user, keyword_index):
    assert (store.check_health()["mode"] == "server") == SCALEOUT_PASS
    add_and_ingest(user, "manual.md", MANUAL.encode())
    question = "What does fault E-41072 mean?"
    vector = retrieve(user, question, k=1, mode="vector").sources
    assert "E-41072" not in vector[0].text  # meaning alone cannot tell the sections apart
    hybrid = retrieve(user, question, k=1)  # the default: hybrid
    assert "E-41072" in hybrid.sources[0].text
    assert "drain pump" in hybrid.text


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_keyword_only_and_a_meaning_only_question_both_succeed(user, keyword_index):
    add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    add_and_ingest(user, "manual.md", MANUAL.encode())
    # Keyword-only: a name, nothing to mean.
    for mode in ("keyword", "hybrid"):
        best = retrieve(user, "Vell", k=1, mode=mode).sources[0]
        assert "Thomas Vell" in best.text, mode
    # Meaning-only: no word in common with the text beyond stop words.
    meaning = "How many stairs did the warden ascend?"
    assert not retrieve(user, meaning, mode="keyword").sources
    best = retrieve(user, meaning, k=1).sources[0]
    assert "214 steps" in best.text
    assert best.vector_score is not None and best.keyword_score is None


@pytest.mark.django_db
@pytest.mark.scaleout
def test_title_and_section_are_indexed_but_not_shown(user, keyword_index):
    document = add_and_ingest(user, "orchard-handbook-v2.md", docs.MARKDOWN_NOTE.encode())
    row = Chunk.objects.filter(document=document).first()
    assert row.context.startswith("orchard-handbook-v2.md")
    # Found by the title alone (keyword index), but the model sees the chunk text only.
    context = retrieve(user, "orchard handbook v2", mode="keyword")
    assert context.sources and context.sources[0].title == "orchard-handbook-v2.md"
    assert "orchard-handbook-v2.md\n" not in context.sources[0].text


@pytest.mark.django_db
@pytest.mark.scaleout
def test_delete_removes_the_document_from_both_indexes(user, keyword_index):
    keep = add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    gone = add_and_ingest(user, "manual.md", MANUAL.encode())
    assert _keyword_rows(gone) == gone.chunk_count > 0
    gone_id = gone.pk
    delete_document(gone)
    assert not Chunk.objects.filter(document_id=gone_id).exists()
    assert store.count_document_chunks(keep.collection.chroma_name, gone_id) == 0
    for mode in ("vector", "keyword", "hybrid"):
        titles = _titles(retrieve(user, "fault E-41072 drain pump", k=10, mode=mode))
        assert "manual.md" not in titles, mode
    assert _keyword_rows(keep) == keep.chunk_count


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_delete_that_fails_in_the_vector_store_removes_nothing(user, monkeypatch):
    document = add_and_ingest(user, "manual.md", MANUAL.encode())

    def unreachable(*args, **kwargs):
        raise ConnectionError("chroma is away")

    monkeypatch.setattr(store, "delete_document", unreachable)
    with pytest.raises(ConnectionError):
        delete_document(document)
    assert Document.objects.filter(pk=document.pk).exists()
    assert _keyword_rows(document) == document.chunk_count
    assert "manual.md" in _titles(retrieve(user, "E-41072", mode="keyword"))


@pytest.mark.django_db
@pytest.mark.scaleout
def test_reingest_swaps_generations_in_both_indexes_with_no_stale_hits(user, keyword_index):
    document = add_and_ingest(user, "manual.md", MANUAL.encode())
    old = document.live_generation
    chroma = document.collection.chroma_name
    reingest(document)
    # Queued again: the old generation answers in both indexes until the new one is live.
    assert "manual.md" in _titles(retrieve(user, "E-41072", mode="keyword"))
    assert "manual.md" in _titles(retrieve(user, "drain pump runs dry", mode="vector"))
    assert ingest_document(document.pk).status == "ready"
    document.refresh_from_db()
    assert document.status == "ready" and document.live_generation != old
    generations = set(Chunk.objects.filter(document=document).values_list("generation", flat=True))
    assert generations == {document.live_generation}
    stored = store.collection(chroma).get(where={"document_id": document.pk}, include=["metadatas"])
    assert {m["generation"] for m in stored["metadatas"]} == {document.live_generation}
    # An old generation's chunk that Chroma still held (its removal failed) never answers.
    vector = get_embedder().embed(["fault E-41072 drain pump"])
    store.add_chunks(
        chroma,
        [f"{document.pk}:{old}:0"],
        vector,
        ["STALE fault E-41072 drain pump"],
        [{"document_id": document.pk, "collection_id": document.collection_id, "generation": old}],
    )
    for mode in ("vector", "hybrid"):
        found = retrieve(user, "fault E-41072 drain pump", k=10, mode=mode).sources
        assert found and not any("STALE" in s.text for s in found), mode


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_failure_while_making_a_generation_live_leaves_nothing_half_done(user, monkeypatch):
    """The step that makes a new generation live (document row + keyword rows)
    is one transaction: when it fails midway, none of its rows stay, and the
    document fails with nothing left in either index."""
    document = add_and_ingest(user, "manual.md", MANUAL.encode())
    old = document.live_generation
    Document.objects.filter(pk=document.pk).update(status="queued", ingest_token="")
    real = Chunk.objects.bulk_create
    seen = {}

    def fail_midway(objs, *args, **kwargs):
        real(objs[:2], *args, **kwargs)  # part of the new generation written...
        seen["generation"] = objs[0].generation
        raise RuntimeError("disk full")  # ...then the database fails

    monkeypatch.setattr(Chunk.objects, "bulk_create", fail_midway)
    result = ingest_document(document.pk)
    monkeypatch.undo()
    document.refresh_from_db()
    assert result.status == "failed" and document.status == "failed"
    assert seen["generation"] != old
    assert not Chunk.objects.filter(generation=seen["generation"]).exists()
    assert _keyword_rows(document) == 0
    assert store.count_document_chunks(document.collection.chroma_name, document.pk) == 0
    for mode in ("vector", "keyword", "hybrid"):
        assert not retrieve(user, "E-41072 fault", k=10, mode=mode).sources, mode


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_failed_ingestion_leaves_nothing_in_either_index(user):
    bad = add_and_ingest(user, "cut.pdf", docs.truncated_pdf())
    assert bad.status == "failed"
    assert _keyword_rows(bad) == 0
    assert store.count_document_chunks(bad.collection.chroma_name, bad.pk) == 0


@pytest.mark.django_db
@pytest.mark.scaleout
def test_access_control_holds_in_both_indexes(user, other_user, keyword_index):
    add_and_ingest(other_user, "secret.md", b"# Bob\n\nThe vault code is ZEBRAQUILL 5512.\n")
    add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    bobs = Collection.personal_for(other_user)
    for mode in ("vector", "keyword", "hybrid"):
        for ids in (None, [bobs.pk], [bobs.pk, Collection.personal_for(user).pk]):
            found = retrieve(user, "ZEBRAQUILL vault code 5512", ids, k=10, mode=mode)
            assert "secret.md" not in _titles(found), (mode, ids)
    assert "secret.md" in _titles(retrieve(other_user, "ZEBRAQUILL", mode="keyword"))


@pytest.mark.django_db
@pytest.mark.scaleout
def test_collection_settings_choose_the_mode(user):
    add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    coll = Collection.personal_for(user)
    question = "How many stairs did the warden ascend?"
    Collection.objects.filter(pk=coll.pk).update(search_mode="keyword")
    assert not retrieve(user, question).sources
    Collection.objects.filter(pk=coll.pk).update(search_mode="hybrid", keyword_weight=0.3)
    assert "214 steps" in retrieve(user, question, k=1).sources[0].text


@pytest.mark.django_db
@pytest.mark.scaleout
def test_api_search_returns_full_text_section_and_scores(client, user):
    add_and_ingest(user, "manual.md", MANUAL.encode())
    client.force_login(user)
    body = {"query": "What does fault E-41072 mean?", "k": 3}
    answer = client.post("/api/search", json.dumps(body), content_type="application/json")
    assert answer.status_code == 200, answer.content
    best = answer.json()["results"][0]
    assert best["rank"] == 1 and "E-41072" in best["text"]
    assert best["text"].endswith("once the cause is fixed.")  # the whole chunk
    assert best["section"] == "Dishwasher service manual > Fault report"
    assert best["keyword_score"] > 0 and best["vector_score"] is not None
    assert best["fused_score"] > 0 and best["page"] is None
    body["mode"] = "keyword"
    keyword = client.post("/api/search", json.dumps(body), content_type="application/json")
    assert all(r["vector_score"] is None for r in keyword.json()["results"])
    body["mode"] = "semantic"
    bad = client.post("/api/search", json.dumps(body), content_type="application/json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_mode"


@pytest.mark.django_db(transaction=True)
def test_documents_indexed_before_hybrid_search_keep_answering_then_are_reindexed(user):
    document = add_and_ingest(user, "aldermoor.md", LIGHTHOUSE.encode())
    # As a database from before this change: no keyword rows, no version.
    Chunk.objects.filter(document=document).delete()
    Document.objects.filter(pk=document.pk).update(index_version="", live_generation="")
    assert "aldermoor.md" in _titles(retrieve(user, "Who built the lighthouse?"))
    assert worker.requeue_outdated() == [document.pk]
    worker.wait_until_idle(timeout=120)
    document.refresh_from_db()
    assert document.status == "ready" and document.index_version == index_version()
    assert _keyword_rows(document) == document.chunk_count
    assert worker.requeue_outdated() == []  # nothing changes: nothing is re-embedded


def test_the_prepared_onnx_embeddings_match_sentence_transformers():
    from rag.embeddings import Embedder, model_path, usable_onnx_export

    if usable_onnx_export(model_path()) is None:
        if os.environ.get("BREEZEWEB_REQUIRE_MODEL") == "1":
            pytest.fail("MODELS_DIR/embeddings is missing: run manage.py prepare_embeddings")
        pytest.skip("no ONNX export prepared (manage.py prepare_embeddings)")
    onnx = Embedder(model_path(), "onnx")
    reference = Embedder(model_path(), "sentence-transformers")
    texts = [LIGHTHOUSE, MANUAL[:600], "E-41072", "How many stairs did the warden ascend?"]
    cosine = (onnx.embed(texts) * reference.embed(texts)).sum(axis=1)
    assert onnx.backend == "onnx" and cosine.min() > 0.97, cosine
