"""docs/websocket.md lists every error code the websocket can send, and
nothing else. The codes are the websocket's one table, `chat.errors.WEBSOCKET_CODES`
(the runners' `ErrorCode`s included, since a runner error is forwarded with
its code): every error frame goes through `chat.errors.websocket_error` or is
built from a `ChatError` whose code the table holds, and anything else is sent
as `internal_error`. Codes raised by name anywhere on the websocket's paths
(found by walking, from the consumer, every chat module definition it reaches)
must be in the table and the docs.
"""

from __future__ import annotations

import ast
import re

from chat.errors import WEBSOCKET_CODES, ChatError, websocket_error
from runners.base import ErrorCode, RunnerError
from runners.guardian import GuardianBlocked
from tests.support.processes import ROOT

DOC = ROOT / "docs" / "websocket.md"


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


def test_docs_websocket_md_lists_exactly_the_codes_of_the_websocket_table():
    documented = documented_codes()
    assert not WEBSOCKET_CODES - documented, (
        f"undocumented in docs/websocket.md: {WEBSOCKET_CODES - documented}"
    )
    assert not documented - WEBSOCKET_CODES, (
        f"documented but not in the table: {documented - WEBSOCKET_CODES}"
    )
    assert {code.value for code in ErrorCode} <= WEBSOCKET_CODES


def test_the_table_maps_service_errors_and_refuses_unknown_codes():
    runner = websocket_error(RunnerError("timeout", "slow"))
    assert (runner.code, runner.message, runner.retryable) == ("timeout", "slow", True)
    blocked = websocket_error(GuardianBlocked("no", rule="r", where="input"))
    assert (blocked.code, blocked.message, blocked.retryable) == ("guardian_blocked", "no", False)
    assert websocket_error(ChatError("not_found", "gone")).code == "not_found"
    # A code the table does not know, or any other exception, is a bug.
    assert websocket_error(ChatError("no_such_code", "x")).code == "internal_error"
    assert websocket_error(ValueError("secret detail")).message == "Something went wrong."


# ---- every code a chat module can raise on the websocket's paths ------------------------

CHAT = ROOT / "chat"
# Constructors of a chat error, and which positional argument is its code.
CODE_ARG = {"ChatError": 0, "PydanticCustomError": 0, "InputError": 1}


class _Module:
    """One chat module: its top-level definitions and what its names import."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tree = ast.parse((CHAT / f"{name}.py").read_text())
        self.defs: dict[str, ast.AST] = {}
        self.modules: dict[str, str] = {}  # local alias -> chat module (`from chat import x`)
        self.names: dict[str, tuple[str, str]] = {}  # local name -> (chat module, name)
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.defs[node.name] = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        self.defs[target.id] = node
            elif isinstance(node, ast.ImportFrom) and node.module == "chat":
                for alias in node.names:
                    self.modules[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chat."):
                for alias in node.names:
                    self.names[alias.asname or alias.name] = (node.module[5:], alias.name)


def websocket_reachable_codes() -> dict[str, set[str]]:
    """Code -> the chat modules that raise it, over every definition the
    websocket consumer reaches by name: its own module, and from there what
    each reached definition names in any chat module (`services.begin_message`,
    `Attachments`, `decode`, ...), transitively. A chat module's functions that
    only the HTTP API calls are not reached."""
    modules = {path.stem: None for path in CHAT.glob("*.py") if path.stem != "__init__"}

    def module(name: str) -> _Module:
        if modules[name] is None:
            modules[name] = _Module(name)
        return modules[name]

    todo = [("consumers", name) for name in module("consumers").defs]
    seen: set[tuple[str, str]] = set()
    codes: dict[str, set[str]] = {}
    while todo:
        where, name = todo.pop()
        if (where, name) in seen or where not in modules:
            continue
        seen.add((where, name))
        mod = module(where)
        if name not in mod.defs:
            continue
        for node in ast.walk(mod.defs[name]):
            if isinstance(node, ast.Name):
                if node.id in mod.defs:
                    todo.append((where, node.id))
                elif node.id in mod.names:
                    todo.append(mod.names[node.id])
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in mod.modules
            ):
                todo.append((mod.modules[node.value.id], node.attr))
            if isinstance(node, ast.Call):
                kind = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                index = CODE_ARG.get(kind)
                if index is not None and len(node.args) > index:
                    code = node.args[index]
                    if isinstance(code, ast.Constant) and isinstance(code.value, str):
                        codes.setdefault(code.value, set()).add(where)
    return codes


def test_every_code_the_websocket_can_raise_by_name_is_in_the_table_and_the_docs():
    """Error frames built from a ChatError go out with its code as it is, so a
    code raised anywhere on the websocket's paths (the consumer, the frames,
    the chat service, live answers, ...) must be one the table and
    docs/websocket.md know."""
    codes = websocket_reachable_codes()
    # The walk reaches beyond the consumer: the chat service and live answers too.
    assert {"bad_json", "credential_ended", "quota_exceeded"} <= set(codes)
    assert "services" in codes["nothing_to_regenerate"] and "services" in codes["not_editable"]
    assert "live" in codes["not_found"] and "frames" in codes["bad_image"]
    assert "errors" in codes["rate_limited"]  # chat.errors.rate_limited, from the consumer and live
    unknown = {code: sorted(where) for code, where in codes.items() if code not in WEBSOCKET_CODES}
    assert not unknown, f"raised on the websocket's paths but not in WEBSOCKET_CODES: {unknown}"
    undocumented = set(codes) - documented_codes()
    assert not undocumented, f"raised on the websocket's paths, not in docs: {undocumented}"
