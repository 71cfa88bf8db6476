"""The OpenAI-compatible HTTP API.

In-process tests drive the real ASGI application (`breezeweb.asgi.application`)
through httpx.ASGITransport, answering from the scripted chat-completions
server on 127.0.0.1 through the real Llama Stack runner. Tests of streaming
behaviour on the wire (SSE as it arrives, client disconnects) and with the
official `openai` client run against a real uvicorn process with its own SQLite
database (the `live` fixture at the end), including the real local model.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

from django.conf import settings
from django.test import Client, override_settings

import httpx
import pytest
from asgiref.sync import sync_to_async
from PIL import Image

from accounts.models import ApiKey
from chat.models import Conversation, Message
from runners.models import GuardianRule, RunnerConfig
from runners.router import circuits
from tests.support.clients import call
from tests.support.fixtures import local_model_ready, require_local_model, runner_config, running
from tests.support.processes import WebServer, manage, site_env
from tests.support.scripted_server import Reply, ScriptedToolCall

db = pytest.mark.django_db(transaction=True)


pytestmark = pytest.mark.usefixtures("fresh_process_state")


async def complete(**kwargs) -> httpx.Response:
    """POST /v1/chat/completions (`call`'s keyword arguments: key, body, ...)."""
    return await call("POST", "/v1/chat/completions", **kwargs)


async def block_classified_answers() -> None:
    """A guardian rule that ends an answer once it says "classified"."""
    await sync_to_async(GuardianRule.objects.create)(
        name="no internals", kind="block_term", value="classified", applies_to="output"
    )


def chat_body(text: str = "Hello?", **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


def assert_openai_error(response: httpx.Response, status: int, code: str, param=...) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not ...:
        assert error["param"] == param, error
    return error


def nothing_saved() -> bool:
    return not Conversation.objects.exists() and not Message.objects.exists()


def png_data_url(size=(8, 8)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def parse_sse(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- models ----------------------------------------------------------------------------


@db
@pytest.mark.scaleout
async def test_models_lists_auto_and_each_enabled_runner_with_its_capabilities(
    api_key, scripted_runner
):
    await sync_to_async(runner_config)(
        "http://127.0.0.1:9", "vision", model_id="v", enable_vision=True, priority=5
    )
    await sync_to_async(RunnerConfig.objects.create)(
        name="off", kind="llamastack", endpoint="http://127.0.0.1:9", model_id="o", enabled=False
    )
    response = await call("GET", "/v1/models", key=api_key)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["auto", "scripted", "vision"]  # auto first, then by priority; no disabled
    scripted = body["data"][1]
    assert scripted["object"] == "model" and scripted["owned_by"] == "breezeweb"
    assert scripted["metadata"]["kind"] == "llamastack"
    assert scripted["metadata"]["model_id"] == "scripted-model"
    assert scripted["metadata"]["capabilities"] == ["llm"]
    assert body["data"][2]["metadata"]["capabilities"] == ["llm", "vlm"]
    assert body["data"][0]["metadata"]["capabilities"] == ["llm", "vlm"]
    detail = await call("GET", "/v1/models/vision", key=api_key)
    assert detail.json()["id"] == "vision"
    assert_openai_error(await call("GET", "/v1/models/off", key=api_key), 404, "model_not_found")


@db
async def test_a_missing_or_wrong_key_gets_an_openai_shaped_401(api_key, user):
    assert_openai_error(await call("GET", "/v1/models"), 401, "not_authenticated")
    assert_openai_error(
        await call("GET", "/v1/models", key="bw_not-a-real-key"), 401, "invalid_api_key"
    )
    key = await sync_to_async(ApiKey.objects.get)(user=user)
    await sync_to_async(key.revoke)()
    assert_openai_error(await call("GET", "/v1/models", key=api_key), 401, "invalid_api_key")


@db
async def test_unknown_v1_paths_and_wrong_methods_get_openai_shaped_errors(api_key):
    assert_openai_error(await call("GET", "/v1/embeddings", key=api_key), 404, "unknown_url")
    assert_openai_error(
        await call("POST", "/v1/completions", body={"prompt": "x"}), 404, "unknown_url"
    )
    response = await call("GET", "/v1/chat/completions", key=api_key)
    assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


# ---- completions ----------------------------------------------------------------------


@db
@pytest.mark.scaleout
async def test_a_completion_answers_in_openai_shape_with_usage_and_the_runner(
    api_key, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="Paris is the capital.", usage=(21, 5)))
    response = await complete(
        key=api_key,
        body=chat_body(
            "Capital of France?",
            temperature=0.2,
            top_p=0.9,
            max_tokens=40,
            stop=["\n\n"],
            seed=11,
            frequency_penalty=0.4,
            presence_penalty=0.1,
            top_k=20,
            repetition_penalty=1.15,
            logit_bias={"50256": -100},
        ),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "scripted"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Paris is the capital.",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}
    assert body["breezeweb"]["runner"] == "scripted"
    assert body["breezeweb"]["fallback"] is False
    assert "conversation_id" not in body["breezeweb"]
    sent = scripted_server.chat_requests()[-1].json
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.9
    # Every sampling parameter reaches the runner (OpenAI's and vLLM's names).
    assert (sent["seed"], sent["frequency_penalty"], sent["presence_penalty"]) == (11, 0.4, 0.1)
    assert (sent["top_k"], sent["repetition_penalty"]) == (20, 1.15)
    assert sent["logit_bias"] == {"50256": -100}
    assert sent["max_tokens"] == 40 and sent["stop"] == ["\n\n"]
    assert sent["messages"][-1] == {"role": "user", "content": "Capital of France?"}
    assert await sync_to_async(nothing_saved)()  # stateless by default


@db
async def test_a_stream_is_sse_chunks_with_usage_last_and_done(
    api_key, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="One two three", usage=(7, 3)))
    response = await complete(
        key=api_key,
        body=chat_body(stream=True, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "One two three"
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    assert finish[0]["breezeweb"]["runner"] == "scripted"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@db
async def test_tool_calls_come_back_in_openai_shape(api_key, scripted_server):
    await sync_to_async(runner_config)(scripted_server.url, "agent", enable_agents=True)
    scripted_server.script(
        Reply(text="", tool_calls=(ScriptedToolCall("get_time", '{"tz": "UTC"}', "call_1"),))
    )
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    response = await complete(
        key=api_key,
        body=chat_body("What time is it?", model="agent", tools=[tool]),
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'},
        }
    ]
    assert scripted_server.chat_requests()[-1].json["tools"][0]["function"]["name"] == "get_time"


@db
async def test_content_parts_and_a_valid_image_reach_a_vision_runner(api_key, scripted_server):
    await sync_to_async(runner_config)(scripted_server.url, "vision", enable_vision=True)
    scripted_server.script(Reply(text="A red square."))
    image = png_data_url()
    body = {
        "model": "vision",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                ],
            },
        ],
    }
    response = await complete(key=api_key, body=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "A red square."
    sent = json.dumps(scripted_server.chat_requests()[-1].json)
    assert "What is this?" in sent and "data:image/png;base64," in sent and "Be brief." in sent


@db
async def test_rag_extension_returns_sources_and_the_runner(
    api_key, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="I found nothing."))
    response = await complete(
        key=api_key,
        body=chat_body("What does the handbook say?", breezeweb={"rag": True}),
    )
    assert response.status_code == 200, response.text
    ext = response.json()["breezeweb"]
    assert ext["sources"] == [] and ext["runner"] == "scripted"


# ---- malformed requests: clear errors, nothing saved -------------------------------------


BAD_BODIES = [
    ("not a JSON object", b"[1, 2]", "invalid_type", None),
    (
        "no model",
        {"messages": [{"role": "user", "content": "x"}]},
        "missing_required_parameter",
        "model",
    ),
    (
        "model not a string",
        {"model": 3, "messages": [{"role": "user", "content": "x"}]},
        "invalid_type",
        "model",
    ),
    ("no messages", {"model": "auto"}, "missing_required_parameter", "messages"),
    ("messages not a list", {"model": "auto", "messages": "hi"}, "invalid_type", "messages"),
    ("empty messages", {"model": "auto", "messages": []}, "empty_array", "messages"),
    ("message not an object", {"model": "auto", "messages": ["hi"]}, "invalid_type", "messages[0]"),
    (
        "unknown role",
        {"model": "auto", "messages": [{"role": "wizard", "content": "x"}]},
        "invalid_value",
        "messages[0].role",
    ),
    (
        "content a number",
        {"model": "auto", "messages": [{"role": "user", "content": 5}]},
        "invalid_type",
        "messages[0].content",
    ),
    (
        "last message not the user's",
        {
            "model": "auto",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        "invalid_value",
        "messages[1].role",
    ),
    (
        "unknown part type",
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        "unsupported_content_type",
        "messages[0].content[0].type",
    ),
    ("temperature a string", chat_body(temperature="hot"), "invalid_type", "temperature"),
    ("temperature too high", chat_body(temperature=3), "invalid_value", "temperature"),
    ("seed negative", chat_body(seed=-1), "invalid_value", "seed"),
    ("top_k a float", chat_body(top_k=2.5), "invalid_type", "top_k"),
    ("penalty too high", chat_body(frequency_penalty=2.5), "invalid_value", "frequency_penalty"),
    (
        "logit_bias not a token id",
        chat_body(logit_bias={"the": 1}),
        "invalid_value",
        "logit_bias.the.[key]",
    ),
    ("logit_bias out of range", chat_body(logit_bias={"5": 101}), "invalid_value", "logit_bias.5"),
    ("max_tokens a bool", chat_body(max_tokens=True), "invalid_type", "max_tokens"),
    (
        "max_tokens zero",
        chat_body(max_completion_tokens=0),
        "invalid_type",
        "max_completion_tokens",
    ),
    ("stop a number", chat_body(stop=3), "invalid_type", "stop"),
    ("five stops", chat_body(stop=["a", "b", "c", "d", "e"]), "invalid_value", "stop"),
    ("stream a string", chat_body(stream="yes"), "invalid_type", "stream"),
    (
        "stream_options without stream",
        chat_body(stream_options={"include_usage": True}),
        "invalid_value",
        "stream_options",
    ),
    ("n two", chat_body(n=2), "unsupported_value", "n"),
    ("tools not a list", chat_body(tools={}), "invalid_type", "tools"),
    (
        "tool with a bad name",
        chat_body(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
        "invalid_value",
        "tools[0].function.name",
    ),
    ("extension not an object", chat_body(breezeweb=[]), "invalid_type", "breezeweb"),
    (
        "unknown extension field",
        chat_body(breezeweb={"ragg": True}),
        "unknown_parameter",
        "breezeweb.ragg",
    ),
    (
        "collections not ids",
        chat_body(breezeweb={"collections": ["a"]}),
        "invalid_type",
        "breezeweb.collections",
    ),
    ("save not a bool", chat_body(breezeweb={"save": "yes"}), "invalid_type", "breezeweb.save"),
]


@db
@pytest.mark.scaleout
@pytest.mark.parametrize(
    ("case", "body", "code", "param"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
async def test_a_malformed_body_gets_a_400_naming_the_field_and_saves_nothing(
    case, body, code, param, api_key, scripted_runner, scripted_server
):
    if isinstance(body, dict) and "breezeweb" not in body:
        body = {**body, "breezeweb": {"save": True}}  # even when asked to save, nothing is
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await complete(
        key=api_key,
        content=content,
        headers={"Content-Type": "application/json"},
    )
    error = assert_openai_error(response, 400, code, param)
    assert error["type"] == "invalid_request_error"
    assert await sync_to_async(nothing_saved)()
    assert scripted_server.chat_requests() == []  # no runner was asked


@db
@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"{not json", "not valid JSON"), (b"", "empty"), (b"\xff\xfe{}", "UTF-8")],
)
async def test_a_body_that_is_not_json_gets_invalid_json(content, fragment, api_key):
    response = await complete(
        key=api_key,
        content=content,
        headers={"Content-Type": "application/json"},
    )
    error = assert_openai_error(response, 400, "invalid_json", None)
    assert fragment in error["message"]


@db
async def test_an_unknown_or_disabled_model_is_404_model_not_found(
    api_key, scripted_runner, scripted_server
):
    body = chat_body(model="gpt-17", breezeweb={"save": True})
    error = assert_openai_error(
        await complete(key=api_key, body=body),
        404,
        "model_not_found",
        "model",
    )
    assert "gpt-17" in error["message"] and "/v1/models" in error["message"]
    await sync_to_async(RunnerConfig.objects.filter(name="scripted").update)(enabled=False)
    assert_openai_error(
        await complete(key=api_key, body=chat_body(model="scripted")),
        404,
        "model_not_found",
    )
    assert await sync_to_async(nothing_saved)()
    assert scripted_server.chat_requests() == []


@db
async def test_a_broken_image_is_a_400_naming_the_part(api_key, scripted_server):
    await sync_to_async(runner_config)(scripted_server.url, "vision", enable_vision=True)
    body = {
        "model": "vision",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"},
                    },
                ],
            }
        ],
    }
    response = await complete(key=api_key, body=body)
    error = assert_openai_error(
        response, 400, "invalid_image", "messages[0].content[1].image_url.url"
    )
    assert "PNG, JPEG, WebP or GIF" in error["message"]
    body["messages"][0]["content"][1]["image_url"]["url"] = "https://example.com/cat.png"
    error = assert_openai_error(await complete(key=api_key, body=body), 400, "invalid_image")
    assert "not fetched" in error["message"]
    assert scripted_server.chat_requests() == []


