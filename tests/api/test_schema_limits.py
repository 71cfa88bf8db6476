"""Every limit of chat/limits.py that bounds an HTTP request is in the OpenAPI
document, at the field it bounds, with its value (the document is generated
from the same pydantic models that enforce it); and every limit is accounted
for, so a new one cannot be enforced without being documented."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api import schemas
from api.openapi import build_schema
from chat import limits

SCHEMA = build_schema()
COMPONENTS = SCHEMA["components"]["schemas"]


def values(node: Any, keyword: str) -> set:
    """Every value of `keyword` anywhere in `node` (through anyOf, items, ...)."""
    found = set()
    if isinstance(node, dict):
        for key, child in node.items():
            if key == keyword and not isinstance(child, dict | list):
                found.add(child)
            found |= values(child, keyword)
    elif isinstance(node, list):
        for child in node:
            found |= values(child, keyword)
    return found


def field(component: str, name: str) -> dict:
    return COMPONENTS[component]["properties"][name]


# limit name -> (component, field, keyword, value the schema holds)
IN_SCHEMA = {
    "MAX_MESSAGES": [("ChatCompletionRequest", "messages", "maxItems", limits.MAX_MESSAGES)],
    "MAX_TEXT_CHARS": [
        (role, "content", "maxLength", limits.MAX_TEXT_CHARS)
        for role in ("SystemMessage", "UserMessage", "AssistantMessage", "ToolMessage")
    ]
    + [("TextPart", "text", "maxLength", limits.MAX_TEXT_CHARS)],
    "MAX_STOP_SEQUENCES": [
        ("ChatCompletionRequest", "stop", "maxItems", limits.MAX_STOP_SEQUENCES)
    ],
    "MAX_TOOLS": [("ChatCompletionRequest", "tools", "maxItems", limits.MAX_TOOLS)],
    "MAX_TOKENS": [
        ("ChatCompletionRequest", name, "maximum", limits.MAX_TOKENS)
        for name in ("max_tokens", "max_completion_tokens")
    ],
    "SAMPLING_BOUNDS": [
        ("ChatCompletionRequest", name, keyword, value)
        for name, (_, low, high) in limits.SAMPLING_BOUNDS.items()
        for keyword, value in (("minimum", low), ("maximum", high))
    ],
    "MAX_TOOL_NAME_CHARS": [
        (
            "FunctionDefinition",
            "name",
            "pattern",
            f"^[A-Za-z0-9_-]{{1,{limits.MAX_TOOL_NAME_CHARS}}}$",
        )
    ],
    "MAX_QUERY_CHARS": [("SearchRequest", "query", "maxLength", limits.MAX_QUERY_CHARS)],
    "MAX_SHARE_DAYS": [("ShareRequest", "expires_in_days", "maximum", limits.MAX_SHARE_DAYS)],
    "MAX_INSTRUCTIONS_CHARS": [
        ("ProjectRequest", "instructions", "maxLength", limits.MAX_INSTRUCTIONS_CHARS)
    ],
    "MAX_SEARCH_K": [("SearchRequest", "k", "maximum", limits.MAX_SEARCH_K)],
    "MAX_FILES_PER_REQUEST": [("Upload", "file", "maxItems", limits.MAX_FILES_PER_REQUEST)],
    "MAX_DOCUMENTS_LISTED": [
        ("DocumentList", "documents", "maxItems", limits.MAX_DOCUMENTS_LISTED)
    ],
    "MAX_TIMEZONE_CHARS": [
        ("BreezeWebRequest", "timezone", "maxLength", limits.MAX_TIMEZONE_CHARS)
    ],
}
# Limits stated in prose: (where, the text that must be there).
IN_PROSE = {
    "MAX_IMAGES": (field("UserMessage", "content")["description"], "At most 4 image parts"),
    "MAX_TITLE_CHARS": (field("ConversationPatch", "title")["description"], "1-200 characters"),
    "MAX_CONVERSATION_QUERY_CHARS": (
        json.dumps(SCHEMA["paths"]["/api/conversations"]["get"]["parameters"]),
        "at most 200 characters",
    ),
    "MAX_SEARCH_HITS": (
        json.dumps(SCHEMA["paths"]["/api/conversations"]["get"]["parameters"]),
        "best match first, at most 50",
    ),
    "MAX_SMALL_BODY_BYTES": (SCHEMA["info"]["description"], "65536 (/api)"),
    "MAX_JSON_DEPTH": (SCHEMA["info"]["description"], "64 (/v1)"),
    "MAX_APP_JSON_DEPTH": (SCHEMA["info"]["description"], "32 (/api)"),
}
# Limits that bound no HTTP request body, and why.
ELSEWHERE = {
    "MAX_COLLECTIONS": "the websocket's collections",
    "MAX_REQUEST_ID_CHARS": "the websocket's request_id",
    "MAX_RUNNER_NAME_CHARS": "the websocket's runner name",
    "MAX_ATTACHED_PER_SOCKET": "the websocket's attach frames",
    "TITLE_MAX_CHARS": "a title made from a first message, not a request field",
    "MAX_ACTIVE_KEYS": "the API-keys page (an HTML form), not the HTTP API",
}


def test_max_messages_is_in_the_generated_schema():
    messages = field("ChatCompletionRequest", "messages")
    assert messages["maxItems"] == limits.MAX_MESSAGES == 1000
    assert messages["minItems"] == 1


@pytest.mark.parametrize("name", sorted(IN_SCHEMA))
def test_each_request_limit_is_in_the_schema_at_its_field(name):
    for component, name_, keyword, value in IN_SCHEMA[name]:
        assert value in values(field(component, name_), keyword), (component, name_, keyword)


@pytest.mark.parametrize("name", sorted(IN_PROSE))
def test_limits_without_a_keyword_are_stated_in_the_schema_text(name):
    text, expected = IN_PROSE[name]
    assert expected in text, (name, text)


def test_every_limit_is_accounted_for():
    """A new limit in chat/limits.py must be put in the schema (or said to be elsewhere)."""
    names = {
        n for n, v in vars(limits).items() if n.isupper() and isinstance(v, int | tuple | dict)
    }
    accounted = set(IN_SCHEMA) | set(IN_PROSE) | set(ELSEWHERE)
    assert names == accounted, (sorted(names - accounted), sorted(accounted - names))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}] * (limits.MAX_MESSAGES + 1)}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 129}, "tools"),
    ],
)
def test_the_schema_limits_are_the_enforced_ones(body, param):
    base = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(schemas.InputError) as info:
        schemas.parse(schemas.ChatCompletionRequest, {**base, **body})
    assert (info.value.code, info.value.param) == ("array_too_long", param)
    at_limit = {k: v[:-1] for k, v in body.items()}
    schemas.parse(schemas.ChatCompletionRequest, {**base, **at_limit})


def test_the_schema_is_json_and_has_no_hand_written_titles():
    text = json.dumps(SCHEMA)
    assert '"title": "Messages"' not in text  # pydantic's field titles are dropped


PIXEL = "data:image/png;base64,iVBORw0KGgo="


def user_with_images(n: int) -> dict:
    image = {"type": "image_url", "image_url": {"url": PIXEL}}
    return {"role": "user", "content": [{"type": "text", "text": "x"}] + [image] * n}


def test_v1_takes_as_many_images_per_message_as_the_websocket():
    base = {"model": "auto"}
    schemas.parse(
        schemas.ChatCompletionRequest, {**base, "messages": [user_with_images(limits.MAX_IMAGES)]}
    )
    with pytest.raises(schemas.InputError) as info:
        body = {**base, "messages": [user_with_images(limits.MAX_IMAGES + 1)]}
        schemas.parse(schemas.ChatCompletionRequest, body)
    assert (info.value.status, info.value.code) == (400, "array_too_long")
    assert info.value.param == "messages[0].content"
    assert f"At most {limits.MAX_IMAGES} images" in info.value.message


def test_v1_caps_max_tokens_like_the_websocket():
    base = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
    for name in ("max_tokens", "max_completion_tokens"):
        schemas.parse(schemas.ChatCompletionRequest, {**base, name: limits.MAX_TOKENS})
        with pytest.raises(schemas.InputError) as info:
            schemas.parse(schemas.ChatCompletionRequest, {**base, name: limits.MAX_TOKENS + 1})
        assert (info.value.code, info.value.param) == ("invalid_type", name)
