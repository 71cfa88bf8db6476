"""First run in the browser: while no account exists the site offers to
create the admin account at /setup/, exactly once, even when two browsers
submit at the same moment (decided by a database constraint)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management import call_command

import httpx
import pytest

from accounts.models import FirstRun
from tests.support.processes import ROOT, WebServer

PASSWORD = "a-long-admin-passphrase-42"


def _form(username: str = "root", password: str = PASSWORD, again: str | None = None) -> dict:
    return {"username": username, "password1": password, "password2": again or password}


@pytest.mark.django_db
def test_a_fresh_install_sends_the_login_page_to_the_first_run_page(client):
    response = client.get("/login/")
    assert response.status_code == 302 and response["Location"] == "/setup/"
    page = client.get("/setup/")
    assert page.status_code == 200
    assert b"Create the admin account" in page.content
    assert "no-store" in page["Cache-Control"] or "max-age=0" in page["Cache-Control"]


@pytest.mark.django_db
def test_the_first_run_creates_a_signed_in_superuser_and_is_never_offered_again(client):
    response = client.post("/setup/", _form())
    assert response.status_code == 302 and response["Location"] == "/"
    admin = get_user_model().objects.get()
    assert admin.username == "root" and admin.is_superuser and admin.is_staff
    assert admin.check_password(PASSWORD)
    assert client.get("/").status_code == 200  # signed in
    assert client.get("/setup/").status_code == 404
    assert client.post("/setup/", _form("intruder")).status_code == 404
    # Even with every account deleted, the page stays closed.
    get_user_model().objects.all().delete()
    assert FirstRun.objects.filter(username="root").exists()
    assert client.get("/setup/").status_code == 404


@pytest.mark.django_db
def test_an_install_with_an_account_never_offers_it(client, user):
    assert client.get("/setup/").status_code == 404
    assert client.post("/setup/", _form()).status_code == 404
    assert client.get("/login/").status_code == 200
    assert get_user_model().objects.count() == 1


@pytest.mark.django_db
def test_a_bad_form_says_what_is_wrong_and_creates_nothing(client):
    response = client.post("/setup/", _form(again="something-else-entirely"))
    assert response.status_code == 200
    assert b"didn" in response.content  # "The two password fields didn't match."
    response = client.post("/setup/", _form(password="short", again="short"))
    assert response.status_code == 200 and b"too short" in response.content
    assert not get_user_model().objects.exists() and not FirstRun.objects.exists()
    assert client.get("/setup/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_request_that_passed_the_open_check_loses_at_the_constraint():
    """What the slower of two simultaneous submissions meets: the page looked
    open, but the one FirstRun row exists by the time it saves."""
    from accounts import firstrun
    from accounts.views import FirstAdminForm

    first, second = FirstAdminForm(_form("first")), FirstAdminForm(_form("second"))
    assert first.is_valid() and second.is_valid()
    firstrun.create_first_admin(first)
    with pytest.raises(firstrun.FirstRunClosed):
        firstrun.create_first_admin(second)
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["first"]


@pytest.mark.django_db
def test_make_run_prints_the_url_only_while_no_account_exists(capsys, user):
    call_command("first_run_url", "http://127.0.0.1:8000")
    assert capsys.readouterr().out == ""
    user.delete()  # the first account was recorded: the page stays closed
    call_command("first_run_url", "http://127.0.0.1:8000")
    assert capsys.readouterr().out == ""
    FirstRun.objects.all().delete()  # as on a fresh install
    call_command("first_run_url", "http://127.0.0.1:8000/")
    assert "http://127.0.0.1:8000/setup/" in capsys.readouterr().out


# ---- two browsers at once, against a real server --------------------------------------


@pytest.fixture
def fresh_site(tmp_path):
    """A uvicorn process with its own, migrated, empty SQLite database."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "CHROMA_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env.update(DATA_DIR=str(tmp_path), BREEZEWEB_ENV_FILE="/nonexistent")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "breezeweb.settings"},
        check=True,
        timeout=300,
    )
    server = WebServer(env).start()
    yield server, tmp_path
    server.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)


def _accounts(data_dir: Path) -> list[tuple[str, int]]:
    import sqlite3

    with sqlite3.connect(data_dir / "db.sqlite3") as db:
        return db.execute("SELECT username, is_superuser FROM auth_user").fetchall()


def test_two_browsers_submitting_at_once_create_exactly_one_admin(fresh_site):
    server, data_dir = fresh_site
    browsers = [httpx.Client(base_url=server.url) for _ in range(2)]
    tokens = []
    for browser in browsers:
        page = browser.get("/setup/")
        assert page.status_code == 200
        tokens.append(re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)[1])
    start = threading.Barrier(2)
    answers: list[httpx.Response | None] = [None, None]

    def submit(i: int) -> None:
        start.wait()
        answers[i] = browsers[i].post(
            "/setup/",
            data={"csrfmiddlewaretoken": tokens[i], **_form(f"admin{i}")},
            headers={"Referer": f"{server.url}/setup/"},
        )

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    statuses = sorted(a.status_code for a in answers)
    # One created the account (redirected to the chat); the other was told:
    # 409 when it lost at the constraint, 404 when it arrived after the commit.
    assert statuses in ([302, 409], [302, 404]), [a.text[:300] for a in answers]
    created = _accounts(data_dir)
    assert len(created) == 1 and created[0][1] == 1
    assert browsers[0].get("/setup/").status_code == 404
    for browser in browsers:
        browser.close()


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["createsuperuser", "sso"])
def test_an_admin_made_without_the_page_closes_it_even_after_every_account_is_deleted(
    client, monkeypatch, how
):
    """`createsuperuser` (and DJANGO_SUPERUSER_*, its non-interactive form) or
    a single sign-on user creates the first account: the first run is
    recorded then, so deleting every account does not reopen /setup/."""
    if how == "createsuperuser":
        monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", PASSWORD)
        call_command("createsuperuser", "--noinput", username="boss", email="boss@example.com")
    else:  # what accounts/oidc.py does on a first sign-in: a plain user save
        get_user_model().objects.create_user("carol", password=None)
    assert FirstRun.objects.get().username in {"boss", "carol"}
    get_user_model().objects.all().delete()
    assert client.get("/setup/").status_code == 404
    assert client.post("/setup/", _form()).status_code == 404
    assert not get_user_model().objects.exists()