@db
async def test_an_image_for_a_text_only_model_is_400_but_with_auto_503(
    api_key, scripted_runner, scripted_server
):
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": png_data_url()}},
    ]
    pinned = {"model": "scripted", "messages": [{"role": "user", "content": parts}]}
    response = await complete(key=api_key, body=pinned)
    error = assert_openai_error(response, 400, "model_not_capable", "model")
    assert "vlm" in error["message"]
    auto = {**pinned, "model": "auto"}
    response = await complete(key=api_key, body=auto)
    error = assert_openai_error(response, 503, "no_runner_available")
    assert error["type"] == "server_error"
    assert scripted_server.chat_requests() == []


@db
async def test_a_body_over_the_size_limit_is_an_openai_shaped_413(api_key, scripted_runner):
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=2048):
        response = await complete(key=api_key, body=chat_body("x" * 5000))
    assert_openai_error(response, 413, "request_too_large")


@db
async def test_a_blocked_message_is_400_content_blocked_and_nothing_is_saved(
    api_key, scripted_runner, scripted_server
):
    await sync_to_async(GuardianRule.objects.create)(
        name="no secrets",
        kind="block_term",
        value="password",
        message="Please do not share passwords.",
    )
    body = chat_body("my password is hunter2", breezeweb={"save": True})
    error = assert_openai_error(await complete(key=api_key, body=body), 400, "content_blocked")
    assert error["message"] == "Please do not share passwords."
    assert await sync_to_async(nothing_saved)()
    assert scripted_server.chat_requests() == []


