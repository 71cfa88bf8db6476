"""Streaming at scale: N concurrent websocket chats of T tokens at R tokens/s
each, through BreezeWeb and through the bare transport, in one run.

    .venv/bin/python bench/streaming_scale.py [--streams 100,200] [--tokens 100]
                                             [--token-delay 0.02] [--processes N]
                                             [--redis-url URL] [--profile FILE]

- **bare Daphne**, **bare uvicorn**: a Channels consumer that sends the token
  frames itself (bench/_bare_ws.py) on each server: the transport's own cost.
  Issue 16 defined the baseline on Daphne; BreezeWeb serves on uvicorn, so
  both are measured.
- **bare relay (uvicorn)**: the same consumer reading each answer from a paced
  upstream of its own with httpx and sending every delta as it arrives: the
  least any server that answers from an upstream spends per token.
- **bare relay xN**: the same relay served by N uvicorn processes on one port
  (with `--processes` N > 1): the least a server of N processes that answers
  from an upstream spends, beside BreezeWeb xN.
- **BreezeWeb**: one uvicorn process of the product (SQLite, an API key), every
  chat answered through the whole path (frame parsing, the turn saved, the
  pipeline, the router, the Llama Stack runner) by a paced OpenAI-compatible
  upstream in its own process (bench/websocket_chat.py's echo server), whose
  answer names its stream so the client checks every token arrives once, in
  order, on the right socket.
- **BreezeWeb xN**: the same site served by `manage.py serve` with N uvicorn
  processes on one port (`--processes`, default: the machine's cores; 0 leaves
  it out), sharing Redis (`--redis-url`, a database of its own, emptied first)
  and a `chroma run` server, on PostgreSQL (`--database-url`, a database of its
  own, created afresh; `--database-url ""` keeps SQLite), as docs/scaling.md
  deploys it. Its CPU is the sum over its processes.

Per run: streams complete and byte-exact, TTFT p50/p99, p50/p99 gap between
token frames of a stream, and the server process's CPU time (user + system,
psutil) per delivered token; the ratio of BreezeWeb's CPU per token to each
bare transport's is the figure issue 16 asks for (<= 1.5x).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import psutil
from _common import percentile, profiled
from websocket_chat import Site, one_stream, paced_upstream

from breezeweb.serve import server_command
from tests.support.processes import Process, Served, Upstream, chroma_server
from tests.support.scripted_server import free_port

BENCH = Path(__file__).resolve().parent


class BareSite:
    """The bare transport, shaped like websocket_chat.Site for one_stream()."""

    def __init__(
        self,
        tokens: int,
        delay: float,
        server: str = "daphne",
        upstream: str = "",
        processes: int = 1,
    ) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.key = "bare"
        env = {
            "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]),
            "BARE_TOKENS": str(tokens),
            "BARE_DELAY": str(delay),
            "BARE_UPSTREAM": upstream,
        }
        if server == "daphne":
            argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port)]
            argv += ["_bare_ws:application"]
        else:  # the command line BreezeWeb serves with, on the bare application
            argv = server_command("127.0.0.1", self.port, processes, proxy=False)
            argv[-1] = "_bare_ws:application"
            argv[argv.index("--lifespan") + 1] = "off"  # nothing to start
        self.process = Process(argv, env)

    def start(self) -> None:
        self.process.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the bare server did not start:\n{self.process.log_tail()}")

    @property
    def pid(self) -> int:
        return self.process.popen.pid

    def stop(self) -> None:
        self.process.stop()


class PerCoreSite(Site):
    """The site served by `manage.py serve` with `processes` uvicorn processes
    on one port, on Redis, a Chroma server and (`database_url`) PostgreSQL,
    each emptied first (docs/scaling.md)."""

    def __init__(
        self, concurrency: int, processes: int, redis_url: str, database_url: str = ""
    ) -> None:
        super().__init__(concurrency)
        import redis

        redis.Redis.from_url(redis_url).flushdb()  # the benchmark's own database
        if database_url.startswith("postgres"):
            fresh_postgres_database(database_url)  # likewise
        if database_url:
            self.env["DATABASE_URL"] = database_url
        self.chroma, chroma_url = chroma_server(self.data / "chroma-server")
        self.env.update(
            REDIS_URL=redis_url,
            CHROMA_URL=chroma_url,
            WEB_PROCESSES=str(processes),
            RAG_INGEST_WORKER="channels",
        )
        self.web = Served(self.env, log=self.data / "serve.log")
        self.url = f"127.0.0.1:{self.web.port}"

    def stop(self) -> None:
        super().stop()
        self.chroma.kill()
        self.chroma.wait()


def fresh_postgres_database(url: str) -> None:
    """Drop and create the database `url` names (on its server's `postgres`
    database): each run starts empty."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres", query=""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


async def warm_up(site, chats: int) -> None:
    """`chats` chats at once, twice: every process of the site pays its
    one-time costs (imports, the upstream client) before anything is timed."""
    for _ in range(2):
        start = asyncio.Event()
        start.set()
        await asyncio.gather(*(one_stream(site, i, 5, start, []) for i in range(chats)))


