"""Every JSON answer of the HTTP APIs, and every frame the chat websocket
sends, checked against the OpenAPI document.

api/schemas.py declares the response bodies and api/openapi.py says which
operation answers which model for which status; the views build those bodies
themselves. This middleware (first in both chains of the test run's settings,
tests/support/settings.py) checks every JSON response of a documented
operation, whichever test and client caused it, against the document's schema
for that operation and status. An undocumented status of a documented
operation is a finding too. Findings are recorded here (a server a test
started appends them to the file LOG_VARIABLE names), and the autouse fixture
`_answers_match_the_api_document` (tests/conftest.py) fails the test during
which one was made, so the document cannot drift from what the views send.

The websocket's frames are checked the same way: the middleware, when a
process builds its handlers, also wraps `ChatConsumer.send_frame` (the one
place a frame leaves) so that each frame is held to its model in
chat/server_frames.py (`WsServerFrame`).

Objects are checked closed: a field the views or the consumer send that the
models do not declare is a finding too (`_closed`).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_DOCUMENT_URI = "urn:breezeweb:openapi"
REF_PREFIX = "#/components/schemas/"
# Where servers a test starts (other processes, which inherit the variable from
# tests/support/hermetic.py) write their findings for the test process to read.
LOG_VARIABLE = "BREEZEWEB_CONFORMANCE_LOG"

# What the middleware found in this process since the last `take_findings()`.
_findings: list[str] = []
# Set by the test process (tests/conftest.py); a server it started writes to the log.
in_test_process = False


def _record(problem: str) -> None:
    if in_test_process or not os.environ.get(LOG_VARIABLE):
        _findings.append(problem)
        return
    with open(os.environ[LOG_VARIABLE], "a", encoding="utf-8") as log:
        log.write(f"(pid {os.getpid()}) {problem}\n")


def take_findings() -> list[str]:
    """What this process and the servers it started found since the last call."""
    found = list(_findings)
    _findings.clear()
    log = Path(os.environ.get(LOG_VARIABLE, "/nonexistent"))
    if log.is_file():
        found += log.read_text(encoding="utf-8").splitlines()
        log.unlink(missing_ok=True)
    return found


@cache
def _paths() -> list[tuple[re.Pattern[str], dict[str, Any]]]:
    """(path pattern, its operations by method), literal paths before
    templated ones, as Django's URLconf resolves them: `/api/conversations/export`
    is not a conversation id."""
    from api.openapi import build_schema

    found = []
    for path, item in build_schema()["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$")
        found.append((path.count("{"), pattern, {m.upper(): op for m, op in item.items()}))
    found.sort(key=lambda entry: entry[0])
    return [(pattern, operations) for _, pattern, operations in found]


def _operation(method: str, path: str) -> dict[str, Any] | None:
    """The documented operation a request is for, or None."""
    operations = next((ops for pattern, ops in _paths() if pattern.match(path)), {})
    return operations.get(method)


def _closed(node: Any) -> Any:
    """A copy of a schema in which an object that lists its fields and says
    nothing of others gets `additionalProperties: false`, so an undeclared
    field is a finding (a model with extra="allow" and a free-form dict say
    otherwise and keep it). The published document stays open, so clients
    tolerate fields added later."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: _closed(value) for key, value in node.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


@cache
def _registry() -> Registry:
    """The closed document, made once per process for every validator."""
    from api.openapi import build_schema

    document = Resource.from_contents(_closed(build_schema()), default_specification=DRAFT202012)
    return Registry().with_resource(_DOCUMENT_URI, document)


@cache
def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": _DOCUMENT_URI + ref}, registry=_registry(), format_checker=FormatChecker()
    )


def check(method: str, path: str, status: int, content_type: str, body: bytes) -> str | None:
    """What is wrong with this answer against the document, or None."""
    operation = _operation(method, path)
    if operation is None:
        return None  # not a documented operation (the API's 404 and 405 answers)
    where = f"{method} {path} -> {status}"
    documented = operation["responses"].get(str(status))
    if documented is None:
        return f"{where}: status {status} is not documented for this operation"
    media = documented.get("content", {})
    if not media:
        return None  # documented without a body (204)
    sent = content_type.split(";")[0].strip()
    if sent not in media:
        return f"{where}: answered {sent or 'no content type'}, documented {', '.join(media)}"
    if sent != "application/json":
        return None  # Markdown, a file: documented as a string
    try:
        data = json.loads(body)
    except ValueError:
        return f"{where}: the body is not JSON"
    return _against(media["application/json"]["schema"]["$ref"], data, where)