@db
async def test_an_output_rule_ends_the_answer_with_content_filter(
    api_key, scripted_runner, scripted_server
):
    await block_classified_answers()
    scripted_server.script(Reply(text="The plan is classified and more."))
    response = await complete(key=api_key, body=chat_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert "classified" not in body["choices"][0]["message"]["content"]
    assert "no internals" in body["breezeweb"]["blocked"]


# ---- runner failures -----------------------------------------------------------------------


@db
async def test_an_unavailable_runner_is_503_and_a_slow_one_504(api_key, scripted_server):
    await sync_to_async(runner_config)(
        scripted_server.url, "scripted", timeout_seconds=1, extra_params={"retries": 0}
    )
    scripted_server.script(Reply(status=503, headers={"Retry-After": "3"}))
    response = await complete(key=api_key, body=chat_body())
    error = assert_openai_error(response, 503, "runner_unavailable")
    assert error["type"] == "server_error"
    circuits.reset()
    scripted_server.script(Reply(headers_delay=3))
    response = await complete(key=api_key, body=chat_body())
    assert_openai_error(response, 504, "runner_timeout")


@db
async def test_an_error_after_the_stream_began_is_an_error_event_then_done(
    api_key, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="one two three four five", break_after=2))
    response = await complete(key=api_key, body=chat_body(stream=True))
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    text = "".join(
        e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e.get("choices")
    )
    assert text.startswith("one")


