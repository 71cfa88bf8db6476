"""/metrics: Prometheus text with runner counters, histograms and live gauges;
loopback-only unless METRICS_TOKEN is set; never a key; multi-process mode."""

from __future__ import annotations

import os
import subprocess
import sys

from django.test import Client, override_settings

import pytest
from channels.db import database_sync_to_async
from prometheus_client.parser import text_string_to_metric_families

from runners import views
from runners.base import ChatMessage, ChatRequest
from runners.models import RunnerConfig
from runners.router import circuits, route
from tests.support.fixtures import runner_config
from tests.support.processes import ROOT
from tests.support.scripted_server import Reply

API_KEY = "sk-metrics-test-a1b2c3d4e5f6a7b8"
TOKEN = "metrics-token-4f3e2d1c0b"


pytestmark = pytest.mark.usefixtures("fresh_process_state")


@database_sync_to_async
def scrape():
    """GET /metrics from a worker thread whose DB connection is closed after
    (the async test client would leave one open, blocking PostgreSQL teardown)."""
    return Client().get("/metrics")


def samples(body: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(body: bytes, name: str, **labels) -> float | None:
    return samples(body).get((name, tuple(sorted(labels.items()))))


def make_config(endpoint: str, name: str, **fields) -> RunnerConfig:
    return runner_config(endpoint, name, api_key=API_KEY, timeout_seconds=5.0, **fields)


async def answer(pinned: str | None = None) -> str:
    text = []
    try:
        async for event in route(
            ChatRequest(messages=(ChatMessage("user", "hi"),)), pinned=pinned, source="api"
        ):
            text.append(getattr(event, "text", ""))
    except Exception as exc:
        return f"error: {exc}"
    return "".join(text)


@pytest.mark.scaleout
@pytest.mark.django_db(transaction=True)
async def test_metrics_count_requests_errors_latency_and_tokens_by_runner(scripted_server):
    await database_sync_to_async(make_config)(scripted_server.url, "metrics-a", priority=5)
    before = (await scrape()).content
    scripted_server.script(Reply(text="one two three"), Reply(status=401))
    assert await answer() == "one two three"
    assert (await answer()).startswith("error:")
    response = await scrape()
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    after = response.content

    def delta(name: str, **labels) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    ok = {"runner": "metrics-a", "status": "ok", "error_code": ""}
    failed = {"runner": "metrics-a", "status": "failed", "error_code": "auth"}
    assert delta("breezeweb_runner_requests_total", **ok) == 1
    assert delta("breezeweb_runner_requests_total", **failed) == 1
    assert delta("breezeweb_runner_duration_seconds_count", runner="metrics-a") == 2
    assert delta("breezeweb_runner_time_to_first_token_seconds_count", runner="metrics-a") == 1
    assert delta("breezeweb_runner_completion_tokens_sum", runner="metrics-a") == 3
    assert delta("breezeweb_runner_fallbacks_total", runner="metrics-a") == 1
    assert value(after, "breezeweb_runner_enabled", runner="metrics-a", kind="llamastack") == 1
    assert value(after, "breezeweb_runner_priority", runner="metrics-a") == 5
    assert value(after, "breezeweb_runners_enabled") == 1
    assert value(after, "breezeweb_runner_circuit_state", runner="metrics-a") == 0
    assert value(after, "breezeweb_runner_consecutive_failures", runner="metrics-a") == 1
    assert API_KEY not in after.decode()


@pytest.mark.scaleout
@pytest.mark.django_db(transaction=True)
async def test_an_open_circuit_shows_in_the_gauges(scripted_server, monkeypatch):
    monkeypatch.setattr(circuits, "threshold", 2)
    await database_sync_to_async(make_config)(scripted_server.url, "metrics-b")
    scripted_server.script(Reply(status=500, body="no"), Reply(status=500, body="no"))
    await answer()
    await answer()
    body = (await scrape()).content
    assert value(body, "breezeweb_runner_circuit_state", runner="metrics-b") == 2
    assert value(body, "breezeweb_runner_consecutive_failures", runner="metrics-b") == 2


@pytest.mark.django_db
def test_without_a_token_only_loopback_clients_are_served(client):
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::ffff:127.0.0.1").status_code == 200
    refused = client.get("/metrics", REMOTE_ADDR="10.1.2.3")
    assert refused.status_code == 403
    assert b"set METRICS_TOKEN" in refused.content
    assert client.get("/metrics", REMOTE_ADDR="").status_code == 403


@pytest.mark.django_db
def test_a_request_forwarded_by_a_local_proxy_is_not_treated_as_loopback(client):
    # nginx on the same host connects from 127.0.0.1 for every visitor.
    for header in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP"):
        response = client.get("/metrics", REMOTE_ADDR="127.0.0.1", **{header: "203.0.113.9"})
        assert response.status_code == 403, header


@pytest.mark.django_db
@override_settings(METRICS_TOKEN=TOKEN)
def test_with_a_token_a_bearer_header_is_required_even_from_loopback(client):
    missing = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer nope", REMOTE_ADDR="10.1.2.3")
    assert wrong.status_code == 401
    assert TOKEN not in wrong.content.decode()
    ok = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", REMOTE_ADDR="10.1.2.3")
    assert ok.status_code == 200
    assert b"breezeweb_runners_enabled" in ok.content


@pytest.mark.django_db
def test_metrics_only_answer_get(client):
    assert client.post("/metrics").status_code == 405


@pytest.mark.django_db
def test_prometheus_multiproc_dir_aggregates_every_process(tmp_path, monkeypatch, client):
    """Two worker processes record attempts into a shared directory; /metrics
    in a third process reports their sum."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    code = (
        "from runners.metrics import observe_attempt\n"
        "observe_attempt('multi', 'ok', total_s=0.2, ttft_s=0.05, completion_tokens=7)\n"
    )
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    body = client.get("/metrics").content
    labels = {"runner": "multi", "status": "ok", "error_code": ""}
    assert value(body, "breezeweb_runner_requests_total", **labels) == 2
    assert value(body, "breezeweb_runner_completion_tokens_sum", runner="multi") == 14
    assert b"breezeweb_runners_enabled" in body  # live gauges still there


def test_loopback_detection():
    assert views._loopback("127.0.0.5")
    assert views._loopback("::1")
    assert not views._loopback("192.168.0.1")
    assert not views._loopback("not an ip")
