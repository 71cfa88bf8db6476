"""Runner kinds and the per-process cache of runner instances.

Kinds are an explicit table of dotted paths, imported on first use. Instances
are built from enabled `RunnerConfig` rows and cached per process; a config's
`version` (bumped on every save) tells each process when to rebuild.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from runners.base import Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerKind:
    """One kind of runner: what admins see, and the class (a dotted path,
    imported on first use so that listing kinds loads no inference library)."""

    label: str
    path: str


# The one list of runner kinds: `RunnerConfig.kind`'s choices, the admin form,
# the docs and the contract suite all read it.
RUNNER_KINDS: dict[str, RunnerKind] = {
    "executorch": RunnerKind("Local ExecuTorch", "runners.executorch.runner.ExecuTorchRunner"),
    "llamastack": RunnerKind("Remote Llama Stack", "runners.llamastack.runner.LlamaStackRunner"),
}
KIND_CHOICES: list[tuple[str, str]] = [(name, kind.label) for name, kind in RUNNER_KINDS.items()]


def runner_class(kind: str) -> type[Runner]:
    try:
        path = RUNNER_KINDS[kind].path
    except KeyError:
        raise ImproperlyConfigured(
            f"Unknown runner kind {kind!r}; known kinds: {', '.join(sorted(RUNNER_KINDS))}"
        ) from None
    try:
        return import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"Runner kind {kind!r} ({path}) could not be loaded: {exc}"
        ) from exc


# name -> ((version, updated_at), runner). updated_at as well: two admins
# saving the same config at once both write version N+1 from N, but not the
# same updated_at, so a process that built from the first save still rebuilds.
_instances: dict[str, tuple[tuple, Runner]] = {}
_closing: set[asyncio.Task] = set()


def build_runner(config) -> Runner:
    """A runner for this config, reusing the cached one while its version holds."""
    stamp = (config.version, getattr(config, "updated_at", None))
    cached = _instances.get(config.name)
    if cached and cached[0] == stamp and cached[1].__class__ is runner_class(config.kind):
        return cached[1]
    runner = runner_class(config.kind).from_config(config)
    _instances[config.name] = (stamp, runner)
    if cached:
        _close_later(cached[1])
    return runner


def _close_later(runner: Runner) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    task = loop.create_task(runner.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def forget_all() -> None:
    """Drop every cached runner (tests)."""
    _instances.clear()


async def readiness() -> dict:
    """For /readyz: at least one enabled runner answers its health check."""
    from channels.db import database_sync_to_async

    from runners.models import RunnerConfig

    configs = await database_sync_to_async(
        lambda: list(RunnerConfig.objects.filter(enabled=True).order_by("-priority"))
    )()
    if not configs:
        return {"ok": False, "detail": "no enabled runner"}
    parts = {}
    for config in configs:
        try:
            health = await asyncio.wait_for(build_runner(config).health(), timeout=5)
            parts[config.name] = {"ok": health.ok, "detail": health.detail}
        except Exception as exc:
            parts[config.name] = {"ok": False, "detail": type(exc).__name__}
    return {"ok": any(p["ok"] for p in parts.values()), "runners": parts}


def preload_local_runners() -> None:
    """Load enabled local runners (starting their engine processes) in a
    background thread, so the first chat after a start does not wait for the
    model. Remote runners need nothing: their HTTP clients belong to the
    server's event loop."""
    import threading

    def load() -> None:
        from django.db import close_old_connections

        from runners.models import RunnerConfig

        try:
            configs = [
                config
                for config in RunnerConfig.objects.filter(enabled=True)
                if runner_class(config.kind).local
            ]
            for config in configs:
                asyncio.run(runner_class(config.kind).from_config(config).load())
                log.info("preloaded runner %s", config.name)
        except Exception as exc:  # the first request reports it properly
            log.warning("preloading local runners failed: %s", exc)
        finally:
            close_old_connections()

    threading.Thread(target=load, name="preload-runners", daemon=True).start()
