"""docs/websocket.md lists every error code the websocket can send, and
nothing else. The codes are read from the source (AST), not from a hand list:

- `FrameError("code", ...)` and `_error_frame(request_id, "code", ...)` /
  `send_error(request_id, "code", ...)` in chat/consumers.py, and the
  `error = ("code", ...)` tuples it builds while streaming;
- `ChatError("code", ...)` raised by the functions of chat/services.py that
  the consumer calls, and by the chat.py functions those call in turn;
- every runner `ErrorCode`, since a runner error is forwarded with its code.
"""

from __future__ import annotations

import ast
import re

from runners.base import ErrorCode
from tests.support.processes import ROOT

CONSUMERS = ROOT / "chat" / "consumers.py"
CHAT = ROOT / "chat" / "services.py"
DOC = ROOT / "docs" / "websocket.md"


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _constants(node: ast.expr | None) -> set[str] | None:
    """The strings an expression can be: a constant, or either branch of a
    conditional expression; None when it is not known statically."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        body, orelse = _constants(node.body), _constants(node.orelse)
        return body | orelse if body is not None and orelse is not None else None
    return None


def _codes_in(tree: ast.AST) -> set[str]:
    codes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            position = {"FrameError": 0, "ChatError": 0, "_error_frame": 1, "send_error": 1}
            index = position.get(name)
            if index is not None and len(node.args) > index:
                found = _constants(node.args[index])
                # A code built at run time would escape this test: only the
                # forwarding helpers may pass one on (an error's own `.code`).
                assert found is not None or name in ("_error_frame", "send_error"), ast.dump(node)
                codes |= found or set()
        elif (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Tuple)
            and any(isinstance(t, ast.Name) and t.id == "error" for t in node.targets)
        ):
            codes |= (_constants(node.value.elts[0]) if node.value.elts else None) or set()
    return codes


def _chat_codes_reachable_from_the_consumer(consumer: ast.Module) -> set[str]:
    chat_tree = ast.parse(CHAT.read_text())
    functions = {
        node.name: node
        for node in chat_tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    todo = {
        node.attr
        for node in ast.walk(consumer)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "services"
        and node.attr in functions
    }
    assert {"begin_message", "begin_regenerate", "begin_edit"} <= todo
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for node in ast.walk(functions[name]):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in functions
                and node.func.id not in seen
            ):
                todo.add(node.func.id)
    codes: set[str] = set()
    for name in seen:
        codes |= _codes_in(functions[name])
    return codes


def emitted_codes() -> set[str]:
    consumer = ast.parse(CONSUMERS.read_text())
    return (
        _codes_in(consumer)
        | _chat_codes_reachable_from_the_consumer(consumer)
        | {code.value for code in ErrorCode}
    )


def documented_codes() -> set[str]:
    text = DOC.read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    codes: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first_cell = line.split("|")[1]
            codes |= set(re.findall(r"`([a-z_]+)`", first_cell))
    codes.discard("code")
    return codes


def test_the_extraction_finds_codes_of_every_origin():
    codes = emitted_codes()
    # One from each source: a frame check, a chat refusal, the stream, a runner.
    assert {"bad_json", "nothing_to_regenerate", "guardian_blocked", "no_runner"} <= codes


def test_docs_websocket_md_lists_exactly_the_error_codes_the_websocket_can_send():
    emitted, documented = emitted_codes(), documented_codes()
    assert not emitted - documented, f"undocumented in docs/websocket.md: {emitted - documented}"
    assert not documented - emitted, f"documented but never sent: {documented - emitted}"
