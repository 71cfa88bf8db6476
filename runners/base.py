"""The Runner protocol: the one contract every inference backend implements.

A runner kind is a class listed in `runners.registry.RUNNER_KINDS`; a
`RunnerConfig` row instantiates it with `from_config`. Everything that crosses
this boundary is a frozen dataclass defined here; SDK objects never leak out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
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


# The sampling parameters a request may set, each interface's declaration of
# them reads these: name -> (type, minimum, maximum). Plus `logit_bias`:
# token id -> a bias within LOGIT_BIAS_RANGE, at most MAX_LOGIT_BIAS entries.
SAMPLING_BOUNDS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 1_000_000),
    "repetition_penalty": (float, 0.5, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "presence_penalty": (float, -2.0, 2.0),
    "seed": (int, 0, 2**63 - 1),
}
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 300
SAMPLING_PARAMS = (*SAMPLING_BOUNDS, "logit_bias")


@dataclass(frozen=True)
class ChatRequest:
    """What a runner is asked to do. None means "use the runner config's value".

    Sampling (OpenAI / llama.cpp meanings; the local runner honours them all,
    see runners/executorch/sampling.py): `top_k` (0 = off),
    `repetition_penalty` (1.0 = off), `frequency_penalty` and
    `presence_penalty` (0 = off), `seed` (same seed, same answer),
    `logit_bias` (token id -> -100..100)."""

    messages: tuple[ChatMessage, ...]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    request_id: str = ""
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = None

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


class NoticeCode(StrEnum):
    """Every code a `Notice` can carry, and its `data`: the one definition
    (docs/websocket.md lists them; the chat page shows a translated message
    per code, static/js/notices.js, which tests/test_i18n.py checks)."""

    QUEUED = "queued"  # position: in the local runner's queue
    TRIMMED = "trimmed"  # dropped: oldest turns left out to fit the context
    LOOP = "loop"  # unit: what the answer kept repeating
    FALLBACK = "fallback"  # failed: the runner that failed; code: its ErrorCode
    STEP_LIMIT = "step_limit"  # max_steps: the agent's cap on rounds of tool calls
    TIME_LIMIT = "time_limit"  # seconds: the agent turn's time limit


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not answer text, e.g.
    `queued` (position in the local runner's queue) or `trimmed` (old turns
    left out to fit the context). `code` is one of `NoticeCode` (a plain
    string once made); `message` is English, for programs and as the page's
    fallback."""

    code: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", NoticeCode(self.code).value)


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


FINISH_REASONS = ("stop", "length", "tool_calls", "cancelled", "loop")
"""How a runner's answer ends (`Done.finish_reason`): the model stopped, the
length limit, tool calls for the caller to run, cancelled, or the loop guard
(runners.loopguard) cut a repeating answer."""


@dataclass(frozen=True)
class Done:
    """The last event of every successful stream."""

    finish_reason: str  # one of FINISH_REASONS
    usage: Usage = Usage()
    timings: Timings = Timings()
    model_id: str = ""


Event = TokenDelta | ToolCall | Notice | Done


# ---- errors ------------------------------------------------------------------------


class NotAdmitted(Exception):
    """Raised by the router's `admit` hook: the caller may not have this
    runner answer now (a budget of theirs is spent). `auto` tries the next
    runner; a turn pinned to it fails with this error."""


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
    sending the same request again can help; the router falls back before the
    first token on every error except `invalid_input` (about the request
    itself, which never counts toward a circuit). Messages must never contain
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


def unencodable(text: str) -> str | None:
    """What in `text` cannot be encoded as UTF-8 (a lone UTF-16 surrogate,
    which JSON's `\\ud800` escapes can produce), or None when it all can.
    No tokenizer, database or HTTP client accepts such text."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}"
    return None


def first_unencodable(value: Any) -> str | None:
    """The problem with the first string that cannot be encoded in nested
    lists, tuples and dicts (keys too), walked without recursion so that any
    nesting depth is safe; None when every string can be encoded."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            problem = unencodable(item)
            if problem:
                return problem
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def request_problem(request: ChatRequest) -> str | None:
    """What in `request` no runner can read (text that cannot be encoded:
    messages, images, tool calls, stop sequences, tools), or None."""
    for index, m in enumerate(request.messages):
        problem = first_unencodable((m.content, m.images, m.tool_calls, m.tool_call_id))
        if problem:
            return f"message {index} contains {problem}"
    problem = first_unencodable((request.stop, request.tools))
    if problem:
        return f"the stop sequences or tools contain {problem}"
    return None


def request_error(exc: BaseException, request: ChatRequest | None = None) -> RunnerError | None:
    """The `invalid_input` error when the request itself caused `exc`: an
    encoding error, or any failure while the request holds text that cannot
    be encoded (tokenizers reject it with a TypeError, HTTP clients with a
    UnicodeEncodeError). None when the exception says nothing about the
    request: then it is the runner's. Request errors never count against a
    runner's circuit."""
    problem = request_problem(request) if request is not None else None
    if problem is None and isinstance(exc, UnicodeEncodeError):
        problem = "text that cannot be encoded (a lone UTF-16 surrogate)"
    if problem is None:
        return None
    return RunnerError(
        ErrorCode.INVALID_INPUT, f"The request cannot be read: {problem}. Send valid Unicode."
    )


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
