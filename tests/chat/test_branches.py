"""Branches: a conversation is a tree of messages. Regenerating and editing
add branches and never delete; the page and the model see the active branch;
the API exposes the tree, switches branches and forks from any message."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async

from chat.models import Conversation, Message
from tests.chat.test_chat_ws import ask, frames_until, is_end, of
from tests.support.clients import client_of, connect
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.scaleout,
    pytest.mark.usefixtures("fresh_process_state", "no_detached_answers"),
]


def send(client, method, path, body):
    return getattr(client, method)(path, json.dumps(body), content_type="application/json")


async def regenerate(ws, cid, request_id):
    await ws.send_json_to({"type": "regenerate", "request_id": request_id, "conversation_id": cid})
    return await frames_until(ws, is_end(request_id))


async def edit(ws, cid, message_id, text, request_id):
    frame = {"type": "edit", "request_id": request_id, "conversation_id": cid}
    await ws.send_json_to(frame | {"message_id": message_id, "text": text})
    return await frames_until(ws, is_end(request_id))


def shown(client, cid) -> list[tuple[str, str, int]]:
    """The active branch as the page gets it: (role, text, number of siblings)."""
    body = client.get(f"/api/conversations/{cid}").json()
    return [(m["role"], m["content"], len(m["siblings"])) for m in body["messages"]]


async def test_regenerating_keeps_every_answer_and_the_arrows_move_between_them(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="One."), Reply(text="Two."), Reply(text="Three."))
    ws = await connect(user)
    first = of(await ask(ws, "Count"), "accepted")[0]
    cid = first["conversation_id"]
    await regenerate(ws, cid, "r2")
    third = of(await regenerate(ws, cid, "r3"), "accepted")[0]
    await ws.disconnect()

    def check():
        client = client_of(user)
        assert shown(client, cid) == [("user", "Count", 1), ("assistant", "Three.", 3)]
        body = client.get(f"/api/conversations/{cid}").json()
        siblings = body["messages"][1]["siblings"]
        assert siblings[-1] == third["assistant_message_id"]
        assert [n["role"] for n in body["tree"]] == ["user", "assistant", "assistant", "assistant"]
        # "1 / 3": the first answer, then back to the last.
        assert send(
            client, "patch", f"/api/conversations/{cid}", {"active_message_id": siblings[0]}
        )
        assert shown(client, cid)[1] == ("assistant", "One.", 3)
        send(client, "patch", f"/api/conversations/{cid}", {"active_message_id": siblings[2]})
        assert shown(client, cid)[1] == ("assistant", "Three.", 3)
        assert Message.objects.filter(conversation_id=cid).count() == 4

    await sync_to_async(check)()


async def test_the_model_reads_the_active_branch_only(user, scripted_runner, scripted_server):
    scripted_server.script(Reply(text="A1"), Reply(text="A2"), Reply(text="B1"), Reply(text="B2"))
    ws = await connect(user)
    first = of(await ask(ws, "Q1"), "accepted")[0]
    cid = first["conversation_id"]
    await ask(ws, "Q2", request_id="r2", conversation_id=cid)
    # An edit of Q1 starts a branch beside it; its follow-up sees only that branch.
    await edit(ws, cid, first["user_message_id"], "Q1 edited", "r3")
    await ask(ws, "Q3", request_id="r4", conversation_id=cid)
    await ws.disconnect()
    sent = scripted_server.chat_requests()[-1].json["messages"]
    assert [(m["role"], m["content"]) for m in sent if m["role"] != "system"] == [
        ("user", "Q1 edited"),
        ("assistant", "B1"),
        ("user", "Q3"),
    ]

    def check():
        client = client_of(user)
        assert shown(client, cid) == [
            ("user", "Q1 edited", 2),
            ("assistant", "B1", 1),
            ("user", "Q3", 1),
            ("assistant", "B2", 1),
        ]
        # Back to the first version of Q1: its whole branch is still there.
        send(
            client,
            "patch",
            f"/api/conversations/{cid}",
            {"active_message_id": first["user_message_id"]},
        )
        assert [text for _, text, _ in shown(client, cid)] == ["Q1", "A1", "Q2", "A2"]

    await sync_to_async(check)()
    # And the next message continues the branch shown.
    scripted_server.script(Reply(text="A3"))
    ws = await connect(user)
    await ask(ws, "Q2 follow-up", request_id="r5", conversation_id=cid)
    await ws.disconnect()
    sent = scripted_server.chat_requests()[-1].json["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["Q1", "Q2", "Q2 follow-up"]


def test_fork_copies_the_branch_up_to_a_message(user, other_user):
    conversation = Conversation.objects.create(owner=user, title="Original")
    q1 = Message.objects.create(conversation=conversation, role="user", content="Q1")
    a1 = Message.objects.create(conversation=conversation, role="assistant", content="A1")
    Message.objects.create(conversation=conversation, role="user", content="Q2")
    client = client_of(user)
    response = send(
        client, "post", f"/api/conversations/{conversation.pk}/fork", {"message_id": a1.pk}
    )
    assert response.status_code == 201
    fork = response.json()
    assert fork["id"] != conversation.pk and fork["title"] == "Original"
    assert [(m["role"], m["content"]) for m in fork["messages"]] == [
        ("user", "Q1"),
        ("assistant", "A1"),
    ]
    assert fork["messages"][1]["parent_id"] == fork["messages"][0]["id"] != q1.pk
    # The original is untouched; another user can fork nothing of it.
    assert Message.objects.filter(conversation=conversation).count() == 3
    other = client_of(other_user)
    theirs = send(
        other, "post", f"/api/conversations/{conversation.pk}/fork", {"message_id": a1.pk}
    )
    assert theirs.status_code == 404
    foreign = Conversation.objects.create(owner=other_user, title="Bob's")
    bobs = Message.objects.create(conversation=foreign, role="user", content="Bob's secret")
    mixed = send(
        client, "post", f"/api/conversations/{conversation.pk}/fork", {"message_id": bobs.pk}
    )
    assert mixed.status_code == 404
    switched = send(
        client, "patch", f"/api/conversations/{conversation.pk}", {"active_message_id": bobs.pk}
    )
    assert switched.status_code == 404
    assert Conversation.objects.filter(owner=user).count() == 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "bad_message_id"),
        ({"message_id": "1"}, "bad_message_id"),
        ({"message_id": 0}, "bad_message_id"),
    ],
)
def test_bad_forks_are_refused(user, body, code):
    conversation = Conversation.objects.create(owner=user, title="x")
    response = send(client_of(user), "post", f"/api/conversations/{conversation.pk}/fork", body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert Conversation.objects.count() == 1
