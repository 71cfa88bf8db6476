"""Real BreezeWeb processes for tests and benchmarks: the web server on a free port,
`runworker`, `manage.py` commands, a site of its own, and a scripted upstream
in a process of its own (`Upstream`).

By default they share the test's database, Redis and DATA_DIR through the
environment, exactly as separate machines of a scale-out deployment would;
`site_env(data_dir)` instead gives a site of its own (SQLite, embedded Chroma
and uploads in `data_dir`), as the browser tests and the benchmarks use.
Each runs with its parent's DJANGO_SETTINGS_MODULE: the test run's
(tests/support/settings.py) under pytest, the product's in a benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from breezeweb.serve import server_command
from tests.support.scripted_server import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


def site_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a site of its own: no shared database, Redis or
    Chroma server, no .env file, its data in `data_dir`, and `settings` on top."""
    return {
        **os.environ,
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "CHROMA_URL": "",
        "DATA_DIR": str(data_dir),
        "BREEZEWEB_ENV_FILE": "/nonexistent",
        "MODELS_DIR": os.environ.get("MODELS_DIR", str(ROOT / "data" / "models")),
        **settings,
    }


def manage(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    """`manage.py <args>` in the checkout with `env`; its stdout. A failure
    raises with the end of its stderr."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def chroma_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    """`chroma run` (the installed chromadb's server) on a free port of
    127.0.0.1, storing in `tmp`: the process and its URL."""
    binary = Path(shutil.which("chroma") or Path(sys.executable).with_name("chroma"))
    port = free_port()
    process = subprocess.Popen(
        [str(binary), "run", "--path", str(tmp), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chroma run exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("chroma run did not answer within 60 s")


def end_process(popen: subprocess.Popen | None, timeout: float = 15) -> None:
    """Terminate `popen` if it still runs; kill it if it has not ended within `timeout` s."""
    if popen is None or popen.poll() is not None:
        return
    popen.terminate()
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=timeout)


def wait_until_healthy(
    popen: subprocess.Popen,
    url: str,
    what: str,
    log_tail: Callable[[], str],
    timeout: float,
    *,
    healthy: Callable[[httpx.Response], bool] = lambda response: response.status_code == 200,
    interval: float = 0.2,
) -> None:
    """Poll `url` until its answer is `healthy`. A RuntimeError naming `what`,
    with `log_tail()`, if `popen` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{what} exited with {popen.returncode}:\n{log_tail()}")
        try:
            if healthy(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{what} did not answer within {timeout:g} s:\n{log_tail()}")


class Process:
    """A child process run from the checkout, its output in a log file (a pipe
    nobody reads would stall a chatty server)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path | None = None) -> None:
        self.argv = argv
        self.env = {**os.environ, **env}
        self._own_log = log is None  # a temporary file, removed by stop()
        if log is None:
            handle, name = tempfile.mkstemp(prefix="breezeweb-process-", suffix=".log")
            os.close(handle)
            log = Path(name)
        self.log = log
        self.popen: subprocess.Popen | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as log:  # the child keeps its own copy open
            self.popen = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        end_process(self.popen)
        if self._own_log:
            self.log.unlink(missing_ok=True)


class WebServer(Process):
    """breezeweb.asgi served by uvicorn on a free port of 127.0.0.1, one
    process, with the options `make run` and the image give it
    (breezeweb.serve), the port kept across restarts; started means /healthz
    answers."""

    def __init__(self, env: dict[str, str], log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(server_command("127.0.0.1", self.port, proxy=False), env, log)

    def start(self, timeout: float = 60) -> WebServer:
        super().start()
        wait_until_healthy(self.popen, f"{self.url}/healthz", "the server", self.log_tail, timeout)
        return self

    def crash_and_restart(self) -> None:
        """SIGKILL the server (no chance to save anything), then start it again."""
        self.popen.kill()
        self.popen.wait(timeout=15)
        self.start()


class Served(WebServer):
    """`manage.py serve` (breezeweb.serve: one uvicorn process, or several on
    one port per WEB_PROCESSES) on a free port of 127.0.0.1; started means
    /healthz answers."""

    def __init__(self, env: dict[str, str], log: Path | None = None) -> None:
        super().__init__(env, log)
        self.argv = [sys.executable, "manage.py", "serve", "--bind", "127.0.0.1"]
        self.argv += ["--port", str(self.port)]


def create_user(username: str, password: str, *, admin: bool = False) -> str:
    """Python for `live_site(setup=...)` that creates an account."""
    if admin:
        return (
            "from django.contrib.auth.models import User;"
            f"User.objects.create_superuser({username!r}, '{username}@example.com', {password!r})\n"
        )
    return (
        "from django.contrib.auth.models import User;"
        f"User.objects.create_user({username!r}, password={password!r})\n"
    )


def remote_runner(endpoint: str, name: str = "scripted", **fields: object) -> str:
    """Python for `live_site(setup=...)` that adds a Llama Stack runner config
    answering from `endpoint` (the scripted server, usually)."""
    values = {"name": name, "kind": "llamastack", "endpoint": endpoint}
    values |= {"model_id": "scripted-model", **fields}
    arguments = ", ".join(f"{key}={value!r}" for key, value in values.items())
    return f"from runners.models import RunnerConfig;RunnerConfig.objects.create({arguments})\n"


@contextmanager
def live_site(
    data: Path, setup: str = "", *, local_model: bool = False, **settings: str
) -> Iterator[WebServer]:
    """A whole site of its own in `data` (SQLite, embedded Chroma, uploads),
    served by uvicorn: migrated, with the bootstrap runner configs (the local
    model, which must be prepared) when `local_model`, then `setup` run in
    `manage.py shell`. Stopped and removed after; its log's text is kept in
    the server's `final_log`."""
    env = site_env(data, **settings)
    if local_model and not (Path(env["MODELS_DIR"]) / "model.pte").exists():
        pytest.fail(f"no prepared model in {env['MODELS_DIR']}: run `manage.py prepare_model`")
    manage(env, "migrate", "--noinput", "-v0")
    if local_model:
        manage(env, "bootstrap")
    if setup:
        manage(env, "shell", "-c", setup)
    live = WebServer(env, log=data / "server.log").start()
    try:
        yield live
    finally:
        live.stop()
        live.final_log = live.log.read_text(errors="replace") if live.log.exists() else ""
        shutil.rmtree(data, ignore_errors=True)


class Upstream:
    """A scripted upstream in a process of its own: `argv` runs
    tests.support.scripted_server.serve_until_stdin_closes, which prints the
    URL it serves; `stop()` closes its stdin."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.popen: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Upstream:
        self.popen = subprocess.Popen(
            self.argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.url = self.popen.stdout.readline().strip()
        if not self.url:
            self.stop()
            raise RuntimeError(f"the upstream {self.argv} did not start")
        return self

    def stop(self) -> None:
        if self.popen is not None:
            self.popen.stdin.close()
            self.popen.wait(timeout=15)

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Worker(Process):
    def __init__(self, env: dict[str, str], channel: str = "ingest") -> None:
        super().__init__([sys.executable, "manage.py", "runworker", channel], env)
