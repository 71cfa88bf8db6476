"""Data safety (issue 21), with real Chroma, real embeddings and real processes:

- the test suite runs in its own DATA_DIR: a server from the same checkout,
  serving and answering searches, is left byte-identical by a slice of the
  suite run with the environment pointing at that server's data;
- a server's Redis database (0, the default) keeps every key while the
  scale-out pass's cache-clearing tests run with REDIS_URL pointing at it;
- a second process on the embedded store is refused with a clear message;
- no document is ever stuck: a store that fails inside ingestion and again
  inside the cleanup ends `failed` with a reason; the watchdog settles runs
  that died and leaves live ones alone;
- the store heals itself: a Chroma collection deleted (or recreated empty)
  behind the server's back is found again, rebuilt from the database's record,
  and uploads and searches keep working.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings as django_settings
from django.db import OperationalError, connections
from django.test import Client
from django.utils import timezone

import httpx
import pytest

from accounts.models import ApiKey
from rag import store, worker
from rag.ingestion import ingest_document
from rag.models import Collection, Document
from rag.retrieval import retrieve
from tests.support import documents as docs
from tests.support import hermetic
from tests.support.documents import add_and_ingest, chunk_count
from tests.support.processes import ROOT, WebServer, manage, site_env

LIGHTHOUSE_QUESTION = docs.LIGHTHOUSE_QUESTIONS[0][0]  # page 1


@pytest.fixture
def rag_thread(settings):
    settings.RAG_INGEST_WORKER = "thread"
    yield settings
    worker.stop_watchdog()
    worker.wait_until_idle(timeout=120)
    docs.drop_all_chroma_collections()


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OperationalError as exc:
            # The test database is SQLite's shared-cache in-memory one, which
            # locks whole tables and does not wait: a read that meets the
            # watchdog's write reads again (a file database waits instead).
            if "locked" not in str(exc):
                raise
        time.sleep(0.1)
    return False


# --- the run's own DATA_DIR ------------------------------------------------------------


def test_settings_use_the_runs_own_temporary_data_dir():
    data_dir = Path(django_settings.DATA_DIR)
    assert data_dir == hermetic.DATA_DIR
    assert data_dir.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not data_dir.is_relative_to(ROOT)
    for path in (django_settings.CHROMA_PATH, django_settings.MEDIA_ROOT):
        assert Path(path).is_relative_to(data_dir)
    assert os.environ["DATA_DIR"] == str(data_dir)  # what the processes tests start get
    assert not django_settings.CHROMA_URL


def test_the_pytest_script_loads_the_hermetic_plugin_as_python_m_pytest_does():
    """`pytest` (unlike `python -m pytest`) does not put the working directory
    on sys.path: pyproject's `pythonpath` does, before `-p tests.support.hermetic`."""
    script = Path(sys.executable).parent / "pytest"
    if not script.exists():
        pytest.skip(f"no pytest script next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTEST_ADDOPTS"}}
    run = subprocess.run(
        [
            str(script),
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_data_safety.py::test_settings_use_the_runs_own_temporary_data_dir",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_the_main_pass_ignores_the_shells_database_and_redis():
    if os.environ.get("BREEZEWEB_SCALEOUT_PASS") == "1":
        pytest.skip("the scale-out pass uses PostgreSQL and Redis on purpose")
    assert "REDIS_URL" not in os.environ and "DATABASE_URL" not in os.environ
    assert not django_settings.REDIS_URL
    assert django_settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"


@pytest.mark.parametrize(
    ("url", "worker", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "", "redis://127.0.0.1:6379/10"),
        ("redis://127.0.0.1:6379", "gw1", "redis://127.0.0.1:6379/11"),
        ("redis://:pw@redis:6379/3", "gw0", "redis://:pw@redis:6379/10"),
        ("redis://127.0.0.1:6379/12", "gw2", "redis://127.0.0.1:6379/14"),
    ],
)
def test_the_scaleout_pass_uses_redis_databases_a_server_does_not(url, worker, expected):
    assert hermetic.redis_for_worker(url, worker) == expected


SERVER_REDIS_DB = 0  # README, .env.example and compose.yaml serve from it


def run_slice(tests: list[str], env: dict[str, str], *, passed: int) -> None:
    """Run these tests of the suite in a pytest of its own with `env`; all pass."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{passed} passed" in run.stdout, run.stdout[-2000:]


@pytest.mark.scaleout
@pytest.mark.skipif(
    os.environ.get("BREEZEWEB_SCALEOUT_PASS") != "1",
    reason="needs Redis: runs in the scale-out pass",
)
def test_the_scaleout_pass_leaves_a_servers_redis_database_untouched():
    """A server's cache and channel layer live in Redis database 0; the
    cache-clearing tests (FLUSHDB) run with the shell's REDIS_URL pointing
    there, as a developer's would, and every key of the server survives."""
    from urllib.parse import urlsplit, urlunsplit

    import redis

    ours = urlsplit(django_settings.REDIS_URL)
    assert int(ours.path.strip("/")) >= hermetic.FIRST_TEST_REDIS_DB
    server_url = urlunsplit(ours._replace(path=f"/{SERVER_REDIS_DB}"))
    server = redis.Redis.from_url(server_url)
    tag = f"breezeweb-data-safety-{os.getpid()}-{time.monotonic_ns()}"
    seeded = {
        f"{tag}:cache": b"a cached page",
        f"{tag}:asgi:group:documents.user.1": b"a live socket",
        f"{tag}:rag:resume-ingestion": b"1",
    }
    for key, value in seeded.items():
        server.set(key, value, ex=600)
    try:
        # The child keeps this worker's PYTEST_XDIST_WORKER, so it lands on this
        # worker's own database (this test waits for it): never another
        # worker's, and never the server's.
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
        env.update(BREEZEWEB_SCALEOUT_PASS="1", REDIS_URL=server_url)
        slice_ = [
            "tests/accounts/test_limits.py::test_exactly_n_are_admitted_under_concurrent_threads",
            "tests/accounts/test_limits.py::"
            "test_exactly_n_are_admitted_under_concurrent_asyncio_callers",
        ]
        run_slice(slice_, env, passed=2)
        assert {key: server.get(key) for key in seeded} == seeded
    finally:
        server.delete(*seeded)
        server.close()


# --- a real server next to the suite -----------------------------------------------------

SETUP_SERVER = """
import json
from django.core.management import call_command
from django.contrib.auth import get_user_model
from accounts.models import ApiKey
call_command("migrate", verbosity=0, interactive=False)
user = get_user_model().objects.create_user("carol", password="carol-password-123")
print(json.dumps({"key": ApiKey.issue(user, "server")[1]}))
"""


class LiveServer:
    """`make run` in miniature: its own DATA_DIR, SQLite, embedded Chroma."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": "",
            "REDIS_URL": "",
            "RAG_INGEST_WORKER": "thread",
            "BREEZEWEB_ENV_FILE": "/nonexistent",
            "PRELOAD_LOCAL_RUNNERS": "false",
            "SECRET_KEY": "live-server-secret-key-for-the-data-safety-test-0123456789",
        }
        self.key = ""
        self.web: WebServer | None = None

    def start(self) -> LiveServer:
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", SETUP_SERVER],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        self.key = json.loads(done.stdout.strip().splitlines()[-1])["key"]
        self.web = WebServer(self.env).start(timeout=120)
        return self

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def upload(self, name: str, data: bytes) -> dict:
        response = httpx.post(
            f"{self.web.url}/api/documents",
            headers=self.headers,
            files={"file": (name, data)},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        return response.json()["documents"][0]

    def document(self, document_id: int) -> dict:
        response = httpx.get(
            f"{self.web.url}/api/documents/{document_id}", headers=self.headers, timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()["document"]

    def search(self, query: str) -> list[dict]:
        response = httpx.post(
            f"{self.web.url}/api/search",
            headers=self.headers,
            json={"query": query, "k": 5},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()["results"]

    def snapshot(self) -> dict[str, str]:
        """sha256 of every file of the server's data (its SQLite database and
        WAL, the Chroma store, the uploads), except SQLite's `-shm` index,
        which readers of the database update by design."""
        return {
            str(path.relative_to(self.data_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(self.data_dir.rglob("*"))
            if path.is_file() and not path.name.endswith("-shm")
        }


def tree_listing(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry under `root` (a symbolic link to a directory is followed
    once, as the checkout's `data/` may be one): its size and mtime, or None
    for a directory; nothing is read, the prepared models are gigabytes.
    SQLite's `-shm` index is left out (readers update it by design)."""
    listing: dict[str, tuple[int, int] | None] = {}
    if not root.exists():
        return listing
    base = root.resolve()
    for folder, dirs, files in os.walk(base):
        here = Path(folder)
        for name in dirs:
            listing[str((here / name).relative_to(base))] = None
        for name in files:
            if name.endswith("-shm"):
                continue
            stat = (here / name).lstat()
            listing[str((here / name).relative_to(base))] = (stat.st_size, stat.st_mtime_ns)
    return listing