@db
async def test_an_upstream_failure_before_any_token_is_an_http_error_even_when_streaming(
    api_key, scripted_server
):
    await sync_to_async(runner_config)(scripted_server.url, "scripted", extra_params={"retries": 0})
    scripted_server.script(Reply(status=500))
    response = await complete(key=api_key, body=chat_body(stream=True))
    assert response.status_code in (502, 503), response.text
    assert response.json()["error"]["type"] == "server_error"


# ---- recording conversations (optional) ----------------------------------------------------


@db
@pytest.mark.scaleout
async def test_save_records_the_request_and_the_answer_as_a_conversation(
    api_key, user, scripted_runner, scripted_server
):
    scripted_server.script(Reply(text="Hi Ada."), Reply(text="You said hello."))
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "Hello, I am Ada."},
        ],
        "breezeweb": {"save": True},
    }
    response = await complete(key=api_key, body=body)
    assert response.status_code == 200, response.text
    conversation_id = response.json()["breezeweb"]["conversation_id"]

    def saved(cid):
        conversation = Conversation.objects.get(pk=cid)
        return (
            conversation.owner_id,
            conversation.title,
            [(m.role, m.content, m.status) for m in conversation.messages.order_by("id")],
        )

    owner, title, rows = await sync_to_async(saved)(conversation_id)
    assert owner == user.pk and title == "Hello, I am Ada."
    assert rows == [
        ("system", "Be nice.", "complete"),
        ("user", "Hello, I am Ada.", "complete"),
        ("assistant", "Hi Ada.", "complete"),
    ]
    body["messages"] += [
        {"role": "assistant", "content": "Hi Ada."},
        {"role": "user", "content": "What did I say?"},
    ]
    body["breezeweb"] = {"conversation_id": conversation_id}
    response = await complete(key=api_key, body=body)
    assert response.json()["breezeweb"]["conversation_id"] == conversation_id
    _, _, rows = await sync_to_async(saved)(conversation_id)
    assert rows[3:] == [
        ("user", "What did I say?", "complete"),
        ("assistant", "You said hello.", "complete"),
    ]


