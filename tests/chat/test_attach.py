"""Attaching to an answer (chat/live.py, docs/websocket.md *Attaching to an
answer*): a second socket, a reloaded page or another device joins an answer
in progress with one `sync` frame and then the live frames, every token
exactly once, checked through the sequence numbers. Driven through the real
routed application with WebsocketCommunicator, answering from the scripted
chat-completions server through the real Llama Stack runner; on the in-memory
channel layer here, on Redis in the scale-out pass (and across two uvicorn
processes in tests/test_scaleout.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from django.utils import timezone

import pytest
from asgiref.sync import sync_to_async

from chat import live, services
from chat.errors import ChatError
from chat.frames import AttachFrame, decode
from chat.limits import MAX_ATTACHED_PER_SOCKET
from chat.models import Conversation, Message
from chat.services import STALE_STREAMING_SECONDS
from tests.chat.test_chat_ws import frames_until, is_end, message, of, text_of
from tests.support.clients import connect
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.scaleout,
    pytest.mark.usefixtures("user", "other_user", "fresh_process_state", "no_detached_answers"),
]

# Pieces of several widths, some beyond the BMP: `seq` counts characters.
PIECES = tuple(f"wörd{i} " if i % 3 else f"🙂{i} " for i in range(240))
ANSWER = "".join(PIECES)


def slow_answer(delay: float = 0.01) -> Reply:
    return Reply(tokens=PIECES, token_delay=delay)


def assert_continuous(frames: list[dict], request_id: str, start_seq: int = 0) -> str:
    """Every token frame of `request_id` continues the one before it (its
    `seq` minus its length is the previous `seq`): nothing lost or doubled.
    Returns their text."""
    seq = start_seq
    for frame in of(frames, "token", request_id):
        assert frame["text"], frame
        assert frame["seq"] - len(frame["text"]) == seq, (seq, frame)
        seq = frame["seq"]
    return text_of(frames, request_id)


async def start_answer(ws, request_id="r1", tokens_first=2) -> tuple[list[dict], dict]:
    """Send a message and read until `tokens_first` token frames arrived."""
    await ws.send_json_to({"type": "message", "request_id": request_id, "text": "talk to me"})
    frames = await frames_until(ws, lambda f: f["type"] == "token")
    for _ in range(tokens_first - 1):
        frames += await frames_until(ws, lambda f: f["type"] == "token")
    return frames, of(frames, "accepted", request_id)[0]


# ---- the frame ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ('{"type": "attach", "request_id": "a"}', "missing_field"),
        (
            '{"type": "attach", "request_id": "a", "message_id": 1, "conversation_id": 2}',
            "bad_field",
        ),
        ('{"type": "attach", "request_id": "a", "message_id": 1, "last_seq": -1}', "bad_field"),
        ('{"type": "attach", "request_id": "a", "message_id": 1, "last_seq": "3"}', "bad_field"),
        ('{"type": "attach", "request_id": "a", "message_id": 0}', "not_found"),
        ('{"type": "attach", "request_id": "a", "message_id": true}', "bad_field"),
        ('{"type": "attach", "message_id": 5}', "missing_field"),
    ],
)
def test_a_malformed_attach_frame_is_refused_with_its_code(raw, code):
    with pytest.raises(ChatError) as refused:
        decode(raw)
    assert refused.value.code == code, refused.value.message


def test_an_attach_frame_names_one_answer_and_the_last_seq_seen():
    frame = decode('{"type": "attach", "request_id": "a", "conversation_id": 7, "last_seq": 12}')
    assert isinstance(frame, AttachFrame)
    assert (frame.conversation_id, frame.message_id, frame.last_seq) == (7, None, 12)
    assert decode('{"type": "attach", "request_id": "a", "message_id": 9}').last_seq == 0


async def attached_mid_answer(user):
    """An answer started on one socket of `user` (`r1`, two tokens in) and a
    second socket of the same user (another tab or device) attached to it as
    `a1`: (owner, the owner's frames so far, its `accepted`, second)."""
    owner = await connect(user)
    frames, accepted = await start_answer(owner)
    second = await connect(user)
    await second.send_json_to(
        {"type": "attach", "request_id": "a1", "message_id": accepted["assistant_message_id"]}
    )
    return owner, frames, accepted, second


# ---- live ---------------------------------------------------------------------------------


async def test_a_second_socket_attaches_mid_answer_and_gets_every_token_once(
    user, scripted_runner, scripted_server
):
    scripted_server.script(slow_answer())
    owner, frames, accepted, second = await attached_mid_answer(user)
    followed = await frames_until(second, is_end("a1"), timeout=30)
    frames += await frames_until(owner, is_end("r1"), timeout=30)
    await owner.disconnect()
    await second.disconnect()

    # The owner's own frames are numbered too.
    assert assert_continuous(frames, "r1") == ANSWER
    sync = followed[0]
    assert sync["type"] == "sync" and sync["request_id"] == "a1", followed[:2]
    assert sync["message_id"] == accepted["assistant_message_id"]
    assert sync["conversation_id"] == accepted["conversation_id"]
    assert sync["live"] is True and sync["status"] == "streaming" and sync["since"] == 0
    assert 0 < sync["seq"] == len(sync["text"]) < len(ANSWER), "joined mid-answer"
    assert sync["runner"] == "scripted"
    assert of(followed, "sync") == [sync]
    rest = assert_continuous(followed, "a1", start_seq=sync["seq"])
    assert sync["text"] + rest == ANSWER
    done = of(followed, "done", "a1")
    assert len(done) == 1 and done[0]["status"] == "complete"
    assert done[0]["message_id"] == accepted["assistant_message_id"]
    assert (await message(accepted["assistant_message_id"])).content == ANSWER


async def test_a_reloaded_page_attaches_by_conversation_and_continues_from_its_last_seq(
    user, scripted_runner, scripted_server
):
    scripted_server.script(slow_answer())
    page = await connect(user)
    frames, accepted = await start_answer(page, tokens_first=3)
    await page.disconnect()  # the reload: the answer goes on, detached
    seen = assert_continuous(frames, "r1")
    last_seq = of(frames, "token")[-1]["seq"]

    reloaded = await connect(user)
    await reloaded.send_json_to(
        {
            "type": "attach",
            "request_id": "again",
            "conversation_id": accepted["conversation_id"],
            "last_seq": last_seq,
        }
    )
    followed = await frames_until(reloaded, is_end("again"), timeout=30)
    await reloaded.disconnect()
    sync = followed[0]
    assert sync["type"] == "sync" and sync["since"] == last_seq
    assert sync["message_id"] == accepted["assistant_message_id"]
    # Only what the page had not seen, then the live rest, each character once.
    rest = assert_continuous(followed, "again", start_seq=sync["seq"])
    assert seen + sync["text"] + rest == ANSWER
    assert of(followed, "done")[0]["status"] == "complete"


async def test_a_frame_lost_on_the_way_is_recovered_from_a_new_snapshot(
    user, scripted_runner, scripted_server, monkeypatch
):
    # A channel layer drops messages to a full channel; the attacher notices
    # the gap in `seq` and catches up through a new `sync` (since: its seq).
    publish = live.LiveAnswer._publish
    tokens_published = 0

    async def lossy(self, frame):
        nonlocal tokens_published
        if frame["type"] == "token":
            tokens_published += 1
            if tokens_published == 3:
                return
        await publish(self, frame)

    monkeypatch.setattr(live.LiveAnswer, "_publish", lossy)
    scripted_server.script(slow_answer(0.02))
    owner, _, _, second = await attached_mid_answer(user)
    followed = await frames_until(second, is_end("a1"), timeout=40)
    await frames_until(owner, is_end("r1"), timeout=40)
    await owner.disconnect()
    await second.disconnect()
    assert tokens_published > 3
    syncs = of(followed, "sync")
    assert len(syncs) == 2, [f["type"] for f in followed]
    assert syncs[1]["since"] > 0 and syncs[1]["since"] + len(syncs[1]["text"]) == syncs[1]["seq"]
    text, seq = "", 0
    for frame in followed:
        if frame["type"] == "sync":
            assert frame["since"] == seq
            text, seq = text + frame["text"], frame["seq"]
        elif frame["type"] == "token":
            assert frame["seq"] - len(frame["text"]) == seq
            text, seq = text + frame["text"], frame["seq"]
    assert text == ANSWER


async def test_stop_from_an_attached_socket_stops_the_answer(
    user, scripted_runner, scripted_server
):
    scripted_server.script(slow_answer(0.05))
    owner, _, accepted, second = await attached_mid_answer(user)
    await frames_until(second, lambda f: f["type"] == "sync")
    await second.send_json_to({"type": "stop", "request_id": "a1"})
    followed = await frames_until(second, is_end("a1"), timeout=30)
    frames = await frames_until(owner, is_end("r1"), timeout=30)
    await owner.disconnect()
    await second.disconnect()
    assert of(followed, "done")[0]["status"] == "stopped"
    assert of(frames, "done")[0]["status"] == "stopped"
    saved = await message(accepted["assistant_message_id"])
    assert saved.status == "stopped" and 0 < len(saved.content) < len(ANSWER)


# ---- ended, missing, not yours ---------------------------------------------------------------


async def test_an_attach_after_the_end_gets_the_final_text_and_done(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(tokens=PIECES[:20]))
    ws = await connect(user)
    await ws.send_json_to({"type": "message", "request_id": "r1", "text": "short"})
    frames = await frames_until(ws, is_end("r1"))
    answer_done = of(frames, "done")[0]
    for attach in (
        {"message_id": answer_done["message_id"]},
        {"conversation_id": answer_done["conversation_id"]},
    ):
        await ws.send_json_to({"type": "attach", "request_id": "late", **attach})
        sync, done = await frames_until(ws, is_end("late"))
        assert sync["type"] == "sync" and sync["text"] == "".join(PIECES[:20])
        assert (sync["live"], sync["status"], sync["since"]) == (False, "complete", 0)
        assert sync["seq"] == len(sync["text"])
        assert done == {**answer_done, "request_id": "late"}
    await ws.disconnect()


async def test_another_users_answer_cannot_be_attached_to(user, other_user):
    conversation = await sync_to_async(Conversation.objects.create)(owner=user, title="mine")
    answer = await sync_to_async(Message.objects.create)(
        conversation=conversation, role="assistant", content="secret", status="streaming"
    )
    question = await sync_to_async(Message.objects.create)(
        conversation=conversation, role="user", content="question"
    )
    intruder = await connect(other_user)
    answers = []
    for attach in (
        {"message_id": answer.pk},
        {"conversation_id": conversation.pk},
        {"message_id": question.pk},  # not an answer, even for its owner
        {"message_id": 10**15},  # missing: the same refusal
    ):
        await intruder.send_json_to({"type": "attach", "request_id": "peek", **attach})
        answers.append(await intruder.receive_json_from(timeout=10))
    await intruder.send_json_to({"type": "ping", "request_id": "still"})
    assert (await intruder.receive_json_from(timeout=10))["type"] == "pong"
    await intruder.disconnect()
    for frame in answers:
        assert (frame["type"], frame["code"], frame["request_id"]) == ("error", "not_found", "peek")
        assert "secret" not in frame["message"]
    assert answers[0]["message"] == answers[3]["message"].replace(str(10**15), str(answer.pk))


async def test_an_answer_no_process_is_generating_shows_its_saved_text_until_settled(
    user, monkeypatch
):
    # Its server died mid-answer: no hub answers; the saved text is sent (not
    # live), and once the answer is stale it is settled and `done` follows.
    monkeypatch.setattr(live, "SNAPSHOT_TIMEOUT_SECONDS", 0.2)
    conversation = await sync_to_async(Conversation.objects.create)(owner=user, title="crash")
    answer = await sync_to_async(Message.objects.create)(
        conversation=conversation, role="assistant", content="saved so far", status="streaming"
    )
    ws = await connect(user)
    await ws.send_json_to({"type": "attach", "request_id": "a", "message_id": answer.pk})
    sync = await ws.receive_json_from(timeout=10)
    assert (sync["type"], sync["text"], sync["live"], sync["status"]) == (
        "sync",
        "saved so far",
        False,
        "streaming",
    )
    assert await ws.receive_nothing(timeout=0.5)  # the same text is not sent again
    stale = timezone.now() - timedelta(seconds=STALE_STREAMING_SECONDS + 1)
    await sync_to_async(Message.objects.filter(pk=answer.pk).update)(updated_at=stale)
    settled = await ws.receive_json_from(timeout=10)
    done = await ws.receive_json_from(timeout=10)
    await ws.disconnect()
    # Nothing new to add to the text the client has, and how it ended.
    assert (settled["type"], settled["status"], settled["since"], settled["text"]) == (
        "sync",
        "stopped",
        len("saved so far"),
        "",
    )
    assert (done["type"], done["status"], done["request_id"]) == ("done", "stopped", "a")


async def test_a_socket_follows_a_bounded_number_of_answers(user, monkeypatch):
    monkeypatch.setattr(live, "SNAPSHOT_TIMEOUT_SECONDS", 60)
    conversation = await sync_to_async(Conversation.objects.create)(owner=user, title="many")
    answer = await sync_to_async(Message.objects.create)(
        conversation=conversation, role="assistant", status="streaming"
    )
    ws = await connect(user)
    for i in range(MAX_ATTACHED_PER_SOCKET):
        await ws.send_json_to({"type": "attach", "request_id": f"a{i}", "message_id": answer.pk})
    await ws.send_json_to({"type": "attach", "request_id": "a0", "message_id": answer.pk})
    duplicate = await ws.receive_json_from(timeout=10)
    await ws.send_json_to({"type": "attach", "request_id": "more", "message_id": answer.pk})
    refused = await ws.receive_json_from(timeout=10)
    await ws.disconnect()
    assert (duplicate["code"], duplicate["request_id"]) == ("duplicate_request_id", "a0")
    assert (refused["code"], refused["retryable"]) == ("rate_limited", True)
    assert refused["retry_after_s"] == services.SLOT_RETRY_AFTER_SECONDS


async def test_without_an_attacher_the_answer_publishes_nothing_per_token(
    user, scripted_runner, scripted_server, monkeypatch
):
    published: list[str] = []
    publish = live.LiveAnswer._publish

    async def counted(self, frame):
        published.append(frame["type"])
        await publish(self, frame)

    monkeypatch.setattr(live.LiveAnswer, "_publish", counted)
    scripted_server.script(Reply(tokens=PIECES[:50]))
    ws = await connect(user)
    started = time.monotonic()
    await ws.send_json_to({"type": "message", "request_id": "r1", "text": "alone"})
    frames = await frames_until(ws, is_end("r1"))
    await ws.disconnect()
    assert assert_continuous(frames, "r1") == "".join(PIECES[:50])
    assert time.monotonic() - started < 30
    # Only the final `done`, for a socket that might be attaching right then.
    assert published == ["done"]
    await asyncio.sleep(0)