def _against(ref: str, data: Any, where: str) -> str | None:
    error = next(iter(_validator(ref).iter_errors(data)), None)
    if error is None:
        return None
    at = "".join(f"[{step!r}]" for step in error.absolute_path) or "the body"
    return f"{where}: {at}: {error.message[:300]} (schema {ref.rsplit('/', 1)[-1]})"


def stream_schema(method: str, path: str, status: int) -> str | None:
    """The `$ref` of the events of a documented text/event-stream answer."""
    operation = _operation(method, path) or {}
    documented = operation.get("responses", {}).get(str(status), {})
    media = documented.get("content", {}).get("text/event-stream")
    return media["schema"]["$ref"] if media else None


def check_event(ref: str, where: str, event: str) -> str | None:
    """One Server-Sent Event of a stream whose `data:` events are `ref` objects;
    an error after the stream began is an OpenAIError instead, and `[DONE]` ends it."""
    data = "\n".join(line[5:].lstrip() for line in event.splitlines() if line.startswith("data:"))
    if not data or data == "[DONE]":
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        return f"{where}: an event that is not JSON: {data[:100]!r}"
    if isinstance(payload, dict) and "error" in payload:
        ref = REF_PREFIX + "OpenAIError"
    return _against(ref, payload, where + " (an event)")


def check_frame(frame: dict[str, Any]) -> str | None:
    """What is wrong with a frame the chat websocket sends, or None."""
    from chat.server_frames import FRAMES

    kind = frame.get("type")
    where = f"websocket frame {str(kind)[:40]!r}"
    model = FRAMES.get(kind) if isinstance(kind, str) else None
    if model is None:
        return f"{where}: not a type of WsServerFrame ({', '.join(FRAMES)})"
    return _against(REF_PREFIX + model.__name__, frame, where)


def install_websocket_check() -> None:
    from chat.consumers import ChatConsumer

    send_frame = ChatConsumer.send_frame
    if getattr(send_frame, "checked", False):
        return

    async def checked(self: Any, frame: dict) -> None:
        if problem := check_frame(frame):
            _record(problem)
        await send_frame(self, frame)

    checked.checked = True  # type: ignore[attr-defined]
    ChatConsumer.send_frame = checked  # type: ignore[method-assign]


class ConformanceMiddleware:
    """Records a finding for any answer that does not match the API document."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        install_websocket_check()
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        response = self.get_response(request)
        self._check(request, response)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        response = await self.get_response(request)
        self._check(request, response)
        return response

    @staticmethod
    def _check(request: HttpRequest, response: HttpResponse) -> None:
        if getattr(response, "streaming", False):
            ref = stream_schema(request.method or "", request.path, response.status_code)
            if ref is not None and response.get("Content-Type", "").startswith("text/event-stream"):
                where = f"{request.method} {request.path} -> {response.status_code}"
                response.streaming_content = _checked_events(response, ref, where)
            return  # a file download: not JSON
        problem = check(
            request.method or "",
            request.path,
            response.status_code,
            response.get("Content-Type", ""),
            response.content,
        )
        if problem:
            _record(problem)


def _checked_events(response: Any, ref: str, where: str) -> Any:
    """The response's chunks, unchanged; each complete event checked as it passes."""
    buffer = {"text": ""}
    decoder = codecs.getincrementaldecoder("utf-8")()  # a character may span two chunks

    def look(chunk: bytes | str) -> None:
        text = buffer["text"] + (decoder.decode(chunk) if isinstance(chunk, bytes) else chunk)
        *events, buffer["text"] = text.split("\n\n")
        for event in events:
            if problem := check_event(ref, where, event):
                _record(problem)

    chunks = response.streaming_content  # now: the caller replaces it with what this returns
    if response.is_async:

        async def checked_async() -> Any:
            async for chunk in chunks:
                look(chunk)
                yield chunk

        return checked_async()

    def checked() -> Any:
        for chunk in chunks:
            look(chunk)
            yield chunk

    return checked()
