"""The real server (uvicorn, as `manage.py serve` starts it) answers
malformed uploads in JSON, lets an upload arrive, and keeps API keys out of
its access log."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.support.processes import ROOT, WebServer

pytestmark = pytest.mark.slow

MAKE_KEY = """
import django; django.setup()
from django.contrib.auth.models import User
from accounts.models import ApiKey
user = User.objects.create_user("uploader", password="uploader-password-123")
print(ApiKey.issue(user, "server test")[1])
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("server-data")
    env = {"DATA_DIR": str(data), "DJANGO_SETTINGS_MODULE": "breezeweb.settings"}
    full_env = {**__import__("os").environ, **env}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env=full_env,
        check=True,
    )
    key = (
        subprocess.run(
            [sys.executable, "-c", MAKE_KEY],
            cwd=ROOT,
            env=full_env,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .strip()
    )
    access_log = data / "server.log"  # uvicorn's access lines, through settings.LOGGING
    server = WebServer(env, log=access_log).start()
    yield server, key, access_log
    server.stop()


def test_a_multipart_body_without_a_boundary_gets_a_json_error(server):
    web, key, _ = server
    response = httpx.post(
        f"{web.url}/api/documents",
        content=b"x" * 100,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "multipart/form-data"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] in {"bad_multipart", "bad_upload"}
    assert "multipart" in error["message"]


def test_a_well_formed_upload_still_arrives(server):
    web, key, _ = server
    response = httpx.post(
        f"{web.url}/api/documents",
        files={"file": ("notes.txt", b"The lighthouse keeper logs the weather at dawn.\n" * 20)},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code in (200, 201, 202), response.text
    assert json.loads(response.text)


def test_a_key_in_a_query_string_never_reaches_the_access_log(server):
    web, key, access_log = server
    response = httpx.get(f"{web.url}/api/documents?api_key={key}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "api_key_in_query"
    web.stop()
    text = access_log.read_text()
    assert "/api/documents?api_key=bw_[redacted]" in text
    assert key not in text
