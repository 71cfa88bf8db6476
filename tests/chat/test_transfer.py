"""Export and import: BreezeWeb JSON round-trips byte-identical text with its
branches; ChatGPT's conversations.json (a sample built from its public format,
with a `mapping` tree) imports with branches preserved; hostile content stays
text or is skipped with a reason; imports run off the request with progress."""

from __future__ import annotations

import json
import time

import pytest

from chat.limits import MAX_TEXT_CHARS
from chat.models import Conversation, ImportJob, Message
from tests.support.clients import client_of

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.scaleout]

HOSTILE = "<script>alert(1)</script> **bold** `code` ![x](javascript:alert(1)) 🦜 ü\r\n\ttab"


def import_file(client, payload: bytes) -> dict:
    response = client.post("/api/imports", payload, content_type="application/json")
    assert response.status_code == 202, response.content
    job = response.json()
    deadline = time.monotonic() + 60
    while job["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = client.get(f"/api/imports/{job['id']}").json()
    return job


def branchy(owner) -> Conversation:
    """Q1 with two answers (the second shown), and an edit of Q1 with its own answer."""
    c = Conversation.objects.create(owner=owner, title="Parrots ü")
    q1 = Message.objects.create(conversation=c, role="user", content=HOSTILE)
    Message.objects.create(
        conversation=c,
        role="assistant",
        content="First answer",
        runner_name="local",
        model_id="SmolLM2",
        prompt_tokens=12,
        completion_tokens=3,
        time_to_first_token_ms=41.5,
        tokens_per_second=88.0,
        total_ms=120.0,
        sources=[{"document_id": 1, "title": "birds.md", "page": 2, "snippet": "s", "score": 0.5}],
    )
    second = Message.objects.create(
        conversation=c, role="assistant", content="Second answer\n", parent=q1
    )
    edited = Message(conversation=c, role="user", content="Q1, edited")
    edited.root = True
    edited.save()
    Message.objects.create(conversation=c, role="assistant", content="Edited answer")
    Conversation.objects.filter(pk=c.pk).update(active_leaf=second)
    return c


def shape(export: dict) -> list:
    """What must survive a round trip: each message's fields but ids and
    dates, its parent by position, and the active message by position."""
    out = []
    for record in export["conversations"]:
        ids = [m["id"] for m in record["messages"]]
        messages = [
            {k: v for k, v in m.items() if k not in ("id", "parent", "created_at")}
            | {"parent": ids.index(m["parent"]) if m["parent"] else None}
            for m in record["messages"]
        ]
        out.append((record["title"], ids.index(record["active"]), messages))
    return out


def test_export_then_import_round_trips_text_and_branches(user, other_user):
    original = branchy(user)
    client = client_of(user)
    exported = client.get(f"/api/conversations/{original.pk}/export")
    assert exported["Content-Disposition"].startswith("attachment;")
    job = import_file(client, exported.content)
    assert job["status"] == "done" and job["format"] == "breezeweb"
    assert (job["total"], job["done"], job["progress"]) == (1, 1, 1.0)
    (imported,) = job["report"]["imported"]
    assert imported["messages"] == 5 and job["report"]["skipped"] == []
    again = client.get(f"/api/conversations/{imported['conversation_id']}/export").json()
    assert shape(again) == shape(exported.json())
    copy = Message.objects.get(
        conversation_id=imported["conversation_id"], role="user", parent=None, content=HOSTILE
    )
    assert copy.content.encode() == HOSTILE.encode()
    # The page shows the same branch, with both answers as siblings.
    shown = client.get(f"/api/conversations/{imported['conversation_id']}").json()["messages"]
    assert [m["content"] for m in shown] == [HOSTILE, "Second answer\n"]
    assert len(shown[1]["siblings"]) == 2
    # Nobody else sees the job or exports the conversation.
    other = client_of(other_user)
    assert other.get(f"/api/imports/{job['id']}").status_code == 404
    assert other.get(f"/api/conversations/{original.pk}/export").status_code == 404


def test_markdown_export_has_runner_timings_and_sources(user):
    branchy(user)
    client = client_of(user)
    Conversation.objects.update(active_leaf=Message.objects.get(content="First answer"))
    text = client.get("/api/conversations/export", {"format": "md"}).content.decode()
    assert text.startswith("# Parrots ü\n")
    assert "## Assistant (local · SmolLM2 · TTFT 42 ms · 88.0 tok/s" in text
    assert "1. birds.md, page 2" in text
    assert HOSTILE in text
    assert client.get("/api/conversations/export", {"format": "pdf"}).status_code == 400


def chatgpt_sample() -> list[dict]:
    """conversations.json as ChatGPT's data export writes it: a `mapping` of
    nodes with parent/children, a hidden root and system message, a
    regenerated answer (two children of one question), an edited question (two
    children of the root path), a tool message and an image part."""

    def node(key, parent, children, role=None, parts=None, t=0.0, kind="text"):
        message = None
        if role:
            message = {
                "id": key,
                "author": {"role": role, "name": None, "metadata": {}},
                "create_time": t,
                "content": {"content_type": kind, "parts": parts},
                "status": "finished_successfully",
                "metadata": {"model_slug": "gpt-4o"} if role == "assistant" else {},
                "recipient": "all",
            }
        return {"id": key, "message": message, "parent": parent, "children": children}

    mapping = {
        "root": node("root", None, ["sys"]),
        "sys": node("sys", "root", ["q1", "q1b"], "system", [""], 1),
        "q1": node("q1", "sys", ["a1", "a1b"], "user", ["How do parrots talk?"], 2),
        "a1": node("a1", "q1", [], "assistant", ["By mimicry."], 3),
        "a1b": node("a1b", "q1", ["tool"], "assistant", ["They imitate sounds."], 4),
        "tool": node("tool", "a1b", ["q2"], "tool", ["search results"], 5),
        "q2": node(
            "q2",
            "tool",
            ["a2"],
            "user",
            ["And this one?", {"content_type": "image_asset_pointer", "asset_pointer": "file-1"}],
            6,
            "multimodal_text",
        ),
        "a2": node("a2", "q2", [], "assistant", [HOSTILE], 7),
        "q1b": node("q1b", "sys", ["a3"], "user", ["How do parrots sing?"], 8),
        "a3": node("a3", "q1b", [], "assistant", ["Rarely."], 9),
    }
    return [
        {
            "title": "Parrot\x00 talk",
            "create_time": 1.0,
            "update_time": 9.0,
            "mapping": mapping,
            "current_node": "a2",
            "conversation_id": "c1",
        },
        {"title": "Empty", "mapping": {"root": node("root", None, [])}, "current_node": "root"},
        {"title": "Broken"},
    ]


def test_a_chatgpt_export_imports_with_its_branches(user):
    client = client_of(user)
    job = import_file(client, json.dumps(chatgpt_sample()).encode())
    assert job["status"] == "done" and job["format"] == "chatgpt", job
    (imported,) = job["report"]["imported"]
    assert imported["title"] == "Parrot talk"  # the NUL of the title is dropped
    assert any("attachments" in reason for reason in imported["skipped_messages"])
    skipped = {s["title"]: s["reasons"] for s in job["report"]["skipped"]}
    assert set(skipped) == {"Empty", "Broken"}
    conversation = client.get(f"/api/conversations/{imported['conversation_id']}").json()
    # The current node's branch is shown, the regenerated answer and the tool
    # message in between left out of it, the hostile text kept as text.
    shown = [(m["role"], m["content"], len(m["siblings"])) for m in conversation["messages"]]
    assert shown == [
        ("user", "How do parrots talk?", 2),
        ("assistant", "They imitate sounds.", 2),
        ("user", "And this one?", 1),
        ("assistant", HOSTILE, 1),
    ]
    assert len(conversation["tree"]) == 7
    assert Message.objects.get(content="By mimicry.").model_id == "gpt-4o"


@pytest.mark.parametrize(
    ("payload", "error", "code"),
    [
        (b"not json", "not JSON", "not_json"),
        (b'{"hello": 1}', "neither", "unknown_format"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON", "not_json"),
        (
            json.dumps({"format": "breezeweb.conversations", "conversations": 5}).encode(),
            "not a list",
            "not_a_list",
        ),
    ],
)
def test_files_that_cannot_be_imported_fail_with_a_reason(user, payload, error, code):
    """The reason in English (`error`) and as a code the page translates."""
    job = import_file(client_of(user), payload)
    assert job["status"] == "failed" and error in job["error"]
    assert job["error_code"] == code
    assert not Conversation.objects.exists()


def test_messages_no_database_can_hold_are_skipped_with_a_reason(user):
    record = {
        "title": "Mixed",
        "active": None,
        "messages": [
            {"id": 1, "parent": None, "role": "user", "content": "fine"},
            {"id": 2, "parent": 1, "role": "assistant", "content": "a\x00b"},
            {"id": 3, "parent": 1, "role": "assistant", "content": "x" * (MAX_TEXT_CHARS + 1)},
            {"id": 4, "parent": 1, "role": "admin", "content": "promote me"},
            {"id": 5, "parent": 1, "role": "assistant", "content": 42},
            {"id": 7, "parent": 1, "role": "assistant", "content": "SURROGATE"},
            {
                "id": 6,
                "parent": 1,
                "role": "assistant",
                "content": "ok",
                "status": "hacked",
                "prompt_tokens": "9",
            },
        ],
    }
    text = json.dumps(
        {"format": "breezeweb.conversations", "version": 1, "conversations": [record]}
    )
    # A lone surrogate travels as the file's JSON escape.
    text = text.replace('"SURROGATE"', '"lone \\ud800"')
    job = import_file(client_of(user), text.encode())
    (imported,) = job["report"]["imported"]
    assert imported["messages"] == 2
    reasons = " ".join(imported["skipped_messages"])
    assert "NUL" in reasons and "longer than" in reasons and "role 'admin'" in reasons
    assert "not text" in reasons and len(imported["skipped_messages"]) == 5
    kept = Message.objects.get(content="ok")
    assert (kept.status, kept.prompt_tokens) == ("complete", None)  # bad details dropped
    assert ImportJob.objects.get().status == "done"


def _stale_job(owner, status: str) -> ImportJob:
    from datetime import timedelta

    from django.utils import timezone

    from chat import transfer

    job = ImportJob.objects.create(owner=owner, status=status, total=3, done=1)
    old = timezone.now() - timedelta(seconds=transfer.STALE_AFTER_SECONDS + 1)
    ImportJob.objects.filter(pk=job.pk).update(updated_at=old)
    path = transfer._upload_path(job.pk)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"[]")
    return job


def test_an_import_a_restart_stopped_is_settled_as_failed_when_polled(user, other_user):
    """The import's thread dies with the process; its job would stay `running`
    and the page poll forever. Without a heartbeat for STALE_AFTER_SECONDS it
    is answered failed, with a reason, and its upload is deleted."""
    from chat import transfer

    stopped = _stale_job(user, "running")
    queued = _stale_job(user, "queued")
    alive = ImportJob.objects.create(owner=user, status="running", total=3, done=1)
    client = client_of(user)
    job = client.get(f"/api/imports/{stopped.pk}").json()
    assert job["status"] == "failed" and job["error"] == transfer.STALE_ERROR
    assert job["error_code"] == "stale"
    assert job["done"] == 1  # what it had done is kept
    assert not transfer._upload_path(stopped.pk).exists()
    # Another user's poll of it settles it but shows nothing.
    assert client_of(other_user).get(f"/api/imports/{queued.pk}").status_code == 404
    assert ImportJob.objects.get(pk=queued.pk).status == "failed"
    assert not transfer._upload_path(queued.pk).exists()
    # A job that saved progress recently is running, not stale.
    assert client.get(f"/api/imports/{alive.pk}").json()["status"] == "running"


def test_a_new_import_settles_every_stale_job_and_a_slow_thread_stops(
    user, other_user, monkeypatch
):
    from chat import transfer

    theirs = _stale_job(other_user, "running")
    import_file(
        client_of(user),
        json.dumps(
            {"format": "breezeweb.conversations", "version": 1, "conversations": []}
        ).encode(),
    )
    assert ImportJob.objects.get(pk=theirs.pk).status == "failed"
    assert not transfer._upload_path(theirs.pk).exists()
    # A thread that was only slow finds its job settled at its next save and
    # stops there: the job stays failed, it is not brought back to `done`.
    data = {
        "format": "breezeweb.conversations",
        "version": 1,
        "conversations": [
            {
                "title": f"c{i}",
                "messages": [{"id": 1, "parent": None, "role": "user", "content": "hi"}],
            }
            for i in range(3)
        ],
    }
    saved = []
    real_save = transfer.save_conversation

    def save_then_settle(owner, incoming):
        saved.append(incoming)
        ImportJob.objects.filter(owner=owner).update(status="failed", error=transfer.STALE_ERROR)
        return real_save(owner, incoming)

    monkeypatch.setattr(transfer, "save_conversation", save_then_settle)
    job = transfer.start_import(user, json.dumps(data).encode(), background=False)
    assert job["status"] == "failed" and job["error"] == transfer.STALE_ERROR
    assert len(saved) == 1


def test_an_untitled_import_is_titled_in_the_language_of_its_request(user, compiled_translations):
    """Like a new chat's default title: the importer's language (here zh-Hant
    from Accept-Language), though the import runs off the request."""
    record = {"messages": [{"id": 1, "parent": None, "role": "user", "content": "hi"}]}
    payload = json.dumps({"format": "breezeweb.conversations", "conversations": [record]})
    client = client_of(user)
    client.defaults["HTTP_ACCEPT_LANGUAGE"] = "zh-TW"
    job = import_file(client, payload.encode())
    assert job["report"]["imported"][0]["title"] == "匯入的對話"
    client.defaults["HTTP_ACCEPT_LANGUAGE"] = "en"
    job = import_file(client, payload.encode())
    assert job["report"]["imported"][0]["title"] == "Imported chat"
