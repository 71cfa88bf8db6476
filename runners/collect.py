"""What a stream of runner events amounts to, and how long it took: the one
event collector (docs/architecture.md, *One turn, one record of it*).

`EventCollector.take(event)` gathers the text, tool calls, notices, the
routing and the final `Done` of `route()` (or of `chat.pipeline.run_turn`,
whose collector, `chat.turns.TurnRecorder`, adds sources and the saved
outcome). It lives in `runners` so that the admin's test prompt
(runners/probes.py) uses it too: `runners` imports neither `chat` nor `rag`.

Timings are measured one way, on our clock, from `started` (when the request
reached the server):

- time to first token: until the first answer event (text or a tool call)
  left the stream, so it includes guardian, retrieval, routing, queueing and
  prompt processing: what the user waited;
- total: until `finish()`;
- tokens per second: the runner's own decode rate when it reports one, else
  completion tokens over the time from the first token to the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from runners.base import Done, Notice, RunnerError, TokenDelta, ToolCall
from runners.router import Routed


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What a stream amounted to: the answer, who gave it, its usage and
    timings, and the error that ended it (if one did)."""

    content: str = ""
    runner_name: str = ""
    model_id: str = ""
    fallback: bool = False
    finish_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token_ms: float | None = None
    tokens_per_second: float | None = None
    total_ms: float | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    error_code: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class EventCollector:
    started: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    routed: Routed | None = None
    done: Done | None = None
    first_token_at: float | None = None
    ended_at: float | None = None

    def take(self, event: Any) -> None:
        """Record one event (unknown kinds are ignored)."""
        if isinstance(event, TokenDelta):
            if event.text:
                self._first()
                self.parts.append(event.text)
        elif isinstance(event, ToolCall):
            self._first()
            self.tool_calls.append(event)
        elif isinstance(event, Routed):
            self.routed = event
        elif isinstance(event, Notice):
            self.notices.append(event)
        elif isinstance(event, Done):
            self.done = event

    def _first(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def finish(self) -> None:
        """The stream ended (completed, failed or cancelled): stop the clock."""
        if self.ended_at is None:
            self.ended_at = time.monotonic()

    # ---- what it amounts to --------------------------------------------------------------

    def fields(self, *, finish_reason: str | None = None, error: Any = None) -> dict[str, Any]:
        """The fields of an `Outcome` (stopping the clock): `finish_reason`
        defaults to the runner's; `error` is anything with a code and a
        message (a RunnerError, chat's ChatError)."""
        self.finish()
        if finish_reason is None:
            finish_reason = self.done.finish_reason if self.done else ""
        code = getattr(error, "code", "")
        return {
            "content": self.content,
            "runner_name": self.runner_name,
            "model_id": self.model_id,
            "fallback": self.fallback,
            "finish_reason": finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token_ms": self.time_to_first_token_ms,
            "tokens_per_second": self.tokens_per_second,
            "total_ms": self.total_ms,
            "tool_calls": tuple(self.tool_calls),
            "error_code": getattr(code, "value", code) if error else "",
            "error": error.message if error else "",
        }

    def outcome(self, error: RunnerError | None = None) -> Outcome:
        return Outcome(**self.fields(error=error))

    @property
    def content(self) -> str:
        return "".join(self.parts)

    @property
    def runner_name(self) -> str:
        return self.routed.runner_name if self.routed else ""

    @property
    def model_id(self) -> str:
        if self.done and self.done.model_id:
            return self.done.model_id
        return self.routed.model_id if self.routed else ""

    @property
    def fallback(self) -> bool:
        return self.routed.fallback if self.routed else False

    @property
    def prompt_tokens(self) -> int | None:
        return self.done.usage.prompt_tokens if self.done else None

    @property
    def completion_tokens(self) -> int | None:
        return self.done.usage.completion_tokens if self.done else None

    @property
    def time_to_first_token_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return round((self.first_token_at - self.started) * 1000, 1)

    @property
    def total_ms(self) -> float:
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        return round((end - self.started) * 1000, 1)

    @property
    def tokens_per_second(self) -> float | None:
        timings = self.done.timings if self.done else None
        tps = timings.tokens_per_second if timings and timings.tokens_per_second else None
        if tps is None and self.completion_tokens and self.first_token_at is not None:
            end = self.ended_at if self.ended_at is not None else time.monotonic()
            streamed = end - self.first_token_at
            if streamed > 0:
                tps = self.completion_tokens / streamed
        return round(tps, 1) if tps else None
