"""Benchmark: non-streaming chat completions through BreezeWeb's OpenAI-compatible
API vs the same fast upstream called directly, in one run.

    .venv/bin/python bench/openai_api.py [--requests 400] [--concurrency 8] [--profile FILE]
                                         [--redis URL]

A scripted OpenAI-compatible server (tests/support/scripted_server.py, answering
at once) runs in its own process; BreezeWeb runs as a real uvicorn process with a
fresh SQLite database, one API key and one Llama Stack runner pointed at that
upstream. The same httpx client, with the same concurrency and request count,
first calls the upstream's /v1/chat/completions directly, then BreezeWeb's
(API key auth, rate limit, guardian, router, the Llama Stack runner's streaming
call upstream, a RunRecord saved). In between it measures the site's floor:
`GET /healthz` on the same server (uvicorn, Django's handler, the middleware,
no database), the least any request costs. Reports requests/s, p50 and p99
latency for each, the ratios, and BreezeWeb's p50 above floor + upstream.
`--profile FILE` records the server with py-spy (not a dependency) during
the BreezeWeb run, as collapsed stacks. `--redis URL` serves with REDIS_URL
set, as a site of several processes is (the cache, the channel layer and the
config version in Redis), still one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import profiled  # also puts the checkout on sys.path, for tests.support

from tests.support.processes import Upstream, WebServer, manage, site_env
from tests.support.scripted_server import Reply, ScriptedServer, serve_until_stdin_closes

BODY = {
    "model": "scripted-model",
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 32,
}

SETUP = """
import json
from django.contrib.auth import get_user_model
from accounts.models import ApiKey
from runners.models import RunnerConfig
user = get_user_model().objects.create_user("bench", password="bench-password-123")
RunnerConfig.objects.create(name="upstream", kind="llamastack", endpoint={endpoint!r},
    model_id="scripted-model", priority=10, timeout_seconds=30)
print("KEY" + ApiKey.issue(user, "bench")[1])
"""


def serve_upstream() -> None:
    """Run in its own process: the fast upstream."""
    server = ScriptedServer()
    server.default_reply = Reply(text="Hello there from the fast upstream.", usage=(12, 7))
    serve_until_stdin_closes(server)


async def load(url: str, headers: dict, body: dict, total: int, concurrency: int) -> dict:
    """`total` POSTs with `concurrency` in flight; latencies of the successful ones."""
    latencies: list[float] = []
    failures: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                if body is None:  # a GET (the site's floor: /healthz)
                    response = await client.get(url, headers=headers)
                else:
                    response = await client.post(url, json=body, headers=headers)
                elapsed = time.perf_counter() - started
                answered = body is None or response.json()["choices"][0]["message"]
                if response.status_code == 200 and answered:
                    latencies.append(elapsed)
                else:
                    failures[response.status_code] = failures.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "ok": len(latencies),
        "failures": failures,
        "rps": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the BreezeWeb server with py-spy (collapsed stacks) during its run",
    )
    parser.add_argument("--redis", metavar="URL", default="", help="serve with REDIS_URL=URL")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream()
        return

    tmp = Path(tempfile.mkdtemp(prefix="breezeweb-bench-api-"))
    env = site_env(
        tmp,
        DATABASE_URL=f"sqlite:///{tmp / 'bench.sqlite3'}",
        API_REQUESTS_PER_MINUTE="1000000",
        LOG_LEVEL="WARNING",
        REDIS_URL=args.redis,
    )
    web = WebServer(env, log=tmp / "server.log")
    with Upstream([sys.executable, __file__, "--serve-upstream"]) as upstream:
        manage(env, "migrate", "--noinput")
        out = manage(env, "shell", "-c", SETUP.format(endpoint=upstream.url))
        key = out.split("KEY", 1)[1].strip()
        try:
            web.start()
            direct = (f"{upstream.url}/v1/chat/completions", {}, BODY)
            through = (
                f"{web.url}/v1/chat/completions",
                {"Authorization": f"Bearer {key}"},
                {**BODY, "model": "upstream"},  # the runner config's name is the API's model id
            )
            results = {}
            floor = (f"{web.url}/healthz", {}, None)
            for name, (url, headers, body) in (
                ("upstream direct", direct),
                ("site floor /healthz", floor),
                ("through BreezeWeb", through),
            ):
                asyncio.run(load(url, headers, body, 30, args.concurrency))  # warm-up
                profile = args.profile if name == "through BreezeWeb" else None
                with profiled(web.popen.pid, profile):
                    results[name] = asyncio.run(
                        load(url, headers, body, args.requests, args.concurrency)
                    )
        finally:
            web.stop()

    print(
        f"non-streaming chat completions, {args.requests} requests, "
        f"concurrency {args.concurrency}, {os.cpu_count()} CPUs"
        + (", on Redis" if args.redis else "")
    )
    print(f"{'':20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>8}")
    for name, r in results.items():
        failed = sum(r["failures"].values())
        print(f"{name:20} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {failed:8}")
    d, t = results["upstream direct"], results["through BreezeWeb"]
    print(
        f"ratio (BreezeWeb / direct): throughput {t['rps'] / d['rps']:.3f}, "
        f"p50 latency {t['p50_ms'] / d['p50_ms']:.1f}x, "
        f"p99 latency {t['p99_ms'] / d['p99_ms']:.1f}x"
    )
    f = results["site floor /healthz"]
    print(
        f"BreezeWeb's p50 above the site's floor (uvicorn + Django + middleware, GET /healthz) "
        f"and the upstream's: {t['p50_ms'] - f['p50_ms'] - d['p50_ms']:.1f} ms"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
