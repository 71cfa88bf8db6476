"""Property-based fuzzing of the HTTP APIs.

First, every route under /api and /v1, enumerated from the URLconf (so a new
route cannot be missed), with hostile path values, query strings, methods,
content types and bodies (deep nesting, huge and non-ASCII numbers, lone
surrogates, NUL, oversized strings and bodies, wrong types, unknown fields).
The properties: never a 5xx, every error is JSON in the API's shape with a
code, saved data is unchanged, runner circuits are untouched.

Then POST /v1/chat/completions from its OpenAPI schema:

Request bodies are generated from the `ChatCompletionRequest` schema that
/api/schema serves (generated from api/schemas.py's pydantic models) by
hypothesis-jsonschema, then
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
import re
from urllib.parse import quote

from django.test import override_settings

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import ApiKey
from api.openapi import build_schema
from breezeweb.asgi import application
from chat.models import Conversation, Message, Project
from runners import registry
from runners.router import circuits
from tests.support.fixtures import runner_config
from tests.support.jsonschema_strategies import from_schema

SCHEMA = build_schema()
COMPONENTS = SCHEMA["components"]["schemas"]
REQUEST_SCHEMA = COMPONENTS["ChatCompletionRequest"]
# The request schema as a document of its own, so that its $refs resolve.
REQUEST_DOCUMENT = {**REQUEST_SCHEMA, "components": SCHEMA["components"]}

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


MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id"}


def _int64(value):
    """JSON Schema's integers are unbounded; the API refuses any beyond 64 bits
    (`number_too_large`, tested on its own above): keep generated ones inside."""
    if isinstance(value, dict):
        return {k: _int64(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int64(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-(2**63), min(2**63 - 1, value))
    return value


def _tidy(message: dict) -> dict:
    message = {k: v for k, v in message.items() if k in MESSAGE_KEYS}
    if message.get("role") == "assistant" and not message.get("tool_calls"):
        message["content"] = message.get("content") or "ok"
    return message


@st.composite
def schema_bodies(draw) -> dict:
    """Bodies from the schema, steered so that many are fully valid."""
    body = draw(from_schema(REQUEST_DOCUMENT))
    body = _int64({k: v for k, v in body.items() if k in REQUEST_SCHEMA["properties"]})
    # The schema leaves messages open to extra keys (clients send more than we
    # read); keep the ones we read, so that most generated bodies are valid.
    body["messages"] = [_tidy(message) for message in body["messages"]]
    body["model"] = draw(st.sampled_from(["auto", "scripted", "everything", body["model"]]))
    if draw(st.integers(0, 3)) < 3:  # end with the user's turn, as a valid request must
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
            # Agent mode's steps are named events (`event: breezeweb.step`), chunks too.
            name, _, data = block.rpartition("\n")
            assert name in ("", "event: breezeweb.step"), block
            event = json.loads(data.removeprefix("data: "))
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
    runner_config(scripted_server.url, "scripted", priority=10, timeout_seconds=10)
    runner_config(
        scripted_server.url,
        "everything",
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


# ---- every /api and /v1 route --------------------------------------------------------------


def api_routes() -> list[str]:
    """Every route under /api and /v1 in the URLconf, as Django writes them
    (`api/documents/<id:pk>`, `^v1/(?P<rest>.*)$`)."""
    from django.urls import URLPattern, URLResolver, get_resolver

    routes: list[str] = []

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            text = prefix + str(pattern.pattern).lstrip("^")
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, text)
            elif isinstance(pattern, URLPattern):
                routes.append(text)

    walk(get_resolver().url_patterns, "")
    return sorted(r for r in routes if r.startswith(("api/", "v1/")))


ROUTES = api_routes()
CREATING = {
    "api/conversations",
    "api/projects",
    "api/conversations/<id:conversation_id>/fork",
    "api/conversations/<id:conversation_id>/shares",
}


def _quote(text: str) -> str:
    """Percent-encoded UTF-8, lone surrogates included (as their invalid bytes)."""
    return quote(text, safe="", errors="surrogatepass")


_PARAM = re.compile(r"<(?:\w+:)?(\w+)>|\(\?P<(\w+)>[^)]*\)")

hostile_text = st.one_of(
    st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "\ud800",
            "x\udfff",
            "²",
            "١٢٣",
            "-1",
            "0",
            "9" * 25,
            "9223372036854775808",
            "1e999",
            "NaN",
            "<form><input></form>",
            "../../etc/passwd",
            "ü" * 300,
        ]
    ),
    st.text(max_size=30),
)
hostile_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**63, max_value=2**200),
    st.integers(max_value=-(2**63)),
    st.floats(allow_nan=False, allow_infinity=False),
)
hostile_values = st.recursive(
    st.none() | st.booleans() | hostile_numbers | hostile_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4)
    ),
    max_leaves=10,
)


def _raw_json_bodies() -> st.SearchStrategy[bytes]:
    """JSON texts json.dumps cannot write: deep nesting, huge integers,
    non-finite numbers, escapes of lone surrogates and NUL, oversized bodies."""
    depth = st.integers(min_value=30, max_value=200_000)
    return st.one_of(
        depth.map(lambda n: b"[" * n + b"]" * n),
        depth.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.integers(min_value=20, max_value=6000).map(
            lambda n: b'{"query": "x", "k": 1' + b"0" * n + b', "model": "auto"}'
        ),
        st.sampled_from(
            [
                b'{"query": "\\ud800", "title": "\\udfff", "model": "auto"}',
                b'{"query": "a\\u0000b", "title": "a\\u0000b"}',
                b'{"temperature": NaN, "k": Infinity, "title": -Infinity}',
                b'{"k": 1e999, "title": 1E400}',
                b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud83d"}]}',
                b"\xff\xfe\x00\x00",
                b"\xed\xa0\x80",
                b"",
                b"   ",
                b"null",
            ]
        ),
        st.integers(min_value=70_000, max_value=400_000).map(
            lambda n: b'{"title": "' + b"x" * n + b'", "query": "y"}'
        ),
    )


bodies = st.one_of(
    st.none(),
    hostile_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "title": hostile_values,
            "query": hostile_values,
            "k": hostile_values,
            "collections": hostile_values,
            "model": hostile_values,
            "messages": hostile_values,
            "breezeweb": hostile_values,
            "name": hostile_values,
            "project_id": hostile_values,
            "pinned": hostile_values,
            "message_id": hostile_values,
            "active_message_id": hostile_values,
            "expires_in_days": hostile_values,
            "instructions": hostile_values,
            "unknown_field": hostile_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
    _raw_json_bodies(),
    st.binary(max_size=64),
)
content_types = st.sampled_from(
    [
        "application/json",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/json; charset=utf-16",
        None,
    ]
)
methods = st.sampled_from(
    ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PROPFIND", "QUERY"]
)
queries = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            "?collection=%C2%B2",
            "?collection=-1",
            "?collection=99999999999999999999999",
            "?q=%00",
            "?q=%ED%A0%80",
            "?q=" + "x" * 3000,
            "?q=%22secret",
            "?q=NEAR(secret%20bob)",
            "?q=owner%3Au1%20OR%20secret*",
            "?q=secret&project=1",
            "?project=%C2%B2",
            "?project=99999999999999999999999",
            "?collection=1&collection=2",
        ]
    ),
    hostile_text.map(lambda t: "?q=" + _quote(t)),
)


def snapshot() -> dict:
    from rag.models import Collection, Document

    return {
        "conversations": sorted(Conversation.objects.values_list("pk", "title", "owner_id")),
        "messages": sorted(Message.objects.values_list("pk", "content", "status")),
        "documents": sorted(Document.objects.values_list("pk", "title", "collection_id")),
        "collections": sorted(Collection.objects.values_list("pk", "name")),
        "keys": sorted(ApiKey.objects.values_list("pk", "revoked_at")),
        "projects": sorted(Project.objects.values_list("pk", "name", "owner_id")),
    }


def test_the_route_list_comes_from_the_urlconf():
    expected = {
        "api/conversations",
        "api/conversations/<id:conversation_id>",
        "api/conversations/export",
        "api/conversations/<id:conversation_id>/export",
        "api/imports",
        "api/imports/<id:job_id>",
        "api/conversations/<id:conversation_id>/fork",
        "api/conversations/<id:conversation_id>/shares",
        "api/shares",
        "api/shares/<id:share_id>",
        "api/projects",
        "api/projects/<id:project_id>",
        "api/documents",
        "api/documents/<id:pk>",
        "api/documents/<id:pk>/reingest",
        "api/collections",
        "api/search",
        "api/runners",
        "api/usage",
        "api/schema",
        "api/docs",
        "v1/models",
        "v1/models/<str:model_id>",
        "v1/chat/completions",
    }
    assert expected <= set(ROUTES), ROUTES


@pytest.mark.django_db(transaction=True)
def test_every_api_route_answers_hostile_requests_with_json_4xx(user, other_user, scripted_server):
    from rag.models import Collection

    registry.forget_all()
    circuits.reset()
    runner_config(scripted_server.url, "scripted", priority=10, timeout_seconds=10)
    raw_key = ApiKey.issue(user, "fuzz")[1]
    # Someone else's things: ids that exist but are never the caller's.
    theirs = Conversation.objects.create(owner=other_user, title="Bob's")
    Message.objects.create(conversation=theirs, role="user", content="secret")
    their_collection = Collection.personal_for(other_user)
    their_project = Project.objects.create(owner=other_user, name="Bob's project")
    Collection.personal_for(user)
    foreign_ids = [str(theirs.pk), str(their_collection.pk), str(their_project.pk)]
    loop = asyncio.new_event_loop()
    seen: dict[str, set[int]] = {}

    async def send(method, path, content, content_type, auth) -> httpx.Response:
        headers = {}
        if auth:
            headers["Authorization"] = f"Bearer {raw_key}"
        if content_type:
            headers["Content-Type"] = content_type
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.request(method, path, content=content, headers=headers)

    @settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )
    @given(
        values=st.lists(
            st.one_of(st.sampled_from(foreign_ids), hostile_text), min_size=2, max_size=2
        ),
        method=methods,
        query=queries,
        body=bodies,
        content_type=content_types,
        auth=st.sampled_from([True, True, True, False]),
    )
    def run(route, values, method, query, body, content_type, auth) -> None:
        filled = iter(values)
        path = "/" + _PARAM.sub(lambda m: _quote(next(filled, "1")) or "1", route).rstrip("$")
        before = snapshot()
        response = loop.run_until_complete(send(method, path + query, body, content_type, auth))
        seen.setdefault(route, set()).add(response.status_code)
        context = (method, path[:200], query[:100], (body or b"")[:200], content_type)
        assert response.status_code < 500, (context, response.text[:500])
        if response.status_code >= 400:
            assert response.headers["content-type"].startswith("application/json"), (
                context,
                response.text[:300],
            )
            if method != "HEAD":
                error = response.json()["error"]
                assert isinstance(error["code"], str) and error["code"], error
                assert isinstance(error["message"], str) and error["message"], error
                if path.startswith("/v1"):
                    assert set(error) == {"message", "type", "param", "code"}, error
        completed = route == "v1/chat/completions" and response.status_code == 200
        # Creating a conversation or a project is what a 201 there means.
        created = route in CREATING and method == "POST" and response.status_code == 201
        if not (completed or created):
            assert snapshot() == before, context
        assert circuits.paused() == {}, context
        assert circuits.state("scripted") == "closed", context

    try:
        with override_settings(
            API_REQUESTS_PER_MINUTE=100_000,
            APP_API_REQUESTS_PER_MINUTE=100_000,
            DATA_UPLOAD_MAX_MEMORY_SIZE=256 * 1024,
        ):
            # Each route gets its own examples: drawing routes at random left
            # one undriven now and then.
            for route in ROUTES:
                run(route)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        registry.forget_all()
    # Every route was driven.
    assert set(seen) == set(ROUTES), sorted(set(ROUTES) - set(seen))