@db
async def test_another_users_conversation_is_404_and_untouched(
    api_key, other_user, scripted_runner, scripted_server
):
    theirs = await sync_to_async(Conversation.objects.create)(owner=other_user, title="private")
    body = chat_body(breezeweb={"conversation_id": theirs.pk})
    assert_openai_error(
        await complete(key=api_key, body=body),
        404,
        "conversation_not_found",
        "breezeweb.conversation_id",
    )
    assert await sync_to_async(Message.objects.count)() == 0
    assert scripted_server.chat_requests() == []


@db
async def test_an_unreadable_collection_is_404(api_key, other_user, scripted_runner):
    from rag.models import Collection

    private = await sync_to_async(Collection.objects.create)(name="theirs", owner=other_user)
    body = chat_body(breezeweb={"rag": True, "collections": [private.pk]})
    assert_openai_error(
        await complete(key=api_key, body=body),
        404,
        "collection_not_found",
        "breezeweb.collections",
    )


# ---- limits and CSRF ------------------------------------------------------------------------


@db
async def test_the_request_rate_per_user_is_limited_with_retry_after(
    api_key, user, scripted_runner
):
    with override_settings(API_REQUESTS_PER_MINUTE=3):
        for _ in range(3):
            assert (await call("GET", "/v1/models", key=api_key)).status_code == 200
        response = await complete(key=api_key, body=chat_body())
        error = assert_openai_error(response, 429, "rate_limit_exceeded")
        assert error["type"] == "rate_limit_error"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        # Another key of the same user shares the budget (no key farming) ...
        other = await sync_to_async(ApiKey.issue)(user, "second")
        assert (await call("GET", "/v1/models", key=other[1])).status_code == 429
    # ... unless per-key budgets are switched on.
    with override_settings(API_REQUESTS_PER_MINUTE=3, API_RATE_LIMIT_PER_KEY=True):
        assert (await call("GET", "/v1/models", key=other[1])).status_code == 200