def _users_data() -> dict[str, dict]:
    """What the suite must never write: the checkout's data/ and the user's
    model cache (both may be absent)."""
    return {
        "data/": tree_listing(ROOT / "data"),
        "model cache": tree_listing(hermetic.SHARED_MODEL_CACHE),
    }


def _building(listing: dict) -> bool:
    """A `prepare_model` (the user's, not the suite's) is building into the
    model cache: its `.build-*` folder is there."""
    return any(Path(name).name.startswith(".build-") for name in listing)


def servers_on_the_checkouts_data() -> list[int]:
    """Processes other than the suite's that serve from the checkout's data/:
    a `make run` (uvicorn) or a `manage.py` command whose DATA_DIR is data/ or
    unset with the checkout as its working directory. The suite's own servers
    run with a temporary DATA_DIR and are not counted. Only /proc is read."""
    data = (ROOT / "data").resolve()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(
                line.split(b"=", 1)
                for line in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in line
            )
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if not any(b"uvicorn" in arg or arg.endswith(b"manage.py") for arg in argv):
            continue
        data_dir = environ.get(b"DATA_DIR")
        here = Path(os.fsdecode(data_dir)).resolve() if data_dir else cwd.resolve() / "data"
        if here == data and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def assert_users_data_unchanged(before: dict[str, dict], serving: bool) -> None:
    after = _users_data()
    if _building(before["model cache"]):
        # Someone's `make run` started a build before the suite did: it writes
        # there meanwhile. (A build started by the suite itself still shows.)
        before = {**before, "model cache": {}}
        after = {**after, "model cache": {}}
    if serving:
        # A server from this checkout serves people from data/ meanwhile (the
        # case this test is about): its own writes are expected there, so
        # data/ is not compared; the live server above stands in for it.
        before = {**before, "data/": {}}
        after = {**after, "data/": {}}
    assert after == before, (
        "the suite changed the checkout's data/ or the user's model cache (or a "
        "server from this checkout was writing there meanwhile)"
    )


