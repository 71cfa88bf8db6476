"""MCP servers' tools, through the maintained `mcp` Python SDK (1.x).

A server is listed (its tools read with `tools/list`) when a turn first
needs it and again as soon as an admin changes it (its `version`): that turn
waits for the listing (at most MCP_LIST_TIMEOUT_SECONDS). Afterwards the
listing is renewed at most every MCP_STATUS_TTL_SECONDS per process, in the
background: a turn uses what is known (a server known to be down stays left
out until a renewal finds it up), so no turn waits for a server that is
known to be down. Each outcome is saved on the `McpServer` row (status,
detail, tools) for the admin. A server that does not answer within
MCP_LIST_TIMEOUT_SECONDS is *down*: its tools are left out of the turn,
which goes on with the others.

Each tool call opens its own session (a stdio server is started for it and
ends with it), so a call never depends on a connection another turn left in
some state, and a server that died is simply started again next time.
Tools are offered to the model as `<server>__<tool>`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from django.utils import timezone

import httpx
from channels.db import database_sync_to_async

from agents import limits
from agents.models import McpServer
from agents.tools import Tool, ToolContext, ToolFailed, ToolOutput, innermost

log = logging.getLogger(__name__)

SEPARATOR = "__"
# OpenAI's rule for function names; a tool whose full name breaks it is left out.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class _Listing:
    version: int
    at: float
    tools: tuple[Tool, ...]
    ok: bool
    detail: str = ""

    def names(self) -> list[str]:
        """The tools' names on their server (without the `<server>__` prefix)."""
        return [t.name.split(SEPARATOR, 1)[1] for t in self.tools]


_listings: dict[int, _Listing] = {}
# Background renewals under way, by server pk (at most one per server).
_renewals: dict[int, asyncio.Task] = {}


def forget_listings() -> None:
    """Forget every cached tool list and renewal under way (tests)."""
    _listings.clear()
    for task in _renewals.values():
        if not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(task.cancel)
    _renewals.clear()


@dataclass(frozen=True)
class _Server:
    """What a call needs of an `McpServer` row, read once (secrets decrypted)."""

    name: str
    transport: str
    url: str
    headers: dict[str, str]
    command: str
    args: tuple[str, ...]
    timeout: float

    @classmethod
    def of(cls, row: McpServer) -> _Server:
        return cls(
            row.name,
            row.transport,
            row.url,
            row.headers,
            row.command,
            tuple(row.args or ()),
            row.timeout_seconds,
        )


@asynccontextmanager
async def session(server: _Server):
    """An initialised `mcp.ClientSession` with the server, closed on exit."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with AsyncExitStack() as stack:
        if server.transport == McpServer.Transport.STDIO:
            # The SDK passes the child only a safe environment (PATH, HOME...),
            # never this process' secrets.
            params = StdioServerParameters(command=server.command, args=list(server.args))
            streams = await stack.enter_async_context(stdio_client(params))
        else:
            http = await stack.enter_async_context(
                create_mcp_http_client(
                    headers=server.headers or None, timeout=httpx.Timeout(server.timeout)
                )
            )
            streams = await stack.enter_async_context(
                streamable_http_client(server.url, http_client=http)
            )
        client = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
        await client.initialize()
        yield client


def _text_of(result: Any) -> str:
    parts = []
    for item in getattr(result, "content", None) or []:
        kind = getattr(item, "type", "")
        if kind == "text":
            parts.append(item.text)
        else:
            parts.append(f"[{kind or 'content'} not shown]")
    if not parts and getattr(result, "structuredContent", None) is not None:
        import json

        parts.append(json.dumps(result.structuredContent, ensure_ascii=False))
    return "\n".join(parts)


def _tool(server: _Server, listed: Any) -> Tool | None:
    name = f"{server.name}{SEPARATOR}{listed.name}"
    if not _NAME.match(name):
        return None
    remote_name = listed.name
    schema = listed.inputSchema if isinstance(listed.inputSchema, dict) else {}
    schema = schema or {"type": "object", "properties": {}}

    async def run(arguments: dict[str, Any], context: ToolContext) -> ToolOutput:
        async with session(server) as client:
            result = await client.call_tool(remote_name, arguments)
        text = _text_of(result)
        if getattr(result, "isError", False):
            raise ToolFailed(text or "The MCP tool reported an error.")
        return ToolOutput(text)

    description = (listed.description or "").strip()[:1000] or f"{listed.name} ({server.name})"
    return Tool(name, description, schema, run, server=server.name)


async def list_server(row: McpServer) -> tuple[bool, str, list[Tool]]:
    """List one server's tools: (up, detail, tools). Never raises."""
    server = _Server.of(row)
    within = min(limits.MCP_LIST_TIMEOUT_SECONDS, server.timeout)
    try:
        async with asyncio.timeout(within):
            async with session(server) as client:
                listed = await client.list_tools()
    except Exception as exc:
        detail = _failure(exc, within)
        log.warning("MCP server %s is down: %s", server.name, detail)
        return False, detail, []
    tools = [t for t in (_tool(server, item) for item in listed.tools) if t is not None]
    return True, f"{len(tools)} tools", tools


