"""The RAG store end to end with real files, real Chroma (in the test DATA_DIR)
and real embeddings: ingestion, failures that leave nothing behind, access
control, delete, re-ingest, resume after a restart, live status events and the
Channels worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from rag import store, worker
from rag.ingestion import ingest_document
from rag.models import Collection, Document
from rag.retrieval import RetrievedContext, Source, retrieve
from rag.uploads import UploadRejected, add_document, reingest, stage_chunks
from rag.uploads import delete_document as delete_doc
from tests.support import documents as docs
from tests.support.documents import add_and_ingest, chunk_count

pytestmark = pytest.mark.usefixtures("rag_thread")


def _sources(context: RetrievedContext) -> list[tuple[str, int | None]]:
    return [(s.title, s.page) for s in context.sources]


@pytest.mark.django_db
@pytest.mark.scaleout
@pytest.mark.parametrize(("question", "page"), docs.LIGHTHOUSE_QUESTIONS)
def test_a_pdf_is_retrievable_by_a_question_with_the_right_page(user, question, page):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    assert (document.status, document.page_count, document.error) == ("ready", 3, "")
    assert document.chunk_count == chunk_count(document) == 3
    context = retrieve(user, question)
    assert context.sources[0].title == "lighthouse.pdf"
    assert context.sources[0].page == page
    assert context.text.startswith(f"[1] lighthouse.pdf, p. {page}: ")


@pytest.mark.django_db
@pytest.mark.scaleout
@pytest.mark.parametrize(
    ("name", "data", "question", "expected"),
    [
        ("orchard.docx", docs.docx_bytes(), "When should apple trees be pruned?", "late February"),
        ("harbour.html", docs.HTML_PAGE.encode(), "What does a mooring cost?", "twelve euros"),
        ("notes.md", docs.MARKDOWN_NOTE.encode(), "Where does the loon nest?", "dunes"),
        (
            "plain.txt",
            b"The bell tower clock was repaired in 2011 by Edda Marsh.",
            "Who repaired the clock?",
            "Edda",
        ),
    ],
)
def test_docx_html_markdown_and_text_are_retrievable(user, name, data, question, expected):
    document = add_and_ingest(user, name, data)
    assert document.status == "ready", document.error
    best = retrieve(user, question).sources[0]
    assert best.title == name and best.page is None
    assert expected in best.snippet


@pytest.mark.django_db
@pytest.mark.scaleout
def test_script_content_of_an_html_page_is_never_indexed(user):
    document = add_and_ingest(user, "harbour.html", docs.HTML_PAGE.encode())
    stored = store.collection(document.collection.chroma_name).get(include=["documents"])
    assert stored["documents"]
    assert not any(docs.SCRIPT_SECRET in text for text in stored["documents"])


@pytest.mark.django_db
@pytest.mark.scaleout
@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("locked.pdf", docs.encrypted_pdf(), "encrypted PDF: remove the password and upload again"),
        ("cut.pdf", docs.truncated_pdf(), "the PDF is damaged or truncated"),
        ("scan.pdf", docs.scanned_pdf(), "no text found: scanned PDF? BreezeWeb does not OCR"),
    ],
)
def test_a_bad_pdf_fails_with_its_reason_and_leaves_nothing_indexed(user, name, data, reason):
    good = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    bad = add_and_ingest(user, name, data)
    assert (bad.status, bad.error, bad.chunk_count) == ("failed", reason, 0)
    assert chunk_count(bad) == 0
    assert chunk_count(good) == 3  # what was saved before is intact
    assert Path(bad.file.path).exists()  # kept so it can be re-ingested or inspected


@pytest.mark.django_db
@pytest.mark.scaleout
@pytest.mark.parametrize(
    ("name", "data", "status", "message"),
    [
        ("notes.txt", docs.binary_named_txt(), 415, "not a text file although named .txt"),
        ("report.pdf", b"plain words", 415, "not a PDF although named .pdf"),
        ("empty.txt", b"", 400, "empty file"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_refused_at_once(
    user, name, data, status, message
):
    staged = stage_chunks([data], name)
    with pytest.raises(UploadRejected) as caught:
        add_document(user, Collection.personal_for(user), staged)
    assert caught.value.status == status and message in caught.value.message
    assert not staged.path.exists()  # the staging file is gone too
    assert Document.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.scaleout
def test_the_same_file_twice_in_a_collection_is_a_duplicate_not_indexed_again(user):
    first = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    with pytest.raises(UploadRejected) as caught:
        add_and_ingest(user, "copy.pdf", docs.lighthouse_pdf())
    assert caught.value.status == 409 and caught.value.code == "duplicate"
    assert caught.value.extra["document"]["id"] == first.pk
    assert "lighthouse.pdf" in caught.value.message
    assert Document.objects.count() == 1 and chunk_count(first) == 3


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_user_never_retrieves_chunks_of_a_collection_they_cannot_read(user, other_user):
    mine = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    question = docs.LIGHTHOUSE_QUESTIONS[0][0]
    assert retrieve(user, question).sources
    assert retrieve(other_user, question) == RetrievedContext("", ())
    # Naming the collection explicitly changes nothing, and raises nothing.
    assert retrieve(other_user, question, [mine.collection_id]).sources == ()
    assert retrieve(other_user, question, [mine.collection_id, 987654]).text == ""


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_shared_collection_is_readable_by_everyone(user, other_user, admin_user):
    shared = Collection.objects.create(name="Handbooks", shared=True)
    add_and_ingest(admin_user, "orchard.docx", docs.docx_bytes(), collection=shared)
    for reader in (user, other_user):
        best = retrieve(reader, "When are codling moth traps hung?").sources[0]
        assert best.title == "orchard.docx" and best.collection_id == shared.pk
    # Limiting to one's personal collection leaves the shared one out.
    personal = Collection.personal_for(user)
    assert retrieve(user, "codling moth traps", [personal.pk]).sources == ()


@pytest.mark.django_db
@pytest.mark.scaleout
def test_the_context_fits_the_budget_and_numbers_its_sources(user):
    add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    add_and_ingest(user, "notes.md", docs.MARKDOWN_NOTE.encode())
    Collection.objects.filter(owner=user).update(score_floor=0.0)
    wide = retrieve(user, "Aldermoor", k=3, budget_tokens=10_000)
    assert [line[:4] for line in wide.text.splitlines()] == ["[1] ", "[2] ", "[3] "]
    assert all(isinstance(s, Source) for s in wide.sources)
    assert set(wide.sources[0].as_dict()) == {
        "document_id", "title", "page", "snippet", "score", "collection_id",
    }  # fmt: skip
    words = lambda text: len(text.split())  # noqa: E731 - a runner's token counter
    tight = retrieve(user, "Aldermoor", k=3, budget_tokens=40, count_tokens=words)
    assert 0 < words(tight.text) <= 40
    assert len(tight.sources) == tight.text.count("\n") + 1


@pytest.mark.django_db
@pytest.mark.scaleout
def test_near_identical_chunks_are_returned_once(user, admin_user):
    shared = Collection.objects.create(name="Shared", shared=True, top_k=5)
    add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    add_and_ingest(admin_user, "lighthouse-copy.pdf", docs.lighthouse_pdf(), collection=shared)
    context = retrieve(user, "Who built the Aldermoor lighthouse?", k=5)
    snippets = [s.snippet for s in context.sources]
    assert len(snippets) == len(set(snippets))
    assert sum("Thomas Vell" in s for s in snippets) == 1


@pytest.mark.django_db
@pytest.mark.scaleout
def test_delete_removes_the_file_and_every_chunk(user, django_capture_on_commit_callbacks):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    path, pk = Path(document.file.path), document.pk
    with django_capture_on_commit_callbacks(execute=True):
        delete_doc(document)
    assert not path.exists()
    assert store.count_document_chunks(document.collection.chroma_name, pk) == 0
    assert retrieve(user, docs.LIGHTHOUSE_QUESTIONS[0][0]).sources == ()


@pytest.mark.django_db
@pytest.mark.scaleout
def test_reingest_replaces_the_chunks_under_a_new_generation(user):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    chroma = store.collection(document.collection.chroma_name)
    before = set(chroma.get(include=[])["ids"])
    reingest(document)
    # Until the new run finishes, the old chunks still answer.
    assert Document.objects.get(pk=document.pk).status == "queued"
    assert retrieve(user, docs.LIGHTHOUSE_QUESTIONS[1][0]).sources[0].page == 2
    assert ingest_document(document.pk).status == "ready"
    after = set(chroma.get(include=[])["ids"])
    assert len(after) == 3 and not (before & after)


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_failed_reingest_leaves_no_chunks(user):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    Path(document.file.path).write_bytes(docs.truncated_pdf())  # the disk went bad
    reingest(document)
    result = ingest_document(document.pk)
    assert (result.status, result.error) == ("failed", "the PDF is damaged or truncated")
    assert chunk_count(document) == 0


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_run_whose_document_was_deleted_cleans_up_after_itself(user):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    collection_name = document.collection.chroma_name
    reingest(document)
    calls = []

    def delete_midway(doc, done, total):
        if not calls:
            calls.append(done)
            Document.objects.filter(pk=doc.pk).delete()

    assert ingest_document(document.pk, on_progress=delete_midway).status == "superseded"
    assert store.count_document_chunks(collection_name, document.pk) == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
def test_a_document_left_processing_by_a_stopped_process_is_resumed(user):
    staged = stage_chunks([docs.lighthouse_pdf()], "lighthouse.pdf")
    document = add_document(user, Collection.personal_for(user), staged, dispatch=False)
    # What a crash mid-ingestion leaves: 'processing', a dead run's token.
    Document.objects.filter(pk=document.pk).update(
        status="processing", progress=0.4, ingest_token="dead-run"
    )
    worker.reset_for_tests()  # a fresh process
    worker.ensure_started()
    assert worker.wait_until_idle(timeout=120)
    document.refresh_from_db()
    assert (document.status, document.chunk_count) == ("ready", 3)
    assert retrieve(user, docs.LIGHTHOUSE_QUESTIONS[2][0]).sources[0].page == 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
async def test_the_worker_thread_pushes_live_status_to_the_owners_group(user):
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(f"documents.user.{user.pk}", channel)
    try:
        collection = await sync_to_async(Collection.personal_for)(user)
        staged = await sync_to_async(stage_chunks)([docs.lighthouse_pdf()], "lighthouse.pdf")
        document = await sync_to_async(add_document)(user, collection, staged)
        events = []
        while not events or events[-1]["status"] not in ("ready", "failed"):
            message = await asyncio.wait_for(layer.receive(channel), timeout=120)
            assert message["type"] == "document.status"
            events.append(message["document"])
    finally:
        await layer.group_discard(f"documents.user.{user.pk}", channel)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "queued" and "processing" in statuses and statuses[-1] == "ready"
    progress = [e["progress"] for e in events if e["status"] == "processing"]
    assert progress == sorted(progress) and progress[-1] > 0.5
    assert events[-1] == {
        "id": document.pk,
        "title": "lighthouse.pdf",
        "status": "ready",
        "progress": 1.0,
        "error": "",
        "chunk_count": 3,
        "collection_id": collection.pk,
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
async def test_the_channels_worker_consumer_takes_jobs_when_configured(user, settings):
    """Scale-out mode: jobs go to the `ingest` channel, and the consumer that
    `runworker ingest` runs indexes them (driven here by Channels' Worker)."""
    from channels.layers import get_channel_layer
    from channels.routing import ChannelNameRouter
    from channels.worker import Worker

    from rag.consumers import IngestWorker

    settings.RAG_INGEST_WORKER = "channels"
    app = ChannelNameRouter({"ingest": IngestWorker.as_asgi()})
    runner = Worker(application=app, channels=["ingest"], channel_layer=get_channel_layer())
    task = asyncio.create_task(runner.arun())
    try:
        collection = await sync_to_async(Collection.personal_for)(user)
        staged = await sync_to_async(stage_chunks)([docs.lighthouse_pdf()], "lighthouse.pdf")
        document = await sync_to_async(add_document)(user, collection, staged)
        for _ in range(1200):
            await document.arefresh_from_db()
            if document.status in ("ready", "failed"):
                break
            await asyncio.sleep(0.1)
        assert (document.status, document.chunk_count) == ("ready", 3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
