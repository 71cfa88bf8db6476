"""Local models are loaded when the server starts, not on the first chat."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from runners import registry
from runners.executorch import runner as executorch_runner
from runners.models import RunnerConfig
from tests.support.fixtures import require_local_model

pytestmark = pytest.mark.slow


@pytest.mark.django_db(transaction=True)
async def test_preloading_loads_the_enabled_local_model_and_health_says_so():
    require_local_model()
    executorch_runner.forget_engines()
    registry.forget_all()
    from asgiref.sync import sync_to_async

    config = await sync_to_async(RunnerConfig.objects.create)(
        name="local", kind="executorch", priority=100
    )
    fresh = registry.runner_class("executorch").from_config(config)
    assert (await fresh.health()).detail.endswith("ready (loads on first request)")

    registry.preload_local_runners()
    deadline = time.monotonic() + 120
    while any(t.name == "preload-runners" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    # A new instance in the server's loop finds the model already loaded.
    health = await registry.runner_class("executorch").from_config(config).health()
    assert health.ok and "loaded; " in health.detail
