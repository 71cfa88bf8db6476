"""The chat websocket, driven through the real routed application
(`breezeweb.asgi.application`) with WebsocketCommunicator, answering from the
scripted chat-completions server on 127.0.0.1 through the real Llama Stack runner."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import time

from django.test import override_settings

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from PIL import Image

from accounts.models import ApiKey
from breezeweb.asgi import application
from chat import services
from chat.consumers import finish_detached
from chat.models import Conversation, Message
from tests.support.clients import WS_PATH, connect, session_headers
from tests.support.fixtures import runner_config
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.scaleout,
    pytest.mark.usefixtures("user", "other_user", "fresh_process_state", "no_detached_answers"),
]


# ---- helpers -----------------------------------------------------------------------


async def frames_until(ws, predicate, timeout: float = 10.0) -> list[dict]:
    """Every frame received until one matches `predicate` (included)."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; got {frames}"
        frame = json.loads(await ws.receive_from(timeout=remaining))
        frames.append(frame)
        if predicate(frame):
            return frames


def is_end(request_id: str):
    return lambda f: f.get("request_id") == request_id and f["type"] == "done"


def of(frames, kind, request_id=None) -> list[dict]:
    return [
        f
        for f in frames
        if f["type"] == kind and (request_id is None or f.get("request_id") == request_id)
    ]


def text_of(frames, request_id) -> str:
    return "".join(f["text"] for f in of(frames, "token", request_id))


@sync_to_async
def message(pk) -> Message:
    return Message.objects.get(pk=pk)


@sync_to_async
def messages_of(conversation_id) -> list[Message]:
    return list(Message.objects.filter(conversation_id=conversation_id).order_by("id"))


async def send_message(ws, text, request_id="r1", conversation_id=None, **extra) -> None:
    """Send a `message` frame (its other fields in `extra`)."""
    await ws.send_json_to(
        {
            "type": "message",
            "request_id": request_id,
            "conversation_id": conversation_id,
            "text": text,
            **extra,
        }
    )


async def ask(ws, text, request_id="r1", conversation_id=None, **extra) -> list[dict]:
    """Send a `message` frame and read the frames up to the end of its answer."""
    await send_message(ws, text, request_id, conversation_id, **extra)
    return await frames_until(ws, is_end(request_id))


async def leave_mid_answer(user, text: str, tokens: int = 1) -> list[dict]:
    """Ask `text` (request r1) and close the socket once `tokens` token frames
    arrived, as a reload does: the frames received."""
    ws = await connect(user)
    await ws.send_json_to({"type": "message", "request_id": "r1", "text": text})
    frames = []
    for _ in range(tokens):
        frames += await frames_until(ws, lambda f: f["type"] == "token")
    await ws.disconnect()
    return frames


def png_data_url(size=(8, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---- auth ----------------------------------------------------------------------------


async def refused_with(headers) -> int:
    """The close code of a refused handshake: accepted, then closed at once
    (what browsers can observe, unlike an HTTP 403), with nothing else sent."""
    ws = WebsocketCommunicator(application, WS_PATH, headers=headers)
    connected, _ = await ws.connect(timeout=5)
    assert connected, "a refusal completes the handshake so the client sees its close code"
    output = await ws.receive_output(timeout=5)
    assert output["type"] == "websocket.close", output
    await ws.wait()
    return output["code"]


async def test_an_unauthenticated_handshake_is_closed_with_4401():
    assert await refused_with([(b"origin", b"http://localhost"), (b"host", b"localhost")]) == 4401


async def test_a_wrong_api_key_is_closed_with_4401():
    assert await refused_with([(b"authorization", b"Bearer bw_not-a-real-key")]) == 4401


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://localhost:9999",  # another port
        "https://localhost",  # another scheme
        "http://localhost.evil.example",
        "null",
        "",
    ],
)
async def test_a_session_from_another_origin_is_closed_with_4403(user, origin):
    headers = await sync_to_async(session_headers)(user)
    headers = [(k, v) for k, v in headers if k != b"origin"]
    if origin:
        headers.append((b"origin", origin.encode()))
    assert await refused_with(headers) == 4403


