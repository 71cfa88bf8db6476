"""The router: which runner answers a request, and what happens when it fails.

Candidates are the enabled `RunnerConfig`s that have every capability the
request needs, highest priority first (ties: lower recent time to first token).
A runner that fails *before its first token* with an error about itself
(unavailable, timeout, rate limited, auth, unknown model, runtime) passes the
request to the next candidate; an error about the request (invalid input) does
not, since another runner would refuse it too. After the first token nothing
falls back: the partial answer stands and the error is reported. A per-runner
circuit breaker skips a runner after consecutive failures for a cool-down, then
lets one trial request through. Every runner's text passes the loop guard
(runners.loopguard): an answer that starts repeating itself is ended with
`finish_reason="loop"` and a `loop` notice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from django.conf import settings

from channels.db import database_sync_to_async

from core import generation
from runners import metrics
from runners.base import (
    Capability,
    ChatRequest,
    Done,
    ErrorCode,
    Event,
    NotAdmitted,
    Notice,
    NoticeCode,
    Runner,
    RunnerError,
    Timings,
    TokenDelta,
    ToolCall,
    Usage,
    request_error,
)
from runners.loopguard import LoopGuard, loop_notice, loop_settings
from runners.models import RunnerConfig, RunRecord
from runners.registry import build_runner

log = logging.getLogger(__name__)

# Errors that say something about the request itself: no other runner can help,
# and they never count toward the runner's circuit.
_REQUEST_ERRORS = {ErrorCode.INVALID_INPUT}


@dataclass(frozen=True)
class Routed:
    """Which runner is answering; sent before its first token (again after a fallback)."""

    runner_name: str
    model_id: str
    fallback: bool
    attempts: tuple[str, ...]


# ---- circuit breaker ---------------------------------------------------------------


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False
    ttft_ewma_ms: float | None = None


@dataclass
class CircuitBoard:
    """Per-process circuit state by runner name."""

    threshold: int = 3
    cooldown_s: float = 30.0
    circuits: dict[str, _Circuit] = field(default_factory=dict)

    def _get(self, name: str) -> _Circuit:
        return self.circuits.setdefault(name, _Circuit())

    def state(self, name: str) -> str:
        c = self._get(name)
        if c.opened_at is None:
            return "closed"
        if time.monotonic() - c.opened_at >= self.cooldown_s:
            return "half-open"
        return "open"

    def allow(self, name: str) -> bool:
        """Whether to try this runner now; a half-open circuit admits one trial."""
        c = self._get(name)
        state = self.state(name)
        if state == "closed":
            return True
        if state == "half-open" and not c.trial_in_flight:
            c.trial_in_flight = True
            return True
        return False

    def success(self, name: str, ttft_ms: float | None) -> None:
        c = self._get(name)
        c.failures, c.opened_at, c.trial_in_flight = 0, None, False
        if ttft_ms is not None:
            c.ttft_ewma_ms = (
                ttft_ms if c.ttft_ewma_ms is None else 0.8 * c.ttft_ewma_ms + 0.2 * ttft_ms
            )

    def failure(self, name: str) -> None:
        c = self._get(name)
        c.failures += 1
        c.trial_in_flight = False
        if c.failures >= self.threshold or c.opened_at is not None:
            c.opened_at = time.monotonic()
            log.warning("runner %s: circuit open after %d failures", name, c.failures)

    def release(self, name: str) -> None:
        """An attempt ended without a verdict (cancelled): free the trial slot."""
        self._get(name).trial_in_flight = False

    def paused(self) -> dict[str, float]:
        """The runners whose circuit is open now, with the seconds until a trial."""
        now = time.monotonic()
        return {
            name: round(self.cooldown_s - (now - c.opened_at), 1)
            for name, c in self.circuits.items()
            if c.opened_at is not None and now - c.opened_at < self.cooldown_s
        }

    def recent_ttft(self, name: str) -> float:
        value = self._get(name).ttft_ewma_ms
        return float("inf") if value is None else value

    def reset(self) -> None:
        self.circuits.clear()


circuits = CircuitBoard(
    threshold=settings.RUNNER_CIRCUIT_FAILURES,
    cooldown_s=settings.RUNNER_CIRCUIT_COOLDOWN_SECONDS,
)


# ---- candidates ------------------------------------------------------------------


def _missing(config: RunnerConfig, needed: frozenset[Capability]) -> list[str]:
    return sorted(c.value for c in needed if c.value not in config.capabilities)


def usable_configs(user) -> list[RunnerConfig]:
    """Every runner config `user` may use (all of them for `user=None`),
    highest priority first: memoized per process until any config or group
    membership changes, in any process (core.generation). The configs are
    shared: read them, never change them."""

    def read() -> list[RunnerConfig]:
        configs = RunnerConfig.objects.all()
        if user is not None:
            configs = configs.usable_by(user)
        return list(configs.order_by("-priority", "name"))

    key = None if user is None else (user.pk, user.is_superuser)
    return generation.memo(("runners.usable", key), read)


def load_candidates(
    needed: frozenset[Capability], pinned: str | None, need_rag: bool, user=None
) -> list[RunnerConfig]:
    """The configs that may answer (`usable_configs`: an admin's edit applies
    to the next request, in every process). With a `user`, only the runners
    that user may use (`RunnerConfig.objects.usable_by`); a runner they may
    not use reads exactly like one that does not exist. `user=None` is for
    trusted callers only (the admin's test prompt, benchmarks). Raises
    RunnerError when none can answer."""
    configs = usable_configs(user)
    if pinned:
        config = next((c for c in configs if c.name == pinned), None)
        if config is None:
            raise RunnerError(
                ErrorCode.NOT_FOUND,
                f"There is no runner named {pinned!r} that you may use; choose another or auto.",
            )
        if not config.enabled:
            raise RunnerError(
                ErrorCode.NO_RUNNER, f"The runner {pinned!r} is disabled; choose another or auto."
            )
        missing = _missing(config, needed)
        if missing:
            raise RunnerError(
                ErrorCode.NO_RUNNER,
                f"The runner {pinned!r} lacks the capability this request needs: "
                f"{', '.join(missing)}" + (" (images)" if "vlm" in missing else ""),
            )
        return [config]
    enabled = [c for c in configs if c.enabled]
    if not enabled:
        if user is not None and any(c.enabled for c in usable_configs(None)):
            raise RunnerError(
                ErrorCode.NO_RUNNER,
                "No runner is open to you. An admin can add you to a group that may use one.",
            )
        raise RunnerError(
            ErrorCode.NO_RUNNER, "No runner is enabled. An admin can enable one in the admin."
        )
    candidates = [c for c in enabled if not _missing(c, needed)]
    if need_rag:
        candidates = [c for c in candidates if c.enable_rag] or candidates
    if not candidates:
        missing = sorted({m for c in enabled for m in _missing(c, needed)})
        hint = {"vlm": "vision (images)", "agent": "tools (agents)"}
        names = ", ".join(f"{m} ({hint.get(m, m)})" for m in missing)
        raise RunnerError(
            ErrorCode.NO_RUNNER,
            f"No enabled runner has the capability this request needs: {names}.",
        )
    return candidates


def _order(candidates: list[RunnerConfig]) -> list[RunnerConfig]:
    return sorted(candidates, key=lambda c: (-c.priority, circuits.recent_ttft(c.name), c.name))


# ---- run records -------------------------------------------------------------------


@dataclass
class _Attempt:
    config: RunnerConfig
    fallback: bool
    user_id: int | None = None
    api_key_id: int | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    tokens_per_second: float | None = None
    hold: Any = None  # what `admit` returned: given back once the record is saved

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000


@database_sync_to_async
def _save_record(
    attempt: _Attempt,
    status: str,
    source: str,
    message_id: int | None,
    capability: str,
    error: RunnerError | None = None,
) -> None:
    total_ms = (time.perf_counter() - attempt.started) * 1000
    RunRecord.objects.create(
        runner_id=attempt.config.pk,
        runner_name=attempt.config.name,
        model_id=attempt.config.model_id,
        capability=capability,
        status=status,
        error_code=error.code.value if error else "",
        error=error.message if error else "",
        fallback=attempt.fallback,
        prompt_tokens=attempt.prompt_tokens,
        completion_tokens=attempt.completion_tokens,
        time_to_first_token_ms=attempt.ttft_ms,
        total_ms=total_ms,
        tokens_per_second=attempt.tokens_per_second,
        source=source,
        message_id=message_id,
        user_id=attempt.user_id,
        api_key_id=attempt.api_key_id,
    )
    if attempt.hold is not None:
        # The record now counts what the attempt spent: its hold is given back.
        attempt.hold.release()
    metrics.observe_attempt(
        attempt.config.name,
        status,
        error.code.value if error else "",
        total_s=total_ms / 1000,
        ttft_s=attempt.ttft_ms / 1000 if attempt.ttft_ms is not None else None,
        completion_tokens=attempt.completion_tokens,
        fell_back=status == RunRecord.Status.FAILED and attempt.first_token_at is None,
    )


def _with_defaults(request: ChatRequest, config: RunnerConfig) -> ChatRequest:
    return replace(
        request,
        temperature=config.temperature if request.temperature is None else request.temperature,
        max_tokens=(
            config.max_tokens
            if request.max_tokens is None
            else min(request.max_tokens, config.max_tokens)
        ),
    )


# ---- the stream ----------------------------------------------------------------------


Prepare = Callable[[ChatRequest, Runner], tuple[ChatRequest, list[Notice]]]
# `admit(config, runner, request)` -> (request, hold): the caller's last word
# on a chosen runner, once the request is fitted to it; raises NotAdmitted.
# `hold.release()` (sync) is called once the attempt's record is saved.
Admit = Callable[[RunnerConfig, Runner, ChatRequest], Awaitable[tuple[ChatRequest, Any]]]


async def route(
    request: ChatRequest,
    *,
    pinned: str | None = None,
    need_rag: bool = False,
    prepare: Prepare | None = None,
    source: str = "chat",
    message_id: int | None = None,
    candidates: list[RunnerConfig] | None = None,
    user=None,
    api_key_id: int | None = None,
    admit: Admit | None = None,
) -> AsyncIterator[Event | Routed]:
    """Answer `request` with the best available runner, falling back before
    the first token. `prepare(request, runner)` fits the request to a runner
    (its prompt budget) and returns notices for the user (e.g. "trimmed"); it
    may raise RunnerError(INVALID_INPUT). `candidates` (from `load_candidates`)
    saves a database round trip when the caller already read them; otherwise
    they are the runners `user` may use (every runner when None: trusted
    callers only). Every attempt's `RunRecord` names `user` and `api_key_id`
    (usage accounting). `admit` (see `Admit`) may refuse a runner once it is
    chosen and fitted (the caller's budgets): `auto` goes on to the next
    one, a pinned turn fails with its NotAdmitted. Yields
    `Routed` before a runner's first event, then the notices, then the
    runner's events."""
    needed = request.needed_capabilities()
    capability = (
        Capability.AGENT
        if Capability.AGENT in needed
        else Capability.VLM
        if Capability.VLM in needed
        else Capability.LLM
    ).value
    if candidates is None:
        candidates = await database_sync_to_async(load_candidates)(needed, pinned, need_rag, user)
    candidates = _order(candidates)
    tried: list[str] = []
    last_error: RunnerError | None = None
    skipped_open: list[str] = []
    refused: NotAdmitted | None = None
    for config in candidates:
        if not pinned and not circuits.allow(config.name):
            skipped_open.append(config.name)
            continue
        if pinned and not circuits.allow(config.name):
            raise RunnerError(
                ErrorCode.UNAVAILABLE,
                f"The runner {config.name!r} failed repeatedly and is paused for a moment; "
                "try again shortly or choose auto.",
                retry_after=circuits.cooldown_s,
            )
        attempt = _Attempt(
            config=config,
            fallback=bool(tried),
            user_id=getattr(user, "pk", None),
            api_key_id=api_key_id,
        )
        tried.append(config.name)
        routed_request = request
        preparing = False  # False while the runner loads, True while the request is fitted
        try:
            runner = build_runner(config)
            await runner.load()
            preparing = True
            routed_request = _with_defaults(request, config)
            notices: list[Notice] = []
            if prepare is not None:
                routed_request, notices = prepare(routed_request, runner)
        except RunnerError as exc:
            await _fail(attempt, exc, source, message_id, capability)
            last_error = exc
            if exc.code in _REQUEST_ERRORS:
                raise
            continue
        except Exception as exc:
            if not preparing:
                log.exception("runner %s could not be prepared", config.name)
                error = RunnerError(
                    ErrorCode.RUNTIME, f"The runner {config.name!r} failed to start."
                )
                await _fail(attempt, error, source, message_id, capability)
                last_error = error
                continue
            # `prepare` is the caller's fitting of *this request* (tokenizing
            # its text): a failure there is no evidence against the runner.
            # Content that cannot be encoded is the client's mistake; anything
            # else is our bug. Neither counts toward the circuit.
            error = request_error(exc, routed_request)
            if error is None:
                log.exception("request could not be prepared for runner %s", config.name)
                error = RunnerError(
                    ErrorCode.RUNTIME,
                    f"The request could not be prepared for the runner {config.name!r}.",
                )
            await _fail(attempt, error, source, message_id, capability, counts=False)
            raise error from None
        if admit is not None:
            try:
                routed_request, attempt.hold = await admit(config, runner, routed_request)
            except NotAdmitted as exc:
                # Not this runner's failure, and not an attempt: no record.
                circuits.release(config.name)
                tried.pop()
                if pinned:
                    raise
                refused = exc
                continue
            except BaseException:
                circuits.release(config.name)
                raise

        try:
            yield Routed(config.name, config.model_id, bool(attempt.fallback), tuple(tried))
            for notice in notices:
                yield notice
        except BaseException:
            if attempt.hold is not None:  # closed before the runner ran: nothing spent
                await asyncio.shield(database_sync_to_async(attempt.hold.release)())
            raise
        stream = runner.stream(routed_request)
        guard = LoopGuard(loop_settings(config.extra_params))
        try:
            async for event in stream:
                if isinstance(event, TokenDelta | ToolCall) and attempt.first_token_at is None:
                    attempt.first_token_at = time.perf_counter()
                if isinstance(event, TokenDelta):
                    attempt.completion_tokens += 1
                    unit = guard.feed(event.text)
                    if unit is not None:
                        # The answer is looping: end it here, cleanly (closing
                        # the stream below stops the runner's generation).
                        yield event
                        yield loop_notice(unit)
                        done = _loop_done(attempt)
                        circuits.success(config.name, attempt.ttft_ms)
                        await _save_record(
                            attempt, RunRecord.Status.OK, source, message_id, capability
                        )
                        yield done
                        return
                if isinstance(event, Done):
                    attempt.prompt_tokens = event.usage.prompt_tokens
                    if event.usage.completion_tokens:
                        attempt.completion_tokens = event.usage.completion_tokens
                    attempt.tokens_per_second = event.timings.tokens_per_second
                    circuits.success(config.name, attempt.ttft_ms)
                    await _save_record(attempt, RunRecord.Status.OK, source, message_id, capability)
                yield event
            return
        except RunnerError as exc:
            await _fail(attempt, exc, source, message_id, capability)
            if attempt.first_token_at is not None or exc.code in _REQUEST_ERRORS or pinned:
                raise
            last_error = exc
            yield Notice(
                NoticeCode.FALLBACK,
                f"{config.name} failed ({exc.message}); trying the next runner.",
                {"failed": config.name, "code": exc.code.value},
            )
        except (asyncio.CancelledError, GeneratorExit):
            circuits.release(config.name)
            await asyncio.shield(
                _save_record(attempt, RunRecord.Status.STOPPED, source, message_id, capability)
            )
            raise
        except Exception as exc:
            error = request_error(exc, routed_request)
            if error is not None:
                # The runner could not encode what the client sent: the
                # client's mistake, which any runner would make too.
                await _fail(attempt, error, source, message_id, capability)
                raise error from None
            log.exception("runner %s crashed", config.name)
            error = RunnerError(ErrorCode.RUNTIME, f"The runner {config.name!r} crashed.")
            await _fail(attempt, error, source, message_id, capability)
            if attempt.first_token_at is not None or pinned:
                raise error from None
            last_error = error
        finally:
            await stream.aclose()

    if refused is not None and last_error is None:
        raise refused
    if last_error is not None:
        if len(tried) > 1:
            raise RunnerError(
                last_error.code,
                f"Every runner failed ({', '.join(tried)}); last error: {last_error.message}",
                retryable=last_error.retryable,
                retry_after=last_error.retry_after,
            )
        raise last_error
    raise RunnerError(
        ErrorCode.UNAVAILABLE,
        "Every runner able to answer is paused after repeated failures "
        f"({', '.join(skipped_open)}); try again shortly.",
        retry_after=circuits.cooldown_s,
    )


def _loop_done(attempt: _Attempt) -> Done:
    """The end of an answer the loop guard stopped (the runner never sent its
    own `Done`): what the router measured."""
    now = time.perf_counter()
    decode = None
    if attempt.first_token_at is not None and now > attempt.first_token_at:
        decode = attempt.completion_tokens / (now - attempt.first_token_at)
        attempt.tokens_per_second = round(decode, 1)
    return Done(
        finish_reason="loop",
        usage=Usage(prompt_tokens=0, completion_tokens=attempt.completion_tokens),
        timings=Timings(
            time_to_first_token_ms=attempt.ttft_ms,
            total_ms=round((now - attempt.started) * 1000, 1),
            tokens_per_second=attempt.tokens_per_second,
        ),
        model_id=attempt.config.model_id,
    )


async def _fail(
    attempt: _Attempt,
    error: RunnerError,
    source: str,
    message_id: int | None,
    capability: str,
    *,
    counts: bool = True,
) -> None:
    """Record a failed attempt. Only errors about the runner count toward its
    circuit; an error the request caused frees a trial slot without a verdict."""
    if counts and error.code not in _REQUEST_ERRORS:
        circuits.failure(attempt.config.name)
    else:
        circuits.release(attempt.config.name)
    await _save_record(attempt, RunRecord.Status.FAILED, source, message_id, capability, error)
