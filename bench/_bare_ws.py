"""The bare transport for bench/streaming_scale.py: a Channels
websocket consumer that answers a chat frame with `BARE_TOKENS` token frames
`BARE_DELAY` seconds apart, in BreezeWeb's frame shapes, and nothing else (no
Django request handling, database, pipeline, runner or upstream).

With `BARE_UPSTREAM` (an OpenAI-compatible server's URL) it is the bare
*relay* instead: each chat frame is one streamed chat completion read from
that upstream with httpx (the HTTP client under llama-stack-client), whose
every content delta goes out as a token frame as it arrives: the least a
server that answers from an upstream does per token (reading it, then
sending it), still without any of the product.

    daphne -b 127.0.0.1 -p PORT _bare_ws:application   (with bench/ on PYTHONPATH)
    uvicorn --host 127.0.0.1 --port PORT _bare_ws:application   (the same, on uvicorn)
"""

from __future__ import annotations

import asyncio
import json
import os

import django
from django.conf import settings

if not settings.configured:
    settings.configure(DEBUG=False, INSTALLED_APPS=["channels"])
    django.setup()

from django.urls import path

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter

TOKENS = int(os.environ.get("BARE_TOKENS", "100"))
DELAY = float(os.environ.get("BARE_DELAY", "0.02"))


class Bare(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        frame = json.loads(text_data)
        asyncio.get_running_loop().create_task(self.answer(frame))

    async def answer(self, frame: dict) -> None:
        rid = frame["request_id"]
        tag = frame["text"].rsplit("-", 1)[-1]
        for k in range(TOKENS):
            await asyncio.sleep(DELAY)
            await self.send(
                json.dumps({"type": "token", "request_id": rid, "text": f"<{tag}:{k}> "})
            )
        await self.send(json.dumps({"type": "done", "request_id": rid, "status": "complete"}))


UPSTREAM = os.environ.get("BARE_UPSTREAM", "")
_client = None


class Relay(Bare):
    async def answer(self, frame: dict) -> None:
        import httpx

        global _client
        if _client is None:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
            _client = httpx.AsyncClient(base_url=UPSTREAM, limits=limits, timeout=120)
        rid = frame["request_id"]
        body = {
            "model": "scripted-model",
            "messages": [{"role": "user", "content": frame["text"]}],
            "stream": True,
        }
        async with _client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", ()):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        await self.send(
                            json.dumps({"type": "token", "request_id": rid, "text": text})
                        )
        await self.send(json.dumps({"type": "done", "request_id": rid, "status": "complete"}))


consumer = Relay if UPSTREAM else Bare
application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/chat/", consumer.as_asgi())])})
