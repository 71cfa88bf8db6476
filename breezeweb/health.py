"""Liveness and readiness: /healthz says the process answers; /readyz checks
the database, the vector store and that at least one enabled runner is healthy
and not paused by its circuit breaker (`degraded`, naming the paused runners,
when every runner that could answer is paused in this process)."""

from __future__ import annotations

import logging
import time

from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET

from asgiref.sync import sync_to_async

log = logging.getLogger(__name__)


@require_GET
async def healthz(request):
    """Alive: answered on the event loop (no worker thread, no database)."""
    return JsonResponse({"status": "ok"})


def _check_database() -> dict:
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        log.warning("readyz: database check failed: %s", type(exc).__name__)
        return {"ok": False, "detail": f"database unreachable ({type(exc).__name__})"}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _check_vector_store() -> dict:
    from rag.store import check_health

    try:
        return check_health()
    except Exception as exc:
        log.warning("readyz: vector store check failed: %s", type(exc).__name__)
        return {"ok": False, "detail": f"vector store unreachable ({type(exc).__name__})"}


async def _check_runners() -> dict:
    from runners.registry import readiness

    try:
        return await readiness()
    except Exception as exc:
        log.warning("readyz: runner check failed: %s", type(exc).__name__)
        return {"ok": False, "detail": f"runner check failed ({type(exc).__name__})"}


def _paused_runners(runners: dict) -> dict[str, float]:
    """The enabled runners whose circuit is open in this process (seconds
    until their trial request), when *every* healthy enabled runner is paused:
    then no chat can be answered here although each check passes."""
    from runners.router import circuits

    healthy = [name for name, part in runners.get("runners", {}).items() if part.get("ok")]
    if not healthy:
        return {}
    paused = circuits.paused()
    if all(name in paused for name in healthy):
        return {name: paused[name] for name in healthy}
    return {}


@require_GET
async def readyz(request):
    # Async, so runner health checks run on the server's event loop, where the
    # runners' shared HTTP clients live.
    checks = {
        "database": await sync_to_async(_check_database)(),
        "vector_store": await sync_to_async(_check_vector_store)(),
        "runners": await _check_runners(),
    }
    ready = all(part["ok"] for part in checks.values())
    status = "ready" if ready else "not ready"
    body: dict = {"status": status, "checks": checks}
    paused = _paused_runners(checks["runners"]) if ready else {}
    if paused:
        # Every runner that could answer is paused by its circuit breaker
        # (per process): this process answers chats with 503 until a trial
        # succeeds, so it is not ready either, and says why.
        status = "degraded"
        checks["runners"] = {
            **checks["runners"],
            "ok": False,
            "detail": "every enabled runner is paused after repeated failures",
        }
        body = {"status": status, "checks": checks, "paused_runners": paused}
    return JsonResponse(body, status=200 if status == "ready" else 503)