async def test_the_origin_is_compared_with_the_sites_own_scheme_host_and_port(user):
    headers = await sync_to_async(session_headers)(user)
    on_port = [(k, v) for k, v in headers if k not in (b"origin", b"host")]
    # The site served on port 8000: exactly that origin is its own.
    ws = await connect(
        headers=[*on_port, (b"host", b"localhost:8000"), (b"origin", b"http://localhost:8000")]
    )
    await ws.disconnect()
    assert (
        await refused_with(
            [*on_port, (b"host", b"localhost:8000"), (b"origin", b"http://localhost")]
        )
        == 4403
    )
    # A Host outside ALLOWED_HOSTS is no origin of ours, even when Origin matches it.
    assert (
        await refused_with(
            [*on_port, (b"host", b"evil.example"), (b"origin", b"http://evil.example")]
        )
        == 4403
    )


async def test_csrf_trusted_origins_are_accepted_exactly(user, settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://chat.example.com", "https://*.example.org"]
    headers = [(k, v) for k, v in await sync_to_async(session_headers)(user) if k != b"origin"]
    for good in ("https://chat.example.com", "https://a.example.org"):
        ws = await connect(headers=[*headers, (b"origin", good.encode())])
        await ws.disconnect()
    for bad in ("http://chat.example.com", "https://chat.example.com:8443", "https://example.net"):
        assert await refused_with([*headers, (b"origin", bad.encode())]) == 4403


async def test_behind_a_tls_proxy_the_https_origin_is_the_sites_own(user, settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    headers = [(k, v) for k, v in await sync_to_async(session_headers)(user) if k != b"origin"]
    proxied = [*headers, (b"x-forwarded-proto", b"https")]
    ws = await connect(headers=[*proxied, (b"origin", b"https://localhost")])
    await ws.disconnect()
    assert await refused_with([*proxied, (b"origin", b"http://localhost")]) == 4403


async def test_an_api_key_client_chats_and_its_turns_are_saved(
    user, scripted_runner, scripted_server
):
    _, raw = await sync_to_async(ApiKey.issue)(user, "script")
    ws = await connect(headers=[(b"authorization", f"Bearer {raw}".encode())])
    scripted_server.script(Reply(text="Hello from the key client."))
    frames = await ask(ws, "Hi there")
    await ws.disconnect()
    accepted = of(frames, "accepted")[0]
    assert text_of(frames, "r1") == "Hello from the key client."
    conversation = await sync_to_async(Conversation.objects.get)(pk=accepted["conversation_id"])
    assert conversation.owner_id == user.pk
    assert conversation.title == "Hi there"
    saved = await message(accepted["assistant_message_id"])
    assert (saved.status, saved.content) == ("complete", "Hello from the key client.")


# ---- the frames of one answer ---------------------------------------------------------


async def test_a_message_streams_accepted_routed_tokens_and_done_in_order(
    user, scripted_runner, scripted_server
):
    ws = await connect(user)
    scripted_server.script(Reply(text="One two three four.", token_delay=0.01, usage=(12, 4)))
    frames = await ask(ws, "Count to four")
    await ws.disconnect()
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "accepted"
    assert kinds[1] == "routed"
    assert kinds[-1] == "done"
    assert set(kinds[2:-1]) == {"token"}
    assert all(f["request_id"] == "r1" for f in frames)
    routed = frames[1]
    assert (routed["runner"], routed["model"], routed["fallback"]) == (
        "scripted",
        "scripted-model",
        False,
    )
    done = frames[-1]
    assert done["status"] == "complete"
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 12, "completion_tokens": 4}
    assert done["timings"]["time_to_first_token_ms"] > 0
    assert text_of(frames, "r1") == "One two three four."
    saved = await message(done["message_id"])
    assert saved.content == "One two three four."
    assert (saved.runner_name, saved.model_id, saved.completion_tokens) == (
        "scripted",
        "scripted-model",
        4,
    )
    assert saved.time_to_first_token_ms is not None and saved.total_ms is not None


async def test_the_history_of_the_conversation_reaches_the_runner(
    user, scripted_runner, scripted_server
):
    ws = await connect(user)
    scripted_server.script(Reply(text="Nice to meet you, Ada."), Reply(text="You are Ada."))
    first = await ask(ws, "My name is Ada.")
    conversation_id = of(first, "accepted")[0]["conversation_id"]
    await ask(ws, "What is my name?", request_id="r2", conversation_id=conversation_id)
    await ws.disconnect()
    sent = scripted_server.chat_requests()[-1].json["messages"]
    contents = [(m["role"], m["content"]) for m in sent if m["role"] != "system"]
    assert contents == [
        ("user", "My name is Ada."),
        ("assistant", "Nice to meet you, Ada."),
        ("user", "What is my name?"),
    ]


async def test_every_sampling_parameter_in_params_reaches_the_runner(
    user, scripted_runner, scripted_server
):
    ws = await connect(user)
    scripted_server.script(Reply(text="Seeded."))
    params = {
        "temperature": 0.3,
        "top_p": 0.95,
        "top_k": 8,
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.6,
        "seed": 1234,
        "logit_bias": {"13": -100},
        "max_tokens": 33,
    }
    frames = await ask(ws, "Hello", params=params)
    await ws.disconnect()
    assert of(frames, "done")
    sent = scripted_server.chat_requests()[-1].json
    assert {name: sent[name] for name in params} == params


async def test_a_notice_frame_says_old_turns_were_trimmed(user, scripted_server):
    await sync_to_async(runner_config)(
        scripted_server.url, "tiny", context_tokens=256, max_tokens=64
    )
    ws = await connect(user)
    long_text = "word " * 150  # ~190 tokens: fits alone, not with the next turn
    first = await ask(ws, long_text)
    conversation_id = of(first, "accepted")[0]["conversation_id"]
    frames = await ask(ws, "and now?", request_id="r2", conversation_id=conversation_id)
    await ws.disconnect()
    notices = of(frames, "notice", "r2")
    assert notices and notices[0]["code"] == "trimmed"
    assert notices[0]["data"]["dropped"] >= 1


async def test_sources_frame_and_rag_flag_reach_the_pipeline(
    user, scripted_runner, scripted_server
):
    ws = await connect(user)
    scripted_server.script(Reply(text="No documents, I see."))
    frames = await ask(ws, "What do my documents say?", rag=True)
    await ws.disconnect()
    sources = of(frames, "sources")
    assert len(sources) == 1 and sources[0]["sources"] == []
    assert [f["type"] for f in frames].index("sources") < [f["type"] for f in frames].index("token")
    conversation = await sync_to_async(Conversation.objects.get)(
        pk=of(frames, "accepted")[0]["conversation_id"]
    )
    assert conversation.rag_enabled


async def test_a_tool_call_frame_carries_the_call(user, scripted_server):
    from tests.support.scripted_server import ScriptedToolCall

    await sync_to_async(runner_config)(scripted_server.url, "agentic", enable_agents=True)
    # The websocket offers no tools; a model that calls one anyway is still reported.
    scripted_server.script(
        Reply(text="", tool_calls=(ScriptedToolCall("lookup", '{"q": "x"}', "call_1"),))
    )
    ws = await connect(user)
    frames = await ask(ws, "look it up")
    await ws.disconnect()
    calls = of(frames, "tool_call")
    assert calls == [
        {
            "type": "tool_call",
            "request_id": "r1",
            "id": "call_1",
            "name": "lookup",
            "arguments": '{"q": "x"}',
        }
    ]


async def test_ping_gets_pong(user):
    ws = await connect(user)
    await ws.send_json_to({"type": "ping", "request_id": "p1"})
    assert await ws.receive_json_from(timeout=5) == {"type": "pong", "request_id": "p1"}
    await ws.disconnect()


async def test_document_status_messages_of_the_users_group_are_forwarded(user, other_user):
    ws = await connect(user)
    other = await connect(other_user)
    layer = get_channel_layer()
    # The message rag.events publishes: {"type": "document.status", "document": {...}}.
    document = {
        "id": 7,
        "title": "notes.txt",
        "status": "ready",
        "progress": 1.0,
        "error": "",
        "chunk_count": 3,
        "collection_id": 1,
    }
    await layer.group_send(
        f"documents.user.{user.pk}", {"type": "document.status", "document": document}
    )
    frame = await ws.receive_json_from(timeout=5)
    assert frame == {"type": "document_status", "request_id": None, "document": document}
    assert await other.receive_nothing(timeout=0.3)
    await ws.disconnect()
    await other.disconnect()


# ---- regenerate and edit ----------------------------------------------------------------


async def test_regenerate_answers_again_and_keeps_the_earlier_answer(
    user, scripted_runner, scripted_server
):
    ws = await connect(user)
    scripted_server.script(Reply(text="First answer."), Reply(text="Second answer."))
    first = await ask(ws, "Tell me something")
    accepted = of(first, "accepted")[0]
    await ws.send_json_to(
        {"type": "regenerate", "request_id": "r2", "conversation_id": accepted["conversation_id"]}
    )
    frames = await frames_until(ws, is_end("r2"))
    await ws.disconnect()
    again = of(frames, "accepted")[0]
    assert again["user_message_id"] == accepted["user_message_id"]
    assert again["assistant_message_id"] != accepted["assistant_message_id"]
    rows = await messages_of(accepted["conversation_id"])
    # Both answers stay, as two branches after the same question (docs/conversations.md).
    assert [(m.role, m.content, m.parent_id) for m in rows] == [
        ("user", "Tell me something", None),
        ("assistant", "First answer.", accepted["user_message_id"]),
        ("assistant", "Second answer.", accepted["user_message_id"]),
    ]


async def test_edit_and_resend_answers_the_new_text_on_a_new_branch(
    user, scripted_runner, scripted_server
):
    ws = await connect(user)
    scripted_server.script(Reply(text="A1"), Reply(text="A2"), Reply(text="A1 again"))
    first = await ask(ws, "Q1")
    cid = of(first, "accepted")[0]["conversation_id"]
    q1 = of(first, "accepted")[0]["user_message_id"]
    await ask(ws, "Q2", request_id="r2", conversation_id=cid)
    await ws.send_json_to(
        {
            "type": "edit",
            "request_id": "r3",
            "conversation_id": cid,
            "message_id": q1,
            "text": "Q1b",
        }
    )
    edited = of(await frames_until(ws, is_end("r3")), "accepted")[0]
    await ws.disconnect()
    rows = await messages_of(cid)
    # The original Q1 and all that followed are kept; Q1b starts a branch beside it.
    assert [(m.role, m.content) for m in rows] == [
        ("user", "Q1"),
        ("assistant", "A1"),
        ("user", "Q2"),
        ("assistant", "A2"),
        ("user", "Q1b"),
        ("assistant", "A1 again"),
    ]
    assert edited["user_message_id"] == rows[4].pk and rows[4].parent_id is None
    sent = scripted_server.chat_requests()[-1].json["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["Q1b"]


async def test_editing_an_assistant_message_is_refused(user, scripted_runner, scripted_server):
    ws = await connect(user)
    first = await ask(ws, "Q1")
    accepted = of(first, "accepted")[0]
    await ws.send_json_to(
        {
            "type": "edit",
            "request_id": "r2",
            "conversation_id": accepted["conversation_id"],
            "message_id": accepted["assistant_message_id"],
            "text": "hijack",
        }
    )
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (frame["type"], frame["code"]) == ("error", "not_editable")
    rows = await messages_of(accepted["conversation_id"])
    assert len(rows) == 2 and rows[1].content == "Hello from the scripted server."


# ---- isolation ---------------------------------------------------------------------------


async def test_a_user_cannot_reach_another_users_conversation(
    user, other_user, scripted_runner, scripted_server
):
    alice = await connect(user)
    frames = await ask(alice, "Alice's secret plan")
    accepted = of(frames, "accepted")[0]
    await alice.disconnect()

    bob = await connect(other_user)
    cid = accepted["conversation_id"]
    attempts = [
        {"type": "message", "request_id": "b1", "conversation_id": cid, "text": "let me in"},
        {"type": "regenerate", "request_id": "b2", "conversation_id": cid},
        {
            "type": "edit",
            "request_id": "b3",
            "conversation_id": cid,
            "message_id": accepted["user_message_id"],
            "text": "mine now",
        },
    ]
    for attempt in attempts:
        await bob.send_json_to(attempt)
        frame = await bob.receive_json_from(timeout=5)
        assert (frame["type"], frame["code"], frame["request_id"]) == (
            "error",
            "not_found",
            attempt["request_id"],
        )
    await bob.disconnect()
    rows = await messages_of(cid)
    assert [m.content for m in rows] == ["Alice's secret plan", "Hello from the scripted server."]
    assert len(scripted_server.chat_requests()) == 1


async def test_two_requests_on_one_socket_are_kept_apart(user, scripted_runner, scripted_server):
    scripted_server.script(
        Reply(text="alpha " * 20, token_delay=0.005), Reply(text="beta " * 20, token_delay=0.005)
    )
    ws = await connect(user)
    for rid, text in (("a", "first"), ("b", "second")):
        await ws.send_json_to({"type": "message", "request_id": rid, "text": text})
    frames = await frames_until(ws, is_end("a"), timeout=15)
    if not of(frames, "done", "b"):
        frames += await frames_until(ws, is_end("b"), timeout=15)
    await ws.disconnect()
    texts = {text_of(frames, "a"), text_of(frames, "b")}
    assert texts == {"alpha " * 20, "beta " * 20}


# ---- stop, disconnect and failures: partial answers are kept -------------------------------


async def test_stop_cancels_one_answer_and_saves_it_as_stopped(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="tick " * 400, token_delay=0.02))
    ws = await connect(user)
    await ws.send_json_to({"type": "message", "request_id": "r1", "text": "go on and on"})
    frames = await frames_until(ws, lambda f: f["type"] == "token" and len(f["text"]) > 0)
    frames += await frames_until(ws, lambda f: f["type"] == "token")
    await ws.send_json_to({"type": "stop", "request_id": "r1"})
    frames += await frames_until(ws, is_end("r1"))
    done = frames[-1]
    assert done["status"] == "stopped"
    assert done["finish_reason"] == "cancelled"
    shown = text_of(frames, "r1")
    assert shown.startswith("tick ") and len(shown) < len("tick " * 400)
    saved = await message(done["message_id"])
    assert saved.status == "stopped"
    assert saved.content == shown
    # The socket stays usable and the upstream stream was abandoned.
    await ws.send_json_to({"type": "ping", "request_id": "p"})
    assert (await ws.receive_json_from(timeout=5))["type"] == "pong"
    await ws.disconnect()
    recorded = scripted_server.chat_requests()[0]
    assert await asyncio.to_thread(recorded.finished.wait, 5)
    assert recorded.disconnected


async def test_stop_for_an_unknown_request_says_so(user):
    ws = await connect(user)
    await ws.send_json_to({"type": "stop", "request_id": "nope"})
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (frame["type"], frame["code"], frame["request_id"]) == ("error", "not_running", "nope")


async def test_closing_the_socket_mid_stream_lets_the_answer_finish_and_be_saved(
    user, scripted_runner, scripted_server
):
    # A reload or a proxy dropping the socket must not cut the answer short.
    scripted_server.script(Reply(text="steady " * 60, token_delay=0.01))
    frames = await leave_mid_answer(user, "keep going")
    assistant_id = of(frames, "accepted")[0]["assistant_message_id"]
    assert (await message(assistant_id)).status == "streaming"
    await finish_detached(wait_seconds=20)
    saved = await message(assistant_id)
    assert saved.status == "complete"
    assert saved.content == "steady " * 60
    assert saved.runner_name == "scripted"
    recorded = scripted_server.chat_requests()[0]
    assert await asyncio.to_thread(recorded.finished.wait, 5)
    assert not recorded.disconnected


async def test_a_new_socket_can_start_a_turn_while_a_detached_answer_finishes(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="first " * 50, token_delay=0.01))
    frames = await leave_mid_answer(user, "one")
    conversation_id = of(frames, "accepted")[0]["conversation_id"]
    await finish_detached(wait_seconds=20)
    again = await connect(user)
    frames = await ask(again, "two", conversation_id=conversation_id)
    await again.disconnect()
    assert of(frames, "done")[0]["status"] == "complete"
    contents = [m.content for m in await messages_of(conversation_id)]
    assert contents[:2] == ["one", "first " * 50] and contents[2] == "two"


