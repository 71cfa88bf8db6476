"""A real, scripted OpenAI / Llama Stack-compatible HTTP server for tests.

It listens on 127.0.0.1 (a free port), runs aiohttp in a background thread
with its own event loop, and speaks what `llama-stack-client` 0.7 and the
`openai` client use:

    GET  /v1/health             {"status": "OK"}
    GET  /v1/models             {"object": "list", "data": [{"id", "object", "created",
                                 "owned_by", "custom_metadata": {...}}]}  (Llama Stack
                                 and OpenAI shapes at once)
    POST /v1/chat/completions   JSON, or SSE when "stream": true (OpenAI chunk format;
                                 a usage chunk last when stream_options.include_usage)

Base URLs: `server.url` for `AsyncLlamaStackClient(base_url=...)` (it adds
`/v1/...` itself) and `server.openai_base_url` (`.../v1`) for `openai`.

Scripting, per test. Each request to a route takes the next queued `Reply`
for that route, else the route's default (`Reply()`: a short streamed answer)::

    server.script(Reply(text="Hi there", token_delay=0.01))          # chat
    server.script(Reply(status=429, headers={"Retry-After": "7"}))
    server.script(Reply(status=500), route="/v1/models")             # models fails
    server.default_reply = Reply(text="always this")                 # every later call

`Reply` fields: `text` (split into tokens on word boundaries, or give
`tokens` explicitly), `token_delay` (seconds between tokens),
`headers_delay` (seconds before the status line: client timeouts),
`status` / `body` / `headers` (an error reply; body defaults to an OpenAI
style `{"error": {...}}`), `tool_calls` (`ScriptedToolCall(name, arguments,
id)`, streamed as OpenAI tool-call deltas, arguments in small pieces),
`finish_reason`, `usage` ((prompt, completion), else estimated),
`break_after` (close the connection after N content tokens: a stream that
breaks mid-answer), `malformed_after` (send a chunk that is not JSON after
N tokens), `raw_events` (SSE `data:` payloads sent verbatim instead of the
generated ones), `drop_connection` (close the connection without any
response, like a reset keep-alive connection).

`server.models` (default `["scripted-model"]`) is what /v1/models lists;
with `server.strict_models` (default True) a chat request for any other
model gets a 404 like Llama Stack's.

Recording: `server.requests` lists every `RecordedRequest` (method, path,
lower-cased `headers` incl. authorization, parsed `json`, `tokens_sent`,
`peer` (the client's address and port: same port, same pooled connection),
`disconnected` when the client went away before the end, and `finished`,
a threading.Event set when the handler is done). `server.chat_requests()`
filters the chat calls; `server.wait_for_requests(n)` blocks until n arrived.

Lifecycle: `ScriptedServer()` then `.start()` / `.stop()`, or `with
ScriptedServer() as server:`; `.reset()` clears the queue, recordings and
defaults. `serve_until_stdin_closes(server)` runs one in a process of its
own. Pytest fixtures live in `tests.support.fixtures` (`scripted_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CHAT_ROUTE = "/v1/chat/completions"
MODELS_ROUTE = "/v1/models"
HEALTH_ROUTE = "/v1/health"

_TOKEN_RE = re.compile(r"\S+\s*|\s+")


def _apply_limits(tokens: list[str], payload: dict) -> tuple[list[str], str]:
    """What an OpenAI-compatible server does with `stop` and `max_tokens`: the
    text ends before the first stop string (finish "stop"), or after
    `max_tokens` tokens (finish "length")."""
    stop = payload.get("stop") or []
    stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str) and s]
    max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens")
    text, kept = "", []
    for token in tokens:
        if isinstance(max_tokens, int) and len(kept) >= max_tokens:
            return kept, "length"
        cut = min(((text + token).find(s) for s in stop if s in text + token), default=-1)
        if cut >= 0:
            if cut > len(text):
                kept.append((text + token)[len(text) : cut])
            return kept, "stop"
        text += token
        kept.append(token)
    return kept, "stop"


@dataclass(frozen=True)
class ScriptedToolCall:
    """A tool call the scripted model asks for; `arguments` is a JSON string."""

    name: str
    arguments: str = "{}"
    id: str = ""


@dataclass(frozen=True)
class Reply:
    """What the server does for one request (see the module docstring)."""

    text: str = "Hello from the scripted server."
    tokens: tuple[str, ...] | None = None
    token_delay: float = 0.0
    headers_delay: float = 0.0
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None
    break_after: int | None = None
    malformed_after: int | None = None
    raw_events: tuple[str, ...] | None = None
    drop_connection: bool = False

    def token_list(self) -> list[str]:
        if self.tokens is not None:
            return list(self.tokens)
        return _TOKEN_RE.findall(self.text)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    body: bytes
    received_at: float
    peer: tuple = ()
    tokens_sent: int = 0
    disconnected: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def authorization(self) -> str:
        return self.headers.get("authorization", "")


def serve_until_stdin_closes(server: ScriptedServer) -> None:
    """Serve `server` from this process, its URL printed first, until stdin
    closes: a scripted upstream in a process of its own, so that its event loop
    does not compete with the process measuring (tests.support.processes.Upstream)."""
    server.start()
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ScriptedServer:
    """A scripted chat-completions server on 127.0.0.1 in a background thread."""

    def __init__(self, models: list[str] | None = None) -> None:
        self.port = 0
        self.models: list[str] = list(models or ["scripted-model"])
        self.strict_models = True
        self.default_reply = Reply()
        self.requests: list[RecordedRequest] = []
        self._queues: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._counter = 0

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> ScriptedServer:
        self._thread = threading.Thread(target=self._serve, name="scripted-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the scripted server did not start within 10 s")
        if self._start_error:
            raise RuntimeError(f"the scripted server failed to start: {self._start_error}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget scripts and recordings; back to the default models and reply."""
        with self._lock:
            self._queues.clear()
            self.requests = []
        self.models = ["scripted-model"]
        self.strict_models = True
        self.default_reply = Reply()

    # ---- scripting and inspection --------------------------------------------------

    def script(self, *replies: Reply, route: str = CHAT_ROUTE) -> None:
        """Queue replies for the next requests to `route` (in order)."""
        with self._lock:
            self._queues.setdefault(route, deque()).extend(replies)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == CHAT_ROUTE]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} requests, got {len(self.requests)}")
            time.sleep(0.005)
        return self.requests

    def _next_reply(self, route: str) -> Reply | None:
        with self._lock:
            queue = self._queues.get(route)
            if queue:
                return queue.popleft()
        return None

    # ---- the server ----------------------------------------------------------------

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _startup(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get(HEALTH_ROUTE, self._health)
        app.router.add_get(MODELS_ROUTE, self._models)
        app.router.add_post(CHAT_ROUTE, self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        # Port 0 lets the OS pick; read back the bound port.
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _record(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            json=parsed,
            body=body,
            received_at=time.monotonic(),
            peer=tuple(request.transport.get_extra_info("peername") or ())
            if request.transport
            else (),
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    async def _scripted_error(self, reply: Reply) -> web.Response:
        body = reply.body
        if body is None:
            body = {"error": {"message": f"scripted error {reply.status}", "code": reply.status}}
        text = body if isinstance(body, str) else json.dumps(body)
        content_type = "text/plain" if isinstance(body, str) else "application/json"
        return web.Response(
            status=reply.status, text=text, content_type=content_type, headers=reply.headers
        )

    async def _json_route(self, request: web.Request, route: str, body) -> web.StreamResponse:
        """A JSON GET route: the next scripted reply for `route` (a delay, an
        error), else `body()`."""
        recorded = await self._record(request)
        try:
            reply = self._next_reply(route)
            if reply and reply.headers_delay:
                await asyncio.sleep(reply.headers_delay)
            if reply and reply.status != 200:
                return await self._scripted_error(reply)
            return web.json_response(body())
        finally:
            recorded.finished.set()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return await self._json_route(request, HEALTH_ROUTE, lambda: {"status": "OK"})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return await self._json_route(request, MODELS_ROUTE, self._model_list)

    def _model_list(self) -> dict:
        data = [
            {
                "id": model,
                "object": "model",
                "created": 1_700_000_000,
                "owned_by": "scripted",
                "custom_metadata": {
                    "model_type": "llm",
                    "provider_id": "scripted",
                    "provider_resource_id": model,
                },
            }
            for model in self.models
        ]
        return {"object": "list", "data": data}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        try:
            return await self._chat_reply(request, recorded)
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            recorded.disconnected = True
            raise
        finally:
            recorded.finished.set()

    async def _chat_reply(self, request: web.Request, recorded: RecordedRequest) -> Any:
        reply = self._next_reply(CHAT_ROUTE) or self.default_reply
        if reply.headers_delay:
            await asyncio.sleep(reply.headers_delay)
        if reply.drop_connection:
            _abort(request)
            recorded.disconnected = True
            return web.Response()
        if reply.status != 200:
            return await self._scripted_error(reply)
        payload = recorded.json if isinstance(recorded.json, dict) else {}
        model = str(payload.get("model", ""))
        if self.strict_models and model not in self.models:
            return web.json_response(
                {"detail": f"Model '{model}' not found. Use 'client.models.list()' to list."},
                status=404,
            )
        self._counter += 1
        completion_id = f"chatcmpl-scripted-{self._counter}"
        tokens = reply.token_list()
        finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
        if reply.finish_reason is None and not reply.tool_calls:
            tokens, finish = _apply_limits(tokens, payload)
        usage = reply.usage or (_estimate_prompt_tokens(payload), len(tokens))
        if not payload.get("stream"):
            return web.json_response(
                _completion(completion_id, model, "".join(tokens), reply, finish, usage)
            )

        response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(data: str) -> None:
            await response.write(f"data: {data}\n\n".encode())

        if reply.raw_events is not None:
            for event in reply.raw_events:
                await send(event)
                if reply.token_delay:
                    await asyncio.sleep(reply.token_delay)
            await response.write_eof()
            return response

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return json.dumps(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                }
            )

        await send(chunk({"role": "assistant", "content": ""}))
        for index, token in enumerate(tokens):
            if reply.break_after is not None and index >= reply.break_after:
                _abort(request)
                recorded.disconnected = True
                return response
            if reply.malformed_after is not None and index >= reply.malformed_after:
                await send('{"id": "broken", "choices": [{"delta": {"content": "oops"')
                await response.write_eof()
                return response
            if reply.token_delay and index:
                await asyncio.sleep(reply.token_delay)
            await send(chunk({"content": token}))
            recorded.tokens_sent += 1
        if reply.break_after is not None and reply.break_after >= len(tokens):
            _abort(request)
            recorded.disconnected = True
            return response
        for position, call in enumerate(reply.tool_calls):
            call_id = call.id or f"call_{self._counter}_{position}"
            await send(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": position,
                                "id": call_id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
            for start in range(0, len(call.arguments), 8):
                piece = call.arguments[start : start + 8]
                await send(
                    chunk({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})
                )
        await send(chunk({}, finish))
        stream_options = payload.get("stream_options") or {}
        if stream_options.get("include_usage"):
            await send(
                json.dumps(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": usage[0],
                            "completion_tokens": usage[1],
                            "total_tokens": usage[0] + usage[1],
                        },
                    }
                )
            )
        await send("[DONE]")
        await response.write_eof()
        return response


def _abort(request: web.Request) -> None:
    """Drop the TCP connection mid-body: the client sees an incomplete stream."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _estimate_prompt_tokens(payload: dict) -> int:
    total = 0
    for message in payload.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return max(1, total // 4)


def _completion(
    completion_id: str,
    model: str,
    text: str,
    reply: Reply,
    finish: str,
    usage: tuple[int, int],
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id or f"call_{completion_id}_{i}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for i, call in enumerate(reply.tool_calls)
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        },
    }
