"""`manage.py serve` (breezeweb/serve.py): one uvicorn process on the
embedded defaults, one per core with REDIS_URL and CHROMA_URL, all on one port.

The decision is tested in-process; the multi-process server for real in the
scale-out pass: a Chroma server, Redis and PostgreSQL shared by two uvicorn
processes under its process manager on one port, a process that dies
replaced, SIGTERM ending them all."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from django.conf import settings
from django.test import override_settings

import httpx
import psutil
import pytest
import websockets

from accounts.models import ApiKey
from breezeweb import serve
from tests.support.processes import Served, chroma_server, manage, site_env

SCALEOUT = os.environ.get("BREEZEWEB_SCALEOUT_PASS") == "1"


@pytest.mark.parametrize(
    ("redis", "chroma", "missing"),
    [
        ("", "", "REDIS_URL and CHROMA_URL unset"),
        ("redis://127.0.0.1:6379/0", "", "CHROMA_URL unset"),
        ("", "http://127.0.0.1:8001", "REDIS_URL unset"),
    ],
)
def test_auto_is_one_process_without_a_shared_layer_and_store(redis, chroma, missing):
    with override_settings(REDIS_URL=redis, CHROMA_URL=chroma):
        chosen = serve.plan("auto")
    assert chosen.processes == 1
    assert missing in chosen.reason


def test_auto_is_one_process_per_core_with_both():
    with override_settings(REDIS_URL="redis://127.0.0.1:6379/0", CHROMA_URL="http://c:8000"):
        chosen = serve.plan("auto")
    assert chosen.processes == (os.cpu_count() or 1)


def test_a_number_of_processes_needs_both_and_is_a_whole_number():
    with override_settings(REDIS_URL="", CHROMA_URL=""):
        assert serve.plan("1").processes == 1
        with pytest.raises(ValueError, match="needs REDIS_URL and CHROMA_URL"):
            serve.plan("2")
    with override_settings(REDIS_URL="redis://127.0.0.1:6379/0", CHROMA_URL="http://c:8000"):
        assert serve.plan(" 3 ").processes == 3
        for bad in ("0", "-1", "two", "1.5", "٣", ""):
            with pytest.raises(ValueError, match="whole number"):
                serve.plan(bad)


def test_the_server_gets_the_websocket_limits_and_proxy_headers_only_when_asked():
    with override_settings(PROXY_HEADERS=False):
        args = serve.server_args(("--log-level", "debug"))
    for options in (serve.IMPLEMENTATION_ARGS, serve.WEBSOCKET_ARGS, serve.SERVER_ARGS):
        assert " ".join(options) in " ".join(args)
    assert "--proxy-headers" not in args and "--no-proxy-headers" in args
    assert args[-3:] == ["--log-level", "debug", serve.APPLICATION]
    with override_settings(PROXY_HEADERS=True, FORWARDED_ALLOW_IPS="10.0.0.5"):
        args = serve.server_args()
    assert args.count("--proxy-headers") == 1 and "--no-proxy-headers" not in args
    assert args[args.index("--forwarded-allow-ips") + 1] == "10.0.0.5"


def test_the_command_says_how_it_serves_and_refuses_what_cannot_work(tmp_path):
    env = site_env(tmp_path)
    out = manage(env, "serve", "--dry-run", "--port", "8123")
    assert "one web process: REDIS_URL and CHROMA_URL unset" in out
    assert "-m uvicorn --host 127.0.0.1 --port 8123 --loop" in out and serve.APPLICATION in out
    assert "--workers" not in out
    with pytest.raises(RuntimeError, match="needs REDIS_URL and CHROMA_URL"):
        manage(env, "serve", "--dry-run", "--processes", "2")
    out = manage(
        {**env, "REDIS_URL": "redis://127.0.0.1:6379/0", "CHROMA_URL": "http://c:8000"},
        "serve",
        "--dry-run",
        "--processes",
        "3",
    )
    assert "3 web processes" in out and "--port 8000 --workers 3 " in out


# ---- for real: two processes on one port -------------------------------------------------


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """The live web processes under uvicorn's manager (multiprocessing spawns
    them; a killed one is a zombie until the parent collects it)."""
    found = []
    for child in parent.children():
        try:
            argv = " ".join(child.cmdline())
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in argv:
                found.append(child)
        except psutil.Error:
            continue
    return found


def _serving_pids(workers: list[psutil.Process], port: int) -> set[int]:
    """The processes holding an accepted connection on `port`."""
    pids = set()
    for process in workers:
        for conn in process.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED:
                pids.add(process.pid)
    return pids


@pytest.fixture
def served(tmp_path, transactional_db):
    from django.db import connection

    from rag import store

    store.reset_client()  # the test process lets go of its store
    chroma, chroma_url = chroma_server(tmp_path / "chroma")
    db = connection.settings_dict
    env = site_env(
        tmp_path / "data",
        DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}",
        REDIS_URL=settings.REDIS_URL,
        CHROMA_URL=chroma_url,
        SECRET_KEY=settings.SECRET_KEY,
        RAG_INGEST_WORKER="channels",
        WEB_PROCESSES="2",
    )
    server = Served(env)
    try:
        server.start(timeout=90)
        yield server, server.port
    finally:
        server.stop()
        chroma.kill()
        chroma.wait()


@pytest.mark.scaleout
@pytest.mark.skipif(not SCALEOUT, reason="multi-process test: runs in the scale-out pass")
def test_two_processes_share_one_port_a_dead_one_is_replaced_and_sigterm_ends_all(served, user):
    server, port = served
    parent = psutil.Process(server.popen.pid)
    workers = _workers(parent)
    assert len(workers) == 2, server.log_tail()
    _, key = ApiKey.issue(user, "serve")

    async def hold_sockets(count: int) -> set[int]:
        sockets = [
            await websockets.connect(
                f"ws://127.0.0.1:{port}/ws/chat/",
                additional_headers={"Authorization": f"Bearer {key}"},
            )
            for _ in range(count)
        ]
        try:
            for ws in sockets:  # every socket answered, wherever it landed
                await ws.send('{"type": "ping"}')
                assert '"pong"' in await asyncio.wait_for(ws.recv(), 10)
            return _serving_pids(workers, port)
        finally:
            for ws in sockets:
                await ws.close()

    serving: set[int] = set()
    for _ in range(5):  # the kernel picks the process; both pick up some
        serving |= asyncio.run(hold_sockets(16))
        if len(serving) == 2:
            break
    assert serving == {d.pid for d in workers}

    workers[0].kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _workers(parent)
        if len(now) == 2 and workers[0].pid not in {d.pid for d in now}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the dead process was not replaced:\n{server.log_tail()}")
    response = httpx.get(
        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200
    assert "died" in server.log_tail()

    children = _workers(parent)
    parent.send_signal(signal.SIGTERM)
    assert server.popen.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