@override_settings(CHAT_CONTINUE_AFTER_DISCONNECT=False)
async def test_with_continuation_off_closing_the_socket_saves_the_partial_answer_as_stopped(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="slow " * 400, token_delay=0.02))
    frames = await leave_mid_answer(user, "talk slowly", tokens=2)
    assistant_id = of(frames, "accepted")[0]["assistant_message_id"]
    saved = await message(assistant_id)
    assert saved.status == "stopped"
    assert saved.content.startswith(text_of(frames, "r1"))
    assert 0 < len(saved.content) < len("slow " * 400)
    recorded = scripted_server.chat_requests()[0]
    assert await asyncio.to_thread(recorded.finished.wait, 5)
    assert recorded.disconnected


async def test_the_answer_is_flushed_to_the_database_while_it_streams(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="piece " * 200, token_delay=0.01))
    ws = await connect(user)
    await ws.send_json_to({"type": "message", "request_id": "r1", "text": "stream"})
    frames = await frames_until(ws, lambda f: f["type"] == "accepted")
    assistant_id = frames[0]["assistant_message_id"]
    await asyncio.sleep(1.2)
    saved = await message(assistant_id)
    assert saved.status == "streaming"
    assert saved.content.startswith("piece ")  # saved before the answer finished
    await ws.disconnect()


