"""Pytest fixtures for the real test servers (loaded by tests/conftest.py).

- `scripted_server`: a `ScriptedServer` (tests.support.scripted_server), shared
  by the session but reset before each test: empty scripts, no recordings,
  models ["scripted-model"].
- `scripted_runner`: an enabled `llamastack` RunnerConfig named "scripted"
  pointing at `scripted_server` (priority 10, 10 s timeout).
- `llamastack_server`: a real `llama stack run` server (session-wide, started on
  first use) whose upstream is its own ScriptedServer; see
  tests.support.llamastack_server.
- `fresh_process_state`: runner instances, circuits and the users' limits reset.
- `no_detached_answers`: no answer outlives the test.
- `api_key`: a bearer key of `user`.
- `rag_thread`: documents ingested by this process' worker thread; after the
  test its queue is drained and the test Chroma store emptied.
- `runner_config(endpoint, name, **fields)`: the one runner-config factory;
  `runner_form(config, **changes)`: its admin change form, filled in.
- `running(server, name)`: a helper server started for a fixture, stopped after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.scripted_server import ScriptedServer


@pytest.fixture(scope="session")
def _scripted_server_session() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedServer]:
    """A scripted server of the test module's own, for a module-scoped site
    (a browser test's server) whose runner config points at it."""
    with ScriptedServer() as server:
        yield server


@pytest.fixture
def scripted_server(_scripted_server_session: ScriptedServer) -> ScriptedServer:
    _scripted_server_session.reset()
    return _scripted_server_session


@pytest.fixture(scope="session")
def llamastack_server():
    from tests.support.llamastack_server import LlamaStackServer

    with running(LlamaStackServer(), "the real Llama Stack server") as server:
        yield server


@pytest.fixture
def scripted_runner(scripted_server: ScriptedServer):
    return runner_config(scripted_server.url, "scripted", priority=10, timeout_seconds=10)


@pytest.fixture
def fresh_process_state(request):
    """The process' runner instances and circuits forgotten before and after the
    test, and the rate and concurrency counters of its users (`user`,
    `other_user`, when it has them) reset."""
    from chat import services
    from runners import registry
    from runners.router import circuits

    registry.forget_all()
    circuits.reset()
    for name in ("user", "other_user"):
        if name in request.fixturenames:
            services.reset_limits(request.getfixturevalue(name).pk)
    yield
    registry.forget_all()
    circuits.reset()


@pytest.fixture
async def no_detached_answers():
    """Answers outlive their socket by design; a test's must not outlive the test."""
    yield
    from chat.consumers import finish_detached

    await finish_detached(cancel=True)


@pytest.fixture
def rag_thread(settings):
    from rag import worker
    from tests.support.documents import drop_all_chroma_collections

    settings.RAG_INGEST_WORKER = "thread"
    yield settings
    worker.wait_until_idle(timeout=120)
    drop_all_chroma_collections()


@pytest.fixture
def api_key(user) -> str:
    """A bearer key of `user`."""
    from accounts.models import ApiKey

    return ApiKey.issue(user, "tests")[1]


@contextmanager
def running(server, name: str):
    """`server` started (`.start()`), and stopped (`.stop()`) after; a server
    that does not start fails the test, saying `name`, once what it did start
    is stopped."""
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"{name} did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def runner_config(endpoint: str, name: str = "remote", *, api_key: str = "", **fields):
    """A saved RunnerConfig of an OpenAI-compatible server at `endpoint`
    (llamastack, model `scripted-model`, unless `fields` say otherwise)."""
    from runners.models import RunnerConfig

    # Scripted servers stream synthetic filler ("tick " * 400), a loop by
    # construction: the loop guard (tested in tests/runners/test_loopguard.py)
    # is off unless a test sets extra_params itself.
    defaults = {
        "kind": "llamastack",
        "model_id": "scripted-model",
        "extra_params": {"loop_guard": False},
    }
    config = RunnerConfig(name=name, endpoint=endpoint, **(defaults | fields))
    if api_key:
        config.api_key = api_key
    config.save()
    return config


def runner_form(config, **changes) -> dict:
    """The admin change form of `config` as an admin submits it: its saved
    values, the key field left blank (keeps the stored key), `changes` on top;
    an empty value is an unchecked box or a blank field."""
    data = {
        "name": config.name,
        "kind": config.kind,
        "enabled": "on" if config.enabled else "",
        "priority": str(config.priority),
        "model_id": config.model_id,
        "endpoint": config.endpoint,
        "api_key": "",
        "temperature": str(config.temperature),
        "max_tokens": str(config.max_tokens),
        "context_tokens": str(config.context_tokens),
        "timeout_seconds": str(config.timeout_seconds),
        "enable_rag": "on" if config.enable_rag else "",
        "extra_params": "{}",
        **changes,
    }
    return {k: v for k, v in data.items() if v != ""}


@pytest.fixture(scope="session")
def compiled_translations() -> None:
    """The .mo catalogs compiled from locale/*.po (`make setup` does it too), and
    Django's cached translations dropped so the fresh ones load."""
    from django.core.management import call_command
    from django.utils.translation import trans_real

    call_command("compile_translations", verbosity=0)
    trans_real._translations.clear()


def local_model_ready() -> bool:
    """Whether the local model is prepared in MODELS_DIR (`manage.py prepare_model`)."""
    from django.conf import settings

    from runners.executorch.prepare import PTE_NAME, TOKENIZER_NAME

    models = Path(settings.MODELS_DIR)
    return (models / PTE_NAME).is_file() and (models / TOKENIZER_NAME).is_file()


def require_local_model() -> None:
    """For a test of the local model: skip it when the model is not prepared,
    or fail it under BREEZEWEB_REQUIRE_MODEL=1 (`make test`, which prepares it)."""
    if local_model_ready():
        return
    from django.conf import settings

    missing = f"no prepared model in {settings.MODELS_DIR}"
    if os.environ.get("BREEZEWEB_REQUIRE_MODEL") == "1":
        pytest.fail(f"BREEZEWEB_REQUIRE_MODEL=1 but {missing}")
    pytest.skip(f"{missing}: run `python manage.py prepare_model`")


@pytest.fixture
def model_ready() -> None:
    require_local_model()


@pytest.fixture
def local_model_idle():
    """Each test starts with every slot of the process's local model free: a
    generation an earlier test stopped (in this test file or another one of
    this worker) may hold its slot a moment longer, and a request then waits
    (a `queued` notice) where the test expects none."""
    from runners.executorch import runner as executorch_runner

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pools = [engine.pool for engine in list(executorch_runner._engines.values())]
        if not any(pool.busy() or pool.queued() for pool in pools):
            return
        time.sleep(0.05)
    pytest.fail("the local model's slots stayed busy for 60 s after the previous test")
