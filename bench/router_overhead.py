"""What the router adds per request, and what the admin dashboard costs.

One command: `.venv/bin/python bench/router_overhead.py [--calls 300] [--rows 100000]`

1. Router overhead. A scripted OpenAI-compatible upstream on 127.0.0.1
   answers at once (8 deltas + usage). In interleaved rounds, the same
   request through:
     runner  `LlamaStackRunner.stream()` consumed to `Done` (the baseline)
     route   `runners.router.route()` with 3 enabled configs in the database:
             candidates read per request, the runner from the registry cache,
             a RunRecord saved and the Prometheus metrics observed.
   Printed: median and p90 per call, and route - runner.
2. Dashboard. `--rows` run records spread over the last 24 hours (SQLite, a
   fresh database); the time of `runner_stats` for the last day (the
   dashboard's larger window) against the baseline of just fetching the same
   columns from the database.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from _common import setup_django

setup_django("router")

from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402

from runners import registry  # noqa: E402
from runners.base import ChatMessage, ChatRequest, Done  # noqa: E402
from runners.llamastack.runner import LlamaStackRunner  # noqa: E402
from runners.models import RunnerConfig, RunRecord  # noqa: E402
from runners.router import route  # noqa: E402
from runners.stats import RECORD_FIELDS, runner_stats  # noqa: E402
from tests.support.scripted_server import Reply, ScriptedServer  # noqa: E402

REQUEST = ChatRequest(messages=(ChatMessage("user", "Say hello"),), max_tokens=16)


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    return f"p50 {statistics.median(ordered):.2f} ms, p90 {p90:.2f} ms"


async def _via_runner(runner: LlamaStackRunner) -> float:
    started = time.perf_counter()
    async for event in runner.stream(REQUEST):
        if isinstance(event, Done):
            pass
    return (time.perf_counter() - started) * 1000


async def _via_route() -> float:
    started = time.perf_counter()
    async for _ in route(REQUEST, source="api"):
        pass
    return (time.perf_counter() - started) * 1000


async def router_overhead(server: ScriptedServer, calls: int) -> None:
    from channels.db import database_sync_to_async

    @database_sync_to_async
    def setup() -> RunnerConfig:
        configs = []
        for name, priority in (("primary", 10), ("second", 5), ("third", 1)):
            configs.append(
                RunnerConfig.objects.create(
                    name=name,
                    kind="llamastack",
                    endpoint=server.url,
                    model_id="scripted-model",
                    priority=priority,
                )
            )
        return configs[0]

    primary = await setup()
    runner = LlamaStackRunner.from_config(primary)
    for _ in range(30):  # warm-up: connections, the registry cache, the ORM
        await _via_runner(runner)
        await _via_route()
    bare: list[float] = []
    routed: list[float] = []
    for _ in range(calls):
        bare.append(await _via_runner(runner))
        routed.append(await _via_route())
    await runner.close()
    await registry.build_runner(primary).close()
    extra = statistics.median(routed) - statistics.median(bare)
    print(f"router overhead ({calls} calls each, interleaved)")
    print(f"  runner.stream()  {_ms(bare)}")
    print(f"  route()          {_ms(routed)}")
    print(
        f"  route - runner:  {extra:+.2f} ms per call (median), "
        f"{statistics.median(routed) / statistics.median(bare):.2f}x"
    )


def dashboard(rows: int) -> None:
    # Exactly `rows` records: the router measurement's own go first.
    RunRecord.objects.all().delete()
    now = timezone.now()
    names = ["primary", "second", "third", "gone"]
    statuses = ["ok"] * 17 + ["failed", "failed", "stopped"]
    batch = []
    for i in range(rows):
        status = random.choice(statuses)
        batch.append(
            RunRecord(
                runner_name=names[i % 4],
                status=status,
                fallback=i % 13 == 0,
                total_ms=random.uniform(50, 4000),
                time_to_first_token_ms=random.uniform(5, 800) if status != "failed" else None,
                tokens_per_second=random.uniform(20, 200) if status == "ok" else None,
            )
        )
    RunRecord.objects.bulk_create(batch, batch_size=5000)
    # Spread over the last 24 hours (auto_now_add stamped them all "now").
    first = RunRecord.objects.order_by("pk").values_list("pk", flat=True).first()
    for pk in range(first, first + rows, 5000):
        RunRecord.objects.filter(pk__gte=pk, pk__lt=pk + 5000).update(
            created_at=now - timezone.timedelta(seconds=random.uniform(0, 86_000))
        )
    since = now - timezone.timedelta(days=1)
    fetch, compute = [], []
    for _ in range(5):
        started = time.perf_counter()
        list(RunRecord.objects.filter(created_at__gte=since).values_list(*RECORD_FIELDS))
        fetch.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        stats = runner_stats(since, now)
        compute.append((time.perf_counter() - started) * 1000)
    assert sum(s.requests for s in stats) == rows
    print(f"dashboard, last 24 hours over {rows} run records (5 runs)")
    print(f"  fetch the columns only     p50 {statistics.median(fetch):.0f} ms")
    print(
        f"  runner_stats (the page)    p50 {statistics.median(compute):.0f} ms, "
        f"{statistics.median(compute) / statistics.median(fetch):.2f}x the fetch"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    call_command("migrate", "--noinput", verbosity=0)
    with ScriptedServer() as server:
        server.default_reply = Reply(tokens=tuple(f"w{i} " for i in range(8)), usage=(5, 8))
        asyncio.run(router_overhead(server, args.calls))
    dashboard(args.rows)


if __name__ == "__main__":
    main()
