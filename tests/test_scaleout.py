"""Scale-out for real: two uvicorn processes and a Channels ingestion worker
sharing PostgreSQL and Redis. They run in the scale-out pass of `make test`
(BREEZEWEB_SCALEOUT_PASS=1, DATABASE_URL / REDIS_URL set); CI requires it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

from django.conf import settings
from django.db import connection

import httpx
import pytest
import websockets

from accounts.models import ApiKey
from chat.models import Message
from rag.models import Collection, Document
from tests.support.fixtures import runner_config
from tests.support.processes import WebServer, Worker
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.scaleout,
    pytest.mark.skipif(
        os.environ.get("BREEZEWEB_SCALEOUT_PASS") != "1",
        reason="multi-process test: runs in the scale-out pass (PostgreSQL + Redis)",
    ),
]


def _shared_env() -> dict[str, str]:
    db = connection.settings_dict
    url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    return {
        "DATABASE_URL": url,
        "REDIS_URL": settings.REDIS_URL,
        "DATA_DIR": str(settings.DATA_DIR),
        "SECRET_KEY": settings.SECRET_KEY,
        "BREEZEWEB_ENV_FILE": "/nonexistent",
        "RAG_INGEST_WORKER": "channels",
    }


@pytest.fixture
def two_web_processes(transactional_db):
    # The embedded Chroma store serves one process: hand it from this test
    # process (earlier tests used it) to the processes started here.
    from rag import store

    store.reset_client()
    env = _shared_env()
    first, second = WebServer(env), WebServer(env)
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        first.stop()
        second.stop()


async def _completions_on_both(first: WebServer, second: WebServer, key: str, n: int) -> list:
    """`n` completions at once, alternating between the two processes."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post(f"{server.url}/v1/chat/completions", headers=headers, json=body)
                for server in [first, second] * (n // 2)
            )
        )


def _models(server: WebServer, key: str) -> list[str]:
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


def test_an_admin_edit_reaches_every_web_process_on_its_next_request(
    two_web_processes, user, scripted_server
):
    first, second = two_web_processes
    _, key = ApiKey.issue(user, "scaleout")
    config = runner_config(scripted_server.url, "remote", priority=10)
    assert "remote" in _models(first, key) and "remote" in _models(second, key)

    config.enabled = False
    config.save()
    assert "remote" not in _models(first, key)
    assert "remote" not in _models(second, key)

    # A chat answered by either process uses the edited config, not a cached one.
    config.enabled = True
    config.endpoint = scripted_server.url
    config.model_id = "renamed-model"
    config.save()
    scripted_server.models = ["renamed-model"]
    scripted_server.default_reply = Reply(text="from the renamed model")
    for server in (first, second):
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "remote", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "from the renamed model"
    sent_models = {r.json["model"] for r in scripted_server.chat_requests()}
    assert sent_models == {"renamed-model"}


def test_a_worker_ingests_an_upload_and_the_status_reaches_a_websocket_on_another_process(
    two_web_processes, user, tmp_path
):
    first, second = two_web_processes
    _, key = ApiKey.issue(user, "scaleout")
    worker = Worker(_shared_env()).start()
    try:

        async def scenario():
            headers = {"Authorization": f"Bearer {key}"}
            async with websockets.connect(
                f"ws://127.0.0.1:{second.port}/ws/chat/", additional_headers=headers
            ) as ws:
                async with httpx.AsyncClient() as client:
                    response = await client.post(
                        f"{first.url}/api/documents",
                        headers=headers,
                        files={
                            "file": (
                                "falcon.md",
                                b"# Falcon\n\nThe falcon project ships "
                                b"in March and its codename is Peregrine.\n",
                            )
                        },
                        timeout=60,
                    )
                assert response.status_code in (200, 201, 202), response.text
                statuses = []
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and "ready" not in statuses:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=120))
                    if frame.get("type") == "document_status":
                        statuses.append(frame["document"]["status"])
                        assert frame["document"]["status"] != "failed", frame
                return statuses

        statuses = asyncio.run(scenario())
        assert statuses[-1] == "ready", (statuses, worker.log_tail())
        document = Document.objects.get(owner=user)
        assert document.chunk_count > 0
        assert document.collection == Collection.personal_for(user)
    finally:
        worker.stop()


# ---- credentials end their sockets on every process -------------------------------------


def _login(server: WebServer, username: str, password: str) -> httpx.Client:
    """A browser-like session on `server`: the login form, with its CSRF token."""
    client = httpx.Client(base_url=server.url, timeout=30)
    page = client.get("/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = client.post(
        "/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{server.url}/login/", "Origin": server.url},
    )
    assert response.status_code == 302, response.text[:500]
    assert settings.SESSION_COOKIE_NAME in client.cookies
    return client