async def test_a_runner_failure_mid_answer_keeps_the_partial_text_and_reports_the_error(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="partial answer then boom " * 5, break_after=4))
    ws = await connect(user)
    frames = await ask(ws, "break please")
    await ws.disconnect()
    errors = of(frames, "error")
    assert len(errors) == 1 and errors[0]["code"] in {"unavailable", "runtime"}
    assert isinstance(errors[0]["retryable"], bool)
    done = frames[-1]
    assert done["status"] == "failed"
    saved = await message(done["message_id"])
    assert saved.status == "failed"
    assert saved.content == text_of(frames, "r1") != ""
    assert saved.error_code == errors[0]["code"]


async def test_no_runner_available_is_an_error_frame_and_the_question_is_kept(user):
    ws = await connect(user)
    frames = await ask(ws, "anyone there?")
    await ws.disconnect()
    error = of(frames, "error")[0]
    assert error["code"] and error["message"]
    rows = await messages_of(of(frames, "accepted")[0]["conversation_id"])
    assert rows[0].content == "anyone there?"
    assert rows[1].status == "failed"


async def test_a_guardian_block_is_reported_as_guardian_blocked(
    user, scripted_runner, scripted_server
):
    from runners.models import GuardianRule

    await sync_to_async(GuardianRule.objects.create)(
        name="no secrets", kind="block_term", value="launch codes", message="Not that."
    )
    ws = await connect(user)
    frames = await ask(ws, "tell me the launch codes")
    await ws.disconnect()
    error = of(frames, "error")[0]
    assert error["code"] == "guardian_blocked"
    assert error["retryable"] is False
    assert not scripted_server.chat_requests()


