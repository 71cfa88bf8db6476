"""A client's mistake is never the runner's failure (issue 12, class 1).

Only errors about the runner count toward its circuit. Text that cannot be
encoded (a lone UTF-16 surrogate from a JSON `\\ud800` escape), a message the
tokenizer rejects, a runner's `invalid_input`: each is the caller's 4xx or
error frame, and the runner stays healthy for everyone else. Driven against
the real local model (ExecuTorch) where it is prepared, else skipped, and
against the scripted Llama Stack server for the runner-side errors.
"""

from __future__ import annotations

import json

import httpx
import pytest
from asgiref.sync import sync_to_async

from accounts.models import ApiKey
from breezeweb.asgi import application
from chat.models import Message
from chat.pipeline import TurnInput, fit_to_budget, run_turn
from runners import registry
from runners.base import ChatMessage, ChatRequest, Done, ErrorCode, RunnerError, TokenDelta
from runners.models import RunnerConfig, RunRecord
from runners.router import circuits, route
from tests.support.clients import connect
from tests.support.fixtures import require_local_model
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("user", "fresh_process_state", "no_detached_answers"),
]

SURROGATE = "\ud800"


@pytest.fixture
def local_runner():
    require_local_model()
    return RunnerConfig.objects.create(
        name="local",
        kind="executorch",
        model_id="smollm2-135m",
        priority=1,
        temperature=0.0,
        max_tokens=8,
        context_tokens=1024,
    )


def assert_healthy(name: str) -> None:
    assert circuits.state(name) == "closed"
    assert circuits._get(name).failures == 0
    assert circuits.allow(name)


async def answer(text: str) -> tuple[str, Done]:
    out, done = "", None
    async for event in run_turn(TurnInput(user=None, messages=(ChatMessage("user", text),))):
        if isinstance(event, TokenDelta):
            out += event.text
        elif isinstance(event, Done):
            done = event
    assert done is not None
    return out, done


async def assert_refused(times: int, attempt, code=ErrorCode.INVALID_INPUT) -> list[RunnerError]:
    """Each of `times` calls `attempt(i)` raises a RunnerError with `code`: the errors."""
    errors = []
    for i in range(times):
        with pytest.raises(RunnerError) as info:
            await attempt(i)
        assert info.value.code == code
        errors.append(info.value)
    return errors


async def drain(events) -> None:
    async for _event in events:
        pass


# ---- the pipeline and the router -----------------------------------------------------------


@pytest.mark.parametrize("count", [3, 30])
async def test_unencodable_turns_are_invalid_input_and_the_local_runner_stays_closed(
    local_runner, count
):
    errors = await assert_refused(count, lambda i: answer(f"question {i} {SURROGATE}"))
    assert all("surrogate" in error.message for error in errors)
    assert_healthy("local")
    text, done = await answer("Say hello.")
    assert done.usage.completion_tokens >= 1 and text


async def test_the_real_tokenizer_rejecting_text_while_fitting_is_the_clients_mistake(
    local_runner,
):
    """Below the pipeline's early check: the local model's own tokenizer
    rejects the text inside prompt fitting (a TypeError from `tokenizers`)."""
    bad = ChatRequest(messages=(ChatMessage("user", f"hi {SURROGATE}"),))
    await assert_refused(circuits.threshold + 2, lambda _: drain(route(bad, prepare=fit_to_budget)))
    assert_healthy("local")
    # And without any fitting, inside the runner's own stream.
    await assert_refused(circuits.threshold + 2, lambda _: drain(route(bad)))
    assert_healthy("local")
    statuses = await sync_to_async(
        lambda: set(RunRecord.objects.values_list("status", "error_code"))
    )()
    assert statuses == {("failed", "invalid_input")}
    text, _ = await answer("Say hello.")
    assert text


async def test_a_tokenizer_that_fails_on_the_message_is_invalid_input_not_a_runner_failure(
    scripted_runner, scripted_server, monkeypatch
):
    runner = registry.build_runner(scripted_runner)
    real = runner.count_tokens

    def picky(text: str) -> int:
        if "forbidden-sequence" in text:
            raise ValueError("the tokenizer cannot read this")
        return real(text)

    monkeypatch.setattr(runner, "count_tokens", picky)
    await assert_refused(30, lambda _: answer("a forbidden-sequence here"))
    assert_healthy("scripted")
    scripted_server.script(Reply(text="fine"))
    assert (await answer("a good question"))[0] == "fine"


