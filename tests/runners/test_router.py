"""The router and the chat-turn pipeline with real runners: Llama Stack
runners against scripted HTTP servers on 127.0.0.1 (one server per runner),
so every failure is a real HTTP failure.

Covers priority order, capability filtering, fallback before the first token
and none after, the circuit breaker, pinning, config edits taking effect
without a restart (across processes), guardian rules on input and streamed
output, and API keys never reaching errors or logs."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from django.test import Client
from django.urls import reverse

import pytest
from channels.db import database_sync_to_async

from chat.pipeline import TurnInput, run_turn
from runners import registry
from runners.base import (
    ChatMessage,
    ChatRequest,
    Done,
    ErrorCode,
    Notice,
    RunnerError,
    TokenDelta,
)
from runners.guardian import MASK, GuardianBlocked
from runners.models import GuardianRule, RunnerConfig, RunRecord
from runners.router import Routed, circuits, route
from tests.support.fixtures import runner_form
from tests.support.scripted_server import Reply, ScriptedServer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.scaleout]

API_KEY = "sk-router-test-7d6c5b4a3f2e1d0c"
IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def _servers():
    servers = [ScriptedServer().start() for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def servers(scripted_server, _servers) -> list[ScriptedServer]:
    """Three independent scripted servers, reset: [0] is the shared fixture."""
    for server in _servers:
        server.reset()
    return [scripted_server, *_servers]


@pytest.fixture(autouse=True)
def fresh_runners(monkeypatch):
    circuits.reset()
    registry.forget_all()
    monkeypatch.setattr(circuits, "threshold", 2)
    monkeypatch.setattr(circuits, "cooldown_s", 30.0)
    yield
    circuits.reset()
    registry.forget_all()


@database_sync_to_async
def make_config(server: ScriptedServer, name: str, priority: int, **fields) -> RunnerConfig:
    config = RunnerConfig(
        name=name,
        kind="llamastack",
        endpoint=server.url,
        model_id="scripted-model",
        priority=priority,
        timeout_seconds=fields.pop("timeout_seconds", 5.0),
        # One attempt per runner: retries inside the runner would hide the router's fallback.
        extra_params=fields.pop("extra_params", {"retries": 0}),
        **fields,
    )
    config.api_key = API_KEY
    config.full_clean()
    config.save()
    return config


@database_sync_to_async
def records() -> list[tuple]:
    return list(
        RunRecord.objects.order_by("id").values_list(
            "runner_name", "status", "error_code", "fallback", "source"
        )
    )


@dataclass
class Outcome:
    routed: list[Routed] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    text: str = ""
    done: Done | None = None
    error: BaseException | None = None

    @property
    def runner(self) -> str:
        return self.routed[-1].runner_name


def hello(text: str = "Hello?", **fields) -> ChatRequest:
    images = fields.pop("images", ())
    return ChatRequest(messages=(ChatMessage("user", text, images=images),), **fields)


async def outcome_of(events) -> Outcome:
    """What a stream of router or turn events amounts to, its error included."""
    outcome = Outcome()
    try:
        async for event in events:
            if isinstance(event, Routed):
                outcome.routed.append(event)
            elif isinstance(event, Notice):
                outcome.notices.append(event)
            elif isinstance(event, TokenDelta):
                outcome.text += event.text
            elif isinstance(event, Done):
                outcome.done = event
    except (RunnerError, GuardianBlocked) as exc:
        outcome.error = exc
    return outcome


async def ask(request: ChatRequest | None = None, **kwargs) -> Outcome:
    return await outcome_of(route(request or hello(), **kwargs))


async def turn(text: str, **kwargs) -> Outcome:
    messages = (ChatMessage("user", text),)
    return await outcome_of(run_turn(TurnInput(user=None, messages=messages, **kwargs)))


# ---- priority and capabilities -------------------------------------------------------


async def test_the_highest_priority_enabled_runner_answers(servers):
    await make_config(servers[0], "low", 1)
    await make_config(servers[1], "high", 10)
    await make_config(servers[2], "off", 99, enabled=False)
    servers[1].default_reply = Reply(text="from high")
    outcome = await ask()
    assert outcome.text == "from high"
    assert outcome.routed == [Routed("high", "scripted-model", False, ("high",))]
    assert servers[0].chat_requests() == [] and servers[2].chat_requests() == []
    assert await records() == [("high", "ok", "", False, "chat")]


async def test_ties_go_to_the_runner_with_the_lower_recent_time_to_first_token(servers):
    await make_config(servers[0], "alpha", 5)
    await make_config(servers[1], "beta", 5)
    servers[0].default_reply = Reply(text="alpha answer", headers_delay=0.3)
    servers[1].default_reply = Reply(text="beta answer")
    # Nothing measured yet: the tie falls to name order.
    assert (await ask()).runner == "alpha"
    assert (await ask(pinned="beta")).text == "beta answer"
    assert circuits.recent_ttft("beta") < circuits.recent_ttft("alpha")
    # Measured: the runner with the lower recent time to first token wins the tie.
    assert (await ask()).runner == "beta"


async def test_an_image_goes_only_to_a_runner_with_vision(servers):
    await make_config(servers[0], "text-only", 10)
    await make_config(servers[1], "vision", 1, enable_vision=True)
    outcome = await ask(hello("What is this?", images=(IMAGE,)))
    assert outcome.runner == "vision"
    sent = servers[1].chat_requests()[0].json["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": IMAGE}} in sent
    assert servers[0].chat_requests() == []


async def test_tools_go_only_to_a_runner_with_agents(servers):
    await make_config(servers[0], "plain", 10)
    await make_config(servers[1], "agent", 1, enable_agents=True)
    outcome = await ask(hello("Look it up", tools=(TOOL,)))
    assert outcome.runner == "agent"
    assert servers[1].chat_requests()[0].json["tools"] == [TOOL]
    assert await records() == [("agent", "ok", "", False, "chat")]


async def test_no_runner_with_the_needed_capability_is_a_clear_error(servers):
    await make_config(servers[0], "plain", 10)
    outcome = await ask(hello("see", images=(IMAGE,)))
    assert isinstance(outcome.error, RunnerError)
    assert outcome.error.code is ErrorCode.NO_RUNNER
    assert "vlm (vision (images))" in outcome.error.message
    assert servers[0].chat_requests() == []


async def test_no_enabled_runner_at_all_is_a_clear_error(servers):
    await make_config(servers[0], "off", 10, enabled=False)
    outcome = await ask()
    assert outcome.error.code is ErrorCode.NO_RUNNER
    assert "No runner is enabled" in outcome.error.message


# ---- fallback --------------------------------------------------------------------------


async def test_it_falls_back_when_the_first_runner_fails_before_its_first_token(servers):
    await make_config(servers[0], "primary", 10)
    await make_config(servers[1], "backup", 1)
    servers[0].script(Reply(status=503, body="overloaded"))
    servers[1].default_reply = Reply(text="backup answer")
    outcome = await ask()
    assert outcome.text == "backup answer"
    assert [r.runner_name for r in outcome.routed] == ["primary", "backup"]
    assert outcome.routed[-1].fallback is True
    assert outcome.routed[-1].attempts == ("primary", "backup")
    (notice,) = [n for n in outcome.notices if n.code == "fallback"]
    assert notice.data == {"failed": "primary", "code": "unavailable"}
    assert await records() == [
        ("primary", "failed", "unavailable", False, "chat"),
        ("backup", "ok", "", True, "chat"),
    ]


async def test_a_timeout_and_an_unreachable_server_also_fall_back(servers):
    from tests.support.scripted_server import free_port

    await make_config(servers[0], "slow", 10, timeout_seconds=1.0)
    down = await make_config(servers[1], "down", 5)
    await database_sync_to_async(RunnerConfig.objects.filter(pk=down.pk).update)(
        endpoint=f"http://127.0.0.1:{free_port()}"
    )
    await make_config(servers[2], "last", 1)
    servers[0].script(Reply(headers_delay=3))
    outcome = await ask()
    assert outcome.runner == "last"
    assert [r[:3] for r in await records()] == [
        ("slow", "failed", "timeout"),
        ("down", "failed", "unavailable"),
        ("last", "ok", ""),
    ]


async def test_it_does_not_fall_back_after_the_first_token_and_keeps_the_partial_answer(servers):
    await make_config(servers[0], "primary", 10)
    await make_config(servers[1], "backup", 1)
    servers[0].script(Reply(text="one two three four", break_after=2))
    outcome = await turn("count")
    assert outcome.text == "one two "
    assert isinstance(outcome.error, RunnerError)
    assert outcome.error.code is ErrorCode.RUNTIME
    assert "after 2 tokens" in outcome.error.message
    assert servers[1].chat_requests() == []
    assert await records() == [("primary", "failed", "runtime", False, "chat")]


async def test_a_request_the_runner_rejects_as_invalid_is_not_passed_on(servers):
    await make_config(servers[0], "primary", 10)
    await make_config(servers[1], "backup", 1)
    servers[0].script(Reply(status=400, body={"error": {"message": "bad temperature"}}))
    outcome = await ask()
    assert outcome.error.code is ErrorCode.INVALID_INPUT
    assert "bad temperature" in outcome.error.message
    assert servers[1].chat_requests() == []
    assert circuits.state("primary") == "closed"


async def test_when_every_runner_fails_the_error_names_them_all(servers):
    await make_config(servers[0], "a", 10)
    await make_config(servers[1], "b", 1)
    servers[0].script(Reply(status=503))
    servers[1].script(Reply(status=500, body="boom"))
    outcome = await ask()
    assert outcome.error.code is ErrorCode.RUNTIME
    assert outcome.error.message.startswith("Every runner failed (a, b); last error:")
    assert API_KEY not in outcome.error.message


# ---- circuit breaker -----------------------------------------------------------------


async def test_the_circuit_opens_after_consecutive_failures_and_closes_after_a_good_trial(
    servers, monkeypatch
):
    monkeypatch.setattr(circuits, "cooldown_s", 0.3)
    await make_config(servers[0], "flaky", 10)
    await make_config(servers[1], "steady", 1)
    servers[0].script(Reply(status=503), Reply(status=503))
    for _ in range(2):
        assert (await ask()).runner == "steady"
    assert circuits.state("flaky") == "open"

    # Open: the flaky runner is skipped without a request.
    assert (await ask()).routed[0].runner_name == "steady"
    assert len(servers[0].chat_requests()) == 2

    await asyncio.sleep(0.35)
    assert circuits.state("flaky") == "half-open"
    outcome = await ask()  # the one trial request goes to flaky, and it answers
    assert outcome.runner == "flaky" and outcome.routed[0].fallback is False
    assert circuits.state("flaky") == "closed"
    assert len(servers[0].chat_requests()) == 3


async def test_a_failed_trial_opens_the_circuit_again(servers, monkeypatch):
    monkeypatch.setattr(circuits, "cooldown_s", 0.3)
    await make_config(servers[0], "flaky", 10)
    await make_config(servers[1], "steady", 1)
    servers[0].script(*[Reply(status=503)] * 3)
    await ask()
    await ask()
    await asyncio.sleep(0.35)
    assert (await ask()).runner == "steady"  # the trial failed and fell back
    assert len(servers[0].chat_requests()) == 3
    assert circuits.state("flaky") == "open"
    assert (await ask()).routed[0].runner_name == "steady"
    assert len(servers[0].chat_requests()) == 3


async def test_with_every_circuit_open_the_error_says_to_try_again_shortly(servers):
    await make_config(servers[0], "only", 10)
    servers[0].script(Reply(status=503), Reply(status=503))
    await ask()
    await ask()
    outcome = await ask()
    assert outcome.error.code is ErrorCode.UNAVAILABLE
    assert "paused after repeated failures (only)" in outcome.error.message
    assert outcome.error.retry_after == circuits.cooldown_s
    assert len(servers[0].chat_requests()) == 2


# ---- pinning -------------------------------------------------------------------------


async def test_a_pinned_runner_answers_even_with_a_lower_priority(servers):
    await make_config(servers[0], "high", 10)
    await make_config(servers[1], "low", 1)
    outcome = await ask(pinned="low")
    assert outcome.runner == "low"
    assert servers[0].chat_requests() == []


async def test_pinning_a_disabled_runner_is_a_clear_error(servers):
    await make_config(servers[0], "off", 10, enabled=False)
    outcome = await ask(pinned="off")
    assert outcome.error.code is ErrorCode.NO_RUNNER
    assert "The runner 'off' is disabled" in outcome.error.message
    assert servers[0].chat_requests() == []


async def test_pinning_a_runner_without_the_needed_capability_is_a_clear_error(servers):
    await make_config(servers[0], "plain", 10)
    outcome = await ask(hello("see", images=(IMAGE,)), pinned="plain")
    assert outcome.error.code is ErrorCode.NO_RUNNER
    assert "lacks the capability this request needs: vlm (images)" in outcome.error.message
    outcome = await ask(hello("do", tools=(TOOL,)), pinned="plain")
    assert "lacks the capability this request needs: agent" in outcome.error.message


async def test_pinning_an_unknown_runner_is_not_found(servers):
    outcome = await ask(pinned="nope")
    assert outcome.error.code is ErrorCode.NOT_FOUND


async def test_a_pinned_runner_that_fails_does_not_fall_back(servers):
    await make_config(servers[0], "pinned", 1)
    await make_config(servers[1], "other", 10)
    servers[0].script(Reply(status=503))
    outcome = await ask(pinned="pinned")
    assert outcome.error.code is ErrorCode.UNAVAILABLE
    assert servers[1].chat_requests() == []


# ---- config edits without restart ----------------------------------------------------------


def _admin_edit(config_pk: int, **changes) -> int:
    """Save a config through the real admin form, as an admin would."""
    from django.contrib.auth import get_user_model

    admin, _ = get_user_model().objects.get_or_create(
        username="root", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(admin)
    config = RunnerConfig.objects.get(pk=config_pk)
    response = client.post(
        reverse("admin:runners_runnerconfig_change", args=[config_pk]),
        runner_form(config, extra_params='{"retries": 0}', **changes),
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    return RunnerConfig.objects.get(pk=config_pk).version


async def test_an_admin_edit_takes_effect_on_the_next_request_without_a_restart(servers):
    config = await make_config(servers[0], "main", 10)
    await make_config(servers[2], "backup", 1)
    servers[0].default_reply = Reply(text="old endpoint")
    servers[1].default_reply = Reply(text="new endpoint")
    assert (await ask()).text == "old endpoint"

    await database_sync_to_async(_admin_edit)(config.pk, endpoint=servers[1].url)
    assert (await ask()).text == "new endpoint"

    await database_sync_to_async(_admin_edit)(config.pk, enabled="")
    assert (await ask()).runner == "backup"
    outcome = await ask(pinned="main")
    assert "is disabled" in outcome.error.message


async def test_two_processes_agree_on_a_config_after_an_edit(servers, monkeypatch):
    """Each process caches its own runners; both compare the config version
    they read from the database and rebuild on their next request."""
    config = await make_config(servers[0], "main", 10)
    servers[0].default_reply = Reply(text="A")
    servers[1].default_reply = Reply(text="B")
    process_one: dict = {}
    process_two: dict = {}

    async def ask_in(cache: dict) -> Outcome:
        monkeypatch.setattr(registry, "_instances", cache)
        return await ask()

    assert (await ask_in(process_one)).text == "A"
    assert (await ask_in(process_two)).text == "A"
    one_before = process_one["main"][1]

    version = await database_sync_to_async(_admin_edit)(config.pk, endpoint=servers[1].url)
    assert (await ask_in(process_one)).text == "B"
    assert (await ask_in(process_two)).text == "B"
    assert process_one["main"][0] == process_two["main"][0]
    assert process_one["main"][0][0] == version
    assert process_one["main"][1] is not one_before
    # Unchanged config: the cached runner is reused, not rebuilt.
    runner = process_one["main"][1]
    await ask_in(process_one)
    assert process_one["main"][1] is runner


async def test_two_saves_racing_from_the_same_version_still_rebuild_the_runner(servers):
    """Two admins save the same config at once: both write version N+1. A
    process that built its runner from the first save still sees the second."""
    config = await make_config(servers[0], "main", 10)
    servers[0].default_reply = Reply(text="A")
    servers[1].default_reply = Reply(text="B")
    assert (await ask()).text == "A"

    @database_sync_to_async
    def racing_saves() -> None:
        first = RunnerConfig.objects.get(pk=config.pk)
        second = RunnerConfig.objects.get(pk=config.pk)
        first.save()  # version N+1, endpoint unchanged
        registry.build_runner(RunnerConfig.objects.get(pk=config.pk))  # a process rebuilds
        second.endpoint = servers[1].url
        second.save()  # also version N+1, from the stale copy
        assert RunnerConfig.objects.get(pk=config.pk).version == first.version

    await racing_saves()
    assert (await ask()).text == "B"


# ---- guardian through the pipeline ---------------------------------------------------------


@database_sync_to_async
def add_rule(kind: str, value: str, applies_to: str = "both", message: str = "") -> None:
    rule = GuardianRule(
        name=f"{kind}-{value}", kind=kind, value=value, applies_to=applies_to, message=message
    )
    rule.full_clean()
    rule.save()


async def test_an_input_rule_refuses_the_message_before_any_runner_is_asked(servers):
    await make_config(servers[0], "main", 10)
    await add_rule("block_term", "project falcon", message="Falcon is confidential.")
    outcome = await turn("Tell me about Project Falcon")
    assert isinstance(outcome.error, GuardianBlocked)
    assert outcome.error.message == "Falcon is confidential."
    assert servers[0].chat_requests() == []
    assert await records() == []


async def test_a_max_length_rule_refuses_long_input_with_the_numbers(servers):
    await make_config(servers[0], "main", 10)
    await add_rule("max_length", "10", applies_to="input")
    outcome = await turn("x" * 25)
    assert "25 characters" in outcome.error.message and "10" in outcome.error.message


async def test_an_output_rule_masks_a_term_split_across_streamed_tokens(servers):
    await make_config(servers[0], "main", 10)
    await add_rule("mask_term", "hunter2", applies_to="output")
    servers[0].script(Reply(tokens=("The pass", "word is hun", "ter", "2, keep it", " safe.")))
    outcome = await turn("what is the password?")
    assert outcome.error is None
    assert outcome.text == f"The password is {MASK}, keep it safe."
    assert "hunter2" not in outcome.text


async def test_an_output_block_rule_stops_the_answer_and_keeps_what_was_shown(servers):
    await make_config(servers[0], "main", 10)
    await add_rule("block_term", "classified", applies_to="output", message="Stopped.")
    words = (
        "Here is a long and harmless start of the answer, ",
        "then the ",
        "classi",
        "fied part",
        " and more.",
    )
    servers[0].script(Reply(tokens=words))
    outcome = await turn("tell me")
    assert isinstance(outcome.error, GuardianBlocked)
    assert outcome.error.message == "Stopped."
    assert outcome.text.startswith("Here is a long and harmless start")
    assert "classi" not in outcome.text


# ---- secrets ---------------------------------------------------------------------------


async def test_the_api_key_reaches_the_server_but_never_errors_or_logs(servers, caplog):
    # Everything, including the HTTP libraries' and the SDK's debug logs.
    for name in ("", "runners", "httpx", "httpcore", "llama_stack_client"):
        caplog.set_level(logging.DEBUG, logger=name)
    await make_config(servers[0], "a", 10)
    await make_config(servers[1], "b", 1)
    servers[0].script(Reply(status=401, body={"error": {"message": f"bad key {API_KEY}"}}))
    servers[1].script(Reply(status=500, body={"error": {"message": f"echo {API_KEY}"}}))
    outcome = await ask()
    assert servers[0].chat_requests()[0].authorization == f"Bearer {API_KEY}"
    assert outcome.error is not None
    assert API_KEY not in outcome.error.message
    assert API_KEY not in repr(outcome.error)
    stored = await database_sync_to_async(
        lambda: list(RunRecord.objects.values_list("error", flat=True))
    )()
    assert stored and all(API_KEY not in e for e in stored)
    assert caplog.records
    assert API_KEY not in caplog.text