async def test_a_pinned_runner_that_does_not_exist_is_refused(user, scripted_runner):
    ws = await connect(user)
    await ws.send_json_to(
        {"type": "message", "request_id": "r1", "text": "hi", "runner": "no-such-runner"}
    )
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (frame["type"], frame["code"]) == ("error", "unknown_runner")
    assert not await sync_to_async(Message.objects.exists)()


# ---- bad frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "mentions"),
    [
        ("not json at all", "bad_json", "JSON"),
        ("[1, 2]", "bad_frame", "object"),
        ('{"request_id": "x"}', "missing_field", "type"),
        ('{"type": "dance", "request_id": "x"}', "unknown_type", "dance"),
        ('{"type": "message", "text": "hi"}', "missing_field", "request_id"),
        ('{"type": "message", "request_id": "x"}', "missing_field", "text"),
        ('{"type": "message", "request_id": "x", "text": 5}', "bad_field", "text"),
        ('{"type": "message", "request_id": "x", "text": "  "}', "missing_field", "empty"),
        (
            '{"type": "message", "request_id": "x", "text": "hi", "conversation_id": "7"}',
            "bad_field",
            "conversation_id",
        ),
        (
            '{"type": "message", "request_id": "x", "text": "hi", "params": {"temperature": 9}}',
            "bad_field",
            "temperature",
        ),
        (
            '{"type": "message", "request_id": "x", "text": "hi", "params": {"seed": "7"}}',
            "bad_field",
            "seed",
        ),
        (
            '{"type": "message", "request_id": "x", "text": "hi", '
            '"params": {"logit_bias": {"word": 1}}}',
            "bad_field",
            "token ids",
        ),
        ('{"type": "regenerate", "request_id": "x"}', "missing_field", "conversation_id"),
        (
            '{"type": "edit", "request_id": "x", "conversation_id": 1, "text": "t"}',
            "missing_field",
            "message_id",
        ),
        (
            '{"type": "message", "request_id": "x", "text": "hi", "images": ["https://e.x/a.png"]}',
            "bad_image",
            "data URL",
        ),
        (
            '{"type": "message", "request_id": "x", "text": "hi", '
            '"images": ["data:image/png;base64,aGVsbG8gd29ybGQ="]}',
            "bad_image",
            "",
        ),
    ],
)
async def test_a_bad_frame_gets_an_error_naming_the_problem_and_the_socket_stays_open(
    user, scripted_runner, scripted_server, raw, code, mentions
):
    ws = await connect(user)
    first = await ask(ws, "keep me")
    await ws.send_to(text_data=raw)
    frame = await ws.receive_json_from(timeout=5)
    assert frame["type"] == "error"
    assert frame["code"] == code, frame
    assert mentions in frame["message"]
    await ws.send_json_to({"type": "ping", "request_id": "still-there"})
    assert (await ws.receive_json_from(timeout=5))["type"] == "pong"
    await ws.disconnect()
    rows = await messages_of(of(first, "accepted")[0]["conversation_id"])
    assert [m.content for m in rows] == ["keep me", "Hello from the scripted server."]
    assert await sync_to_async(Message.objects.count)() == 2


