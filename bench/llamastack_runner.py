"""Overhead of the Llama Stack runner over the bare SDK and over plain httpx.

One command: `.venv/bin/python bench/llamastack_runner.py [--calls 400]`

A scripted OpenAI-compatible upstream on 127.0.0.1 answers at once with a
short streamed reply (8 deltas + usage). The same request is made, in
interleaved rounds so all three see the same machine noise, by:
  httpx   a plain `httpx.AsyncClient.stream` POST, SSE lines read to [DONE]
  sdk     `AsyncLlamaStackClient.chat.completions.create(stream=True)`, iterated
  runner  `LlamaStackRunner.stream()`, consumed to `Done`
Each reuses one client. Printed: median and p90 of the whole call and of the
time to the first content delta, and the runner's difference to the SDK and
the SDK's to httpx. Goal: the runner adds < 0.5 ms per call over the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from runners.base import ChatMessage, ChatRequest, TokenDelta
from runners.llamastack.runner import LlamaStackRunner, lsc
from tests.support.scripted_server import Reply, ScriptedServer

MODEL = "scripted-model"
MESSAGES = [{"role": "user", "content": "Say hello in eight words."}]
REPLY = Reply(tokens=tuple(f"w{i} " for i in range(8)))


async def call_httpx(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
        "max_tokens": 64,
    }
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if not first and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    return time.perf_counter() - started, first - started


async def call_sdk(client) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0.7,
        max_tokens=64,
    )
    async for chunk in stream:
        if not first and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    return time.perf_counter() - started, first - started


async def call_runner(runner: LlamaStackRunner, request: ChatRequest) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    async for event in runner.stream(request):
        if not first and isinstance(event, TokenDelta):
            first = time.perf_counter()
    return time.perf_counter() - started, first - started


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.9)] * 1000


async def main(calls: int, warmup: int) -> None:
    server = ScriptedServer(models=[MODEL]).start()
    server.default_reply = REPLY
    try:
        http = httpx.AsyncClient(timeout=30)
        sdk = lsc.AsyncLlamaStackClient(base_url=server.url, timeout=30, max_retries=0)
        runner = LlamaStackRunner(
            name="bench", model_id=MODEL, endpoint=server.url, temperature=0.7, max_tokens=64
        )
        request = ChatRequest(messages=(ChatMessage("user", MESSAGES[0]["content"]),))
        url = f"{server.url}/v1/chat/completions"
        runs = {
            "httpx": lambda: call_httpx(http, url),
            "sdk": lambda: call_sdk(sdk),
            "runner": lambda: call_runner(runner, request),
        }
        totals: dict[str, list[float]] = {name: [] for name in runs}
        ttfts: dict[str, list[float]] = {name: [] for name in runs}
        for round_no in range(warmup + calls):
            # Rotate the order each round so none always runs first.
            names = list(runs)
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                total, ttft = await runs[name]()
                if round_no >= warmup:
                    totals[name].append(total)
                    ttfts[name].append(ttft)
            # Keep the recordings from growing without bound.
            if round_no % 100 == 0:
                server.requests.clear()
        await runner.close()
        await sdk.close()
        await http.aclose()
    finally:
        server.stop()

    print(
        f"{calls} calls each (after {warmup} warm-up), 8 deltas + usage, upstream answers at once"
    )
    print(f"{'':8}{'call p50':>10}{'call p90':>10}{'ttft p50':>10}{'ttft p90':>10}   (ms)")
    medians = {}
    for name in runs:
        c50, c90 = summary(totals[name])
        t50, t90 = summary(ttfts[name])
        medians[name] = (c50, t50)
        print(f"{name:8}{c50:10.3f}{c90:10.3f}{t50:10.3f}{t90:10.3f}")
    (rc, rt), (sc, st), (hc, ht) = medians["runner"], medians["sdk"], medians["httpx"]
    print(f"runner - sdk:   call {rc - sc:+.3f} ms, ttft {rt - st:+.3f} ms  (ratio {rc / sc:.2f}x)")
    print(f"sdk - httpx:    call {sc - hc:+.3f} ms, ttft {st - ht:+.3f} ms  (ratio {sc / hc:.2f}x)")
    print(f"runner - httpx: call {rc - hc:+.3f} ms, ttft {rt - ht:+.3f} ms  (ratio {rc / hc:.2f}x)")
    verdict = "met" if rc - sc < 0.5 else "NOT met"
    print(f"goal (runner adds < 0.5 ms per call over the SDK): {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.warmup))