def cpu_seconds(pid: int) -> float:
    """The CPU time of `pid` and of every process under it (user + system)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def run(site, pid: int, n: int, tokens: int) -> dict:
    """N chats at once (every socket open first); the server's CPU is counted
    from the start signal to the last `done`."""
    start = asyncio.Event()
    connected: list[int] = []
    tasks = [asyncio.create_task(one_stream(site, i, tokens, start, connected)) for i in range(n)]
    while len(connected) < n:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    cpu_before = cpu_seconds(pid)
    began = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - began
    cpu = cpu_seconds(pid) - cpu_before
    gaps = [g for r in results for g in r["gaps"]]
    delivered = sum(tokens for r in results if r["ok"]) or 1
    return {
        "complete": sum(r["ok"] for r in results),
        "bad": sorted({r["status"] for r in results if not r["ok"]})[:3],
        "ttft_p50": percentile([r["ttft_ms"] for r in results], 50),
        "ttft_p99": percentile([r["ttft_ms"] for r in results], 99),
        "gap_p50": percentile(gaps, 50),
        "gap_p99": percentile(gaps, 99),
        "frames": sum(r["frames"] for r in results) / n,
        "cpu_us_per_token": cpu / delivered * 1e6,
        "cpu_share": cpu / wall,
        "tokens_per_s": delivered / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="100,200")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/breezeweb_bench_scale",
        help="BreezeWeb xN's database (PostgreSQL: dropped and created afresh; "
        "empty: SQLite, as the one process)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record BreezeWeb with py-spy during its largest run (FILE; xN: FILE.xN)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.streams.split(",")]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} at start", flush=True)
    print(
        f"{args.tokens} tokens per chat, {args.token_delay * 1000:.0f} ms apart "
        f"({1 / args.token_delay:.0f} tokens/s per stream)\n",
        flush=True,
    )
    rows = []
    bares = [
        (f"bare {server}", BareSite(args.tokens, args.token_delay, server.lower()))
        for server in ("Daphne", "uvicorn")
    ]
    sites = [("BreezeWeb", Site(max(sizes)))]
    if args.processes > 0:
        per_core = PerCoreSite(max(sizes), args.processes, args.redis_url, args.database_url)
        sites.append((f"BreezeWeb x{args.processes}", per_core))
    try:
        with contextlib.ExitStack() as stack:
            # The bare relay reads a paced upstream of its own.
            pacing = ["--tokens", str(args.tokens), "--token-delay", str(args.token_delay)]
            argv = [sys.executable, str(BENCH / "websocket_chat.py"), "--serve-upstream", *pacing]
            relayed = stack.enter_context(Upstream(argv))
            relay = BareSite(args.tokens, args.token_delay, "uvicorn", upstream=relayed.url)
            bares.append(("bare relay (uvicorn)", relay))
            if args.processes > 1:
                # The relay as BreezeWeb xN is served: N processes on one port.
                relay_n = BareSite(
                    args.tokens, args.token_delay, "uvicorn", relayed.url, args.processes
                )
                bares.append((f"bare relay x{args.processes}", relay_n))
            for _, bare in bares:
                bare.start()
                asyncio.run(warm_up(bare, 4 * max(1, args.processes)))
            for _, site in sites:
                # Every chat goes to the upstream: no process loads the local model.
                site.env["PRELOAD_LOCAL_RUNNERS"] = "false"
                site.web.env["PRELOAD_LOCAL_RUNNERS"] = "false"
                site.prepare()
                site.start()
                stack.enter_context(paced_upstream(site, args.tokens, args.token_delay))
                asyncio.run(warm_up(site, 4 * max(1, args.processes)))
            for n in sizes:
                targets = [(name, bare, bare.pid) for name, bare in bares]
                targets += [(name, site, site.web.popen.pid) for name, site in sites]
                for name, target, pid in targets:
                    profile = None
                    if args.profile and n == max(sizes) and name.startswith("BreezeWeb"):
                        # BreezeWeb -> FILE, BreezeWeb xN -> FILE.xN
                        profile = args.profile + name[len("BreezeWeb") :].replace(" ", ".")
                    with profiled(pid, profile):
                        result = asyncio.run(run(target, pid, n, args.tokens))
                    rows.append((n, name, result))
                    print(f"  {n} streams, {name}: done", flush=True)
    finally:
        for _, bare in bares:
            bare.stop()
        for _, site in sites:
            site.stop()
    print(
        "\n| streams | server | complete, exact | TTFT p50 | TTFT p99 | gap p50 | gap p99 "
        "| frames/stream | CPU per token | server CPU | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, name, r in rows:
        print(
            f"| {n} | {name} | {r['complete']}/{n} | {r['ttft_p50']:.0f} ms | "
            f"{r['ttft_p99']:.0f} ms | {r['gap_p50']:.1f} ms | {r['gap_p99']:.1f} ms | "
            f"{r['frames']:.1f} | {r['cpu_us_per_token']:.0f} µs | {r['cpu_share']:.0%} | "
            f"{r['tokens_per_s']:.0f} |"
        )
    print()
    bare_runs = {(n, name): r for n, name, r in rows if name.startswith("bare")}
    for n, name, ours in rows:
        if name.startswith("bare"):
            continue
        for bare_name, _ in bares:
            ratio = ours["cpu_us_per_token"] / bare_runs[n, bare_name]["cpu_us_per_token"]
            print(f"{n} streams: {name} / {bare_name} CPU per token = {ratio:.2f}x (goal <= 1.5)")
    failed = [(n, name, r["bad"]) for n, name, r in rows if r["complete"] != n]
    if failed:
        print(f"incomplete or inexact streams: {failed}")


if __name__ == "__main__":
    main()