async def test_a_binary_frame_is_refused(user):
    ws = await connect(user)
    await ws.send_to(bytes_data=b"\x00\x01")
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (frame["type"], frame["code"]) == ("error", "bad_frame")


async def test_an_oversized_frame_is_refused_and_nothing_is_saved(user, scripted_runner):
    ws = await connect(user)
    huge = json.dumps({"type": "message", "request_id": "big", "text": "x" * (13 * 1024 * 1024)})
    await ws.send_to(text_data=huge)
    frame = await ws.receive_json_from(timeout=10)
    assert (frame["type"], frame["code"], frame["request_id"]) == ("error", "frame_too_large", None)
    await ws.send_json_to({"type": "ping", "request_id": "p"})
    assert (await ws.receive_json_from(timeout=5))["type"] == "pong"
    await ws.disconnect()
    assert not await sync_to_async(Message.objects.exists)()


async def test_an_image_over_the_size_limit_is_refused(user, scripted_runner, settings):
    settings.IMAGE_MAX_BYTES = 2048
    ws = await connect(user)
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))  # incompressible
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(buffer.getvalue()) > 2048
    await ws.send_json_to({"type": "message", "request_id": "r", "text": "see", "images": [url]})
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (frame["type"], frame["code"]) == ("error", "bad_image")
    assert "MB" in frame["message"] or "large" in frame["message"]


