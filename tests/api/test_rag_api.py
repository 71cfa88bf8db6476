"""The documents HTTP API, the ingest command and the admin, with real files,
real Chroma and real embeddings."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

from django.conf import settings as django_settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client

import pytest

from accounts.models import ApiKey
from rag.ingestion import ingest_document
from rag.models import Collection, Document
from tests.support import documents as docs
from tests.support.documents import add_and_ingest, chunk_count

pytestmark = [pytest.mark.django_db, pytest.mark.scaleout, pytest.mark.usefixtures("rag_thread")]


@pytest.fixture
def api(user):
    _, raw = ApiKey.issue(user, "tests")
    return Client(headers={"Authorization": f"Bearer {raw}"})


@pytest.fixture
def bob_api(other_user):
    _, raw = ApiKey.issue(other_user, "tests")
    return Client(headers={"Authorization": f"Bearer {raw}"})


def _file(name: str, data: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="application/octet-stream")


def _staging_files() -> list[Path]:
    staging = Path(django_settings.MEDIA_ROOT) / "tmp"
    return list(staging.iterdir()) if staging.exists() else []


def test_an_upload_with_an_api_key_is_stored_and_queued(api, user):
    response = api.post("/api/documents", {"file": _file("lighthouse.pdf", docs.lighthouse_pdf())})
    assert response.status_code == 201, response.content
    (doc,) = response.json()["documents"]
    assert (doc["title"], doc["status"], doc["progress"]) == ("lighthouse.pdf", "queued", 0.0)
    assert doc["collection_id"] == Collection.personal_for(user).pk
    stored = Document.objects.get(pk=doc["id"])
    assert Path(stored.file.path).read_bytes() == docs.lighthouse_pdf()
    assert stored.sha256 == doc["sha256"] and stored.mime == "application/pdf"
    assert _staging_files() == []
    # The worker takes it from here; listing and detail show its state.
    ingest_document(doc["id"])
    listed = api.get("/api/documents").json()["documents"]
    assert [(d["id"], d["status"], d["chunk_count"]) for d in listed] == [(doc["id"], "ready", 3)]
    assert api.get(f"/api/documents/{doc['id']}").json()["document"]["page_count"] == 3


def test_several_files_in_one_upload_each_get_a_result(api):
    response = api.post(
        "/api/documents",
        {
            "file": [
                _file("notes.md", docs.MARKDOWN_NOTE.encode()),
                _file("orchard.docx", docs.docx_bytes()),
                _file("bad.txt", docs.binary_named_txt()),
            ]
        },
    )
    assert response.status_code == 201
    body = response.json()
    assert [d["title"] for d in body["documents"]] == ["notes.md", "orchard.docx"]
    assert body["errors"][0]["code"] == "binary_content"
    assert "bad.txt: not a text file although named .txt" in body["errors"][0]["message"]


def test_a_session_upload_needs_the_csrf_token(user):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    upload = {"file": _file("notes.md", docs.MARKDOWN_NOTE.encode())}
    refused = browser.post("/api/documents", upload)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    assert Document.objects.count() == 0 and _staging_files() == []
    browser.get("/login/")  # the login form sets the csrftoken cookie
    token = browser.cookies["csrftoken"].value
    upload = {"file": _file("notes.md", docs.MARKDOWN_NOTE.encode())}
    accepted = browser.post("/api/documents", upload, headers={"X-CSRFToken": token})
    assert accepted.status_code == 201


def test_an_unauthenticated_upload_is_refused():
    response = Client().post("/api/documents", {"file": _file("a.md", b"# hi")})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_a_file_over_the_limit_is_refused_while_streaming_with_the_limit_in_mb(api, settings):
    settings.UPLOAD_MAX_BYTES = 1024 * 1024
    big = b"The tide tables of the harbour.\n" * 40_000  # ~1.3 MB of real text
    response = api.post("/api/documents", {"file": _file("tides.txt", big)})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "file_too_large"
    assert "tides.txt is larger than the upload limit of 1 MB" in error["message"]
    assert Document.objects.count() == 0 and _staging_files() == []


@pytest.mark.parametrize(
    ("name", "data", "status", "code", "message"),
    [
        ("notes.txt", docs.binary_named_txt(), 415, "binary_content", "not a text file"),
        ("report.pdf", b"plain words", 415, "not_a_pdf", "not a PDF although named .pdf"),
        ("empty.txt", b"", 400, "empty_file", "empty file"),
        ("setup.exe", b"MZ\x90\x00", 415, "unsupported_type", "unsupported file type (.exe)"),
    ],
)
def test_wrong_content_gets_a_clear_error_and_stores_nothing(
    api, name, data, status, code, message
):
    response = api.post("/api/documents", {"file": _file(name, data)})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert message in response.json()["error"]["message"]
    assert Document.objects.count() == 0 and _staging_files() == []


def test_the_same_file_again_is_a_409_naming_the_existing_document(api):
    first = api.post("/api/documents", {"file": _file("notes.md", docs.MARKDOWN_NOTE.encode())})
    again = api.post("/api/documents", {"file": _file("copy.md", docs.MARKDOWN_NOTE.encode())})
    assert again.status_code == 409
    error = again.json()["error"]
    existing = first.json()["documents"][0]
    assert error["code"] == "duplicate" and error["document"]["id"] == existing["id"]
    assert "notes.md" in error["message"]
    assert Document.objects.count() == 1


def test_a_path_in_the_filename_never_leaves_the_upload_folder(api):
    response = api.post(
        "/api/documents", {"file": _file("../../../etc/passwd.txt", b"root:x:0:0 line")}
    )
    assert response.status_code == 201
    document = Document.objects.get()
    assert document.title == "passwd.txt"
    media = Path(django_settings.MEDIA_ROOT).resolve()
    assert Path(document.file.path).resolve().is_relative_to(media / "documents")


def test_uploading_to_a_collection_checks_access(api, user, other_user, admin_user):
    bobs = Collection.personal_for(other_user)
    shared = Collection.objects.create(name="Handbooks", shared=True)
    upload = lambda cid: api.post(  # noqa: E731
        "/api/documents", {"file": _file("n.md", docs.MARKDOWN_NOTE.encode()), "collection": cid}
    )
    assert upload(bobs.pk).status_code == 404  # not readable: does not exist for alice
    refused = upload(shared.pk)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "collection_read_only"
    assert Document.objects.count() == 0


def test_documents_of_other_users_are_invisible_and_shared_ones_read_only(
    api, bob_api, user, other_user, admin_user
):
    mine = add_and_ingest(user, "notes.md", docs.MARKDOWN_NOTE.encode())
    shared = Collection.objects.create(name="Handbooks", shared=True)
    handbook = add_and_ingest(admin_user, "orchard.docx", docs.docx_bytes(), collection=shared)
    assert bob_api.get(f"/api/documents/{mine.pk}").status_code == 404
    assert bob_api.delete(f"/api/documents/{mine.pk}").status_code == 404
    assert bob_api.post(f"/api/documents/{mine.pk}/reingest").status_code == 404
    assert [d["id"] for d in bob_api.get("/api/documents").json()["documents"]] == [handbook.pk]
    assert bob_api.get(f"/api/documents/{handbook.pk}").status_code == 200
    refused = bob_api.delete(f"/api/documents/{handbook.pk}")
    assert refused.status_code == 403 and chunk_count(handbook) > 0
    assert chunk_count(mine) == 2


def test_delete_through_the_api_removes_the_file_and_chunks(
    api, user, django_capture_on_commit_callbacks
):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    path, pk = Path(document.file.path), document.pk
    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"/api/documents/{document.pk}")
    assert response.status_code == 200 and response.json() == {"deleted": document.pk}
    assert not Document.objects.filter(pk=document.pk).exists()
    document.pk = pk
    assert chunk_count(document) == 0 and not path.exists()
    search = api.post("/api/search", {"query": "lighthouse"}, "application/json")
    assert search.json()["results"] == []


def test_reingest_through_the_api_queues_it_again(api, user):
    document = add_and_ingest(user, "notes.md", docs.MARKDOWN_NOTE.encode())
    response = api.post(f"/api/documents/{document.pk}/reingest")
    assert response.status_code == 202
    assert response.json()["document"]["status"] == "queued"
    assert chunk_count(document) == 2  # the old chunks answer until replaced


def test_search_ranks_chunks_and_never_crosses_users(api, bob_api, user):
    mine = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    body = {"query": "How is rainwater stored for the tomatoes?", "k": 2}
    results = api.post("/api/search", body, "application/json").json()["results"]
    assert results[0]["rank"] == 1 and results[0]["page"] == 2
    assert results[0]["title"] == "lighthouse.pdf" and "forty thousand" in results[0]["snippet"]
    assert results[0]["score"] >= results[-1]["score"]
    assert len(results) <= 2
    for ask in ({**body}, {**body, "collections": [mine.collection_id]}):
        stolen = bob_api.post("/api/search", ask, "application/json")
        assert stolen.status_code == 200 and stolen.json()["results"] == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "bad_query"),
        ({"query": "  "}, "bad_query"),
        ({"query": "x", "k": 0}, "bad_k"),
        ({"query": "x", "k": True}, "bad_k"),
        ({"query": "x", "collections": "1"}, "bad_collections"),
        ([1, 2], "bad_json"),
    ],
)
def test_a_bad_search_gets_a_400_with_a_code(api, body, code):
    response = api.post("/api/search", body, "application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_collections_lists_the_personal_one_first_and_shared_ones(api, user, other_user):
    Collection.personal_for(other_user)
    shared = Collection.objects.create(name="Handbooks", shared=True)
    listed = api.get("/api/collections").json()["collections"]
    assert [c["id"] for c in listed] == [Collection.personal_for(user).pk, shared.pk]
    assert listed[0]["writable"] is True and listed[1]["writable"] is False


def test_the_ingest_command_indexes_a_folder_with_a_summary(tmp_path, user):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "lighthouse.pdf").write_bytes(docs.lighthouse_pdf())
    (folder / "sub" / "notes.md").write_bytes(docs.MARKDOWN_NOTE.encode())
    (folder / "sub" / "locked.pdf").write_bytes(docs.encrypted_pdf())
    (folder / "binary.txt").write_bytes(docs.binary_named_txt())
    (folder / ".hidden.md").write_bytes(b"# hidden")
    out = StringIO()
    call_command("ingest", str(folder), "--user", "alice", stdout=out, stderr=StringIO())
    text = out.getvalue()
    assert "2 of 4 file(s) indexed" in text and "5 chunks" in text
    assert "locked.pdf: encrypted PDF: remove the password and upload again" in text
    assert "binary.txt: not a text file although named .txt" in text
    statuses = dict(Document.objects.values_list("title", "status"))
    assert statuses == {"lighthouse.pdf": "ready", "notes.md": "ready", "locked.pdf": "failed"}
    again = StringIO()
    call_command("ingest", str(folder / "sub" / "notes.md"), "--user", "alice", stdout=again)
    assert "1 duplicate(s)" in again.getvalue()


def test_the_ingest_command_needs_a_target():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--collection ID or --user NAME"):
        call_command("ingest", "/nonexistent")


def test_the_admin_lists_documents_and_uploads_and_deletes(client, admin_user):
    client.force_login(admin_user)
    shared = Collection.objects.create(name="Handbooks", shared=True)
    page = client.post(
        "/admin/rag/document/add/",
        {"collection": shared.pk, "upload": _file("orchard.docx", docs.docx_bytes())},
    )
    assert page.status_code == 302, page.content[:2000]
    document = Document.objects.get()
    assert (document.title, document.collection, document.status) == (
        "orchard.docx",
        shared,
        "queued",
    )
    ingest_document(document.pk)
    listing = client.get("/admin/rag/document/")
    assert listing.status_code == 200
    assert b"orchard.docx" in listing.content and b"ready" in listing.content
    bad = client.post(
        "/admin/rag/document/add/",
        {"collection": shared.pk, "upload": _file("fake.pdf", b"not a pdf")},
    )
    assert bad.status_code == 200 and b"not a PDF although named .pdf" in bad.content
    client.post(
        "/admin/rag/document/",
        {"action": "delete_with_chunks", "_selected_action": [document.pk]},
    )
    assert not Document.objects.exists() and chunk_count(document) == 0