def test_the_listing_of_the_users_data_sees_a_new_or_rewritten_file(tmp_path):
    real = tmp_path / "real"
    (real / "models").mkdir(parents=True)
    (real / "db.sqlite3").write_bytes(b"x")
    (tmp_path / "data").symlink_to(real)  # as a worktree's data/ may be
    before = tree_listing(tmp_path / "data")
    assert set(before) == {"models", "db.sqlite3"}
    (real / "models" / "new").write_bytes(b"")
    assert tree_listing(tmp_path / "data") != before
    os.remove(real / "models" / "new")
    assert tree_listing(tmp_path / "data") == before
    (real / "db.sqlite3").write_bytes(b"y")
    os.utime(real / "db.sqlite3", ns=(0, 0))
    assert tree_listing(tmp_path / "data") != before
    assert tree_listing(tmp_path / "absent") == {}


def test_a_server_on_the_checkouts_data_is_recognised(tmp_path):
    """A process named like a server, started from the checkout without a
    DATA_DIR, counts; the same with a DATA_DIR of its own does not."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "manage.py"]
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    users = subprocess.Popen(sleeper, cwd=ROOT, env=env)
    own = subprocess.Popen(sleeper, cwd=ROOT, env={**env, "DATA_DIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 10
        while users.pid not in servers_on_the_checkouts_data() and time.monotonic() < deadline:
            time.sleep(0.05)
        found = servers_on_the_checkouts_data()
        assert users.pid in found
        assert own.pid not in found
    finally:
        for process in (users, own):
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def serving_server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("live-server") / "data")
    try:
        server.start()
        document = server.upload("lighthouse.pdf", docs.lighthouse_pdf())
        assert _wait_for(
            lambda: server.document(document["id"])["status"] in ("ready", "failed"), 180
        )
        assert server.document(document["id"])["status"] == "ready"
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_the_suite_leaves_a_running_servers_data_byte_identical(serving_server, tmp_path):
    before = serving_server.search(LIGHTHOUSE_QUESTION)
    assert before and before[0]["title"] == "lighthouse.pdf" and before[0]["page"] == 1
    snapshot = serving_server.snapshot()
    assert any(name.startswith("chroma/") for name in snapshot)
    assert any(name.startswith("uploads/documents/") for name in snapshot)
    users_data = _users_data()
    serving = bool(servers_on_the_checkouts_data())

    # A developer's shell and .env both point at the server's data.
    dotenv = tmp_path / "developer.env"
    dotenv.write_text(
        f"DATA_DIR={serving_server.data_dir}\n"
        f"DATABASE_URL=sqlite:///{serving_server.data_dir / 'db.sqlite3'}\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "BREEZEWEB_SCALEOUT_PASS", "PYTEST_ADDOPTS"}
    }
    env.update(
        DATA_DIR=str(serving_server.data_dir),
        BREEZEWEB_ENV_FILE=str(dotenv),
        DATABASE_URL=f"sqlite:///{serving_server.data_dir / 'db.sqlite3'}",
    )
    # A slice that stores uploads, writes and queries Chroma collections with
    # the same names as the server's, and drops every collection afterwards.
    slice_ = [
        "tests/test_data_safety.py::test_settings_use_the_runs_own_temporary_data_dir",
        "tests/rag/test_rag.py::test_a_pdf_is_retrievable_by_a_question_with_the_right_page",
        "tests/rag/test_rag.py::test_delete_removes_the_file_and_every_chunk",
    ]
    run_slice(slice_, env, passed=5)

    assert_users_data_unchanged(users_data, serving or bool(servers_on_the_checkouts_data()))
    assert serving_server.snapshot() == snapshot
    assert serving_server.search(LIGHTHOUSE_QUESTION) == before


@pytest.mark.slow
def test_a_second_process_on_the_embedded_store_is_refused_with_what_to_do(
    serving_server, tmp_path
):
    note = tmp_path / "note.md"
    note.write_text("# Note\n\nThe second process must not write this.\n")
    snapshot = serving_server.snapshot()
    run = subprocess.run(
        [sys.executable, "manage.py", "ingest", str(note), "--user", "carol"],
        cwd=ROOT,
        env={**os.environ, **serving_server.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "is in use by another process (pid" in run.stderr, run.stderr[-2000:]
    assert "uvicorn" in run.stderr and "CHROMA_URL" in run.stderr
    assert serving_server.snapshot() == snapshot  # nothing was added
    assert serving_server.search(LIGHTHOUSE_QUESTION)[0]["page"] == 1


@pytest.mark.django_db
def test_the_embedded_store_is_released_and_taken_again_within_a_process(rag_thread):
    store.get_client()
    holder = store.lock_path().read_text()
    assert holder.startswith(f"pid {os.getpid()} ")
    store.reset_client()
    code = (
        "import os, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'breezeweb.settings');"
        "django.setup(); from rag import store; store.get_client(); print('took it')"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 0 and "took it" in other.stdout, other.stderr[-2000:]
    store.get_client()  # the other process has exited: ours again
    assert store.lock_path().read_text().startswith(f"pid {os.getpid()} ")


# --- no document is ever stuck ---------------------------------------------------------


class _FailingHandle:
    """A real Chroma collection whose writes and deletes fail (a full disk, a
    store that went away): everything else goes to the real collection."""

    def __init__(self, real, failing=("upsert", "add", "delete")) -> None:
        self._real = real
        self._failing = failing
        self.calls: list[str] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _fail(self, operation: str):
        from chromadb.errors import InternalError

        self.calls.append(operation)
        raise InternalError(f"{operation}: disk I/O error")

    def _call(self, operation: str, kwargs: dict):
        if operation in self._failing:
            self._fail(operation)
        return getattr(self._real, operation)(**kwargs)

    def upsert(self, **kwargs):
        return self._call("upsert", kwargs)

    def add(self, **kwargs):
        return self._call("add", kwargs)

    def delete(self, **kwargs):
        return self._call("delete", kwargs)


@pytest.mark.django_db
def test_a_store_failing_in_ingestion_and_again_in_the_cleanup_ends_failed_with_a_reason(
    rag_thread, user
):
    collection = Collection.personal_for(user)
    real = store.collection(collection.chroma_name)
    failing = _FailingHandle(real)
    store._handles[collection.chroma_name] = failing
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf(), collection)

    assert failing.calls == ["upsert", "delete"]  # the write, then the cleanup
    assert (document.status, document.progress, document.chunk_count) == ("failed", 0.0, 0)
    assert document.error == ("indexing failed (InternalError); see the server log, then re-ingest")
    assert retrieve(user, LIGHTHOUSE_QUESTION).sources == ()

    # The store works again: re-ingesting is what the reason says to do.
    store._handles[collection.chroma_name] = real
    worker.requeue(document)
    assert ingest_document(document.pk).status == "ready"
    assert retrieve(user, LIGHTHOUSE_QUESTION).sources[0].page == 1


@pytest.mark.django_db
def test_a_failure_while_handling_a_superseded_run_still_ends_the_run(rag_thread, user):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    worker.requeue(document)
    failing = _FailingHandle(store.collection(document.collection.chroma_name), ["delete"])
    store._handles[document.collection.chroma_name] = failing

    def delete_midway(doc, done, total):
        Document.objects.filter(pk=doc.pk).delete()

    result = ingest_document(document.pk, on_progress=delete_midway)
    assert result.status == "superseded"
    assert failing.calls == ["delete"]


def _leave_processing(document: Document, *, attempts: int, seconds_ago: float) -> None:
    """What a crashed worker leaves: `processing`, a dead run's token, an old heartbeat."""
    Document.objects.filter(pk=document.pk).update(
        status="processing",
        progress=0.95,
        ingest_token="dead-run",
        attempts=attempts,
        heartbeat_at=timezone.now() - timedelta(seconds=seconds_ago),
    )


