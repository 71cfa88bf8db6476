"""Serving: how many Daphne processes, on one port (`manage.py serve`, which
`make run` and the Docker image start).

- **One process** on the embedded defaults: the in-memory channel layer and
  the embedded Chroma store belong to one process, so a second one could not
  see the first one's sockets, limits or documents. `serve` execs Daphne in
  its place, exactly as a plain `daphne` command line would.
- **One process per core** when `REDIS_URL` (channel layer, cache, limits)
  and `CHROMA_URL` (the vector store) are set (`WEB_PROCESSES=auto`, the
  default), or `WEB_PROCESSES=N`. The parent binds the port once and starts
  N Daphne processes that accept on that same socket (`daphne --fd`): the
  kernel hands each new connection to whichever process is free, so every
  core serves and clients still see one address. The parent only watches:
  a process that dies is started again (at most once a second), SIGTERM or
  SIGINT stops them all.

The Daphne arguments every BreezeWeb server gets (websocket limits, and
`--proxy-headers` when `PROXY_HEADERS=true`) are defined here once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from django.conf import settings

# Websocket messages up to 16 MB (images in a frame; chat.limits.MAX_FRAME_BYTES
# is the application's own, smaller limit, answered with an error frame).
WEBSOCKET_ARGS = (
    "--websocket-max-message-size",
    "16777216",
    "--websocket-max-frame-size",
    "16777216",
)
APPLICATION = "breezeweb.asgi:application"
RESTART_INTERVAL_SECONDS = 1.0


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


def daphne_args(extra: tuple[str, ...] = ()) -> list[str]:
    """Daphne's options after the address: the websocket limits, the proxy
    headers when PROXY_HEADERS=true, then `extra`, then the application."""
    proxy = ["--proxy-headers"] if settings.PROXY_HEADERS else []
    return [*WEBSOCKET_ARGS, *proxy, *extra, APPLICATION]


def daphne_command(address: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "daphne", *address, *daphne_args(extra)]


def listening_socket(host: str, port: int) -> socket.socket:
    """The one listening socket the processes share. IPv4 only: Daphne adopts
    a socket (`--fd`) as an IPv4 one."""
    if ":" in host:
        raise ValueError(
            f"several web processes listen on an IPv4 address, not {host!r} "
            "(bind 0.0.0.0, or set WEB_PROCESSES=1)"
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """N Daphne processes accepting on one listening socket."""

    def __init__(self, sock: socket.socket, count: int, extra: tuple[str, ...] = ()) -> None:
        self.sock = sock
        self.count = count
        self.command = daphne_command(["--fd", str(sock.fileno())], extra)
        self.children: list[subprocess.Popen] = []
        self.stopping = False

    def _start_one(self) -> subprocess.Popen:
        return subprocess.Popen(self.command, pass_fds=(self.sock.fileno(),))

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.children = [self._start_one() for _ in range(self.count)]
        last_restart = 0.0
        while not self.stopping:
            time.sleep(0.2)
            for i, child in enumerate(self.children):
                if child.poll() is None or self.stopping:
                    continue
                wait = RESTART_INTERVAL_SECONDS - (time.monotonic() - last_restart)
                if wait > 0:
                    continue  # started again on a later round
                print(
                    f"web process {child.pid} exited with {child.returncode}; starting another",
                    file=sys.stderr,
                    flush=True,
                )
                self.children[i] = self._start_one()
                last_restart = time.monotonic()
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.sock.close()
        return 0
