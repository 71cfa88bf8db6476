"""Serving: uvicorn, with how many processes, on one port (`manage.py serve`,
which `make run` and the Docker image start).

- **One process** on the embedded defaults: the in-memory channel layer and
  the embedded Chroma store belong to one process, so a second one could not
  see the first one's sockets, limits or documents. `serve` execs uvicorn in
  its place, exactly as a plain `uvicorn` command line would.
- **One process per core** when `REDIS_URL` (channel layer, cache, limits)
  and `CHROMA_URL` (the vector store) are set (`WEB_PROCESSES=auto`, the
  default), or `WEB_PROCESSES=N`: uvicorn's own process manager
  (`--workers N`) binds the port once and starts N processes that accept on
  it, so every core serves and clients still see one address; it starts a
  process that dies again, and SIGTERM or SIGINT stops them all.

Why uvicorn (docs/scaling.md, docs/benchmarks.md): on this code it costs
less CPU per websocket frame and per HTTP request than Daphne, and it needs
nothing patched: the ASGI lifespan starts what a serving process runs
(breezeweb.server), its access log goes through `logging` (where API keys
are masked) and it leaves request bodies to Django.

The server options every BreezeWeb server gets are defined here once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from django.conf import settings

APPLICATION = "breezeweb.asgi:application"
# The event loop, HTTP parser and websocket implementation (all requirements).
IMPLEMENTATION_ARGS = ("--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio")
# Websocket messages up to 16 MB (images in a frame; chat.limits.MAX_FRAME_BYTES
# is the application's own, smaller limit, answered with an error frame). No
# per-message compression: token frames are a few dozen bytes, where deflate
# costs CPU per frame and saves nothing.
WEBSOCKET_ARGS = ("--ws-max-size", "16777216", "--ws-per-message-deflate", "false")
# The lifespan runs breezeweb.server's start-up; no `Server:` header.
SERVER_ARGS = ("--lifespan", "on", "--no-server-header", "--timeout-graceful-shutdown", "20")


@dataclass(frozen=True)
class Plan:
    processes: int
    reason: str


def plan(requested: str | int | None = None) -> Plan:
    """How many processes to serve with: `requested` (or WEB_PROCESSES):
    "auto" or a whole number >= 1. Raises ValueError with what to change
    when several processes are asked for without what they need."""
    value = str(requested if requested is not None else settings.WEB_PROCESSES).strip().lower()
    missing = [name for name in ("REDIS_URL", "CHROMA_URL") if not getattr(settings, name)]
    cores = os.cpu_count() or 1
    if value == "auto":
        if missing:
            return Plan(1, f"one web process: {' and '.join(missing)} unset (see docs/scaling.md)")
        return Plan(cores, f"{cores} web processes, one per core (REDIS_URL and CHROMA_URL set)")
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise ValueError(f"WEB_PROCESSES must be 'auto' or a whole number >= 1, not {value!r}")
    count = int(value)
    if count > 1 and missing:
        raise ValueError(
            f"WEB_PROCESSES={count} needs {' and '.join(missing)}: processes share the channel "
            "layer, limits and documents through them (docs/scaling.md)"
        )
    return Plan(count, f"{count} web process{'es' if count > 1 else ''} (WEB_PROCESSES)")


def server_args(extra: tuple[str, ...] = (), proxy: bool | None = None) -> list[str]:
    """uvicorn's options after the address: the implementation, the websocket
    limits, the proxy headers only when `proxy` (default: PROXY_HEADERS=true),
    then `extra`, then the application."""
    if settings.PROXY_HEADERS if proxy is None else proxy:
        proxy = ["--proxy-headers", "--forwarded-allow-ips", settings.FORWARDED_ALLOW_IPS]
    else:
        proxy = ["--no-proxy-headers"]
    return [*IMPLEMENTATION_ARGS, *WEBSOCKET_ARGS, *SERVER_ARGS, *proxy, *extra, APPLICATION]


def server_command(
    host: str,
    port: int,
    processes: int = 1,
    extra: tuple[str, ...] = (),
    proxy: bool | None = None,
) -> list[str]:
    """The whole uvicorn command line: one process, or `processes` under
    uvicorn's process manager on the same address."""
    workers = ["--workers", str(processes)] if processes > 1 else []
    address = ["--host", host, "--port", str(port), *workers]
    return [sys.executable, "-m", "uvicorn", *address, *server_args(extra, proxy)]