def _failure(exc: BaseException, within: float) -> str:
    """A short reason without secrets (headers never appear in exception text we keep)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {within:g} s"
    inner = innermost(exc)
    message = str(inner).split("\n")[0][:200]
    return f"{type(inner).__name__}: {message}" if message else type(inner).__name__


def _save_status(pk: int, ok: bool, detail: str, tools: list[Tool]) -> None:
    McpServer.objects.filter(pk=pk).update(
        status="up" if ok else "down",
        status_detail=detail,
        checked_at=timezone.now(),
        tools=[
            {"name": t.name.split(SEPARATOR, 1)[1], "description": t.description} for t in tools
        ],
    )


async def check(row: McpServer) -> tuple[bool, str, list[Tool]]:
    """List `row` now, remember the result and save it for the admin."""
    ok, detail, tools = await list_server(row)
    _listings[row.pk] = _Listing(row.version, time.monotonic(), tuple(tools), ok, detail)
    await database_sync_to_async(_save_status)(row.pk, ok, detail, tools)
    return ok, detail, tools


def _age(row: McpServer, now: float) -> str:
    """What this process knows of `row`'s tools: `unknown` (no listing for its
    current version), `old` (listed more than MCP_STATUS_TTL_SECONDS ago) or
    `fresh`."""
    cached = _listings.get(row.pk)
    if cached is None or cached.version != row.version:
        return "unknown"
    return "old" if now - cached.at > limits.MCP_STATUS_TTL_SECONDS else "fresh"


async def current_listing(row: McpServer) -> _Listing:
    """`row`'s listing: the one kept when it is fresh, else listed now (the
    admin's checks)."""
    if _age(row, time.monotonic()) != "fresh":
        await check(row)
    return _listings[row.pk]


def _renew(row: McpServer) -> None:
    """List `row` again in the background (once at a time per server)."""
    running = _renewals.get(row.pk)
    if running is not None and not running.done():
        return
    task = asyncio.get_running_loop().create_task(check(row))
    _renewals[row.pk] = task

    def finished(task: asyncio.Task) -> None:
        if _renewals.get(row.pk) is task:
            del _renewals[row.pk]
        if not task.cancelled() and task.exception() is not None:
            log.warning("renewing the listing of MCP server %s failed", row.name)

    task.add_done_callback(finished)


async def server_tools(rows: list[McpServer]) -> list[Tool]:
    """The tools of the enabled servers that answer. A server without a
    listing for its current version is listed now (concurrently, each at most
    MCP_LIST_TIMEOUT_SECONDS); an older listing than MCP_STATUS_TTL_SECONDS is
    used as it is while it is renewed in the background. A down server
    contributes none."""
    now = time.monotonic()
    unknown = []
    for row in rows:
        age = _age(row, now)
        if age == "unknown":
            unknown.append(row)
        elif age == "old":
            _renew(row)
    if unknown:
        await asyncio.gather(*(check(row) for row in unknown))
    tools: list[Tool] = []
    for row in rows:
        listing = _listings.get(row.pk)
        if listing is not None and listing.ok:
            tools.extend(listing.tools)
    return tools