@db
async def test_concurrent_streams_per_user_are_limited(
    api_key, user, scripted_runner, scripted_server
):
    from accounts import limits

    # Hold the user's only slot, as a running stream would (from any of their keys).
    with override_settings(API_MAX_CONCURRENT_STREAMS=1):
        lease = await limits.acquire_slot(f"api-streams:user:{user.pk}", 1)
        assert lease is not None
        response = await complete(key=api_key, body=chat_body(stream=True))
        assert_openai_error(response, 429, "too_many_concurrent_streams")
        assert response.headers["Retry-After"]
        # Non-streaming requests are not counted against streams.
        ok = await complete(key=api_key, body=chat_body())
        assert ok.status_code == 200
        await lease.release()
        response = await complete(key=api_key, body=chat_body(stream=True))
        assert response.status_code == 200
        # The finished stream gave its slot back.
        again = await limits.acquire_slot(f"api-streams:user:{user.pk}", 1)
        assert again is not None
        await again.release()
    assert scripted_server.chat_requests()


@db
@pytest.mark.scaleout
def test_a_session_call_needs_the_csrf_token_but_a_key_call_does_not(
    user, api_key, scripted_runner, scripted_server
):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    body = json.dumps(chat_body())
    refused = browser.post("/v1/chat/completions", body, content_type="application/json")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    assert scripted_server.chat_requests() == []
    # With the token from a page the session rendered, the same call goes through.
    browser.get("/settings/api-keys/")
    token = browser.cookies[settings.CSRF_COOKIE_NAME].value
    accepted = browser.post(
        "/v1/chat/completions", body, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )
    assert accepted.status_code == 200, accepted.content
    # A key-authenticated call carries no cookie and needs no token.
    program = Client(enforce_csrf_checks=True)
    keyed = program.post(
        "/v1/chat/completions",
        body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {api_key}",
    )
    assert keyed.status_code == 200
    # A GET with the session needs no token either.
    assert browser.get("/v1/models").status_code == 200


# ---- the schema and its page -----------------------------------------------------------------


def test_the_schema_is_openapi_31_and_describes_every_api_route(client):
    response = client.get("/api/schema")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"] == "3.1.0"
    paths = set(schema["paths"])
    assert {
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/chat/completions",
        "/healthz",
        "/readyz",
        "/api/documents",
        "/api/documents/{document_id}",
        "/api/documents/{document_id}/reingest",
        "/api/collections",
        "/api/search",
        "/api/conversations",
        "/api/conversations/{conversation_id}",
        "/api/runners",
    } <= paths
    # Every $ref points at a component that exists.
    text = json.dumps(schema)
    import re

    for name in set(re.findall(r'"#/components/schemas/([A-Za-z]+)"', text)):
        assert name in schema["components"]["schemas"], name


def test_the_schema_validates_as_openapi_and_its_request_schema_accepts_a_real_request():
    import jsonschema

    from api.openapi import build_schema

    schema = build_schema()
    root = {
        **schema["components"]["schemas"]["ChatCompletionRequest"],
        "components": schema["components"],
    }
    validator = jsonschema.Draft202012Validator(root)
    validator.validate(chat_body(stream=True, stream_options={"include_usage": True}, stop="x"))
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"model": "auto", "messages": []})


