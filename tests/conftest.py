"""Shared test set-up: a small cast of users and the scale-out pass.

The run's own temporary DATA_DIR (set before Django's settings load) comes from
the early plugin tests.support.hermetic, loaded through pyproject's addopts."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest
from hypothesis import settings as hypothesis_settings

pytest_plugins = ["tests.support.fixtures"]

# `make test` is reproducible: the property-based suites draw the same examples
# on every run (HYPOTHESIS_PROFILE=explore draws new ones each time, for hunting).
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # Running without the early plugin (e.g. `-p no:tests.support.hermetic`)
    # would write into whatever DATA_DIR the environment names: refuse.
    if not config.pluginmanager.has_plugin("tests.support.hermetic"):
        raise pytest.UsageError(
            "tests.support.hermetic is not loaded: the tests would use the real DATA_DIR"
        )


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `scaleout` (they touch the database and the channel layer)
    run twice in `make test`: first on the embedded defaults, then again with
    BREEZEWEB_SCALEOUT_PASS=1 and DATABASE_URL / REDIS_URL pointing at
    PostgreSQL and Redis. When those services are missing that second pass
    skips with a reason, except with REQUIRE_SERVICES=1 (CI): then it fails."""
    if os.environ.get("BREEZEWEB_SCALEOUT_PASS") != "1":
        return
    db = os.environ.get("DATABASE_URL", "")
    redis = os.environ.get("REDIS_URL", "")
    problem = ""
    if not db.startswith("postgres"):
        problem = "DATABASE_URL is not a PostgreSQL URL"
    elif not redis:
        problem = "REDIS_URL is not set"
    elif not _reachable(db, 5432):
        problem = f"PostgreSQL at {urlparse(db).hostname} is unreachable"
    elif not _reachable(redis, 6379):
        problem = f"Redis at {urlparse(redis).hostname} is unreachable"
    if not problem:
        return
    if os.environ.get("REQUIRE_SERVICES") == "1":
        raise pytest.UsageError(f"scale-out pass: REQUIRE_SERVICES=1 but {problem}")
    skip = pytest.mark.skip(reason=f"scale-out pass: {problem}")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password-123")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-password-123")


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser(
        "admin", "admin@example.com", "admin-password-123"
    )


@pytest.fixture(autouse=True)
def _no_watchdog_outlives_its_test():
    """An upload starts this process's ingestion watchdog (as in a server); a
    test's watchdog must not go on sweeping a database the next test owns."""
    yield
    from rag import worker

    worker.stop_watchdog()


@pytest.fixture(autouse=True)
def _fresh_generation_memo():
    """Each test reads runner configs, rules and quotas from its own database:
    flushing one between tests sends no signal, so the memo starts over."""
    from core import generation

    generation.forget()
    yield
    generation.forget()


@pytest.fixture(autouse=True)
def _answers_match_the_api_document():
    """Every JSON answer a test caused under /api and /v1, and every frame the
    chat websocket sent, matches the OpenAPI document (tests/support/conformance.py
    checks each one as it is sent)."""
    from tests.support import conformance

    conformance.in_test_process = True
    conformance.install_websocket_check()
    conformance.take_findings()
    yield
    findings = conformance.take_findings()
    assert not findings, "answers that do not match /api/schema:\n" + "\n".join(findings)
