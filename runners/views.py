"""The runner dashboard (staff) and the Prometheus `/metrics` endpoint.

`/metrics` protection: with `METRICS_TOKEN` set, a request must carry
`Authorization: Bearer <METRICS_TOKEN>`; without it, only loopback clients
(REMOTE_ADDR 127.0.0.1 or ::1) are served. With `PROMETHEUS_MULTIPROC_DIR`
set, counters and histograms are aggregated across every process that
shares that directory (prometheus_client's multi-process mode).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    generate_latest,
)

from runners.models import RunnerConfig
from runners.router import circuits
from runners.stats import runner_stats

WINDOWS = (("Last hour", timedelta(hours=1)), ("Last 24 hours", timedelta(days=1)))
CIRCUIT_VALUES = {"closed": 0, "half-open": 1, "open": 2}


def dashboard(request: HttpRequest) -> HttpResponse:
    """Per runner over the last hour and day: requests, error rate, latency,
    TTFT, tokens/s, fallbacks. Wrapped by `admin.site.admin_view` in urls."""
    if not request.user.has_perm("runners.view_runrecord"):
        raise PermissionDenied
    now = timezone.now()
    windows = [(label, runner_stats(now - span, now)) for label, span in WINDOWS]
    context = {
        **admin.site.each_context(request),
        "title": "Runner dashboard",
        "windows": windows,
        "generated_at": now,
        "circuits": [(name, circuits.state(name)) for name in _config_names()],
    }
    return render(request, "admin/runners/dashboard.html", context)


def _config_names() -> list[str]:
    return list(RunnerConfig.objects.order_by("-priority", "name").values_list("name", flat=True))


# ---- /metrics ------------------------------------------------------------------------


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def metrics_allowed(request: HttpRequest) -> tuple[bool, int, str]:
    """(allowed, status if not, reason). Never echoes the token."""
    token = settings.METRICS_TOKEN
    if token:
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if given and hmac.compare_digest(given.encode(), token.encode()):
            return True, 200, ""
        return False, 401, "Send Authorization: Bearer <METRICS_TOKEN>."
    # Behind a reverse proxy on the same host every request comes from
    # loopback; a forwarding header means it really came from elsewhere.
    forwarded = any(
        request.META.get(h) for h in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
    )
    if _loopback(request.META.get("REMOTE_ADDR", "")) and not forwarded:
        return True, 200, ""
    return (
        False,
        403,
        "/metrics is served to loopback clients only; set METRICS_TOKEN to scrape it remotely.",
    )


def _live_gauges() -> CollectorRegistry:
    """Gauges read at scrape time from the configs and this process's circuits."""
    registry = CollectorRegistry(auto_describe=True)
    enabled = Gauge(
        "breezeweb_runner_enabled",
        "1 if the runner config is enabled.",
        ["runner", "kind"],
        registry=registry,
    )
    priority = Gauge(
        "breezeweb_runner_priority", "The runner's priority.", ["runner"], registry=registry
    )
    circuit = Gauge(
        "breezeweb_runner_circuit_state",
        "Circuit breaker in this process: 0 closed, 1 half-open (trial allowed), 2 open.",
        ["runner"],
        registry=registry,
    )
    failures = Gauge(
        "breezeweb_runner_consecutive_failures",
        "Consecutive failures counted by this process's circuit breaker.",
        ["runner"],
        registry=registry,
    )
    count = Gauge(
        "breezeweb_runners_enabled", "Number of enabled runner configs.", registry=registry
    )
    configs = list(RunnerConfig.objects.values_list("name", "kind", "enabled", "priority"))
    for name, kind, is_enabled, prio in configs:
        enabled.labels(name, kind).set(1 if is_enabled else 0)
        priority.labels(name).set(prio)
        circuit.labels(name).set(CIRCUIT_VALUES[circuits.state(name)])
        state = circuits.circuits.get(name)
        failures.labels(name).set(state.failures if state else 0)
    count.set(sum(1 for c in configs if c[2]))
    return registry


def _runner_metrics() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition: runner counters and histograms
    (runners.metrics) plus live config and circuit gauges."""
    allowed, status, reason = metrics_allowed(request)
    if not allowed:
        response = HttpResponse(reason + "\n", status=status, content_type="text/plain")
        if status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body = _runner_metrics() + generate_latest(_live_gauges())
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
