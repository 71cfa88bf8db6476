"""The test run's own data, set before Django's settings exist.

Loaded with `-p tests.support.hermetic` (pyproject's pytest `addopts`), so this
module is imported while pytest parses its arguments: before pytest-django
configures Django in its `pytest_load_initial_conftests` hook, and long before
any conftest. A conftest is too late: by then `settings.DATA_DIR` has been read.

What it makes sure of, for this run and every process a test starts (they
inherit the environment):

- Django's settings are `SETTINGS_MODULE`: the product's, with a fast
  password hasher (tests/support/settings.py says why).

- `DATA_DIR` is a fresh temporary directory, whatever the shell or a `.env`
  says (a developer's `DATA_DIR` pointing at a live server's data is exactly
  what must not be used). It is removed when the run ends.
- No `.env` is read (`BREEZEWEB_ENV_FILE` points nowhere) and `CHROMA_URL` is
  dropped: tests never write into a real Chroma server.
- `DATABASE_URL` and `REDIS_URL` are dropped too (SQLite in `DATA_DIR`, the
  in-memory channel layer and cache), except in the scale-out pass
  (`BREEZEWEB_SCALEOUT_PASS=1`), where PostgreSQL is pytest-django's `test_`
  database and Redis a database numbered 10 or more (`redis_for_worker`),
  never the database 0 a server uses by default.
- `MODELS_DIR` defaults to the checkout's prepared model (only read).
- `BREEZEWEB_MODEL_CACHE` (where `prepare_model` keeps builds and takes its
  locks) is inside `DATA_DIR` too; the user's cache is named in
  `SHARED_MODEL_CACHE` for the tests that read a cached build from it, which
  they do through a view of symbolic links (`read_only_model_cache`).

`pytest_configure` then checks that Django really uses that directory and stops
the run otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
ENV_MARKER = "BREEZEWEB_TEST_DATA_DIR"
# The run's Django settings: the product's with a fast password hasher
# (tests/support/settings.py), for pytest-django and every process a test
# starts (tests/support/processes.py passes the environment on).
SETTINGS_MODULE = "tests.support.settings"

DATA_DIR = Path(tempfile.mkdtemp(prefix="breezeweb-test-")).resolve()

os.environ["DATA_DIR"] = str(DATA_DIR)
os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
os.environ[ENV_MARKER] = str(DATA_DIR)
os.environ["BREEZEWEB_ENV_FILE"] = "/nonexistent"
os.environ.pop("CHROMA_URL", None)
os.environ.setdefault("MODELS_DIR", str(ROOT / "data" / "models"))
# The user's cache, named once by the first process of the run: a worker of a
# parallel run (pytest-xdist) inherits BREEZEWEB_MODEL_CACHE already pointing
# into the first process's DATA_DIR.
SHARED_MODEL_CACHE = Path(
    os.environ.get("BREEZEWEB_SHARED_MODEL_CACHE")
    or os.environ.get("BREEZEWEB_MODEL_CACHE")
    or Path.home() / ".cache" / "breezeweb"
)
os.environ["BREEZEWEB_SHARED_MODEL_CACHE"] = str(SHARED_MODEL_CACHE)
os.environ["BREEZEWEB_MODEL_CACHE"] = str(DATA_DIR / "model-cache")
# Servers a test starts report answers that do not match the API document here
# (tests/support/conformance.py); each process of the run has its own file.
os.environ["BREEZEWEB_CONFORMANCE_LOG"] = str(DATA_DIR / "conformance-findings.log")


# Redis databases a server never uses by default (README, .env.example and
# compose.yaml serve from database 0): the scale-out pass flushes its databases
# (cache.clear() is FLUSHDB) and sends to the `ingest` channel and the
# documents groups, which a live worker on the same database would receive.
FIRST_TEST_REDIS_DB = 10


def redis_for_worker(url: str, worker: str) -> str:
    """The Redis URL of one process of the scale-out pass: the server `url`
    names, database base + n for worker gw<n> (n = 0 without pytest-xdist),
    where base is the URL's database but never below FIRST_TEST_REDIS_DB. So
    the workers' channel layers, limiters and caches never see each other's
    keys (pytest-django gives each its own test database), nor a server's."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    base = max(int(parts.path.strip("/") or 0), FIRST_TEST_REDIS_DB)
    n = int(worker.removeprefix("gw")) if worker.startswith("gw") else 0
    return urlunsplit(parts._replace(path=f"/{base + n}"))


if os.environ.get("BREEZEWEB_SCALEOUT_PASS") == "1":
    # PostgreSQL is safe as it is: pytest-django creates and drops its own
    # `test_<name>` database (`test_<name>_gw<n>` per worker), never <name>.
    if os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = redis_for_worker(
            os.environ["REDIS_URL"], os.environ.get("PYTEST_XDIST_WORKER", "")
        )
else:
    # The main pass runs on the embedded defaults whatever the shell says: a
    # developer's DATABASE_URL / REDIS_URL name the server they run.
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-0123456789")
# Tests load models when they need them (and measure it); servers they start
# inherit this.
os.environ.setdefault("PRELOAD_LOCAL_RUNNERS", "false")


def read_only_model_cache(target: Path) -> Path:
    """A model cache at `target` whose builds are symbolic links to the user's
    cached builds: reading it reuses them, and whatever prepare_model writes
    (locks, a new build) lands in `target`, never in the user's cache."""
    shared = SHARED_MODEL_CACHE / "models"
    for build in shared.iterdir() if shared.is_dir() else ():
        if build.is_dir() and not build.name.startswith("."):
            view = target / "models" / build.name
            view.mkdir(parents=True, exist_ok=True)
            for item in build.iterdir():
                (view / item.name).symlink_to(item)
    return target


def _is_inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def check_settings() -> None:
    """Refuse to run when Django's DATA_DIR is not this run's own directory."""
    from django.conf import settings

    actual = Path(settings.DATA_DIR).resolve()
    if actual != DATA_DIR:
        raise pytest.UsageError(
            f"tests must use their own DATA_DIR ({DATA_DIR}) but Django's settings say "
            f"{actual}; load tests.support.hermetic first (`-p tests.support.hermetic`, "
            "set in pyproject's pytest addopts)"
        )
    for name in ("CHROMA_PATH", "MEDIA_ROOT", "MODEL_CACHE_DIR"):
        if not _is_inside(Path(getattr(settings, name)), DATA_DIR):
            raise pytest.UsageError(f"settings.{name} is outside the test DATA_DIR")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.version:
        return
    try:
        from django.conf import settings

        configured = settings.configured
    except ImportError:  # pragma: no cover - Django is a requirement
        return
    if configured:
        check_settings()


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(DATA_DIR, ignore_errors=True)