async def test_an_image_goes_to_a_vision_runner_and_is_saved_with_the_message(
    user, scripted_server
):
    await sync_to_async(runner_config)(scripted_server.url, "vision", enable_vision=True)
    scripted_server.script(Reply(text="A red square."))
    ws = await connect(user)
    frames = await ask(ws, "what is this?", images=[png_data_url()])
    await ws.disconnect()
    assert text_of(frames, "r1") == "A red square."
    saved = await message(of(frames, "accepted")[0]["user_message_id"])
    assert saved.images and saved.images[0].startswith("data:image/png;base64,")
    sent = scripted_server.chat_requests()[-1].json["messages"][-1]["content"]
    assert any(part.get("type") == "image_url" for part in sent)


# ---- limits --------------------------------------------------------------------------------


async def test_too_many_concurrent_answers_are_rate_limited(
    user, scripted_runner, scripted_server, settings
):
    settings.CHAT_MAX_CONCURRENT_PER_USER = 2
    scripted_server.default_reply = Reply(text="wait " * 100, token_delay=0.02)
    ws = await connect(user)
    for rid in ("a", "b", "c"):
        await ws.send_json_to({"type": "message", "request_id": rid, "text": rid})
    frames = await frames_until(ws, lambda f: f["type"] == "error")
    limited = frames[-1]
    assert (limited["code"], limited["request_id"], limited["retryable"]) == (
        "rate_limited",
        "c",
        True,
    )
    assert limited["retry_after_s"] == services.SLOT_RETRY_AFTER_SECONDS
    for rid in ("a", "b"):
        await ws.send_json_to({"type": "stop", "request_id": rid})
    frames += await frames_until(ws, lambda f: f["type"] == "done" and f["request_id"] == "b")
    # A slot is free again once an answer ends.
    scripted_server.default_reply = Reply(text="ok")
    if not of(frames, "done", "a"):
        await frames_until(ws, is_end("a"))
    again = await ask(ws, "now?", request_id="d")
    await ws.disconnect()
    assert again[-1]["status"] == "complete"


async def test_the_concurrency_limit_holds_across_sockets(
    user, scripted_runner, scripted_server, settings
):
    settings.CHAT_MAX_CONCURRENT_PER_USER = 1
    scripted_server.default_reply = Reply(text="wait " * 100, token_delay=0.02)
    one = await connect(user)
    two = await connect(user)
    await one.send_json_to({"type": "message", "request_id": "a", "text": "first"})
    await frames_until(one, lambda f: f["type"] == "accepted")
    await two.send_json_to({"type": "message", "request_id": "b", "text": "second"})
    frame = await two.receive_json_from(timeout=5)
    assert (frame["type"], frame["code"]) == ("error", "rate_limited")
    assert frame["retry_after_s"] == services.SLOT_RETRY_AFTER_SECONDS
    await one.disconnect()
    await two.disconnect()


