"""Streams stay alive through proxies: silences become SSE comments, and a
stream whose first token is slow opens anyway instead of sending nothing."""

from __future__ import annotations

import asyncio

import pytest

from accounts.models import ApiKey
from api import openai_api
from api.heartbeat import HEARTBEAT, Heartbeat
from runners import registry
from runners.router import circuits
from tests.api.test_openai_api import chat_body, complete, parse_sse
from tests.support.scripted_server import Reply


@pytest.fixture
def api_key(user) -> str:
    registry.forget_all()
    circuits.reset()
    return ApiKey.issue(user, "tests")[1]


async def _slow_source():
    yield "a"
    await asyncio.sleep(0.35)
    yield "b"


async def test_a_silence_longer_than_the_interval_yields_heartbeats_in_between():
    items = [item async for item in Heartbeat(_slow_source(), 0.1)]
    assert items[0] == "a" and items[-1] == "b"
    assert items.count(HEARTBEAT) >= 2
    assert set(items) == {"a", "b", HEARTBEAT}


async def test_closing_it_closes_the_source_even_mid_wait():
    closed = asyncio.Event()

    async def source():
        try:
            yield 1
            await asyncio.sleep(60)
            yield 2
        finally:
            closed.set()

    beat = Heartbeat(source(), 0.05)
    assert await beat.__anext__() == 1
    assert await beat.__anext__() is HEARTBEAT
    await beat.aclose()
    assert closed.is_set()


@pytest.fixture
def quick_heartbeats(monkeypatch):
    """Keep-alive comments every 0.1 s; the stream opens after 0.2 s at most."""
    monkeypatch.setattr(openai_api, "SSE_HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(openai_api, "PRIME_MAX_SECONDS", 0.2)


def events_of(text: str) -> list:
    """The SSE events, keep-alive comments left out as SSE clients do."""
    return parse_sse("\n\n".join(b for b in text.split("\n\n") if not b.startswith(":")))


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("quick_heartbeats")
async def test_a_slow_first_token_opens_the_stream_with_keep_alive_comments(
    api_key, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="late but whole", headers_delay=0.8))
    response = await complete(key=api_key, body=chat_body(stream=True))
    assert response.status_code == 200
    assert ": keep-alive" in response.text
    # Comments are invisible to SSE clients: the events are the usual ones.
    events = events_of(response.text)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])
    assert text == "late but whole"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("quick_heartbeats")
async def test_a_failure_after_the_stream_opened_early_is_an_error_event(
    api_key, scripted_runner, scripted_server
):
    scripted_server.script(Reply(status=401, headers_delay=0.6))
    response = await complete(key=api_key, body=chat_body(stream=True))
    assert response.status_code == 200  # the headers went out before the failure
    events = events_of(response.text)
    assert events[-1] == "[DONE]"
    assert any(isinstance(e, dict) and "error" in e for e in events)
    assert "key" not in str(events).lower() or "api key" in str(events).lower()
