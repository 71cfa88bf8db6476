"""docs/websocket.md lists every error code the websocket can send, and
nothing else. The codes are the websocket's one table, `chat.errors.WEBSOCKET_CODES`
(the runners' `ErrorCode`s included, since a runner error is forwarded with
its code): every error frame goes through `chat.errors.websocket_error` or is
built from a `ChatError` whose code the table holds, and anything else is sent
as `internal_error`.
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


def test_the_codes_the_websocket_raises_by_name_are_in_the_table():
    """A cheap guard for typos: literal codes in the frame and consumer modules."""
    codes: set[str] = set()
    for name in ("frames.py", "consumers.py", "errors.py"):
        for node in ast.walk(ast.parse((ROOT / "chat" / name).read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", "") in ("ChatError", "PydanticCustomError")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                codes.add(node.args[0].value)
    assert {"bad_json", "text_too_long", "credential_ended", "rate_limited"} <= codes
    assert codes <= WEBSOCKET_CODES, codes - WEBSOCKET_CODES
