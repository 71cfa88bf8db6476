"""Property-based fuzzing of POST /v1/chat/completions from its OpenAPI schema.

Request bodies are generated from the `ChatCompletionRequest` schema that
/api/schema serves (a small JSON Schema -> Hypothesis translator below), then
some are broken on purpose (a field replaced by arbitrary JSON, a required
field dropped, arbitrary JSON or bytes as the whole body). Each goes through
the real ASGI application in-process (httpx.ASGITransport); the runner behind
it is the scripted chat-completions server, so valid requests really complete.

The properties: never a 5xx, every error is OpenAI-shaped, every success is a
chat.completion (or a well-formed SSE stream), and a refused request saves nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.test import override_settings

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import ApiKey
from api.openapi import build_schema
from breezeweb.asgi import application
from chat.models import Conversation
from runners import registry
from runners.models import RunnerConfig
from runners.router import circuits

SCHEMA = build_schema()
COMPONENTS = SCHEMA["components"]["schemas"]
REQUEST_SCHEMA = COMPONENTS["ChatCompletionRequest"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
    """Values valid for `schema` (the subset of JSON Schema our OpenAPI uses)."""
    if "$ref" in schema:
        return from_schema(COMPONENTS[schema["$ref"].rsplit("/", 1)[-1]], depth)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, depth) for s in schema[key]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, depth) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**31)), schema.get("maximum", 2**31))
    if kind == "number":
        return st.floats(schema.get("minimum", -1e6), schema.get("maximum", 1e6), allow_nan=False)
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 40))
    if kind == "array":
        items = from_schema(schema.get("items", {}), depth + 1) if depth < 8 else st.none()
        return st.lists(
            items,
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", 3), 3),
        )
    if kind == "object" or "properties" in schema:
        if depth >= 8:
            return st.just({})
        required = set(schema.get("required", ()))
        fields = {
            name: from_schema(prop, depth + 1)
            for name, prop in schema.get("properties", {}).items()
        }
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required},
        )
    return json_values


@st.composite
def schema_bodies(draw) -> dict:
    """Bodies from the schema, steered so that many are fully valid."""
    body = draw(from_schema(REQUEST_SCHEMA))
    body["model"] = draw(st.sampled_from(["auto", "scripted", "everything", body["model"]]))
    if draw(st.booleans()):  # end with the user's turn, as a valid request must
        body["messages"] = [*body["messages"], {"role": "user", "content": draw(st.text())}]
    if "stream_options" in body and draw(st.booleans()):
        body["stream"] = True  # stream_options is only valid with streaming
    if draw(st.booleans()):
        body.pop("breezeweb", None)  # RAG on every other request would only be slower
    elif isinstance(body.get("breezeweb"), dict):
        body["breezeweb"].pop("conversation_id", None)  # ids of nobody's conversations
    return body


@st.composite
def broken_bodies(draw) -> dict | list | str | int | None:
    body = draw(schema_bodies())
    how = draw(st.sampled_from(["replace", "drop", "extra", "whole"]))
    if how == "replace":
        body[draw(st.sampled_from(sorted(REQUEST_SCHEMA["properties"])))] = draw(json_values)
    elif how == "drop":
        body.pop(draw(st.sampled_from(["model", "messages"])))
    elif how == "extra":
        body[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    else:
        return draw(json_values)
    return body


requests = st.one_of(
    schema_bodies().map(lambda b: json.dumps(b).encode()),
    broken_bodies().map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=64),
)


def check_error(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str) and error["code"]
    assert error["param"] is None or isinstance(error["param"], str)


def check_success(response: httpx.Response) -> None:
    if response.headers["content-type"].startswith("text/event-stream"):
        blocks = [b for b in response.text.split("\n\n") if b]
        assert blocks[-1] == "data: [DONE]"
        for block in blocks[:-1]:
            event = json.loads(block.removeprefix("data: "))
            assert event.get("object") == "chat.completion.chunk" or "error" in event
        return
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["total_tokens"] >= 0


@pytest.mark.django_db(transaction=True)
def test_generated_requests_never_cause_a_server_error(user, scripted_server):
    registry.forget_all()
    circuits.reset()
    RunnerConfig.objects.create(
        name="scripted",
        kind="llamastack",
        endpoint=scripted_server.url,
        model_id="scripted-model",
        priority=10,
        timeout_seconds=10,
    )
    RunnerConfig.objects.create(
        name="everything",
        kind="llamastack",
        endpoint=scripted_server.url,
        model_id="scripted-model",
        enable_vision=True,
        enable_agents=True,
        timeout_seconds=10,
    )
    raw_key = ApiKey.issue(user, "fuzz")[1]
    loop = asyncio.new_event_loop()
    seen: dict[int, int] = {}

    async def send(content: bytes) -> httpx.Response:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.post(
                "/v1/chat/completions",
                content=content,
                headers={"Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"},
            )

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(content=requests)
    def run(content: bytes) -> None:
        conversations_before = Conversation.objects.count()
        response = loop.run_until_complete(send(content))
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (content[:500], response.text[:500])
        if response.status_code == 200:
            check_success(response)
        else:
            assert response.status_code in (400, 404, 413), response.text
            check_error(response)
            assert Conversation.objects.count() == conversations_before

    try:
        with override_settings(API_REQUESTS_PER_MINUTE=100_000):
            run()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        registry.forget_all()
    # The generator reached both sides: real completions and refusals.
    assert seen.get(200, 0) >= 5 and seen.get(400, 0) >= 5, seen