@pytest.mark.django_db(transaction=True)
def test_the_watchdog_retries_a_run_that_died_within_a_bounded_time(rag_thread, user):
    from rag.uploads import add_document, stage_chunks

    rag_thread.RAG_INGEST_STALL_SECONDS = 2
    staged = stage_chunks([docs.lighthouse_pdf()], "lighthouse.pdf")
    document = add_document(user, Collection.personal_for(user), staged, dispatch=False)
    _leave_processing(document, attempts=1, seconds_ago=0)
    worker.start_watchdog()
    started = time.monotonic()
    assert _wait_for(lambda: Document.objects.get(pk=document.pk).ingest_token != "dead-run", 10)
    settled_after = time.monotonic() - started
    assert 1.0 < settled_after < 2 + 0.5 + 2  # stale after 2 s, swept every 0.5 s
    # The retried run must not be taken for dead in turn while it loads the
    # embedding model on a busy machine: the bound above was the point.
    rag_thread.RAG_INGEST_STALL_SECONDS = 120
    assert _wait_for(lambda: Document.objects.get(pk=document.pk).status == "ready", 120)
    document.refresh_from_db()
    assert (document.chunk_count, document.attempts, document.error) == (3, 2, "")
    assert retrieve(user, LIGHTHOUSE_QUESTION).sources[0].page == 1


