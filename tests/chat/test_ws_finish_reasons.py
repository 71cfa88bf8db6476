"""docs/websocket.md lists every `finish_reason` a `done` frame can carry,
and nothing else: the one definition is `chat.turns.FINISH_REASONS` (the
runners', the agent loop's and the chat's own)."""

from __future__ import annotations

import re

from agents.loop import STEP_LIMIT, TIME_LIMIT
from chat.turns import FINISH_REASONS
from tests.support.processes import ROOT

DOC = ROOT / "docs" / "websocket.md"


def documented_reasons() -> list[str]:
    section = DOC.read_text().split("\n## Finish reasons\n", 1)[1].split("\n## ", 1)[0]
    reasons = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            reasons += re.findall(r"`([a-z_]+)`", line.split("|")[1])
    return [r for r in reasons if r != "finish_reason"]


def test_docs_websocket_md_lists_exactly_the_finish_reasons():
    documented = documented_reasons()
    assert len(documented) == len(set(documented))
    assert set(documented) == set(FINISH_REASONS)
    assert {STEP_LIMIT, TIME_LIMIT, "loop", "interrupted"} <= set(FINISH_REASONS)
    assert "(see [Finish reasons](#finish-reasons))" in DOC.read_text()
