"""One turn, one record of it: `TurnRecorder` turns `pipeline.run_turn`'s
events into the `TurnOutcome` that the websocket and the HTTP API both save
through `chat.services` (docs/architecture.md, *One turn, one record of it*).

It is the runners' `EventCollector` (text, tool calls, notices, routing,
`Done`, timings measured one way) plus what only a chat turn has: the
sources retrieval found, and the outcome saved onto the assistant message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agents import loop
from agents.loop import StepFinished
from chat.errors import ChatError
from chat.pipeline import Sources
from chat.services import INTERRUPTED, TurnOutcome
from runners import base
from runners.collect import EventCollector

# Message.Status values an answer ends with.
COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"

# The finish_reason of a stopped answer and of a failed one.
CANCELLED, ERROR = "cancelled", "error"

FINISH_REASONS = (*base.FINISH_REASONS, *loop.FINISH_REASONS, ERROR, INTERRUPTED)
"""Every `finish_reason` an answer is saved with and a `done` frame carries
(docs/websocket.md lists exactly these): the runner's, the agent loop's, a
failed answer's and one a server that died left unfinished."""


@dataclass
class TurnRecorder(EventCollector):
    sources: list[dict[str, Any]] = field(default_factory=list)
    # Agent mode: the finished tool calls (the websocket also saves them as they happen).
    steps: list[dict[str, Any]] = field(default_factory=list)

    def take(self, event: Any) -> None:
        if isinstance(event, Sources):
            self.sources = [dict(s) for s in event.sources]
        elif isinstance(event, StepFinished):
            self.steps.append(event.step.as_dict())
        else:
            super().take(event)

    def outcome(
        self, status: str, error: ChatError | None = None, *, finish_reason: str | None = None
    ) -> TurnOutcome:
        """The saved record of the answer. `finish_reason` is the runner's for a
        complete answer (`stop` when it gave none), `cancelled` for a stopped
        one and `error` for a failed one, unless given."""
        if finish_reason is None and status != COMPLETE:
            finish_reason = CANCELLED if status == STOPPED else ERROR
        fields = self.fields(finish_reason=finish_reason, error=error)
        fields["finish_reason"] = fields["finish_reason"] or "stop"
        return TurnOutcome(**fields, status=status, sources=self.sources)