@pytest.mark.django_db(transaction=True)
async def test_the_watchdog_fails_a_document_whose_runs_keep_dying_and_tells_the_owner(
    rag_thread, user
):
    from asgiref.sync import sync_to_async
    from channels.layers import get_channel_layer

    from rag.events import remember_event_loop
    from rag.uploads import add_document, stage_chunks

    rag_thread.RAG_INGEST_STALL_SECONDS = 1
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(f"documents.user.{user.pk}", channel)
    remember_event_loop()
    try:
        collection = await sync_to_async(Collection.personal_for)(user)
        staged = await sync_to_async(stage_chunks)([docs.lighthouse_pdf()], "lighthouse.pdf")
        document = await sync_to_async(add_document)(user, collection, staged, dispatch=False)
        await sync_to_async(_leave_processing)(
            document, attempts=worker.MAX_ATTEMPTS, seconds_ago=60
        )
        await sync_to_async(worker.start_watchdog)()
        message = await asyncio.wait_for(layer.receive(channel), timeout=10)
    finally:
        await layer.group_discard(f"documents.user.{user.pk}", channel)
    expected = (
        "indexing stopped 3 times without finishing (the worker crashed or was stopped, "
        "perhaps on this file); see the server log, then re-ingest"
    )
    assert message["type"] == "document.status"
    assert (message["document"]["status"], message["document"]["error"]) == ("failed", expected)
    await document.arefresh_from_db()
    assert (document.status, document.error, document.ingest_token) == ("failed", expected, "")
    # The thread sync_to_async used keeps its connection: close it, so the
    # test database can be dropped (PostgreSQL pass).
    await sync_to_async(connections.close_all)()


