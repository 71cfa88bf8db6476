"""`OidcProvider`: the test OpenID Connect provider (tests.support.oidc_provider,
django-oidc-provider) as a real process on 127.0.0.1 with its own SQLite
database, an RSA signing key, users with groups, and one confidential client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ROOT, end_process, wait_until_healthy
from tests.support.scripted_server import free_port

SETTINGS = "tests.support.oidc_provider.settings"


class OidcProvider:
    def __init__(self, data_dir: Path) -> None:
        self.data = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = f"{self.url}/openid"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}},
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "OP_DATA_DIR": str(data_dir),
            "OP_URL": self.url,
        }
        self.proc: subprocess.Popen | None = None

    def _admin(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "django", *args],
            cwd=ROOT,
            env=self.env,
            check=True,
            timeout=300,
            capture_output=True,
            text=True,
        )
        return done.stdout

    def run(self, code: str) -> str:
        """Run Python in the provider's Django (e.g. to change a user's groups)."""
        return self._admin("shell", "-c", code)

    def setup(self, *, client_id: str, client_secret: str, site_url: str) -> None:
        """Migrate, make a signing key and register BreezeWeb at `site_url`."""
        self._admin("migrate", "--noinput", "-v0")
        self._admin("creatersakey")
        config = json.dumps(
            {
                "client_id": client_id,
                "client_secret": client_secret,
                "redirect": f"{site_url}/oidc/callback/",
                "logout": f"{site_url}/login/",
            }
        )
        self.run(
            "import json\n"
            "from oidc_provider.models import Client, ResponseType\n"
            f"c = json.loads({config!r})\n"
            "client = Client.objects.create(name='BreezeWeb', client_type='confidential',"
            " client_id=c['client_id'], client_secret=c['client_secret'], jwt_alg='RS256',"
            " require_consent=False, _redirect_uris=c['redirect'],"
            " _post_logout_redirect_uris=c['logout'])\n"
            "client.response_types.add(ResponseType.objects.get(value='code'))\n"
        )

    def add_user(self, username: str, password: str, email: str, groups: list[str]) -> None:
        self.run(
            "from django.contrib.auth.models import Group, User\n"
            f"u = User.objects.create_user({username!r}, {email!r}, {password!r})\n"
            f"u.groups.set([Group.objects.get_or_create(name=n)[0] for n in {groups!r}])\n"
        )

    def set_groups(self, username: str, groups: list[str]) -> None:
        self.run(
            "from django.contrib.auth.models import Group, User\n"
            f"u = User.objects.get(username={username!r})\n"
            f"u.groups.set([Group.objects.get_or_create(name=n)[0] for n in {groups!r}])\n"
        )

    def start(self, timeout: float = 60) -> OidcProvider:
        self.log = open(self.data / "provider.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{self.port}", "--noreload"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until_healthy(
            self.proc,
            f"{self.issuer}/.well-known/openid-configuration",
            "the OIDC provider",
            lambda: (self.data / "provider.log").read_text()[-3000:],
            timeout,
        )
        return self

    def stop(self) -> None:
        end_process(self.proc, timeout=10)
        if self.proc:
            self.log.close()
