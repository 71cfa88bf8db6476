"""Chat websocket benchmark: `.venv/bin/python bench/websocket_chat.py`

(a) Overhead: tokens/s and time to first token of the real local runner
    (SmolLM2-135M through ExecuTorch) called directly in this process, against
    the same runner answering the same prompt through /ws/chat/ of a real
    uvicorn process (frame parsing, saving the turn, the pipeline, the router,
    streaming persistence, token frames). Runs alternate, greedy decoding, so
    both paths produce the same tokens; tokens/s counts from the first to the
    last token on both paths. Goals: >= 0.98 of direct throughput,
    <= 10 ms added to the first token.
(b) Concurrency: N websocket chats at once through the same uvicorn process,
    answered by a fast scripted upstream (a real HTTP server in its own process,
    through the Llama Stack runner). Every stream's tokens name the stream, so
    the client checks that no token is lost, duplicated or misrouted. Reports
    the p99 gap between token frames of a stream (goal < 100 ms).

Options: --concurrency 200 --tokens 100 --token-delay 0.02 --runs 20
--max-tokens 256 --skip-direct --skip-concurrency --persistent-db. Prints a
Markdown summary.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import percentile

from tests.support.processes import Upstream, WebServer, manage, site_env

PROMPT = "Explain in a few paragraphs how a lighthouse works and why it matters to ships."


# ---- the site: its own DATA_DIR, SQLite, a uvicorn process ----------------------------


class Site:
    def __init__(self, concurrency: int, persistent_db: bool = False) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="breezeweb-bench-ws-"))
        settings = {
            "CHAT_MAX_CONCURRENT_PER_USER": str(concurrency + 10),
            "CHAT_MESSAGES_PER_MINUTE": str(concurrency * 10 + 100),
            "LOG_LEVEL": "WARNING",
        }
        if persistent_db:
            # Keep the SQLite connection between database calls (see docs/benchmarks.md).
            settings["DATABASE_URL"] = f"sqlite:///{self.data / 'db.sqlite3'}?conn_max_age=600"
        self.env = site_env(self.data, **settings)
        self.web = WebServer(self.env, log=self.data / "server.log")
        self.url = f"127.0.0.1:{self.web.port}"
        self.key = ""

    def manage(self, *args: str) -> str:
        return manage(self.env, *args)

    def prepare(self) -> None:
        self.manage("migrate", "--noinput", "-v0")
        self.manage("bootstrap")
        out = self.manage(
            "shell",
            "-c",
            "from django.contrib.auth.models import User; from accounts.models import ApiKey;"
            "u = User.objects.create_user('bench', password='bench-password-123');"
            "print('KEY=' + ApiKey.issue(u, 'bench')[1])",
        )
        self.key = next(line[4:] for line in out.splitlines() if line.startswith("KEY="))

    def start(self) -> None:
        self.web.start()

    def stop(self) -> None:
        self.web.stop()
        shutil.rmtree(self.data, ignore_errors=True)


async def ws_connect(site: Site):
    from websockets.asyncio.client import connect

    return await connect(
        f"ws://{site.url}/ws/chat/",
        additional_headers={"Authorization": f"Bearer {site.key}"},
        max_size=None,
        open_timeout=60,
        ping_interval=None,
    )


# ---- (a) direct vs websocket on the local runner ---------------------------------------


async def direct_run(runner, max_tokens: int) -> dict:
    from chat.pipeline import SYSTEM_PROMPT
    from runners.base import ChatMessage, ChatRequest, Done, TokenDelta

    request = ChatRequest(
        messages=(ChatMessage("system", SYSTEM_PROMPT), ChatMessage("user", PROMPT)),
        temperature=0.0,
        max_tokens=max_tokens,
    )
    t0 = time.perf_counter()
    first = None
    text = []
    done = None
    async for event in runner.stream(request):
        if isinstance(event, TokenDelta):
            last = time.perf_counter()
            if first is None:
                first = last
            text.append(event.text)
        elif isinstance(event, Done):
            done = event
    end = last
    tokens = done.usage.completion_tokens
    return {
        "ttft_ms": (first - t0) * 1000,
        "tps": tokens / (end - first),
        "tokens": tokens,
        "text": "".join(text),
    }


async def ws_run(ws, request_id: str, max_tokens: int) -> dict:
    frame = {
        "type": "message",
        "request_id": request_id,
        "conversation_id": None,
        "text": PROMPT,
        "runner": "local",
        "params": {"temperature": 0.0, "max_tokens": max_tokens},
    }
    t0 = time.perf_counter()
    await ws.send(json.dumps(frame))
    first = None
    text = []
    while True:
        f = json.loads(await ws.recv())
        if f.get("request_id") != request_id:
            continue
        if f["type"] == "token":
            last = time.perf_counter()
            if first is None:
                first = last
            text.append(f["text"])
        elif f["type"] == "error":
            raise RuntimeError(f"websocket error: {f}")
        elif f["type"] == "done":
            end = last
            tokens = f["usage"]["completion_tokens"]
            return {
                "ttft_ms": (first - t0) * 1000,
                "tps": tokens / (end - first),
                "tokens": tokens,
                "text": "".join(text),
            }


async def bench_overhead(site: Site, runs: int, max_tokens: int) -> dict:
    import django

    os.environ.update({k: v for k, v in site.env.items() if k != "LOG_LEVEL"})
    django.setup()
    from asgiref.sync import sync_to_async

    from runners.models import RunnerConfig
    from runners.registry import build_runner

    config = await sync_to_async(RunnerConfig.objects.get)(name="local")
    runner = build_runner(config)
    await runner.load()
    ws = await ws_connect(site)
    # Warm both processes (model load, first-call costs), then alternate.
    await direct_run(runner, 16)
    await ws_run(ws, "warm", 16)
    direct, via_ws = [], []
    for i in range(runs):
        direct.append(await direct_run(runner, max_tokens))
        via_ws.append(await ws_run(ws, f"run-{i}", max_tokens))
        d, w = direct[-1], via_ws[-1]
        print(
            f"  run {i + 1}: direct {d['tps']:.1f} tok/s, TTFT {d['ttft_ms']:.1f} ms"
            f" | websocket {w['tps']:.1f} tok/s, TTFT {w['ttft_ms']:.1f} ms"
            f" ({d['tokens']}/{w['tokens']} tokens)",
            flush=True,
        )
    await ws.close()
    await runner.close()
    overheads = await sync_to_async(server_overheads)()
    pairs = list(zip(direct, via_ws, strict=True))
    same = sum(d["text"] == w["text"] for d, w in pairs)
    # Each pair ran back to back: their ratio is robust to the machine's load drifting.
    pair_ratio = statistics.median(w["tps"] / d["tps"] for d, w in pairs)
    pair_added = statistics.median(w["ttft_ms"] - d["ttft_ms"] for d, w in pairs)
    d_tps = statistics.median(r["tps"] for r in direct)
    w_tps = statistics.median(r["tps"] for r in via_ws)
    d_ttft = statistics.median(r["ttft_ms"] for r in direct)
    w_ttft = statistics.median(r["ttft_ms"] for r in via_ws)
    return {
        "runs": runs,
        "tokens": statistics.median(r["tokens"] for r in via_ws),
        "direct_tps": d_tps,
        "ws_tps": w_tps,
        "ratio": pair_ratio,
        "direct_ttft": d_ttft,
        "ws_ttft": w_ttft,
        "added_ttft": pair_added,
        "same_text": same,
        "server_overhead": statistics.median(overheads) if overheads else float("nan"),
        "server_overhead_p90": percentile(overheads, 90),
    }


def server_overheads() -> list[float]:
    """Per websocket answer: the time to first token the consumer measured
    (from the frame's arrival) minus the runner's own, which the router saved
    in the RunRecord: the server's work before and around the runner (parse,
    limits, saving the turn, guardian, routing), free of client and network."""
    from chat.models import Message

    values = []
    rows = Message.objects.filter(role="assistant", status="complete").exclude(
        time_to_first_token_ms=None
    )
    for message in rows.prefetch_related("runs"):
        runs = [r for r in message.runs.all() if r.time_to_first_token_ms is not None]
        if message.completion_tokens and message.completion_tokens > 16 and runs:
            values.append(message.time_to_first_token_ms - runs[-1].time_to_first_token_ms)
    return values


# ---- (b) N concurrent chats against a fast scripted upstream ---------------------------


def serve_upstream(tokens: int, delay: float) -> None:
    """Run in its own process: a ScriptedServer whose answer to "stream-<i>"
    is `tokens` tokens "<i:k> ", `delay` seconds apart."""
    from tests.support.scripted_server import Reply, ScriptedServer, serve_until_stdin_closes

    class EchoServer(ScriptedServer):
        async def _chat_reply(self, request, recorded):
            messages = recorded.json.get("messages", [])
            content = messages[-1]["content"] if messages else ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content)
            tag = content.rsplit("-", 1)[-1]
            # No await between queueing and the base class taking it: atomic.
            self.script(
                Reply(tokens=tuple(f"<{tag}:{k}> " for k in range(tokens)), token_delay=delay)
            )
            return await super()._chat_reply(request, recorded)

    serve_until_stdin_closes(EchoServer())


async def one_stream(
    site: Site, index: int, tokens: int, start: asyncio.Event, connected: list[int]
) -> dict:
    ws = await ws_connect(site)
    connected.append(index)
    await start.wait()
    rid = f"c{index}"
    t0 = time.perf_counter()
    await ws.send(json.dumps({"type": "message", "request_id": rid, "text": f"stream-{index}"}))
    arrivals: list[float] = []
    parts: list[str] = []
    status = "?"
    while True:
        f = json.loads(await ws.recv())
        if f.get("request_id") != rid and f["type"] != "document_status":
            status = "misrouted"
            continue
        if f["type"] == "token":
            arrivals.append(time.perf_counter())
            parts.append(f["text"])
        elif f["type"] == "error":
            status = f"error {f['code']}"
        elif f["type"] == "done":
            status = status if status not in ("?",) else f["status"]
            break
    await ws.close()
    expected = "".join(f"<{index}:{k}> " for k in range(tokens))
    text = "".join(parts)
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return {
        "ok": text == expected and status == "complete",
        "status": status,
        "ttft_ms": (arrivals[0] - t0) * 1000 if arrivals else float("nan"),
        "gaps": gaps,
        "frames": len(arrivals),
        "lost": 0 if text == expected else 1,
        "total_ms": ((arrivals[-1] if arrivals else t0) - t0) * 1000,
    }


@contextmanager
def paced_upstream(site: Site, tokens: int, delay: float):
    """The echo upstream in its own process, and `site` answering every chat
    from it through the Llama Stack runner (the local runner off)."""
    argv = [sys.executable, __file__, "--serve-upstream"]
    with Upstream([*argv, "--tokens", str(tokens), "--token-delay", str(delay)]) as upstream:
        site.manage(
            "shell",
            "-c",
            "from runners.models import RunnerConfig;"
            "RunnerConfig.objects.filter(name='local').update(enabled=False);"
            "RunnerConfig.objects.create(name='upstream', kind='llamastack', "
            f"endpoint='{upstream.url}', model_id='scripted-model', priority=200,"
            " timeout_seconds=120)",
        )
        yield upstream


async def bench_concurrency(site: Site, n: int, tokens: int, delay: float) -> dict:
    with paced_upstream(site, tokens, delay):
        # One chat first: the first request pays one-time costs (SDK import, client).
        warm = asyncio.Event()
        warm.set()
        await one_stream(site, n, tokens, warm, [])
        start = asyncio.Event()
        connected: list[int] = []
        tasks = [
            asyncio.create_task(one_stream(site, i, tokens, start, connected)) for i in range(n)
        ]
        while len(connected) < n:  # every socket open before the chats start
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        began = time.perf_counter()
        start.set()
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "n": n,
        "tokens": tokens,
        "delay_ms": delay * 1000,
        "complete": sum(r["ok"] for r in results),
        "bad": [r["status"] for r in results if not r["ok"]][:5],
        "p50_gap": percentile(gaps, 50),
        "p99_gap": percentile(gaps, 99),
        "max_gap": max(gaps) if gaps else float("nan"),
        "p50_ttft": percentile([r["ttft_ms"] for r in results], 50),
        "p99_ttft": percentile([r["ttft_ms"] for r in results], 99),
        "frames_per_stream": statistics.mean(r["frames"] for r in results),
        "tokens_per_s": n * tokens / wall,
        "wall_s": wall,
    }


# ---- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--skip-direct", action="store_true")
    parser.add_argument(
        "--persistent-db",
        action="store_true",
        help="serve with DATABASE_URL=sqlite:///...?conn_max_age=600",
    )
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.tokens, args.token_delay)
        return

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} at start", flush=True)
    site = Site(args.concurrency, args.persistent_db)
    try:
        site.prepare()
        site.start()
        if not args.skip_direct:
            print("(a) local runner: direct vs through the websocket", flush=True)
            # The runtime's C++ logs every generation on fd 2: keep the report readable.
            saved_stderr = os.dup(2)
            with open(site.data / "direct-stderr.log", "wb") as sink:
                os.dup2(sink.fileno(), 2)
                try:
                    a = asyncio.run(bench_overhead(site, args.runs, args.max_tokens))
                finally:
                    os.dup2(saved_stderr, 2)
            print(
                f"\n| path | tokens/s (median) | TTFT ms (median) |\n|---|---|---|\n"
                f"| direct `runner.stream()` | {a['direct_tps']:.1f} | {a['direct_ttft']:.1f} |\n"
                f"| websocket `/ws/chat/` | {a['ws_tps']:.1f} | {a['ws_ttft']:.1f} |\n"
                f"\nthroughput ratio {a['ratio']:.3f} (goal >= 0.98), added TTFT "
                f"{a['added_ttft']:.1f} ms (goal <= 10) (medians of back-to-back pairs), "
                f"{a['runs']} runs of ~{a['tokens']:.0f} "
                f"tokens, identical text in {a['same_text']}/{a['runs']} runs\n"
                f"server-side time added before the first token (consumer's TTFT minus the "
                f"runner's own, per answer): median {a['server_overhead']:.1f} ms, "
                f"p90 {a['server_overhead_p90']:.1f} ms\n",
                flush=True,
            )
        if not args.skip_concurrency:
            print(
                f"(b) {args.concurrency} concurrent chats, {args.tokens} tokens each, "
                f"{args.token_delay * 1000:.0f} ms apart upstream",
                flush=True,
            )
            b = asyncio.run(
                bench_concurrency(site, args.concurrency, args.tokens, args.token_delay)
            )
            header = (
                "| streams | complete and exact | p50 gap | p99 gap | max gap | p50 TTFT "
                "| p99 TTFT | frames/stream | tokens/s delivered |"
            )
            print(
                f"\n{header}\n|---|---|---|---|---|---|---|---|---|\n"
                f"| {b['n']} | {b['complete']}/{b['n']} | {b['p50_gap']:.1f} ms | "
                f"{b['p99_gap']:.1f} ms | {b['max_gap']:.1f} ms | {b['p50_ttft']:.0f} ms | "
                f"{b['p99_ttft']:.0f} ms | {b['frames_per_stream']:.1f} | "
                f"{b['tokens_per_s']:.0f} |\n"
                f"\np99 gap goal < 100 ms; {'no' if b['complete'] == b['n'] else 'SOME'} lost or "
                f"misrouted tokens {b['bad'] or ''}\n",
                flush=True,
            )
    finally:
        site.stop()


if __name__ == "__main__":
    main()
