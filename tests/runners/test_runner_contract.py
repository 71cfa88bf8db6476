"""The contract every runner kind in RUNNER_KINDS must honour (like datasette's
"every hook has a test"). Each kind is driven for real: the local
kind on the prepared SmolLM2 program, the Llama Stack kind over HTTP against
the scripted server. Adding a kind without a contract fixture fails here."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from django.conf import settings

import pytest

from runners.base import ChatMessage, ChatRequest, Done, ErrorCode, Runner, RunnerError, TokenDelta
from runners.models import RunnerConfig
from runners.registry import RUNNER_KINDS, runner_class
from tests.support.scripted_server import Reply

CONTRACT_KINDS = ["executorch", "llamastack"]


def test_every_registered_kind_has_a_contract_fixture():
    assert sorted(RUNNER_KINDS) == sorted(CONTRACT_KINDS)


def _executorch(_server) -> Runner:
    if not (Path(settings.MODELS_DIR) / "model.pte").exists():
        if os.environ.get("BREEZEWEB_REQUIRE_MODEL") == "1":
            pytest.fail(f"BREEZEWEB_REQUIRE_MODEL=1 but no prepared model in {settings.MODELS_DIR}")
        pytest.skip("no prepared model: run `python manage.py prepare_model`")
    config = RunnerConfig(
        name="contract-local",
        kind="executorch",
        temperature=0.0,
        max_tokens=64,
        context_tokens=1024,
    )
    return runner_class("executorch").from_config(config)


def _llamastack(server) -> Runner:
    server.default_reply = Reply(text="The capital of France is Paris.", token_delay=0.01)
    config = RunnerConfig(
        name="contract-remote",
        kind="llamastack",
        endpoint=server.url,
        model_id="scripted-model",
        temperature=0.0,
        max_tokens=64,
        timeout_seconds=10,
    )
    return runner_class("llamastack").from_config(config)


def _long_reply(server) -> None:
    server.default_reply = Reply(text=" ".join(["word"] * 400), token_delay=0.02)


BUILDERS = {"executorch": _executorch, "llamastack": _llamastack}


@pytest.fixture(params=CONTRACT_KINDS)
def runner_and_server(request, scripted_server):
    if request.param == "executorch":
        request.applymarker(pytest.mark.slow)
    return request.param, BUILDERS[request.param](scripted_server), scripted_server


def _ask(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", text),), temperature=0.0, **kw)


async def test_it_streams_text_and_ends_with_done_and_usage(runner_and_server):
    _, runner, _ = runner_and_server
    await runner.load()
    pieces, done = [], None
    async for event in runner.stream(_ask("What is the capital of France?", max_tokens=24)):
        if isinstance(event, TokenDelta):
            pieces.append(event.text)
        elif isinstance(event, Done):
            done = event
    assert "Paris" in "".join(pieces)
    assert len(pieces) > 1  # streamed, not one finished blob
    assert done is not None and done.finish_reason in {"stop", "length"}
    assert done.usage.completion_tokens > 0
    assert done.timings.time_to_first_token_ms is not None
    await runner.close()


async def test_it_stops_promptly_when_cancelled_and_serves_the_next_request(runner_and_server):
    kind, runner, server = runner_and_server
    if kind == "llamastack":
        _long_reply(server)
    await runner.load()

    async def consume():
        async for event in runner.stream(
            _ask("Write a very long story about a dragon.", max_tokens=400)
        ):
            if isinstance(event, TokenDelta):
                seen.append(event.text)

    seen: list[str] = []
    task = asyncio.create_task(consume())
    while len(seen) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.time() - started < 1.0
    assert len(seen) < 100
    if kind == "llamastack":
        server.default_reply = Reply(text="Paris it is.")
    answer = ""
    async for event in runner.stream(_ask("What is the capital of France?", max_tokens=24)):
        if isinstance(event, TokenDelta):
            answer += event.text
    assert "Paris" in answer
    await runner.close()


async def test_it_reports_health(runner_and_server):
    _, runner, _ = runner_and_server
    health = await runner.health()
    assert health.ok, health.detail
    await runner.close()


async def test_it_maps_failures_to_typed_errors(runner_and_server, tmp_path):
    kind, runner, server = runner_and_server
    if kind == "executorch":
        broken = RunnerConfig(
            name="contract-broken",
            kind="executorch",
            extra_params={"pte_path": str(tmp_path / "missing.pte")},
        )
        runner = runner_class("executorch").from_config(broken)
        expected = ErrorCode.NOT_LOADED
    else:
        server.script(Reply(status=503))
        server.script(Reply(status=503))
        expected = ErrorCode.UNAVAILABLE
    with pytest.raises(RunnerError) as info:
        await runner.load()
        async for _ in runner.stream(_ask("hi")):
            pass
    assert info.value.code == expected
    assert info.value.retryable is True
    assert info.value.message  # a sentence for the user
    await runner.close()


def test_counting_tokens_is_positive_and_monotonic(runner_and_server):
    _, runner, _ = runner_and_server
    short, long = runner.count_tokens("hello"), runner.count_tokens("hello " * 50)
    assert 0 < short < long
