"""Shared test set-up: an isolated DATA_DIR per run (the prepared model is
reused from the real one), a small cast of users, and the scale-out pass."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest_plugins = ["tests.support.fixtures"]

ROOT = Path(__file__).resolve().parent.parent
_TMP_DATA = tempfile.mkdtemp(prefix="breezeweb-test-")
os.environ["DATA_DIR"] = _TMP_DATA
os.environ.setdefault("MODELS_DIR", str(ROOT / "data" / "models"))
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-0123456789")
os.environ.setdefault("BREEZEWEB_ENV_FILE", "/nonexistent")
# Tests load models when they need them (and measure it); servers they start
# inherit this.
os.environ.setdefault("PRELOAD_LOCAL_RUNNERS", "false")  # a developer's .env must not leak in


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP_DATA, ignore_errors=True)


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
