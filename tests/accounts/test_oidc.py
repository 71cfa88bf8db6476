"""Single sign-on against a real OpenID Connect provider: a django-oidc-provider
process on 127.0.0.1 (tests.support.oidc_server) and a real BreezeWeb uvicorn
process configured with its issuer, client id and secret. The round trip
(authorization code flow, RS256 ID token checked against the JWKS, userinfo)
creates the user, syncs their groups from the `groups` claim, and signing out
ends the provider's session too. The client secret appears in no log."""

from __future__ import annotations

import re
import shutil
import sqlite3

from django.test import Client, override_settings

import httpx
import pytest

from tests.support.oidc_server import OidcProvider
from tests.support.processes import WebServer, manage, site_env

pytestmark = pytest.mark.slow

CLIENT_ID = "breezeweb-test"
CLIENT_SECRET = "oidc-client-secret-7d1f4e2a9b"
PASSWORD = "carol-provider-pass-42"


@pytest.fixture
def sso(tmp_path_factory):
    """(provider, site): BreezeWeb signing in through the provider."""
    provider_dir = tmp_path_factory.mktemp("op")
    site_dir = tmp_path_factory.mktemp("rp")
    env = site_env(site_dir)
    # Its port is chosen now: the provider must know the redirect URI.
    site = WebServer(env, log=site_dir / "server.log")
    provider = OidcProvider(provider_dir)
    provider.setup(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, site_url=site.url)
    provider.add_user("carol", PASSWORD, "carol@example.com", ["research", "staff"])
    provider.start()
    oidc = {"OIDC_ISSUER": provider.issuer, "OIDC_CLIENT_ID": CLIENT_ID}
    oidc |= {"OIDC_CLIENT_SECRET": CLIENT_SECRET, "OIDC_PROVIDER_NAME": "Test SSO"}
    env.update(oidc)
    site.env.update(oidc)
    manage(env, "migrate", "--noinput", "-v0")
    # A local account that the provider's "admin" must never become.
    manage(
        env,
        "shell",
        "-c",
        "from django.contrib.auth.models import User;"
        "User.objects.create_superuser('carol', 'local@example.com', 'local-admin-pass-1')",
    )
    site.start()
    yield provider, site
    site.stop()
    provider.stop()
    shutil.rmtree(site_dir, ignore_errors=True)
    shutil.rmtree(provider_dir, ignore_errors=True)


def _sign_in(browser: httpx.Client, site: WebServer) -> httpx.Response:
    """The browser's round trip: BreezeWeb -> provider login -> back, signed in."""
    login_page = browser.get(f"{site.url}/login/")
    assert "Sign in with Test SSO" in login_page.text
    at_provider = browser.get(f"{site.url}/oidc/authenticate/")
    if "Test provider" in at_provider.text:  # the provider asks who we are
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', at_provider.text)[1]
        at_provider = browser.post(
            str(at_provider.url),
            data={
                "csrfmiddlewaretoken": token,
                "username": "carol",
                "password": PASSWORD,
                "next": at_provider.url.params["next"],
            },
            headers={"Referer": str(at_provider.url)},
        )
    return at_provider


def _breezeweb_db(site: WebServer):
    return sqlite3.connect(site.log.parent / "db.sqlite3")


def _groups_of(site: WebServer, username: str) -> list[str]:
    with _breezeweb_db(site) as db:
        rows = db.execute(
            "SELECT g.name FROM auth_group g JOIN auth_user_groups ug ON ug.group_id = g.id"
            " JOIN auth_user u ON u.id = ug.user_id WHERE u.username = ? ORDER BY g.name",
            (username,),
        ).fetchall()
    return [r[0] for r in rows]


def test_sign_in_creates_the_user_syncs_groups_and_sign_out_ends_both_sessions(sso):
    provider, site = sso
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        landed = _sign_in(browser, site)
        # Back in BreezeWeb, signed in: the chat page with a live session.
        assert landed.url.path == "/" and landed.status_code == 200, landed.text[:500]
        with _breezeweb_db(site) as db:
            users = db.execute(
                "SELECT u.username, u.email, u.password, u.is_superuser, i.subject, i.issuer"
                " FROM auth_user u JOIN accounts_oidcidentity i ON i.user_id = u.id"
            ).fetchall()
        assert len(users) == 1
        username, email, password, is_superuser, subject, issuer = users[0]
        # The local "carol" (a superuser) is not who the provider's carol is.
        assert username == "carol-2" and email == "carol@example.com"
        assert password.startswith("!") and not is_superuser  # no usable password
        assert issuer == provider.issuer and subject
        assert _groups_of(site, "carol-2") == ["research", "staff"]
        assert f'<span class="muted">{username}</span>' in landed.text

        # Sign out: BreezeWeb's session and the provider's both end.
        csrf = browser.cookies["csrftoken"]
        out = browser.post(
            f"{site.url}/logout/",
            data={"csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{site.url}/"},
        )
        assert out.url.path == "/login/", out.url
        assert any("/openid/end-session" in str(r.url) for r in out.history)
        assert browser.get(f"{site.url}/").url.path == "/login/"
        again = browser.get(f"{site.url}/oidc/authenticate/")
        assert "Test provider" in again.text  # the provider asks for the password again

    # Groups follow the provider on the next sign-in.
    provider.set_groups("carol", ["research"])
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        assert _sign_in(browser, site).url.path == "/"
    assert _groups_of(site, "carol-2") == ["research"]
    with _breezeweb_db(site) as db:
        assert db.execute("SELECT count(*) FROM accounts_oidcidentity").fetchone()[0] == 1

    log = site.log.read_text(errors="replace")
    assert CLIENT_SECRET not in log


@pytest.mark.django_db
def test_with_password_login_off_the_form_is_gone_and_passwords_are_refused(user, settings):
    backends = [b for b in settings.AUTHENTICATION_BACKENDS if not b.endswith("ModelBackend")]
    with override_settings(PASSWORD_LOGIN=False, AUTHENTICATION_BACKENDS=backends):
        browser = Client()
        page = browser.get("/login/")
        assert page.status_code == 200 and b'name="password"' not in page.content
        refused = browser.post("/login/", {"username": "alice", "password": "alice-password-123"})
        assert refused.status_code == 403
        assert browser.get("/").status_code == 302  # not signed in
        admin = Client().post(
            "/admin/login/", {"username": "alice", "password": "alice-password-123"}
        )
        assert admin.status_code == 200  # the admin's form refuses it too
        assert not Client().login(username="alice", password="alice-password-123")
        get_user = __import__("django.contrib.auth", fromlist=["get_user_model"]).get_user_model()
        get_user.objects.all().delete()
        assert browser.get("/setup/").status_code == 404  # no first run without passwords
