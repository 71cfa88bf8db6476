"""Projects: a folder of conversations with instructions and defaults for new
chats. The defaults reach a new chat through the websocket (`project_id` in a
`message` frame) and through the API (`POST /api/conversations`), and the
instructions reach the runner at every turn; chats move between projects and
pin; nobody reaches another user's project."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async

from chat.models import Conversation, Message, Project
from rag.models import Collection
from tests.chat.test_chat_ws import ask, frames_until, of
from tests.support.clients import client_of, connect

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.scaleout,
    pytest.mark.usefixtures("fresh_process_state", "no_detached_answers"),
]

INSTRUCTIONS = "You are the pirate assistant of the harbour. Always answer in pirate speech."


def post(client, path, body):
    return client.post(path, json.dumps(body), content_type="application/json")


def patch(client, path, body):
    return client.patch(path, json.dumps(body), content_type="application/json")


def make_project(user, **fields) -> dict:
    response = post(client_of(user), "/api/projects", fields)
    assert response.status_code == 201, response.content
    return response.json()


@pytest.fixture
def harbour(user, scripted_runner):
    # Documents off: a turn with retrieval would load the embedding model
    # (test_a_new_chat_through_the_api_inherits_the_project covers them).
    return make_project(
        user,
        name="Harbour",
        instructions=INSTRUCTIONS,
        runner="scripted",
        temperature=0.3,
        max_tokens=77,
    )


def test_a_project_is_created_listed_changed_and_deleted(user, harbour):
    client = client_of(user)
    assert harbour["runner"] == "scripted" and harbour["rag"] is False
    assert harbour["temperature"] == 0.3 and harbour["max_tokens"] == 77
    assert client.get("/api/projects").json()["projects"] == [harbour]
    changed = patch(client, f"/api/projects/{harbour['id']}", {"runner": None, "top_p": 0.5})
    assert changed.status_code == 200
    body = changed.json()
    assert body["runner"] is None and body["top_p"] == 0.5
    assert body["instructions"] == INSTRUCTIONS  # fields not sent are kept
    chat = post(client, "/api/conversations", {"project_id": harbour["id"]}).json()
    assert client.delete(f"/api/projects/{harbour['id']}").status_code == 204
    assert client.get("/api/projects").json()["projects"] == []
    # Its conversations stay, outside any project.
    assert client.get(f"/api/conversations/{chat['id']}").json()["project_id"] is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "bad_name"),
        ({"name": "   "}, "bad_name"),
        ({"name": 5}, "bad_name"),
        ({"name": "x", "temperature": 9}, "bad_temperature"),
        ({"name": "x", "max_tokens": 0}, "bad_max_tokens"),
        ({"name": "x", "instructions": "i" * 20_001}, "bad_instructions"),
        ({"name": "x", "runner": "no-such-runner"}, "unknown_runner"),
        ({"name": "x", "collections": [10**12]}, "not_found"),
        ({"name": "x", "collections": "1"}, "bad_collections"),
    ],
)
def test_bad_projects_are_refused_and_nothing_is_saved(user, body, code):
    response = post(client_of(user), "/api/projects", body)
    assert response.status_code in (400, 404), response.content
    assert response.json()["error"]["code"] == code
    assert not Project.objects.exists()


async def test_a_new_chat_over_the_websocket_inherits_the_project(user, harbour, scripted_server):
    ws = await connect(user)
    frames = await ask(ws, "Where is the treasure?", project_id=harbour["id"])
    await ws.disconnect()
    accepted = of(frames, "accepted")[0]
    conversation = await sync_to_async(Conversation.objects.get)(pk=accepted["conversation_id"])
    assert conversation.project_id == harbour["id"]
    assert await sync_to_async(lambda: conversation.pinned_runner.name)() == "scripted"
    sent = scripted_server.chat_requests()[-1].json
    system = [m["content"] for m in sent["messages"] if m["role"] == "system"]
    assert INSTRUCTIONS in system[0]
    assert sent["temperature"] == 0.3
    assert sent["max_tokens"] == 77


async def test_instructions_are_read_at_every_turn(user, harbour, scripted_server):
    ws = await connect(user)
    first = await ask(ws, "Hello", project_id=harbour["id"])
    conversation_id = of(first, "accepted")[0]["conversation_id"]
    await sync_to_async(Project.objects.filter(pk=harbour["id"]).update)(
        instructions="Answer like a lighthouse keeper."
    )
    await ask(ws, "And now?", request_id="r2", conversation_id=conversation_id)
    await ws.disconnect()
    sent = scripted_server.chat_requests()[-1].json["messages"]
    system = [m for m in sent if m["role"] == "system"]
    assert "lighthouse keeper" in system[0]["content"]
    assert "pirate" not in system[0]["content"]


async def test_the_frames_own_settings_win_over_the_projects(user, harbour, scripted_server):
    ws = await connect(user)
    frames = await ask(
        ws, "Hi", project_id=harbour["id"], runner="auto", params={"temperature": 1.1}
    )
    await ws.disconnect()
    conversation = await sync_to_async(Conversation.objects.get)(
        pk=of(frames, "accepted")[0]["conversation_id"]
    )
    assert conversation.pinned_runner_id is None
    sent = scripted_server.chat_requests()[-1].json
    assert sent["temperature"] == 1.1
    assert sent["max_tokens"] == 77


def test_a_new_chat_through_the_api_inherits_the_project(user, harbour):
    collection = Collection.personal_for(user)
    client = client_of(user)
    patch(client, f"/api/projects/{harbour['id']}", {"rag": True, "collections": [collection.pk]})
    response = post(client, "/api/conversations", {"project_id": harbour["id"]})
    assert response.status_code == 201
    body = response.json()
    assert body["project_id"] == harbour["id"]
    assert body["pinned_runner"] == "scripted"
    assert body["rag"] is True and body["collections"] == [collection.pk]
    assert body["params"] == {"temperature": 0.3, "top_p": None, "max_tokens": 77}
    assert body["messages"] == [] and body["title"] == "New chat"


async def test_someone_elses_project_is_never_reached(user, other_user, harbour):
    theirs = await sync_to_async(Project.objects.create)(owner=other_user, name="Bob's")
    ws = await connect(user)
    frame = {"type": "message", "request_id": "r1", "text": "Hi", "project_id": theirs.pk}
    await ws.send_json_to(frame)
    frames = await frames_until(ws, lambda f: f["type"] in ("error", "done"))
    await ws.disconnect()
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "not_found"
    assert await sync_to_async(Conversation.objects.count)() == 0

    def over_http():
        client = client_of(user)
        assert post(client, "/api/conversations", {"project_id": theirs.pk}).status_code == 404
        assert client.get(f"/api/projects/{theirs.pk}").status_code == 404
        assert patch(client, f"/api/projects/{theirs.pk}", {"name": "mine"}).status_code == 404
        assert client.delete(f"/api/projects/{theirs.pk}").status_code == 404
        mine = Conversation.objects.create(owner=user, title="mine")
        moved = patch(client, f"/api/conversations/{mine.pk}", {"project_id": theirs.pk})
        assert moved.status_code == 404
        assert Conversation.objects.get(pk=mine.pk).project_id is None
        assert [p["id"] for p in client.get("/api/projects").json()["projects"]] == [harbour["id"]]
        assert Project.objects.get(pk=theirs.pk).name == "Bob's"

    await sync_to_async(over_http)()


def test_chats_move_between_projects_and_pin(user, harbour):
    client = client_of(user)
    other = post(client, "/api/projects", {"name": "Other"}).json()
    first = Conversation.objects.create(owner=user, title="first")
    Message.objects.create(conversation=first, role="user", content="hello")
    second = Conversation.objects.create(owner=user, title="second")
    assert (
        patch(client, f"/api/conversations/{first.pk}", {"project_id": harbour["id"]}).json()[
            "project_id"
        ]
        == harbour["id"]
    )
    listed = client.get("/api/conversations", {"project": harbour["id"]}).json()["conversations"]
    assert [c["id"] for c in listed] == [first.pk]
    patch(client, f"/api/conversations/{first.pk}", {"project_id": other["id"]})
    listed = client.get("/api/conversations", {"project": harbour["id"]}).json()["conversations"]
    assert listed == []
    out = patch(client, f"/api/conversations/{first.pk}", {"project_id": None}).json()
    assert out["project_id"] is None
    # Moving keeps the conversation's own settings and its place by date.
    first.refresh_from_db()
    assert first.pinned_runner_id is None
    # Newest first; a pinned one first of all.
    assert [c["id"] for c in client.get("/api/conversations").json()["conversations"]] == [
        second.pk,
        first.pk,
    ]
    pinned = patch(client, f"/api/conversations/{first.pk}", {"pinned": True}).json()
    assert pinned["pinned"] is True
    assert [c["id"] for c in client.get("/api/conversations").json()["conversations"]] == [
        first.pk,
        second.pk,
    ]
    assert client.get("/api/conversations", {"project": "x"}).json()["error"]["code"] == (
        "bad_project"
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"pinned": "yes"}, "bad_pinned"),
        ({"pinned": None}, "bad_pinned"),
        ({"project_id": "1"}, "bad_project_id"),
        ({"project_id": 0}, "bad_project_id"),
        ({"title": None}, "bad_title"),
        ({}, "bad_title"),
    ],
)
def test_bad_conversation_changes_are_refused(user, body, code):
    conversation = Conversation.objects.create(owner=user, title="kept")
    response = patch(client_of(user), f"/api/conversations/{conversation.pk}", body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    conversation.refresh_from_db()
    assert (conversation.title, conversation.pinned, conversation.project_id) == (
        "kept",
        False,
        None,
    )


async def test_the_projects_collections_reach_a_websocket_chat(user, harbour, scripted_server):
    """A new chat started in a project over the websocket searches the
    project's collections (keyword search: no embedding model needed), and
    only those: another readable collection's passage is not used."""
    from rag.models import Chunk, Document

    def documents():
        made = []
        for name, text in (
            ("Charts", "The treasure is buried under the old lighthouse."),
            ("Elsewhere", "The treasure is in the bank vault."),
        ):
            collection = Collection.objects.create(name=name, owner=user, search_mode="keyword")
            document = Document.objects.create(
                collection=collection,
                owner=user,
                title=f"{name}.md",
                sha256=name,
                size=1,
                status="ready",
            )
            Chunk.objects.create(
                document=document,
                collection=collection,
                generation="g",
                chunk_index=0,
                chroma_id=f"{name}:g:0",
                text=text,
            )
            made.append(collection)
        return made

    charts, _elsewhere = await sync_to_async(documents)()
    await sync_to_async(
        lambda: patch(
            client_of(user),
            f"/api/projects/{harbour['id']}",
            {"rag": True, "collections": [charts.pk]},
        )
    )()
    ws = await connect(user)
    frames = await ask(ws, "Where is the treasure buried?", project_id=harbour["id"])
    await ws.disconnect()
    conversation = await sync_to_async(Conversation.objects.get)(
        pk=of(frames, "accepted")[0]["conversation_id"]
    )
    assert conversation.rag_enabled
    assert await sync_to_async(
        lambda: list(conversation.collections.values_list("pk", flat=True))
    )() == [charts.pk]
    sources = of(frames, "sources")[0]["sources"]
    assert [s["title"] for s in sources] == ["Charts.md"]
    sent = scripted_server.chat_requests()[-1].json["messages"]
    asked = " ".join(m["content"] for m in sent if isinstance(m["content"], str))
    assert "old lighthouse" in asked and "bank vault" not in asked
