"""Credentials end their websockets (issue 12, class 4): revoking an API key
(settings page, admin, `revoke()`), logging out, or deactivating the user
stops the answers streaming on the credential's sockets (saved as
`stopped`) and closes them with 4401 within a second. Through the real routed
application; in the scale-out pass the channel layer is Redis. The same
across two uvicorn processes: tests/test_scaleout.py."""

from __future__ import annotations

import asyncio
import json
import time

from django.test import Client
from django.utils import timezone

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from accounts.models import ApiKey
from breezeweb.asgi import application
from chat.models import Message
from tests.support.clients import connect, logged_in
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.scaleout,
    pytest.mark.usefixtures("user", "fresh_process_state", "no_detached_answers"),
]

SLOW = Reply(text=" ".join(f"word{i}" for i in range(200)), token_delay=0.05)


async def open_socket(headers) -> WebsocketCommunicator:
    return await connect(headers=headers)


async def start_answer(ws, request_id: str = "r1") -> dict:
    """Send a message and wait until its answer is streaming; the `accepted` frame."""
    await ws.send_json_to(
        {"type": "message", "request_id": request_id, "conversation_id": None, "text": "talk"}
    )
    accepted = None
    while True:
        frame = await ws.receive_json_from(timeout=10)
        if frame["type"] == "accepted":
            accepted = frame
        if frame["type"] == "token":
            return accepted
        assert frame["type"] not in ("error", "done"), frame


