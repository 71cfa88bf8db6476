"""A real MCP server for tests, built with the `mcp` SDK's FastMCP.

    python -m tests.support.mcp_server stdio
    python -m tests.support.mcp_server http PORT TOKEN

Tools: `echo(text)`, `add(a, b)`, `fail(reason)` (raises), `sleep(seconds)`
(hangs that long) and `die()` (the server process exits in the middle of the
call). Over HTTP every request must carry `Authorization: Bearer TOKEN`
(401 otherwise). `McpHttpServer` starts the HTTP one on a free port and
stops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# Not tests.support.processes.ROOT: run as a script (stdio), this file has no package.
ROOT = Path(__file__).resolve().parents[2]


def build(port: int = 0):
    from mcp.server.fastmcp import FastMCP

    server = FastMCP("breezeweb-test", host="127.0.0.1", port=port, log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Repeat the text."""
        return f"echo: {text}"

    @server.tool()
    def add(a: float, b: float) -> str:
        """Add two numbers."""
        return str(a + b)

    @server.tool()
    def fail(reason: str = "broken") -> str:
        """Always raises."""
        raise RuntimeError(f"the tool failed on purpose: {reason}")

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Wait, then answer."""
        import asyncio

        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool()
    def die() -> str:
        """The server process exits in the middle of this call."""
        os._exit(3)

    return server


def _http(port: int, token: str) -> None:
    import uvicorn
    from starlette.responses import JSONResponse

    app = build(port).streamable_http_app()

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization") != f"Bearer {token}".encode():
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
        await app(scope, receive, send)

    uvicorn.run(guarded, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


class McpHttpServer:
    """The HTTP server in a child process, on a free port."""

    def __init__(self, token: str) -> None:
        from tests.support.scripted_server import free_port

        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> McpHttpServer:
        import httpx

        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.mcp_server", "http", str(self.port), self.token],
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the MCP server exited with {self.process.returncode}")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the MCP server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stdio_command() -> tuple[str, list[str]]:
    """The command and arguments of the stdio server (an McpServer's `command`, `args`)."""
    return sys.executable, [str(Path(__file__).resolve()), "stdio"]


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        build().run("stdio")
    else:
        _http(int(sys.argv[2]), sys.argv[3])