def _csrf_post(client: httpx.Client, server: WebServer, path: str) -> httpx.Response:
    page = client.get("/settings/api-keys/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    return client.post(
        path,
        data={"csrfmiddlewaretoken": token},
        headers={"Referer": f"{server.url}/settings/api-keys/", "Origin": server.url},
    )


async def _streaming_socket(url: str, headers: dict) -> tuple[object, dict]:
    """A socket on `url` with an answer streaming; (socket, its `accepted` frame)."""
    ws = await websockets.connect(url, additional_headers=headers)
    await ws.send(
        json.dumps({"type": "message", "request_id": "r1", "conversation_id": None, "text": "talk"})
    )
    accepted = None
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
        if frame["type"] == "accepted":
            accepted = frame
        if frame["type"] == "token":
            return ws, accepted
        assert frame["type"] not in ("error", "done"), frame


async def _ended(ws) -> tuple[list[dict], int, float]:
    """Frames until the server closes the socket, the close code, and when it closed."""
    frames = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=10)))
    except websockets.ConnectionClosed as closed:
        return frames, closed.rcvd.code if closed.rcvd else None, time.monotonic()


def _assert_ending_it_closes_the_socket(
    second: WebServer, headers: dict, browser: httpx.Client, first: WebServer, path: str
) -> None:
    """An answer streams on a socket of `second` opened with `headers`; the
    browser's POST to `path` on `first` ends that credential. Within a second
    the socket gets the stopped `done`, a `credential_ended` error and close
    code 4401, and the answer is saved as stopped."""

    async def scenario():
        ws, accepted = await _streaming_socket(f"ws://127.0.0.1:{second.port}/ws/chat/", headers)
        started = time.monotonic()
        response = await asyncio.to_thread(_csrf_post, browser, first, path)
        assert response.status_code == 302
        return (*await _ended(ws), started, accepted)

    frames, code, ended, started, accepted = asyncio.run(scenario())
    assert code == 4401
    assert ended - started < 1.0, f"closed {ended - started:.2f} s after the credential ended"
    assert [f["status"] for f in frames if f["type"] == "done"] == ["stopped"], frames
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "credential_ended"
    saved = Message.objects.get(pk=accepted["assistant_message_id"])
    assert saved.status == "stopped" and saved.content


SLOW = Reply(text=" ".join(f"word{i}" for i in range(400)), token_delay=0.05)


def test_revoking_a_key_on_one_process_ends_its_socket_on_another(
    two_web_processes, user, scripted_runner, scripted_server
):
    first, second = two_web_processes
    key, raw = ApiKey.issue(user, "scaleout")
    scripted_server.default_reply = SLOW
    browser = _login(first, "alice", "alice-password-123")
    _assert_ending_it_closes_the_socket(
        second,
        {"Authorization": f"Bearer {raw}"},
        browser,
        first,
        f"/settings/api-keys/{key.pk}/revoke/",
    )


def test_logging_out_on_one_process_ends_that_sessions_socket_on_another(
    two_web_processes, user, scripted_runner, scripted_server
):
    first, second = two_web_processes
    scripted_server.default_reply = SLOW
    browser = _login(first, "alice", "alice-password-123")
    cookie = browser.cookies[settings.SESSION_COOKIE_NAME]
    headers = {
        "Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}",
        "Origin": f"http://127.0.0.1:{second.port}",
    }
    _assert_ending_it_closes_the_socket(second, headers, browser, first, "/logout/")


def test_revoking_a_key_on_one_process_stops_its_detached_answer_on_another(
    two_web_processes, user, scripted_runner, scripted_server
):
    """An answer whose socket closed goes on in its process
    (CHAT_CONTINUE_AFTER_DISCONNECT); revoking its key on the other process
    stops it there, saved as `stopped`."""
    first, second = two_web_processes
    key, raw = ApiKey.issue(user, "scaleout")
    scripted_server.default_reply = SLOW
    browser = _login(first, "alice", "alice-password-123")

    async def scenario() -> tuple[int, float]:
        ws, accepted = await _streaming_socket(
            f"ws://127.0.0.1:{second.port}/ws/chat/", {"Authorization": f"Bearer {raw}"}
        )
        await ws.close()
        message_id = accepted["assistant_message_id"]
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(_status, message_id) == "streaming"
        started = time.monotonic()
        response = await asyncio.to_thread(
            _csrf_post, browser, first, f"/settings/api-keys/{key.pk}/revoke/"
        )
        assert response.status_code == 302
        while await asyncio.to_thread(_status, message_id) == "streaming":
            assert time.monotonic() - started < 5, "the detached answer went on"
            await asyncio.sleep(0.05)
        return message_id, time.monotonic() - started

    message_id, took = asyncio.run(scenario())
    saved = Message.objects.get(pk=message_id)
    assert (saved.status, bool(saved.content)) == ("stopped", True)
    # Within a second of the revoke, give or take the answer's last save.
    assert took < 1.5, f"stopped {took:.2f} s after the revoke"


