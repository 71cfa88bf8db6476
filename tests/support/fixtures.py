"""Pytest fixtures for the real test servers (loaded by tests/conftest.py).

- `scripted_server`: a `ScriptedServer` (tests.support.scripted_server), shared
  by the session but reset before each test: empty scripts, no recordings,
  models ["scripted-model"].
- `scripted_runner`: an enabled `llamastack` RunnerConfig named "scripted"
  pointing at `scripted_server` (priority 10, 10 s timeout).
- `llamastack_server`: a real `llama stack run` server (session-wide, started on
  first use) whose upstream is its own ScriptedServer; see
  tests.support.llamastack_server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.scripted_server import ScriptedServer


@pytest.fixture(scope="session")
def _scripted_server_session() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.stop()


@pytest.fixture
def scripted_server(_scripted_server_session: ScriptedServer) -> ScriptedServer:
    _scripted_server_session.reset()
    return _scripted_server_session


@pytest.fixture(scope="session")
def llamastack_server():
    from tests.support.llamastack_server import LlamaStackServer

    server = LlamaStackServer()
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"the real Llama Stack server did not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def scripted_runner(scripted_server: ScriptedServer):
    from runners.models import RunnerConfig

    # Scripted servers stream synthetic filler ("tick " * 400), a loop by
    # construction: the loop guard (tested in tests/runners/test_loopguard.py)
    # is off for them.
    return RunnerConfig.objects.create(
        name="scripted",
        kind="llamastack",
        endpoint=scripted_server.url,
        model_id="scripted-model",
        priority=10,
        timeout_seconds=10,
        extra_params={"loop_guard": False},
    )