async def test_messages_per_minute_are_limited(user, scripted_runner, scripted_server, settings):
    settings.CHAT_MESSAGES_PER_MINUTE = 2
    ws = await connect(user)
    await ask(ws, "one", request_id="1")
    await ask(ws, "two", request_id="2")
    await ws.send_json_to({"type": "message", "request_id": "3", "text": "three"})
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (frame["type"], frame["code"], frame["retryable"]) == ("error", "rate_limited", True)
    assert "2 messages a minute" in frame["message"]
    # When the oldest counted message leaves the minute, in whole seconds.
    assert isinstance(frame["retry_after_s"], int) and 1 <= frame["retry_after_s"] <= 60
    assert f"try again in {frame['retry_after_s']} s" in frame["message"]
    assert await sync_to_async(Message.objects.filter(role="user").count)() == 2


async def test_a_runner_that_rate_limits_says_when_to_try_again(
    user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(status=429, headers={"Retry-After": "7"}))
    ws = await connect(user)
    frames = await ask(ws, "busy?")
    await ws.disconnect()
    (error,) = of(frames, "error")
    assert (error["code"], error["retryable"], error["retry_after_s"]) == ("rate_limited", True, 7)
    assert frames[-1]["status"] == "failed"


async def test_every_runner_paused_says_when_the_circuit_closes(
    user, scripted_runner, scripted_server
):
    from runners.router import circuits

    for _ in range(circuits.threshold):
        circuits.failure("scripted")
    ws = await connect(user)
    frames = await ask(ws, "anyone?")
    await ws.disconnect()
    (error,) = of(frames, "error")
    assert error["code"] == "unavailable"
    assert 1 <= error["retry_after_s"] <= math.ceil(circuits.cooldown_s)


# ---- slow clients ----------------------------------------------------------------------------


async def test_tokens_are_coalesced_for_a_client_that_does_not_read(
    user, scripted_runner, scripted_server
):
    words = [f"w{i} " for i in range(300)]
    scripted_server.script(Reply(tokens=tuple(words)))
    ws = await connect(user)
    await ws.send_json_to({"type": "message", "request_id": "r1", "text": "fast please"})
    # Do not read while the answer streams: everything piles up meanwhile.
    assistant = None
    for _ in range(100):
        await asyncio.sleep(0.05)
        rows = await sync_to_async(list)(Message.objects.filter(role="assistant"))
        if rows and rows[0].status == "complete":
            assistant = rows[0]
            break
    assert assistant is not None and assistant.content == "".join(words)
    frames = await frames_until(ws, is_end("r1"))
    await ws.disconnect()
    tokens = of(frames, "token")
    assert text_of(frames, "r1") == "".join(words)
    assert len(tokens) < len(words) / 3  # merged, not one frame per token


async def test_the_frame_outbox_merges_pending_tokens_without_stalling_the_producer():
    from chat.outbox import FrameOutbox

    sent: list[dict] = []
    release = asyncio.Event()

    async def slow_send(frame):
        await release.wait()  # a client that does not read
        sent.append(frame)

    outbox = FrameOutbox(slow_send, interval=0)
    started = time.monotonic()
    outbox.put({"type": "routed", "request_id": "r"})
    for i in range(10_000):
        outbox.put({"type": "token", "request_id": "r", "text": f"{i},"})
    assert time.monotonic() - started < 1.0  # the producer never waited
    assert outbox.pending <= 2  # one pending token frame, however many tokens
    release.set()
    outbox.put({"type": "done", "request_id": "r"})
    await outbox.close()
    assert [f["type"] for f in sent] == ["routed", "token", "done"]
    assert sent[1]["text"] == "".join(f"{i}," for i in range(10_000))


async def test_held_tokens_go_out_at_once_when_the_answer_ends():
    from chat.outbox import FrameOutbox

    sent: list[dict] = []

    async def send(frame):
        sent.append(frame)

    outbox = FrameOutbox(send, interval=10.0)  # hold tokens for a long time
    outbox.put({"type": "token", "request_id": "r", "text": "a"})
    await asyncio.sleep(0.05)
    outbox.put({"type": "token", "request_id": "r", "text": "b"})
    outbox.put({"type": "token", "request_id": "r", "text": "c"})
    await asyncio.sleep(0.05)
    assert [f["text"] for f in sent] == ["a"]  # held: merged, not sent yet
    outbox.put({"type": "done", "request_id": "r"})
    await asyncio.sleep(0.05)
    assert [(f["type"], f.get("text")) for f in sent] == [
        ("token", "a"),
        ("token", "bc"),
        ("done", None),
    ]
    await outbox.close()
