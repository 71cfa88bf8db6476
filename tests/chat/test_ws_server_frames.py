"""The frames the server sends are declared once (chat/server_frames.py), and
docs/websocket.md, the OpenAPI document and the code agree with that
declaration. At run time every frame any test causes is checked against it
(tests/support/conformance.py); here, what can be checked without a socket."""

from __future__ import annotations

import ast
import re

import pytest

from api.openapi import build_schema
from chat.frames import CLIENT_FRAMES, FRAME_TYPES, decode
from chat.server_frames import FRAMES
from tests.support.conformance import check_frame
from tests.support.processes import ROOT

DOC = ROOT / "docs" / "websocket.md"


def documented_rows(heading: str) -> dict[str, str]:
    """`type` -> the rest of its row, in one of docs/websocket.md's frame tables."""
    section = DOC.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = line.split("|")
        if line.startswith("|") and not line.startswith("|---") and len(cells) > 2:
            kind = re.fullmatch(r"\s*`([a-z_]+)`\s*", cells[1])
            if kind and kind.group(1) != "type":  # not the header
                rows[kind.group(1)] = "|".join(cells[2:])
    return rows


def test_the_docs_list_exactly_the_declared_frames_with_every_field():
    rows = documented_rows("Server → client")
    assert set(rows) == set(FRAMES)
    for kind, model in FRAMES.items():
        for field in set(model.model_fields) - {"type", "request_id"}:
            assert f"`{field}`" in rows[kind], f"docs/websocket.md: `{kind}` lacks `{field}`"
    assert set(documented_rows("Client → server")) == set(FRAME_TYPES)


def test_every_frame_the_chat_code_builds_is_a_declared_type():
    built = set()
    for path in (ROOT / "chat").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if {"type", "request_id"} <= keys:
                    kind = node.values[[getattr(k, "value", None) for k in node.keys].index("type")]
                    if isinstance(kind, ast.Constant):
                        built.add(kind.value)
    assert built and built <= set(FRAMES), built - set(FRAMES)


def test_the_openapi_document_holds_both_sides_of_the_socket():
    schemas = build_schema()["components"]["schemas"]
    server = {ref["$ref"].rsplit("/", 1)[1] for ref in schemas["WsServerFrame"]["oneOf"]}
    assert server == {model.__name__ for model in FRAMES.values()}
    client = {ref["$ref"].rsplit("/", 1)[1] for ref in schemas["WsClientFrame"]["oneOf"]}
    assert client == {model.__name__ for model in CLIENT_FRAMES}
    assert schemas["MessageFrame"]["properties"]["text"]["type"] == "string"


def test_ping_and_stop_decode_to_their_models():
    assert decode('{"type": "ping"}').request_id is None
    stop = decode('{"type": "stop", "request_id": "r1"}')
    assert (stop.type, stop.request_id) == ("stop", "r1")


TOKEN = {"type": "token", "request_id": "r1", "text": "Hi", "seq": 2}


def test_a_declared_frame_passes():
    assert check_frame(TOKEN) is None
    assert check_frame({"type": "pong", "request_id": None}) is None


@pytest.mark.parametrize(
    ("frame", "finding"),
    [
        ({**TOKEN, "extra": 1}, "('extra' was unexpected)"),
        ({**TOKEN, "seq": "2"}, "'2' is not of type 'integer'"),
        ({"type": "token", "request_id": "r1", "text": "Hi"}, "'seq' is a required property"),
        ({"type": "hello", "request_id": "r1"}, "websocket frame 'hello'"),
    ],
)
def test_a_drifted_frame_is_a_finding(frame, finding):
    problem = check_frame(frame)
    assert problem is not None and finding in problem, problem
