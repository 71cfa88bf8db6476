"""What the benchmarks share: Django set up in a throw-away DATA_DIR, the
evaluation sets in bench/evalsets, and the percentile they report. Not a benchmark
itself (running it does nothing).

The live processes a benchmark starts (the web server, a scripted upstream, `manage.py`)
come from tests/support/processes.py, the same helpers the tests use."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def setup_django(
    name: str, *, models: bool = False, unset: tuple[str, ...] = (), database_url: str = ""
) -> Path:
    """Django in this process on a fresh DATA_DIR (SQLite, embedded Chroma):
    a benchmark never touches the checkout's data or a configured server.
    `models`: read the prepared models from the checkout's data/models (unless
    MODELS_DIR says otherwise); `unset`: further variables to ignore;
    `database_url`: a database the benchmark asks for explicitly instead."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"bw-bench-{name}-"))
    os.environ["DATA_DIR"] = str(data_dir)
    if models:
        os.environ.setdefault("MODELS_DIR", str(ROOT / "data" / "models"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "breezeweb.settings")
    os.environ.setdefault("BREEZEWEB_ENV_FILE", "/nonexistent")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    for var in ("DATABASE_URL", "REDIS_URL", "CHROMA_URL", *unset):
        os.environ.pop(var, None)
    if database_url:
        os.environ["DATABASE_URL"] = database_url

    import django

    django.setup()
    return data_dir


def evaluation_set(name: str) -> dict:
    """bench/evalsets/<name>.toml: an evaluation set, kept as data apart from the code."""
    return tomllib.loads((ROOT / "bench" / "evalsets" / f"{name}.toml").read_text())


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (NaN for no values)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@contextlib.contextmanager
def profiled(pid: int, path: str | None):
    """py-spy (`pip install py-spy`; not a dependency) sampling process `pid`
    into `path` (collapsed stacks) for the block; nothing without a path."""
    if not path:
        yield
        return
    # Only the thread holding the GIL (the CPU the process spends in Python),
    # sampled without pausing it (pausing a busy server skews what it measures).
    argv = ["py-spy", "record", "-p", str(pid), "-f", "raw", "-r", "250", "--gil", "--nonblocking"]
    argv += ["--subprocesses"]  # a server of several processes: all of them
    argv += ["-o", path]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    time.sleep(1)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