def test_the_docs_page_renders_the_schema_without_inline_scripts(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    html = response.content.decode()
    assert "POST" in html and "/v1/chat/completions" in html and "ChatCompletionRequest" in html
    assert "/api/search" in html and "breezeweb" in html
    # Scripts only from files (the language catalog, the service worker's
    # registration), never inline: the strict CSP holds.
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(" src=" in tag for tag in scripts), scripts
    assert "script-src 'self'" in response["Content-Security-Policy"]


# ---- live: a real uvicorn process, the official openai client -----------------------------------


_SETUP = """
import json
from django.contrib.auth import get_user_model
from accounts.models import ApiKey
from runners.models import RunnerConfig
user = get_user_model().objects.create_user("live", password="live-password-123")
keys = {name: ApiKey.issue(user, name)[1] for name in NAMES}
RunnerConfig.objects.create(name="scripted", kind="llamastack", endpoint=ENDPOINT,
    model_id="scripted-model", priority=10, timeout_seconds=10)
if LOCAL:
    RunnerConfig.objects.create(name="local", kind="executorch", model_id="smollm2-135m",
        priority=1, temperature=0.0, max_tokens=24, context_tokens=1024)
print("SETUP" + json.dumps(keys))
"""


class LiveServer:
    """uvicorn serving breezeweb.asgi on a free port, with its own SQLite database."""

    def __init__(self, tmp: Path, endpoint: str) -> None:
        # SQLite and the embedded defaults, also in the scale-out pass.
        self.env = site_env(
            tmp,
            DATABASE_URL=f"sqlite:///{tmp / 'live.sqlite3'}",
            API_REQUESTS_PER_MINUTE="40",
            # Each test here uses its own key of one user: give each key its own budget.
            API_RATE_LIMIT_PER_KEY="true",
            API_MAX_CONCURRENT_STREAMS="2",
        )
        self.web = WebServer(self.env)
        self.port, self.url = self.web.port, self.web.url
        self.endpoint = endpoint
        self.keys: dict[str, str] = {}

    def start(self) -> LiveServer:
        manage(self.env, "migrate", "--noinput")
        names = ["models", "chat", "stream", "ratelimit", "disconnect", "local"]
        local = local_model_ready()
        code = f"NAMES={names!r}\nENDPOINT={self.endpoint!r}\nLOCAL={local!r}\n" + _SETUP
        out = manage(self.env, "shell", "-c", code)
        self.keys = json.loads(out.split("SETUP", 1)[1])
        self.web.start()
        return self

    def stop(self) -> None:
        self.web.stop()

    def openai(self, key_name: str, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.keys[key_name], max_retries=0, **kwargs
        )


@pytest.fixture(scope="module")
def live(tmp_path_factory, _scripted_server_session):
    server = LiveServer(tmp_path_factory.mktemp("live"), _scripted_server_session.url)
    with running(server, "the live server"):
        yield server


def test_the_openai_client_lists_models(live, scripted_server):
    models = live.openai("models").models.list()
    ids = [m.id for m in models.data]
    assert ids[:2] == ["auto", "scripted"]
    assert models.data[1].owned_by == "breezeweb"
    assert models.data[1].model_extra["metadata"]["capabilities"] == ["llm"]


def test_the_openai_client_gets_a_completion_with_the_extension(live, scripted_server):
    scripted_server.script(Reply(text="Hello from upstream.", usage=(9, 4)))
    completion = live.openai("chat").chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=20,
        extra_body={"breezeweb": {"rag": False}},
    )
    assert completion.choices[0].message.content == "Hello from upstream."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == 13
    assert completion.model == "scripted"
    assert completion.model_extra["breezeweb"]["runner"] == "scripted"


def test_the_openai_client_streams_tokens_as_they_come(live, scripted_server):
    scripted_server.script(Reply(text="alpha beta gamma delta", token_delay=0.05, usage=(5, 4)))
    stream = live.openai("stream").chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "Count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, pieces, usage, ext = [], [], None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            arrivals.append(time.monotonic())
        if chunk.usage:
            usage = chunk.usage
            ext = chunk.model_extra.get("breezeweb")
    assert "".join(pieces) == "alpha beta gamma delta"
    assert arrivals[-1] - arrivals[0] >= 0.1  # streamed, not buffered to the end
    assert usage.completion_tokens == 4
    assert ext["runner"] == "scripted"


def test_the_openai_client_raises_authentication_error_on_a_bad_key(live):
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="bw_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    assert "bw_wrong" not in str(info.value)