@pytest.mark.django_db(transaction=True)
def test_the_watchdog_leaves_a_slow_but_live_run_alone(rag_thread, user):
    from rag.uploads import add_document, stage_chunks

    rag_thread.RAG_INGEST_STALL_SECONDS = 1
    staged = stage_chunks([docs.lighthouse_pdf()], "lighthouse.pdf")
    document = add_document(user, Collection.personal_for(user), staged, dispatch=False)
    settled: list[int] = []

    def slow_step(doc, done, total):
        # A step longer than the stall limit: only the heartbeat shows it is alive.
        time.sleep(2.5)
        settled.extend(worker.settle_stalled())

    result = ingest_document(document.pk, on_progress=slow_step)
    assert (result.status, settled) == ("ready", [])
    document.refresh_from_db()
    assert (document.status, document.attempts) == ("ready", 1)


@pytest.mark.django_db(transaction=True)
def test_a_restart_fails_a_document_that_crashed_every_run_instead_of_looping(rag_thread, user):
    from rag.uploads import add_document, stage_chunks

    staged = stage_chunks([docs.lighthouse_pdf()], "lighthouse.pdf")
    document = add_document(user, Collection.personal_for(user), staged, dispatch=False)
    _leave_processing(document, attempts=worker.MAX_ATTEMPTS, seconds_ago=0)
    worker.reset_for_tests()  # a fresh process
    assert worker.resume_unfinished() == []
    document.refresh_from_db()
    assert document.status == "failed" and "re-ingest" in document.error


