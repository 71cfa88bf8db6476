"""What the admin's runner actions do: a health check and a test prompt.

Services with explicit arguments and frozen results, so the admin (sync, via
`async_to_sync`) and the lazy health endpoint share them. Neither result
carries the API key; error texts come from `RunnerError` messages, which
runners keep free of secrets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from django.core.exceptions import ImproperlyConfigured

from runners.base import ChatMessage, ChatRequest, RunnerError
from runners.collect import EventCollector, Outcome
from runners.models import RunnerConfig
from runners.registry import build_runner
from runners.router import circuits, route

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HealthReport:
    """One runner's health as the admin shows it."""

    name: str
    ok: bool
    detail: str
    latency_ms: float | None
    circuit: str
    models: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
            "circuit": self.circuit,
            "models": list(self.models),
        }


async def check_health(config: RunnerConfig, limit_s: float = HEALTH_TIMEOUT_S) -> HealthReport:
    """Run the (cached, serving) runner's `health()` with a short timeout.
    Never raises: a failure becomes `ok=False` with a reason."""
    started = time.perf_counter()
    circuit = circuits.state(config.name)
    try:
        health = await asyncio.wait_for(build_runner(config).health(), timeout=limit_s)
    except TimeoutError:
        return HealthReport(
            config.name, False, f"no answer within {limit_s:g} s", limit_s * 1000, circuit
        )
    except RunnerError as exc:
        return HealthReport(config.name, False, exc.message, _since(started), circuit)
    except ImproperlyConfigured as exc:  # our own message: unknown kind, bad extra params
        return HealthReport(config.name, False, str(exc), _since(started), circuit)
    except Exception as exc:
        # The exception text may come from a third-party library: show its type only.
        log.warning("health check of runner %s failed: %s", config.name, type(exc).__name__)
        return HealthReport(
            config.name,
            False,
            f"health check failed ({type(exc).__name__})",
            _since(started),
            circuit,
        )
    latency = health.latency_ms if health.latency_ms is not None else _since(started)
    return HealthReport(config.name, health.ok, health.detail, latency, circuit, health.models)


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


# The outcome of one admin test prompt through one pinned runner.
PromptTrial = Outcome


async def try_prompt(
    name: str, prompt: str, *, max_tokens: int | None = None, limit_s: float = 120.0
) -> PromptTrial:
    """Send `prompt` to the runner named `name` (pinned, source "admin") and
    collect what it streamed. Never raises; the partial text is kept on error."""
    request = ChatRequest(
        messages=(ChatMessage(role="user", content=prompt),),
        max_tokens=max_tokens,
        request_id="admin-test-prompt",
    )
    # The one event collector (runners.collect), timed as the chat's turns are.
    collector = EventCollector()
    error: RunnerError | None = None

    async def consume() -> None:
        events = route(request, pinned=name, source="admin")
        try:
            async for event in events:
                collector.take(event)
        finally:
            await events.aclose()

    try:
        await asyncio.wait_for(consume(), timeout=limit_s)
    except RunnerError as exc:
        error = exc
    except TimeoutError:
        error = RunnerError("timeout", f"No complete answer within {limit_s:g} s.")
    except Exception as exc:
        log.warning("test prompt on runner %s failed: %s", name, type(exc).__name__)
        error = RunnerError("runtime", f"The test prompt failed ({type(exc).__name__}).")

    outcome = collector.outcome(error)
    # Named after the runner asked for, even when it failed before routing.
    return replace(outcome, runner_name=outcome.runner_name or name)
