"""Real BreezeWeb processes for tests: Daphne on a free port, `runworker`.

They share the test's database, Redis and DATA_DIR through the environment,
exactly as separate machines of a scale-out deployment would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.scripted_server import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


class Process:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.env = {**os.environ, "DJANGO_SETTINGS_MODULE": "breezeweb.settings", **env}
        self.popen: subprocess.Popen | None = None

    def start(self) -> Process:
        self.popen = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return self

    def log_tail(self) -> str:
        if self.popen and self.popen.poll() is not None and self.popen.stderr:
            return self.popen.stderr.read().decode(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()


class Daphne(Process):
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "breezeweb.asgi:application",
            ],
            env,
        )

    def start(self, timeout: float = 60) -> Daphne:
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"daphne exited:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"daphne did not answer within {timeout} s")


class Worker(Process):
    def __init__(self, env: dict[str, str], channel: str = "ingest") -> None:
        super().__init__([sys.executable, "manage.py", "runworker", channel], env)
