"""The checker behind every test's `_answers_match_the_api_document` fixture
(tests/support/conformance.py) tells a conforming answer from a drifted one."""

from __future__ import annotations

import json

import pytest

from tests.support.conformance import check, check_event, stream_schema

JSON = "application/json"


def body(data) -> bytes:
    return json.dumps(data).encode()


RUNNER = {
    "name": "local",
    "kind": "executorch",
    "capabilities": ["llm"],
    "model_id": "SmolLM2-135M-Instruct",
    "priority": 10,
    "context_tokens": 2048,
}


def test_an_answer_as_documented_passes():
    assert check("GET", "/api/runners", 200, JSON, body({"runners": [RUNNER]})) is None
    error = {"error": {"code": "not_found", "message": "No such document."}}
    assert check("GET", "/api/documents/7", 404, JSON, body(error)) is None


@pytest.mark.parametrize(
    ("method", "path", "status", "content_type", "answer", "finding"),
    [
        # A field of the wrong type, deep inside the body.
        (
            "GET",
            "/api/runners",
            200,
            JSON,
            {"runners": [{**RUNNER, "priority": "10"}]},
            "['runners'][0]['priority']",
        ),
        # A field the document does not declare (the check holds objects closed).
        (
            "GET",
            "/api/runners",
            200,
            JSON,
            {"runners": [{**RUNNER, "api_key": "x"}]},
            "('api_key' was unexpected)",
        ),
        # A documented field missing.
        ("GET", "/api/runners", 200, JSON, {"runners": [{"name": "local"}]}, "required"),
        # A status the operation does not document.
        ("GET", "/api/runners", 418, JSON, {"error": {}}, "status 418 is not documented"),
        # An error in the other API's shape.
        ("GET", "/api/documents/7", 404, JSON, {"detail": "gone"}, "'error' is a required"),
        # JSON documented, something else sent.
        (
            "GET",
            "/api/runners",
            200,
            "text/html",
            "<p>",
            "answered text/html, documented application/json",
        ),
    ],
)
def test_a_drifted_answer_is_a_finding(method, path, status, content_type, answer, finding):
    problem = check(method, path, status, content_type, body(answer))
    assert problem is not None and finding in problem, problem


def test_literal_paths_win_over_templates_and_unknown_operations_are_left_alone():
    # `/api/conversations/export` is the export, not conversation "export".
    export = {"format": "breezeweb.conversations", "version": 1}
    assert "Export" in (check("GET", "/api/conversations/export", 200, JSON, body(export)) or "")
    # No PATCH on the export, and nothing documented at all at /api/nowhere.
    assert check("PATCH", "/api/conversations/export", 405, JSON, b"{}") is None
    assert check("GET", "/api/nowhere", 404, JSON, b"{}") is None


def test_each_event_of_a_completion_stream_is_checked():
    ref = stream_schema("POST", "/v1/chat/completions", 200)
    assert ref is not None and ref.endswith("/ChatCompletionChunk")
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "local",
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}
        ],
    }
    where = "POST /v1/chat/completions -> 200"
    assert check_event(ref, where, "data: " + json.dumps(chunk)) is None
    assert check_event(ref, where, "data: [DONE]") is None
    late_error = {"error": {"message": "m", "type": "server_error", "param": None, "code": "x"}}
    assert check_event(ref, where, "data: " + json.dumps(late_error)) is None
    drifted = {**chunk, "choices": [{"index": 0, "delta": {"content": 3}}]}
    assert "['choices'][0]" in (check_event(ref, where, "data: " + json.dumps(drifted)) or "")
    assert "not JSON" in (check_event(ref, where, "data: {oops") or "")