def test_the_openai_client_raises_rate_limit_error_past_the_limit(live):
    import openai

    client = live.openai("ratelimit")
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(60):  # the live server allows 40 per minute per key
            client.models.list()
    assert info.value.status_code == 429
    assert int(info.value.response.headers["Retry-After"]) >= 1
    assert info.value.body["code"] == "rate_limit_exceeded"


def test_a_client_disconnect_stops_the_generation_upstream(live, scripted_server):
    scripted_server.script(Reply(tokens=tuple(f"t{i} " for i in range(200)), token_delay=0.02))
    body = chat_body("Long answer", stream=True)
    headers = {"Authorization": f"Bearer {live.keys['disconnect']}"}
    with httpx.stream(
        "POST", f"{live.url}/v1/chat/completions", json=body, headers=headers, timeout=10
    ) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 5:
                break
    upstream = scripted_server.chat_requests()[-1]
    assert upstream.finished.wait(10), "the upstream request did not end"
    assert upstream.disconnected
    assert upstream.tokens_sent < 150


@pytest.mark.slow
def test_the_real_local_model_answers_through_the_openai_client(live):
    require_local_model()
    client = live.openai("local", timeout=120)
    completion = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=16,
        temperature=0,
    )
    text = completion.choices[0].message.content
    assert text and text.strip()
    assert completion.model == "local"
    assert completion.usage.completion_tokens >= 1
    assert completion.model_extra["breezeweb"]["runner"] == "local"

    stream = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert usage is not None and usage.completion_tokens >= 1


# ---- the rate limiter itself ----------------------------------------------------------------


def test_the_rate_limiter_allows_the_limit_then_refuses_without_counting_refusals():
    import uuid

    from accounts import limits

    key = f"test:{uuid.uuid4().hex}"
    decisions = [limits.hit(key, 3, 60) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert decisions[0].remaining == 2 and decisions[2].remaining == 0
    assert all(1 <= d.retry_after <= 60 for d in decisions[3:])
    # Refusals are not counted: with a limit of 4 the same history has room for one more.
    assert limits.hit(key, 4, 60).allowed


async def test_concurrency_slots_are_bounded_and_given_back():
    import uuid

    from accounts import limits

    key = f"test:{uuid.uuid4().hex}"
    first = await limits.acquire_slot(key, 2)
    second = await limits.acquire_slot(key, 2)
    assert first and second
    assert await limits.acquire_slot(key, 2) is None
    await first.release()
    await first.release()  # idempotent: gives back one slot only
    third = await limits.acquire_slot(key, 2)
    assert third is not None and await limits.acquire_slot(key, 2) is None
    await third.release()
    await second.release()
    assert await limits.acquire_slot(key, 1) is not None
    limits.reset_slots(key)
    assert await limits.acquire_slot(key, 1) is not None


@db
async def test_a_stream_whose_first_words_break_an_output_rule_ends_with_content_filter(
    api_key, scripted_runner, scripted_server
):
    await block_classified_answers()
    scripted_server.script(Reply(text="classified stuff follows"))
    response = await complete(key=api_key, body=chat_body(stream=True))
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    finish = events[-2]
    assert finish["choices"][0]["finish_reason"] == "content_filter"
    assert "classified" not in response.text.replace('"blocked"', "")


def test_every_api_route_is_in_the_schema():
    """A new endpoint under /api/ or /v1/ must be described in api/openapi.py."""
    import re

    from django.urls import URLPattern, URLResolver, get_resolver

    from api.openapi import build_schema

    def routes(patterns, prefix=""):
        for p in patterns:
            if isinstance(p, URLResolver):
                yield from routes(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern) and not str(p.pattern).startswith("^"):
                yield "/" + prefix + str(p.pattern)

    def shape(path):
        return re.sub(r"\{[^}]+\}", "{}", re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", path))

    described = {shape(p) for p in build_schema()["paths"]}
    served = {
        shape(r)
        for r in routes(get_resolver().url_patterns)
        if r.startswith(("/api/", "/v1/", "/healthz", "/readyz"))
        and r not in ("/api/schema", "/api/docs")
    }
    assert served - described == set()