LEAVE_DEAD_RUN = """
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone
from rag.models import Collection, Document
from rag.worker import MAX_ATTEMPTS
call_command("migrate", verbosity=0, interactive=False)
user, _ = get_user_model().objects.get_or_create(username="dora")
document = Document.objects.create(
    owner=user, collection=Collection.personal_for(user), title=TITLE,
    file="documents/0/" + TITLE, sha256=TITLE, status="processing", progress=0.95,
    ingest_token="dead-run", attempts=MAX_ATTEMPTS,
    heartbeat_at=timezone.now() - timedelta(seconds=SECONDS_AGO),
)
print(document.pk)
"""


def _leave_dead_run(env: dict[str, str], title: str, seconds_ago: float) -> int:
    """What a server killed in the middle of an ingestion leaves in its
    database, written by a process of its own."""
    code = f"TITLE = {title!r}\nSECONDS_AGO = {seconds_ago!r}\n" + LEAVE_DEAD_RUN
    return int(manage(env, "shell", "-c", code).strip().splitlines()[-1])


def _status(data_dir: Path, document_id: int) -> tuple[str, str]:
    import sqlite3

    with sqlite3.connect(data_dir / "db.sqlite3", timeout=20) as db:
        row = db.execute(
            "SELECT status, error FROM rag_document WHERE id = ?", (document_id,)
        ).fetchone()
    return tuple(row)


def test_a_server_settles_what_a_dead_run_left_as_soon_as_it_serves(tmp_path):
    """No upload, no documents API call, no admin page: the server starting is
    enough for the documents a dead run left `processing` to be settled, and
    its watchdog keeps settling those that die while it serves."""
    data_dir = tmp_path / "data"
    env = site_env(data_dir, RAG_INGEST_WORKER="thread", RAG_INGEST_STALL_SECONDS="1")
    before_start = _leave_dead_run(env, "before-the-restart.pdf", seconds_ago=600)
    server = WebServer(env).start(timeout=120)  # waits for /healthz, nothing else
    try:
        expected = ("failed", worker.STALLED_REASON.format(attempts=worker.MAX_ATTEMPTS))
        assert _wait_for(lambda: _status(data_dir, before_start) == expected, 30), (
            _status(data_dir, before_start),
            server.log_tail(),
        )
        # A run that dies while the server is up, after it resumed (once, at
        # the start): the watchdog's sweeps settle it.
        while_serving = _leave_dead_run(env, "while-serving.pdf", seconds_ago=0)
        assert _wait_for(lambda: _status(data_dir, while_serving) == expected, 30), (
            server.log_tail()
        )
        assert "/api/documents" not in server.log_tail()
    finally:
        server.stop()


