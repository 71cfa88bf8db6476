"""The site's foundation: settings, health endpoints, login, bootstrap."""

from __future__ import annotations

import os
import subprocess
import sys

from django.core.management import call_command

import pytest

from runners.models import RunnerConfig
from tests.support.processes import ROOT


def _settings_in_subprocess(
    tmp_path, show: str = "settings.DATABASES['default']['ENGINE']", **env
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "DATA_DIR": str(tmp_path),
        "BREEZEWEB_ENV_FILE": "/nonexistent",
        "DJANGO_SETTINGS_MODULE": "breezeweb.settings",
        **env,
    }
    full_env.pop("SECRET_KEY", None) if "SECRET_KEY" not in env else None
    return subprocess.run(
        [
            sys.executable,
            "-c",
            f"import django; django.setup(); from django.conf import settings; print({show})",
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_database_url_fails_at_start_with_a_clear_message(tmp_path):
    result = _settings_in_subprocess(tmp_path, DATABASE_URL="nosuchdb://admin:hunter2@db.example/x")
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
    assert "unsupported scheme" in result.stderr or "not a valid" in result.stderr
    assert "hunter2" not in result.stderr  # the password is never echoed


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("", 600),
        ("postgres://breezeweb@127.0.0.1:5432/breezeweb", 600),
        ("postgres://breezeweb@127.0.0.1:5432/breezeweb?conn_max_age=0", 0),
        ("postgres://breezeweb@127.0.0.1:5432/breezeweb?conn_max_age=30", 30),
    ],
)
def test_database_connections_are_kept_unless_the_url_says_otherwise(tmp_path, url, kept):
    """On SQLite and PostgreSQL alike a thread keeps its connection between
    ORM calls (reconnecting per call halved a two-process site's chat
    throughput on PostgreSQL); `?conn_max_age=N` in DATABASE_URL wins."""
    db = "settings.DATABASES['default']"
    show = f"{db}['CONN_MAX_AGE'], {db}['CONN_HEALTH_CHECKS']"
    result = _settings_in_subprocess(tmp_path, show, DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(kept), "True"]


def test_a_bad_boolean_names_the_variable(tmp_path):
    result = _settings_in_subprocess(tmp_path, DEBUG="maybe")
    assert result.returncode != 0
    assert "DEBUG must be a boolean" in result.stderr


def test_defaults_are_sqlite_in_data_dir_and_a_generated_secret_key(tmp_path):
    result = _settings_in_subprocess(tmp_path, DATABASE_URL="", SECRET_KEY="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.db.backends.sqlite3"
    key_file = tmp_path / "secret_key"
    assert key_file.exists() and len(key_file.read_text()) > 40
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    first = key_file.read_text()
    _settings_in_subprocess(tmp_path, DATABASE_URL="", SECRET_KEY="")
    assert key_file.read_text() == first  # generated once, then reused


def test_the_product_hashes_passwords_with_djangos_strong_default(tmp_path):
    """The test run uses a fast hasher (tests/support/settings.py); the
    product's own settings keep Django's default, PBKDF2-SHA256."""
    full_env = {
        **os.environ,
        "DATA_DIR": str(tmp_path),
        "BREEZEWEB_ENV_FILE": "/nonexistent",
        "DJANGO_SETTINGS_MODULE": "breezeweb.settings",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from django.contrib.auth.hashers import"
            " make_password; print(make_password('correct horse').split('$')[0])",
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "pbkdf2_sha256", out.stderr


def test_redis_url_switches_channel_layer_and_cache(tmp_path):
    full_env = {
        **os.environ,
        "DATA_DIR": str(tmp_path),
        "REDIS_URL": "redis://127.0.0.1:6379/3",
        "BREEZEWEB_ENV_FILE": "/nonexistent",
        "DJANGO_SETTINGS_MODULE": "breezeweb.settings",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from django.conf import settings as s;"
            " print(s.CHANNEL_LAYERS['default']['BACKEND'], s.CACHES['default']['BACKEND'])",
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "RedisChannelLayer" in out.stdout and "RedisCache" in out.stdout, out.stderr


def test_healthz_answers_without_login(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_is_503_with_reasons_when_no_runner_is_enabled(client):
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["vector_store"]["ok"] is True
    assert body["checks"]["runners"] == {"ok": False, "detail": "no enabled runner"}


@pytest.mark.django_db
def test_the_chat_page_requires_login(client, user):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
    client.force_login(user)
    assert client.get("/").status_code == 200


@pytest.mark.django_db
def test_login_page_renders_and_logs_in(client, user):
    page = client.get("/login/")
    assert page.status_code == 200
    assert b"Sign in" in page.content
    response = client.post("/login/", {"username": "alice", "password": "alice-password-123"})
    assert response.status_code == 302


@pytest.mark.django_db
def test_pages_carry_a_strict_content_security_policy(client):
    response = client.get("/login/")
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert b"<script>" not in response.content


@pytest.mark.django_db
def test_the_admin_requires_staff(client, user, admin_user):
    assert client.get("/admin/").status_code == 302
    client.force_login(admin_user)
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
@pytest.mark.scaleout
def test_bootstrap_creates_default_runners_once():
    call_command("bootstrap")
    call_command("bootstrap")
    local = RunnerConfig.objects.get(name="local")
    remote = RunnerConfig.objects.get(name="llamastack")
    assert (local.kind, local.enabled) == ("executorch", True)
    assert (remote.kind, remote.enabled, remote.endpoint) == (
        "llamastack",
        False,
        "http://localhost:8321",
    )
    assert local.priority > remote.priority
    assert RunnerConfig.objects.count() == 2


@pytest.mark.django_db
@pytest.mark.scaleout
def test_runner_api_keys_are_encrypted_at_rest():
    config = RunnerConfig(name="remote", kind="llamastack", endpoint="http://x:1", model_id="m")
    config.api_key = "sk-very-secret-value"
    config.save()
    stored = RunnerConfig.objects.values_list("api_key_encrypted", flat=True).get(pk=config.pk)
    assert "sk-very-secret-value" not in stored
    assert RunnerConfig.objects.get(pk=config.pk).api_key == "sk-very-secret-value"


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
async def test_the_channel_layer_delivers_between_consumers():
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("bw-test", channel)
    await layer.group_send("bw-test", {"type": "hello", "n": 1})
    assert (await layer.receive(channel))["n"] == 1
    await layer.group_discard("bw-test", channel)
