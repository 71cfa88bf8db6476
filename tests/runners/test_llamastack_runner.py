"""The remote Llama Stack runner, against real HTTP servers on 127.0.0.1.

Faults, payloads and headers are checked against the scripted server
(tests.support.scripted_server); the happy path, model listing and an
unknown model against a real `llama stack run` server (started once per
session) whose upstream is a scripted server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from runners.base import (
    SAMPLING_PARAMS,
    Capability,
    ChatMessage,
    ChatRequest,
    Done,
    ErrorCode,
    Runner,
    RunnerError,
    TokenDelta,
    ToolCall,
)
from runners.images import validate_image_bytes
from runners.llamastack.runner import LlamaStackRunner
from runners.models import RunnerConfig
from runners.registry import runner_class
from tests.support.processes import ROOT
from tests.support.scripted_server import (
    MODELS_ROUTE,
    Reply,
    ScriptedToolCall,
    free_port,
)

API_KEY = "sk-breezeweb-test-9f8e7d6c5b4a"
HELLO = ChatRequest(messages=(ChatMessage("user", "Say hello"),))


def make_runner(endpoint: str, **fields) -> LlamaStackRunner:
    config = RunnerConfig(
        name="remote",
        kind="llamastack",
        model_id=fields.pop("model_id", "scripted-model"),
        endpoint=endpoint,
        timeout_seconds=fields.pop("timeout_seconds", 5.0),
        temperature=fields.pop("temperature", 0.3),
        max_tokens=fields.pop("max_tokens", 64),
    )
    config.api_key = fields.pop("api_key", API_KEY)
    for name, value in fields.items():
        setattr(config, name, value)
    return LlamaStackRunner.from_config(config)


@pytest.fixture
async def runner(scripted_server):
    runner = make_runner(scripted_server.url)
    yield runner
    await runner.close()


async def collect(runner: LlamaStackRunner, request: ChatRequest = HELLO):
    """Every event, and the RunnerError that ended the stream (if any)."""
    events = []
    try:
        async for event in runner.stream(request):
            events.append(event)
    except RunnerError as exc:
        return events, exc
    return events, None


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


def png_data_url(color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return validate_image_bytes(buffer.getvalue()).data_url


# ---- contract --------------------------------------------------------------------


def test_the_llamastack_kind_is_registered_and_follows_the_protocol(scripted_server):
    assert runner_class("llamastack") is LlamaStackRunner
    runner = make_runner(scripted_server.url, enable_vision=True, enable_agents=True)
    assert isinstance(runner, Runner)
    assert runner.capabilities == {Capability.LLM, Capability.VLM, Capability.AGENT}
    assert make_runner(scripted_server.url).capabilities == {Capability.LLM}
    assert runner.model_id == "scripted-model"
    assert runner.context_tokens == 2048
    assert runner.count_tokens("x" * 400) == 100
    assert API_KEY not in repr(runner)


# ---- streaming -------------------------------------------------------------------


async def test_it_yields_each_delta_as_the_server_sends_it(scripted_server, runner):
    tokens = tuple(f"word{i} " for i in range(10))
    scripted_server.script(Reply(tokens=tokens, token_delay=0.05))
    sent_when_first_arrived = None
    events = []
    async for event in runner.stream(HELLO):
        if isinstance(event, TokenDelta) and sent_when_first_arrived is None:
            sent_when_first_arrived = scripted_server.chat_requests()[0].tokens_sent
        events.append(event)
    # Real streaming: the first delta reached us while the server was still generating.
    assert sent_when_first_arrived is not None and sent_when_first_arrived < len(tokens)
    assert [e.text for e in events if isinstance(e, TokenDelta)] == list(tokens)
    done = events[-1]
    assert isinstance(done, Done)
    assert done.finish_reason == "stop"
    assert done.model_id == "scripted-model"


async def test_done_carries_usage_finish_reason_and_timings(scripted_server, runner):
    scripted_server.script(
        Reply(text="one two three", usage=(12, 3), finish_reason="length", token_delay=0.02)
    )
    events, error = await collect(runner)
    assert error is None
    done = events[-1]
    assert done.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (12, 3)
    assert done.timings.time_to_first_token_ms is not None
    assert 0 < done.timings.time_to_first_token_ms < done.timings.total_ms
    assert done.timings.tokens_per_second and done.timings.tokens_per_second > 0


async def test_it_sends_the_bearer_key_the_model_and_the_params(scripted_server):
    runner = make_runner(
        scripted_server.url,
        extra_params={"seed": 7, "repetition_penalty": 1.1, "model": "hijack", "retries": 0},
    )
    request = ChatRequest(
        messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")),
        temperature=0.1,
        top_p=0.9,
        max_tokens=17,
        stop=("\n\n",),
    )
    events, error = await collect(runner, request)
    await runner.close()
    assert error is None and isinstance(events[-1], Done)
    sent = scripted_server.chat_requests()[0]
    assert sent.authorization == f"Bearer {API_KEY}"
    body = sent.json
    assert body["model"] == "scripted-model"  # extra params cannot replace the model
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.1, 0.9, 17)
    assert body["stop"] == ["\n\n"]
    assert (body["seed"], body["repetition_penalty"]) == (7, 1.1)
    assert "retries" not in body  # a runner option, not a request parameter


async def test_every_sampling_parameter_of_the_request_reaches_the_upstream(scripted_server):
    # The config's extra params are defaults: the request's own values win.
    runner = make_runner(scripted_server.url, extra_params={"seed": 7, "top_k": 5, "retries": 0})
    request = ChatRequest(
        messages=(ChatMessage("user", "Hi"),),
        top_p=0.8,
        top_k=12,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        seed=42,
        logit_bias={198: -100.0, 7: 2.5},
    )
    events, error = await collect(runner, request)
    await runner.close()
    assert error is None and isinstance(events[-1], Done)
    body = scripted_server.chat_requests()[0].json
    sent = {name: body[name] for name in SAMPLING_PARAMS if name in body and name != "temperature"}
    assert sent == {
        "top_p": 0.8,
        "top_k": 12,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "seed": 42,
        "logit_bias": {"198": -100.0, "7": 2.5},  # JSON keys: token ids as strings
    }


async def test_config_values_apply_when_the_request_leaves_them_out(scripted_server, runner):
    await collect(runner)
    body = scripted_server.chat_requests()[0].json
    assert (body["temperature"], body["max_tokens"]) == (0.3, 64)
    assert "top_p" not in body and "tools" not in body and "stop" not in body


async def test_without_an_api_key_no_authorization_header_is_sent(scripted_server, monkeypatch):
    # The SDK would otherwise pick a key up from the environment.
    monkeypatch.setenv("LLAMA_STACK_CLIENT_API_KEY", "from-the-environment")
    runner = make_runner(scripted_server.url, api_key="")
    await collect(runner)
    await runner.close()
    assert "authorization" not in scripted_server.chat_requests()[0].headers


async def test_it_reuses_one_pooled_connection_across_calls(scripted_server, runner):
    await collect(runner)
    await collect(runner)
    first, second = scripted_server.chat_requests()
    assert first.peer == second.peer  # same client port: the keep-alive connection was reused


async def test_concurrent_streams_on_one_runner_each_get_their_own_answer(scripted_server, runner):
    scripted_server.default_reply = Reply(text="shared answer for everyone", token_delay=0.02)
    results = await asyncio.gather(*(collect(runner) for _ in range(4)))
    for events, error in results:
        assert error is None
        assert text_of(events) == "shared answer for everyone"
        assert isinstance(events[-1], Done)
    assert len(scripted_server.chat_requests()) == 4


def test_a_runner_keeps_working_when_called_from_another_event_loop(scripted_server):
    # e.g. an admin action through async_to_sync after the websocket loop used it
    runner = make_runner(scripted_server.url)
    for _ in range(2):
        events, error = asyncio.run(collect(runner))
        assert error is None and text_of(events) == "Hello from the scripted server."
    asyncio.run(runner.close())


# ---- vision and tools ---------------------------------------------------------------


async def test_images_are_sent_as_image_url_parts_with_data_urls(scripted_server):
    runner = make_runner(scripted_server.url, enable_vision=True)
    image = png_data_url()
    request = ChatRequest(messages=(ChatMessage("user", "What colour?", images=(image,)),))
    _events, error = await collect(runner, request)
    await runner.close()
    assert error is None
    content = scripted_server.chat_requests()[0].json["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "What colour?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]


async def test_an_image_to_a_runner_without_vision_is_refused_before_any_network_call(
    scripted_server, runner
):
    request = ChatRequest(messages=(ChatMessage("user", "What colour?", images=(png_data_url(),)),))
    events, error = await collect(runner, request)
    assert events == []
    assert error.code is ErrorCode.INVALID_INPUT and not error.retryable
    assert "cannot see images" in error.message
    assert scripted_server.requests == []


async def test_tool_call_deltas_are_assembled_into_tool_call_events(scripted_server):
    runner = make_runner(scripted_server.url, enable_agents=True)
    tools = (
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
    )
    scripted_server.script(
        Reply(
            text="Let me check. ",
            tool_calls=(
                ScriptedToolCall("get_weather", '{"city": "Hsinchu, Taiwan"}', id="call_a"),
                ScriptedToolCall("get_time", '{"timezone": "Asia/Taipei"}', id="call_b"),
            ),
        )
    )
    request = ChatRequest(messages=(ChatMessage("user", "Weather?"),), tools=tools)
    events, error = await collect(runner, request)
    await runner.close()
    assert error is None
    assert scripted_server.chat_requests()[0].json["tools"] == list(tools)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [
        ToolCall("call_a", "get_weather", '{"city": "Hsinchu, Taiwan"}'),
        ToolCall("call_b", "get_time", '{"timezone": "Asia/Taipei"}'),
    ]
    assert json.loads(calls[0].arguments) == {"city": "Hsinchu, Taiwan"}
    assert text_of(events) == "Let me check. "
    assert events[-1].finish_reason == "tool_calls"


async def test_tool_results_and_assistant_tool_calls_are_sent_back(scripted_server, runner):
    call = {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    request = ChatRequest(
        messages=(
            ChatMessage("user", "Go"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "42", tool_call_id="call_a"),
        )
    )
    await collect(runner, request)
    messages = scripted_server.chat_requests()[0].json["messages"]
    assert messages[1]["tool_calls"] == [call]
    assert messages[2] == {"role": "tool", "content": "42", "tool_call_id": "call_a"}


# ---- cancel ------------------------------------------------------------------------


async def test_cancelling_the_consumer_closes_the_http_stream_at_once(scripted_server, runner):
    scripted_server.script(Reply(tokens=tuple(f"t{i} " for i in range(100)), token_delay=0.05))
    received: list = []
    two = asyncio.Event()

    async def consume():
        async for event in runner.stream(HELLO):
            received.append(event)
            if len(received) == 2:
                two.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sent = scripted_server.chat_requests()[0]
    # The server notices on its next write (one token later), not at the end.
    assert await asyncio.to_thread(sent.finished.wait, 2)
    assert sent.disconnected
    assert sent.tokens_sent < 10


async def test_closing_the_iterator_early_also_closes_the_stream(scripted_server, runner):
    scripted_server.script(Reply(tokens=tuple(f"t{i} " for i in range(100)), token_delay=0.05))
    stream = runner.stream(HELLO)
    first = await anext(stream)
    assert isinstance(first, TokenDelta)
    await stream.aclose()
    sent = scripted_server.chat_requests()[0]
    assert await asyncio.to_thread(sent.finished.wait, 2)
    assert sent.disconnected and sent.tokens_sent < 10
    # The runner is free for the next request on the same client.
    events, error = await collect(runner)
    assert error is None and isinstance(events[-1], Done)


# ---- errors --------------------------------------------------------------------------


async def test_connection_refused_is_unavailable_and_retryable():
    port = free_port()  # nothing listens there
    runner = make_runner(f"http://127.0.0.1:{port}")
    events, error = await collect(runner)
    await runner.close()
    assert events == []
    assert error.code is ErrorCode.UNAVAILABLE and error.retryable
    assert f"127.0.0.1:{port}" in error.message


async def test_an_unknown_host_is_unavailable_and_retryable():
    runner = make_runner("http://breezeweb-no-such-host.invalid:8321", extra_params={"retries": 0})
    _events, error = await collect(runner)
    await runner.close()
    assert error.code is ErrorCode.UNAVAILABLE and error.retryable
    assert "breezeweb-no-such-host.invalid" in error.message


async def test_credentials_in_the_endpoint_url_are_never_shown():
    runner = make_runner(f"http://admin:hunter2@127.0.0.1:{free_port()}")
    _events, error = await collect(runner)
    await runner.close()
    assert "hunter2" not in error.message and "hunter2" not in repr(runner)


async def test_a_server_slower_than_the_timeout_is_a_retryable_timeout(scripted_server):
    runner = make_runner(scripted_server.url, timeout_seconds=0.5)
    scripted_server.script(Reply(headers_delay=3))
    started = time.monotonic()
    events, error = await collect(runner)
    await runner.close()
    assert time.monotonic() - started < 2.5
    assert events == []
    assert error.code is ErrorCode.TIMEOUT and error.retryable
    assert "did not answer within 0.5 s" in error.message
    assert len(scripted_server.chat_requests()) == 1  # a timeout is not retried inside the runner


async def test_a_server_that_goes_silent_mid_answer_times_out_after_the_partial_answer(
    scripted_server,
):
    runner = make_runner(scripted_server.url, timeout_seconds=0.4)
    scripted_server.script(Reply(tokens=("first ", "second"), token_delay=2.0))
    events, error = await collect(runner)
    await runner.close()
    assert text_of(events) == "first "
    assert error.code is ErrorCode.TIMEOUT
    assert "stopped sending after 1 tokens" in error.message


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_api_key_is_an_auth_error_that_never_shows_the_key(
    scripted_server, runner, caplog, status
):
    caplog.set_level(logging.DEBUG)
    for name in ("llama_stack_client", "httpx", "httpcore", "runners"):
        caplog.set_level(logging.DEBUG, logger=name)
    # A careless server may echo the key back; it must still not reach the user.
    scripted_server.script(
        Reply(status=status, body={"error": {"message": f"bad key Bearer {API_KEY}"}})
    )
    _events, error = await collect(runner)
    assert error.code is ErrorCode.AUTH and not error.retryable
    assert str(status) in error.message and "API key" in error.message
    assert API_KEY not in error.message and API_KEY not in repr(error)
    assert API_KEY not in caplog.text
    assert len(scripted_server.chat_requests()) == 1


async def test_an_unknown_model_is_not_found_naming_it_and_the_served_models(
    scripted_server,
):
    scripted_server.models = ["llama-3.2-11b-vision", "scripted-model"]
    runner = make_runner(scripted_server.url, model_id="no-such-model")
    _events, error = await collect(runner)
    await runner.close()
    assert error.code is ErrorCode.NOT_FOUND and not error.retryable
    assert "'no-such-model'" in error.message
    assert "llama-3.2-11b-vision, scripted-model" in error.message


async def test_rate_limiting_honours_retry_after_and_is_not_retried_inside(scripted_server, runner):
    scripted_server.script(Reply(status=429, headers={"Retry-After": "7"}))
    _events, error = await collect(runner)
    assert error.code is ErrorCode.RATE_LIMITED and error.retryable
    assert error.retry_after == 7.0
    assert "Retry after 7 s" in error.message
    assert len(scripted_server.chat_requests()) == 1


async def test_a_503_before_the_first_token_is_retried_once_then_answers(scripted_server, runner):
    scripted_server.script(Reply(status=503), Reply(text="second time lucky"))
    events, error = await collect(runner)
    assert error is None
    assert text_of(events) == "second time lucky"
    assert len(scripted_server.chat_requests()) == 2


async def test_a_server_that_keeps_failing_is_unavailable_and_retryable(scripted_server, runner):
    scripted_server.script(Reply(status=503), Reply(status=503), Reply(status=503))
    _events, error = await collect(runner)
    assert error.code is ErrorCode.UNAVAILABLE and error.retryable
    assert "(503)" in error.message
    assert len(scripted_server.chat_requests()) == 2  # one retry, then give up


async def test_a_500_is_a_retryable_runtime_error_with_the_server_message(scripted_server, runner):
    scripted_server.script(Reply(status=500, body={"error": {"message": "CUDA out of memory"}}))
    _events, error = await collect(runner)
    assert error.code is ErrorCode.RUNTIME and error.retryable
    assert "(500)" in error.message and "CUDA out of memory" in error.message
    assert len(scripted_server.chat_requests()) == 1  # 500 is not retried


async def test_a_400_is_invalid_input_with_the_server_detail(scripted_server, runner):
    scripted_server.script(Reply(status=400, body={"detail": "max_tokens too large"}))
    _events, error = await collect(runner)
    assert error.code is ErrorCode.INVALID_INPUT and not error.retryable
    assert "max_tokens too large" in error.message


async def test_a_stream_that_breaks_mid_answer_raises_after_the_partial_answer(
    scripted_server, runner
):
    scripted_server.script(Reply(text="one two three four five six", break_after=3))
    events, error = await collect(runner)
    assert text_of(events) == "one two three "  # the caller keeps these
    assert not any(isinstance(e, Done) for e in events)
    assert error.code is ErrorCode.RUNTIME
    assert "broke after 3 tokens" in error.message


async def test_a_malformed_chunk_is_a_runtime_error_after_the_partial_answer(
    scripted_server, runner
):
    scripted_server.script(Reply(text="alpha beta gamma", malformed_after=2))
    events, error = await collect(runner)
    assert text_of(events) == "alpha beta "
    assert error.code is ErrorCode.RUNTIME
    assert "malformed chunk after 2 tokens" in error.message


async def test_a_chunk_without_choices_is_a_runtime_error(scripted_server, runner):
    scripted_server.script(Reply(raw_events=(json.dumps({"id": "x", "object": "junk"}),)))
    _events, error = await collect(runner)
    assert error.code is ErrorCode.RUNTIME and "malformed" in error.message


async def test_an_error_event_inside_the_stream_is_a_runtime_error(scripted_server, runner):
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "scripted-model",
        "choices": [{"index": 0, "delta": {"content": "Hi "}, "finish_reason": None}],
    }
    error_event = {"error": {"message": "upstream overloaded"}}
    scripted_server.script(Reply(raw_events=(json.dumps(chunk), json.dumps(error_event))))
    events, error = await collect(runner)
    assert text_of(events) == "Hi "
    assert error.code is ErrorCode.RUNTIME and "upstream overloaded" in error.message


async def test_a_dropped_connection_before_the_response_is_retried_once(scripted_server, runner):
    # Like a keep-alive connection the server reset: no response at all.
    scripted_server.script(Reply(drop_connection=True), Reply(text="fresh connection"))
    events, error = await collect(runner)
    assert error is None
    assert text_of(events) == "fresh connection"
    assert len(scripted_server.chat_requests()) == 2


async def test_a_stream_that_breaks_before_any_token_is_retryable_with_nothing_yielded(
    scripted_server, runner
):
    scripted_server.script(Reply(text="never seen", break_after=0))
    events, error = await collect(runner)
    assert events == []
    assert error.code is ErrorCode.RUNTIME and error.retryable
    assert "before any token" in error.message


# ---- health ------------------------------------------------------------------------


async def test_health_is_ok_when_the_model_is_served(scripted_server, runner):
    health = await runner.health()
    assert health.ok
    assert health.models == ("scripted-model",)
    assert health.latency_ms is not None and health.latency_ms > 0
    assert scripted_server.requests[0].path == MODELS_ROUTE
    assert scripted_server.requests[0].authorization == f"Bearer {API_KEY}"


async def test_health_says_which_models_are_served_when_ours_is_not(scripted_server):
    scripted_server.models = ["a/one", "b/two"]
    runner = make_runner(scripted_server.url, model_id="c/three")
    health = await runner.health()
    await runner.close()
    assert not health.ok
    assert "'c/three'" in health.detail and "a/one, b/two" in health.detail


async def test_health_reports_a_server_that_is_down_or_failing(scripted_server, runner):
    scripted_server.script(Reply(status=401), route=MODELS_ROUTE)
    health = await runner.health()
    assert not health.ok and "API key" in health.detail
    assert API_KEY not in health.detail
    down = make_runner(f"http://127.0.0.1:{free_port()}")
    health = await down.health()
    await down.close()
    assert not health.ok and "Could not reach" in health.detail


# ---- logging -----------------------------------------------------------------------


def test_importing_the_runner_does_not_turn_on_request_logging():
    code = (
        "import logging; import runners.llamastack.runner;"
        "root = logging.getLogger();"
        "print(root.level, len(root.handlers))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "breezeweb.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # The SDK's import-time basicConfig(level=INFO) would make this "20 1".
    assert result.stdout.split() == [str(logging.WARNING), "0"]


# ---- a real Llama Stack server --------------------------------------------------------


@pytest.fixture
def stack(llamastack_server):
    llamastack_server.upstream.reset()
    return llamastack_server


async def test_a_real_llama_stack_server_streams_the_upstream_answer(stack):
    stack.upstream.script(Reply(text="Real stack says hello", token_delay=0.02, usage=(9, 4)))
    runner = make_runner(stack.url, model_id=stack.model_id, api_key="", timeout_seconds=30.0)
    events, error = await collect(runner)
    await runner.close()
    assert error is None
    assert [e.text for e in events if isinstance(e, TokenDelta)] == [
        "Real ",
        "stack ",
        "says ",
        "hello",
    ]
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (9, 4)
    forwarded = stack.upstream.chat_requests()[0].json
    assert forwarded["model"] == "scripted-model"
    assert forwarded["messages"][-1]["content"] == "Say hello"


async def test_an_image_part_reaches_the_upstream_through_a_real_server(stack):
    runner = make_runner(
        stack.url, model_id=stack.model_id, api_key="", timeout_seconds=30.0, enable_vision=True
    )
    image = png_data_url((10, 200, 10))
    request = ChatRequest(messages=(ChatMessage("user", "Colour?", images=(image,)),))
    _events, error = await collect(runner, request)
    await runner.close()
    assert error is None
    parts = stack.upstream.chat_requests()[0].json["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": image}} in [
        {"type": p["type"], "image_url": {"url": p["image_url"]["url"]}}
        for p in parts
        if p["type"] == "image_url"
    ]
    assert base64.b64decode(image.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


async def test_health_lists_the_real_server_models(stack):
    runner = make_runner(stack.url, model_id=stack.model_id, api_key="", timeout_seconds=30.0)
    health = await runner.health()
    await runner.close()
    assert health.ok, health.detail
    assert stack.model_id in health.models


async def test_an_unknown_model_on_a_real_server_is_not_found(stack):
    runner = make_runner(
        stack.url, model_id="elsewhere/no-such-model", api_key="", timeout_seconds=30.0
    )
    _events, error = await collect(runner)
    await runner.close()
    assert error.code is ErrorCode.NOT_FOUND and not error.retryable
    assert "'elsewhere/no-such-model'" in error.message
    assert stack.model_id in error.message
    assert stack.upstream.chat_requests() == []