async def until_closed(ws, timeout: float = 5.0) -> tuple[list[dict], int]:
    """The frames sent until the server closed the socket, and its close code."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        output = await ws.receive_output(timeout=max(deadline - time.monotonic(), 0.01))
        if output["type"] == "websocket.close":
            return frames, output.get("code")
        frames.append(json.loads(output["text"]))


async def assert_ended_within_a_second(ws, end, accepted: dict | None) -> None:
    # Timed from the moment the credential has ended (the request or call
    # that ends it has returned, its transaction committed): how long that
    # request itself takes on a loaded machine is not the socket's latency.
    await end()
    started = time.monotonic()
    frames, code = await until_closed(ws)
    assert time.monotonic() - started < 1.0, "the socket must end within a second"
    assert code == 4401
    ends = [f for f in frames if f["type"] in ("done", "error")]
    if accepted is not None:
        done = [f for f in ends if f["type"] == "done"]
        assert [d["status"] for d in done] == ["stopped"], frames
        saved = await sync_to_async(Message.objects.get)(pk=accepted["assistant_message_id"])
        assert saved.status == "stopped"
        assert saved.content  # the partial answer is kept
    assert ends[-1]["type"] == "error" and ends[-1]["code"] == "credential_ended", frames
    assert ends[-1]["request_id"] is None


async def test_revoking_a_key_stops_its_answer_and_closes_its_socket(
    user, scripted_runner, scripted_server
):
    key, raw = await sync_to_async(ApiKey.issue)(user, "script")
    _, other_raw = await sync_to_async(ApiKey.issue)(user, "other")
    ws = await open_socket([(b"authorization", f"Bearer {raw}".encode())])
    bystander = await open_socket([(b"authorization", f"Bearer {other_raw}".encode())])
    scripted_server.script(SLOW)
    accepted = await start_answer(ws)
    await assert_ended_within_a_second(ws, sync_to_async(key.revoke), accepted)
    # A socket with another key of the same user is untouched.
    await bystander.send_json_to({"type": "ping", "request_id": "p"})
    assert (await bystander.receive_json_from(timeout=5))["type"] == "pong"
    await bystander.disconnect()
    # And the revoked key cannot open a new one.
    refused = WebsocketCommunicator(
        application, "/ws/chat/", headers=[(b"authorization", f"Bearer {raw}".encode())]
    )
    assert (await refused.connect(timeout=5))[0]
    assert (await refused.receive_output(timeout=5))["code"] == 4401


async def test_revoking_on_the_settings_page_closes_an_idle_socket(user):
    client, _ = await sync_to_async(logged_in)(user)
    key, raw = await sync_to_async(ApiKey.issue)(user, "script")
    ws = await open_socket([(b"authorization", f"Bearer {raw}".encode())])

    async def revoke():
        response = await sync_to_async(client.post)(f"/settings/api-keys/{key.pk}/revoke/")
        assert response.status_code == 302

    await assert_ended_within_a_second(ws, revoke, None)


async def test_the_admin_revoke_action_closes_the_socket(user, admin_user):
    admin = Client()
    await sync_to_async(admin.force_login)(admin_user)
    key, raw = await sync_to_async(ApiKey.issue)(user, "script")
    ws = await open_socket([(b"authorization", f"Bearer {raw}".encode())])

    async def revoke():
        response = await sync_to_async(admin.post)(
            "/admin/accounts/apikey/",
            {"action": "revoke", "_selected_action": [key.pk]},
        )
        assert response.status_code == 302

    await assert_ended_within_a_second(ws, revoke, None)


async def test_logging_out_stops_the_answer_and_closes_that_sessions_socket_only(
    user, scripted_runner, scripted_server
):
    client, headers = await sync_to_async(logged_in)(user)
    _, other_headers = await sync_to_async(logged_in)(user)  # another browser
    ws = await open_socket(headers)
    other = await open_socket(other_headers)
    scripted_server.script(SLOW)
    accepted = await start_answer(ws)

    async def logout():
        response = await sync_to_async(client.post)("/logout/")
        assert response.status_code in (200, 302)

    await assert_ended_within_a_second(ws, logout, accepted)
    await other.send_json_to({"type": "ping", "request_id": "p"})
    assert (await other.receive_json_from(timeout=5))["type"] == "pong"
    await other.disconnect()


async def test_deactivating_the_user_closes_every_socket_of_theirs(user):
    _, headers = await sync_to_async(logged_in)(user)
    _, raw = await sync_to_async(ApiKey.issue)(user, "script")
    browser = await open_socket(headers)
    program = await open_socket([(b"authorization", f"Bearer {raw}".encode())])

    def deactivate():
        user.is_active = False
        user.save()

    await assert_ended_within_a_second(browser, sync_to_async(deactivate), None)
    _, code = await until_closed(program)
    assert code == 4401


# ---- answers that outlived their socket (CHAT_CONTINUE_AFTER_DISCONNECT) -------------------


async def saved_status(message_id: int, *, becomes: str | None = None, within: float = 1.0):
    """The saved status of the answer; with `becomes`, waited for (up to `within` s)."""
    deadline = time.monotonic() + within
    while True:
        status = await sync_to_async(Message.objects.values_list("status", flat=True).get)(
            pk=message_id
        )
        if becomes is None or status == becomes or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.02)


async def detached_answer(headers) -> int:
    """An answer started on a socket that then closed; still being generated."""
    ws = await open_socket(headers)
    accepted = await start_answer(ws)
    await ws.disconnect()
    message_id = accepted["assistant_message_id"]
    assert await saved_status(message_id) == "streaming"
    return message_id


async def test_revoking_a_key_stops_the_answers_that_outlived_its_sockets(
    user, scripted_runner, scripted_server, settings
):
    settings.CHAT_CONTINUE_AFTER_DISCONNECT = True
    scripted_server.default_reply = SLOW
    key, raw = await sync_to_async(ApiKey.issue)(user, "script")
    _, other_raw = await sync_to_async(ApiKey.issue)(user, "other")
    revoked = await detached_answer([(b"authorization", f"Bearer {raw}".encode())])
    bystander = await detached_answer([(b"authorization", f"Bearer {other_raw}".encode())])
    started = time.monotonic()
    await sync_to_async(key.revoke)()
    assert await saved_status(revoked, becomes="stopped") == "stopped"
    assert time.monotonic() - started < 1.0
    saved = await sync_to_async(Message.objects.get)(pk=revoked)
    assert saved.content  # the partial answer is kept
    # The answer started with another key of the same user goes on.
    await asyncio.sleep(0.3)
    assert await saved_status(bystander) == "streaming"


async def test_logging_out_stops_the_answers_that_outlived_that_sessions_socket(
    user, scripted_runner, scripted_server, settings
):
    settings.CHAT_CONTINUE_AFTER_DISCONNECT = True
    scripted_server.default_reply = SLOW
    client, headers = await sync_to_async(logged_in)(user)
    _, other_headers = await sync_to_async(logged_in)(user)  # another browser
    ended = await detached_answer(headers)
    other = await detached_answer(other_headers)
    response = await sync_to_async(client.post)("/logout/")
    assert response.status_code in (200, 302)
    assert await saved_status(ended, becomes="stopped") == "stopped"
    await asyncio.sleep(0.3)
    assert await saved_status(other) == "streaming"


async def test_a_credential_that_ended_unheard_stops_the_answer_when_its_socket_closes(
    user, scripted_runner, scripted_server, settings
):
    """Revoked while the socket was closing, before the hub listened in its
    place: no message reaches the hub, the check after joining does."""
    settings.CHAT_CONTINUE_AFTER_DISCONNECT = True
    scripted_server.default_reply = SLOW
    key, raw = await sync_to_async(ApiKey.issue)(user, "script")
    ws = await open_socket([(b"authorization", f"Bearer {raw}".encode())])
    accepted = await start_answer(ws)
    # Revoked without the signal (as if its message was lost), then closed.
    await sync_to_async(ApiKey.objects.filter(pk=key.pk).update)(revoked_at=timezone.now())
    await ws.disconnect()
    message_id = accepted["assistant_message_id"]
    assert await saved_status(message_id, becomes="stopped") == "stopped"
