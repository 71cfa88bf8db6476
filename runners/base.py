"""The Runner protocol: the one contract every inference backend implements.

A runner kind is a class listed in `runners.registry.RUNNER_KINDS`; a
`RunnerConfig` row instantiates it with `from_config`. Everything that crosses
this boundary is a frozen dataclass defined here; SDK objects never leak out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable


class Capability(StrEnum):
    LLM = "llm"
    VLM = "vlm"
    AGENT = "agent"


@dataclass(frozen=True)
class ChatMessage:
    """One turn. `images` are data URLs (already validated); `tool_calls` as
    OpenAI-style dicts on assistant turns; `tool_call_id` on tool results."""

    role: str
    content: str
    images: tuple[str, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class ChatRequest:
    """What a runner is asked to do. None means "use the runner config's value"."""

    messages: tuple[ChatMessage, ...]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    request_id: str = ""

    @property
    def has_images(self) -> bool:
        return any(m.images for m in self.messages)

    def needed_capabilities(self) -> frozenset[Capability]:
        needed = {Capability.LLM}
        if self.has_images:
            needed.add(Capability.VLM)
        if self.tools:
            needed.add(Capability.AGENT)
        return frozenset(needed)


# ---- events a runner yields ------------------------------------------------------


@dataclass(frozen=True)
class TokenDelta:
    """A piece of answer text, as produced (never splits a UTF-8 character)."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call the model asked for (arguments as a JSON string)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolResult:
    id: str
    name: str
    content: str


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not answer text, e.g.
    `queued` (position in the local runner's queue) or `trimmed` (old turns
    left out to fit the context)."""

    code: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    time_to_first_token_ms: float | None = None
    total_ms: float | None = None
    tokens_per_second: float | None = None
    prefill_tokens_per_second: float | None = None


@dataclass(frozen=True)
class Done:
    """The last event of every successful stream."""

    finish_reason: str  # "stop", "length", "tool_calls", "cancelled"
    usage: Usage = Usage()
    timings: Timings = Timings()
    model_id: str = ""


Event = TokenDelta | ToolCall | ToolResult | Notice | Done


# ---- errors ------------------------------------------------------------------------


class ErrorCode(StrEnum):
    NOT_LOADED = "not_loaded"
    INVALID_INPUT = "invalid_input"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    RUNTIME = "runtime"
    NOT_FOUND = "not_found"
    NO_RUNNER = "no_runner"


_RETRYABLE_BY_DEFAULT = {
    ErrorCode.NOT_LOADED: True,
    ErrorCode.INVALID_INPUT: False,
    ErrorCode.UNAVAILABLE: True,
    ErrorCode.TIMEOUT: True,
    ErrorCode.AUTH: False,
    ErrorCode.RATE_LIMITED: True,
    ErrorCode.RUNTIME: True,
    ErrorCode.NOT_FOUND: False,
    ErrorCode.NO_RUNNER: False,
}


class RunnerError(Exception):
    """A runner failure the user can be told about. `retryable` says whether
    another attempt (or another runner) can help; the router falls back only on
    retryable errors raised before the first token. Messages must never contain
    secrets (API keys, tokens)."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = _RETRYABLE_BY_DEFAULT[self.code] if retryable is None else retryable
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"RunnerError({self.code.value!r}, {self.message!r}, retryable={self.retryable})"


# ---- health ----------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""
    models: tuple[str, ...] = ()
    latency_ms: float | None = None


# ---- the protocol ----------------------------------------------------------------


@runtime_checkable
class Runner(Protocol):
    """An inference backend. Instances are built by the registry from a
    `RunnerConfig` and shared by every request of a process."""

    local: ClassVar[bool]
    """True when the model runs inside this process (loaded at start, holds memory)."""

    name: str
    model_id: str
    capabilities: frozenset[Capability]
    context_tokens: int

    @classmethod
    def from_config(cls, config: Any) -> Runner:
        """Build an instance from a `RunnerConfig` (saved or not). Cheap: no I/O."""
        ...

    @classmethod
    def validate_config(cls, config: Any) -> dict[str, str]:
        """Problems with an enabled config of this kind, as {field: message}."""
        ...

    async def load(self) -> None:
        """Get ready to serve (load weights, open the HTTP client). Idempotent."""

    def stream(self, request: ChatRequest) -> AsyncIterator[Event]:
        """Answer `request` as events ending with `Done`; raise `RunnerError`.
        Cancelling the consuming task (or `aclose()` on the iterator) must stop
        generation promptly and free the runner for the next request."""
        ...

    async def health(self) -> Health:
        """Whether the runner can answer now, cheaply."""
        ...

    async def close(self) -> None:
        """Release resources (threads, HTTP pools). Idempotent."""

    def count_tokens(self, text: str) -> int:
        """An estimate of `text`'s length in the model's tokens, for prompt budgets."""
        ...