def _status(message_id: int) -> str:
    from django.db import close_old_connections

    try:
        return Message.objects.values_list("status", flat=True).get(pk=message_id)
    finally:
        close_old_connections()


def test_a_real_daphne_refusal_is_a_close_code_the_client_sees(two_web_processes, user):
    first, _ = two_web_processes
    browser = _login(first, "alice", "alice-password-123")
    cookie = browser.cookies[settings.SESSION_COOKIE_NAME]

    async def close_code(headers: dict) -> int:
        async with websockets.connect(
            f"ws://127.0.0.1:{first.port}/ws/chat/", additional_headers=headers
        ) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
            return closed.value.rcvd.code

    session = f"{settings.SESSION_COOKIE_NAME}={cookie}"
    assert asyncio.run(close_code({"Authorization": "Bearer bw_wrong"})) == 4401
    assert asyncio.run(close_code({"Origin": f"http://127.0.0.1:{first.port}"})) == 4401
    for origin in (f"http://127.0.0.1:{first.port + 1}", f"https://127.0.0.1:{first.port}"):
        assert asyncio.run(close_code({"Cookie": session, "Origin": origin})) == 4403


def test_a_message_quota_holds_exactly_across_two_web_processes(
    two_web_processes, user, scripted_server
):
    """Twelve requests at once, split between two processes, against a budget
    of five messages a day: exactly five are answered (accounts.quotas counts
    them with one Redis Lua script)."""
    from accounts import quotas
    from accounts.models import Quota

    first, second = two_web_processes
    _, key = ApiKey.issue(user, "scaleout")
    runner_config(scripted_server.url, "remote", priority=10)
    quota = Quota.objects.create(user=user, metric="messages", period="day", limit=5)
    quotas.reset(quota)
    scripted_server.default_reply = Reply(text="counted")

    answers = asyncio.run(_completions_on_both(first, second, key, 12))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 5 + [429] * 7, [a.text[:200] for a in answers]
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {
        "quota_exceeded"
    }
    assert len(scripted_server.chat_requests()) == 5


def test_token_and_runner_budgets_hold_exactly_across_two_web_processes(
    two_web_processes, user, scripted_server
):
    """Twelve requests at once, split between two processes: a budget of 300
    tokens a day (each answer may take 10 tokens) and one of three messages
    a day on the preferred runner. Every answer held its bound in Redis
    before its runner ran (accounts.quotas.reserve), so the records stay
    within both budgets: the preferred runner answers exactly three, `auto`
    sends the rest to the spare one until the tokens run out."""
    from django.db.models import F, Sum

    from accounts import quotas
    from accounts.models import Quota
    from runners.models import RunRecord

    first, second = two_web_processes
    _, key = ApiKey.issue(user, "scaleout")
    preferred = runner_config(scripted_server.url, "remote", priority=10, max_tokens=10)
    runner_config(scripted_server.url, "spare", priority=5, max_tokens=10)
    for fields in (
        {"metric": "tokens", "limit": 300},
        {"metric": "messages", "limit": 3, "runner": preferred},
    ):
        quotas.reset(Quota.objects.create(user=user, period="day", **fields))
    scripted_server.default_reply = Reply(tokens=("tick ",) * 40, token_delay=0.01)

    answers = asyncio.run(_completions_on_both(first, second, key, 12))
    refused = [a for a in answers if a.status_code != 200]
    assert refused and len(refused) < 12, [a.text[:200] for a in answers]
    assert {a.json()["error"]["code"] for a in refused} == {"quota_exceeded"}
    rows = RunRecord.objects.filter(user=user)
    spent = rows.aggregate(n=Sum(F("prompt_tokens") + F("completion_tokens")))["n"]
    assert spent <= 300, list(rows.values_list("runner_name", "prompt_tokens", "completion_tokens"))
    assert rows.filter(runner_name="remote", status="ok").count() == 3
    assert rows.filter(runner_name="spare", status="ok").count() == 12 - len(refused) - 3


# ---- attaching to an answer generated on another process --------------------------------


def _continuing(frames: list[dict], request_id: str, seq: int) -> str:
    """The text of `request_id`'s sync and token frames, each checked to
    continue the last (`seq` minus its length is the previous `seq`)."""
    text = ""
    for frame in frames:
        if frame.get("request_id") != request_id:
            continue
        if frame["type"] == "sync":
            assert frame["since"] == seq, frame
        elif frame["type"] != "token":
            continue
        assert frame["seq"] - len(frame["text"]) == seq, (seq, frame)
        text, seq = text + frame["text"], frame["seq"]
    return text