async def test_a_tokenizer_broken_for_every_text_is_the_runners_failure(
    scripted_runner, scripted_server, monkeypatch
):
    runner = registry.build_runner(scripted_runner)

    def broken(text: str) -> int:
        raise RuntimeError("tokenizer file is corrupt")

    monkeypatch.setattr(runner, "count_tokens", broken)
    await assert_refused(circuits.threshold, lambda _: answer("hello"), ErrorCode.RUNTIME)
    assert circuits.state("scripted") == "open"


@pytest.mark.parametrize("count", [3, 30])
async def test_a_runner_refusing_the_request_as_invalid_never_opens_its_circuit(
    scripted_runner, scripted_server, count
):
    for _ in range(count):
        scripted_server.script(Reply(status=400, body={"error": {"message": "unsupported"}}))
    await assert_refused(count, lambda _: answer("hello"))
    assert_healthy("scripted")
    scripted_server.script(Reply(text="answered"))
    assert (await answer("hello"))[0] == "answered"


# ---- over /v1 and over the websocket ---------------------------------------------------------


async def v1(key: str, body: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return await client.post(
            "/v1/chat/completions",
            content=json.dumps(body).encode(),  # ensure_ascii: the surrogate travels as \ud800
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=120,
        )


@pytest.mark.parametrize("count", [3, 30])
async def test_bad_v1_requests_leave_the_local_runner_closed_and_the_next_is_answered(
    local_runner, user, settings, count
):
    settings.API_REQUESTS_PER_MINUTE = 1000
    _, key = await sync_to_async(ApiKey.issue)(user, "mistakes")
    for i in range(count):
        body = {"model": "auto", "messages": [{"role": "user", "content": f"q{i} {SURROGATE}"}]}
        response = await v1(key, body)
        assert response.status_code == 400, response.text
        # The HTTP API's input checks refuse it first (`invalid_text`, see
        # docs/http-api.md); the pipeline's own check says `invalid_input`.
        assert response.json()["error"]["code"] in ("invalid_text", "invalid_input")
    assert_healthy("local")
    response = await v1(
        key, {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert response.json()["model"] == "local"


@pytest.mark.parametrize("count", [3, 30])
async def test_bad_websocket_messages_leave_the_local_runner_closed_and_the_next_is_answered(
    local_runner, user, count
):
    ws = await connect(user)
    for i in range(count):
        # A JSON escape is how a lone surrogate arrives: the frame itself is valid UTF-8.
        await ws.send_to(
            text_data='{"type": "message", "request_id": "bad' + str(i) + '", "text": "q \\ud800"}'
        )
        frame = await ws.receive_json_from(timeout=10)
        assert (frame["type"], frame["code"], frame["request_id"]) == (
            "error",
            "invalid_input",
            f"bad{i}",
        )
    assert not await sync_to_async(Message.objects.exists)()
    assert_healthy("local")
    await ws.send_json_to(
        {"type": "message", "request_id": "good", "conversation_id": None, "text": "Say hello."}
    )
    while True:
        frame = await ws.receive_json_from(timeout=120)
        if frame["type"] == "done":
            break
        assert frame["type"] != "error", frame
    await ws.disconnect()
    assert (frame["status"], frame["runner"]) == ("complete", "local")
    saved = await sync_to_async(Message.objects.get)(pk=frame["message_id"])
    assert saved.content


# ---- /readyz ------------------------------------------------------------------------------------


async def test_readyz_is_degraded_naming_the_paused_runners_when_every_runner_is_paused(
    scripted_runner, scripted_server, settings
):
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready"
        for _ in range(circuits.threshold):
            circuits.failure("scripted")
        degraded = await client.get("/readyz")
    assert degraded.status_code == 503
    body = degraded.json()
    assert body["status"] == "degraded"
    assert set(body["paused_runners"]) == {"scripted"}
    assert 0 < body["paused_runners"]["scripted"] <= circuits.cooldown_s
    assert body["checks"]["runners"]["ok"] is False