def test_importing_the_application_starts_no_ingestion_thread(tmp_path):
    """`migrate`, `runworker` and the tests import breezeweb.asgi: only a
    serving process starts the worker and the watchdog."""
    code = (
        "import threading, time, breezeweb.asgi; time.sleep(1);"
        "print(sorted(t.name for t in threading.enumerate()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=site_env(tmp_path / "data", RAG_INGEST_WORKER="thread"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rag-ingest" not in run.stdout and "MainThread" in run.stdout, run.stdout


# --- the store heals itself -----------------------------------------------------------


def _upload(client: Client, name: str, data: bytes) -> int:
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = client.post(
        "/api/documents", {"file": SimpleUploadedFile(name, data, "application/octet-stream")}
    )
    assert response.status_code == 201, response.content
    return response.json()["documents"][0]["id"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("behind_our_back", ["deleted", "recreated empty"])
def test_a_collection_lost_behind_the_servers_back_heals_and_upload_and_search_work(
    rag_thread, user, caplog, behind_our_back
):
    _, raw = ApiKey.issue(user, "tests")
    api = Client(headers={"Authorization": f"Bearer {raw}"})
    first = _upload(api, "lighthouse.pdf", docs.lighthouse_pdf())
    assert worker.wait_until_idle(120)
    assert Document.objects.get(pk=first).status == "ready"
    name = Collection.personal_for(user).chroma_name
    assert name in store._handles  # the server holds a handle

    # Another process (the test suite of old) deletes the collection, or
    # deletes and recreates it, under the server's cached handle.
    client = store.get_client()
    client.delete_collection(name)
    if behind_our_back == "recreated empty":
        client.create_collection(name, embedding_function=None, metadata={"hnsw:space": "cosine"})

    caplog.set_level(logging.WARNING, logger="rag")
    second = _upload(api, "notes.md", docs.MARKDOWN_NOTE.encode())
    assert worker.wait_until_idle(180)
    assert Document.objects.get(pk=second).status == "ready"
    lighthouse = Document.objects.get(pk=first)
    assert (lighthouse.status, lighthouse.chunk_count) == ("ready", 3)  # rebuilt
    messages = [r.getMessage() for r in caplog.records]
    assert any("vanished under its cached handle" in m for m in messages), messages
    assert any("re-ingesting its 1 document(s)" in m for m in messages), messages

    for question, title in [
        (LIGHTHOUSE_QUESTION, "lighthouse.pdf"),
        ("When does the red-throated loon nest?", "notes.md"),
    ]:
        response = api.post("/api/search", {"query": question}, "application/json")
        assert response.status_code == 200, response.content
        assert response.json()["results"][0]["title"] == title
    assert chunk_count(lighthouse) == 3


class _VanishingAfterFirstBatch:
    """A real Chroma collection that another process deletes right after the
    first batch of a write lands in it."""

    def __init__(self, real, name: str) -> None:
        self._real, self._name, self.batches = real, name, []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def upsert(self, **kwargs):
        self._real.upsert(**kwargs)
        self.batches.append(list(kwargs["ids"]))
        if len(self.batches) == 1:
            store.get_client().delete_collection(self._name)


@pytest.mark.django_db
def test_a_collection_lost_between_two_batches_of_a_write_loses_no_chunk(
    rag_thread, user, monkeypatch, caplog
):
    collection = Collection.personal_for(user)
    real = store.collection(collection.chroma_name)
    vanishing = _VanishingAfterFirstBatch(real, collection.chroma_name)
    store._handles[collection.chroma_name] = vanishing
    monkeypatch.setattr(store, "_max_batch", 1)  # three chunks: three batches
    caplog.set_level(logging.WARNING, logger="rag")

    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf(), collection)

    assert len(vanishing.batches) == 1  # then the handle was found stale
    assert "vanished under its cached handle" in caplog.text
    assert "2 of 3 chunks are in the store after writing them" in caplog.text
    assert (document.status, document.chunk_count) == ("ready", 3)
    assert chunk_count(document) == 3
    assert retrieve(user, LIGHTHOUSE_QUESTION).sources[0].page == 1


@pytest.mark.django_db(transaction=True)
def test_a_search_finding_the_collection_gone_rebuilds_it(rag_thread, user, caplog, monkeypatch):
    document = add_and_ingest(user, "lighthouse.pdf", docs.lighthouse_pdf())
    store.get_client().delete_collection(document.collection.chroma_name)
    caplog.set_level(logging.WARNING, logger="rag")
    # The rebuild is handed to the worker once the search has returned: the
    # in-memory test database refuses a writer while another connection
    # reads the table (a file database in WAL mode, as served, does not), and
    # the search still reads after it queued the rebuild.
    queued: list[int] = []
    dispatch = worker._dispatch
    monkeypatch.setattr(worker, "_dispatch", queued.append)
    retrieve(user, LIGHTHOUSE_QUESTION)  # finds it gone: rebuilt in the background
    monkeypatch.setattr(worker, "_dispatch", dispatch)
    assert queued == [document.pk]
    dispatch(document.pk)
    # (Not read from the database while the rebuild writes, for the same reason.)
    assert "re-ingesting its 1 document(s)" in caplog.text
    assert worker.wait_until_idle(120)
    assert Document.objects.get(pk=document.pk).status == "ready"
    assert retrieve(user, LIGHTHOUSE_QUESTION).sources[0].page == 1