async def _attached(server: WebServer, headers: dict, request_id: str, **answer: object):
    """A new socket on `server`, attached as `request_id` to the answer that
    `answer` names (message_id, or conversation_id with last_seq)."""
    ws = await websockets.connect(
        f"ws://127.0.0.1:{server.port}/ws/chat/", additional_headers=headers
    )
    await ws.send(json.dumps({"type": "attach", "request_id": request_id, **answer}))
    return ws


async def _until(ws, request_id: str, kinds: tuple[str, ...], count: int = 1) -> list[dict]:
    frames: list[dict] = []
    while sum(f["type"] in kinds and f.get("request_id") == request_id for f in frames) < count:
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=60)))
        assert frames[-1]["type"] != "error", frames[-1]
    return frames


def test_another_process_follows_an_answer_live_from_a_second_tab_and_after_a_reload(
    two_web_processes, user, scripted_runner, scripted_server
):
    from tests.chat.test_attach import ANSWER, PIECES

    first, second = two_web_processes
    _, raw = ApiKey.issue(user, "scaleout")
    headers = {"Authorization": f"Bearer {raw}"}
    scripted_server.default_reply = Reply(tokens=PIECES, token_delay=0.05)

    async def scenario():
        # The answer is generated on the first process ...
        page = await websockets.connect(
            f"ws://127.0.0.1:{first.port}/ws/chat/", additional_headers=headers
        )
        await page.send(json.dumps({"type": "message", "request_id": "r1", "text": "talk"}))
        seen = await _until(page, "r1", ("token",), count=3)
        accepted = next(f for f in seen if f["type"] == "accepted")
        # ... a second tab on the second process follows it ...
        tab = await _attached(second, headers, "tab", message_id=accepted["assistant_message_id"])
        tab_frames = await _until(tab, "tab", ("token",), count=2)
        # ... and the page reloads mid-answer, onto the second process.
        seen += await _until(page, "r1", ("token",), count=2)
        await page.close()
        last_seq = [f for f in seen if f["type"] == "token"][-1]["seq"]
        reloaded = await _attached(
            second,
            headers,
            "again",
            conversation_id=accepted["conversation_id"],
            last_seq=last_seq,
        )
        reload_frames = await _until(reloaded, "again", ("done",))
        tab_frames += await _until(tab, "tab", ("done",))
        await tab.close()
        await reloaded.close()
        return accepted, seen, tab_frames, reload_frames

    accepted, seen, tab_frames, reload_frames = asyncio.run(scenario())
    page_text = _continuing(seen, "r1", 0)
    tab_sync = next(f for f in tab_frames if f["type"] == "sync")
    assert tab_sync["live"] is True and 0 < tab_sync["seq"] < len(ANSWER)
    assert _continuing(tab_frames, "tab", 0) == ANSWER
    reload_sync = next(f for f in reload_frames if f["type"] == "sync")
    summary = [
        (f["type"], f.get("live"), f.get("status"), f.get("since"), f.get("seq"))
        for f in reload_frames
        if f["type"] in ("sync", "done")
    ]
    assert reload_sync["live"] is True, summary
    assert reload_sync["since"] == len(page_text)
    assert page_text + _continuing(reload_frames, "again", len(page_text)) == ANSWER
    for frames, rid in ((tab_frames, "tab"), (reload_frames, "again")):
        done = [f for f in frames if f["type"] == "done" and f["request_id"] == rid]
        assert [d["status"] for d in done] == ["complete"]
    saved = Message.objects.get(pk=accepted["assistant_message_id"])
    assert (saved.status, saved.content) == ("complete", ANSWER)


def test_an_attach_on_another_process_after_the_end_gets_the_final_text_and_done(
    two_web_processes, user, scripted_runner, scripted_server
):
    first, second = two_web_processes
    _, raw = ApiKey.issue(user, "scaleout")
    headers = {"Authorization": f"Bearer {raw}"}
    scripted_server.default_reply = Reply(text="a short and finished answer")

    async def scenario():
        async with websockets.connect(
            f"ws://127.0.0.1:{first.port}/ws/chat/", additional_headers=headers
        ) as ws:
            await ws.send(json.dumps({"type": "message", "request_id": "r1", "text": "hi"}))
            done = (await _until(ws, "r1", ("done",)))[-1]
        async with await _attached(second, headers, "late", message_id=done["message_id"]) as ws:
            return done, await _until(ws, "late", ("done",))

    done, frames = asyncio.run(scenario())
    assert [f["type"] for f in frames] == ["sync", "done"]
    assert frames[0]["text"] == "a short and finished answer" and frames[0]["live"] is False
    assert frames[1] == {**done, "request_id": "late"}
