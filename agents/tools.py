"""The tool protocol and the registry of what a user's agent turn may call.

A `Tool` is a name, a description, a JSON Schema for its arguments (what the
model is shown, OpenAI's `tools` shape), its `policy` (allow / ask) and a
coroutine `run(arguments, context) -> ToolOutput`. Built-in tools live in
agents/builtin.py, MCP servers' tools are wrapped by agents/mcp.py; both meet
here, filtered by `ToolPolicy` (deny leaves a tool out, groups limit who
sees it) before the model ever sees the list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from agents.models import AgentSettings, ToolPolicy


@dataclass
class ToolContext:
    """What a tool may know about the turn it runs in."""

    user: Any
    timezone: str = ""
    collection_ids: tuple[int, ...] = ()
    settings: AgentSettings = field(default_factory=AgentSettings)
    # Sources cited by search_documents so far: numbering continues across calls.
    sources: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ToolOutput:
    """A tool's answer: `text` for the model, and the sources it cites (if any)."""

    text: str
    sources: tuple[dict[str, Any], ...] = ()


class ToolFailed(Exception):
    """A tool could not do what was asked; the message is told to the model."""


def innermost(exc: BaseException) -> BaseException:
    """The first real error inside exception groups (the MCP SDK's anyio task
    groups wrap what went wrong)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], ToolContext], Awaitable[ToolOutput]]
    policy: str = ToolPolicy.Policy.ALLOW
    server: str = ""  # the MCP server's name; "" for a built-in tool

    def spec(self) -> dict[str, Any]:
        """The tool as the model sees it (OpenAI's function tool shape)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def _policies() -> dict[tuple[str, str], tuple[str, set[int]]]:
    """(server name or "", tool) -> (policy, group ids). Synchronous."""
    found = {}
    for row in ToolPolicy.objects.select_related("server").prefetch_related("groups"):
        key = (row.server.name if row.server_id else "", row.tool)
        found[key] = (row.policy, {g.pk for g in row.groups.all()})
    return found


def _user_groups(user) -> set[int]:
    return set(user.groups.values_list("pk", flat=True)) if user is not None else set()


def apply_policies(
    tools: list[Tool], policies: dict[tuple[str, str], tuple[str, set[int]]], user_groups: set[int]
) -> list[Tool]:
    """The tools a user of `user_groups` may use, each with its policy; denied ones left out."""
    kept = []
    for tool in tools:
        local_name = tool.name.split("__", 1)[1] if tool.server else tool.name
        policy, groups = policies.get((tool.server, local_name), (ToolPolicy.Policy.ALLOW, set()))
        if policy == ToolPolicy.Policy.DENY:
            continue
        if groups and not (groups & user_groups):
            continue
        kept.append(
            Tool(tool.name, tool.description, tool.parameters, tool.run, policy, tool.server)
        )
    return kept


def _load(user) -> tuple[AgentSettings, dict, set[int], list]:
    from agents.models import McpServer

    servers = list(McpServer.objects.filter(enabled=True))
    return AgentSettings.current(), _policies(), _user_groups(user), servers


async def available_tools(context: ToolContext, *, interactive: bool = True) -> dict[str, Tool]:
    """Every tool `context.user` may call in this turn, by name: the built-in
    ones and those of the MCP servers that answer (a server that is down is
    left out, never a failed turn). Without an `interactive` user to ask (the
    HTTP API), *ask* tools are left out too. Sets `context.settings`."""
    from channels.db import database_sync_to_async

    from agents import builtin, mcp

    settings, policies, user_groups, servers = await database_sync_to_async(_load)(context.user)
    context.settings = settings
    tools = builtin.tools(settings) + await mcp.server_tools(servers)
    allowed = apply_policies(tools, policies, user_groups)
    if not interactive:
        allowed = [t for t in allowed if t.policy != ToolPolicy.Policy.ASK]
    return {t.name: t for t in allowed}


def _untitled(schema: Any) -> Any:
    """A JSON Schema without pydantic's `title`s (noise in the model's prompt)."""
    if isinstance(schema, dict):
        return {k: _untitled(v) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_untitled(v) for v in schema]
    return schema


def builtin[A: BaseModel](
    name: str,
    description: str,
    arguments: type[A],
    run: Callable[[A, ToolContext], Awaitable[ToolOutput]],
) -> Tool:
    """A built-in tool whose arguments are the pydantic model `arguments`:
    the schema the model is shown is generated from it, and `run` gets the
    validated model (arguments that do not fit are a `ToolFailed` the model
    is told, naming the argument)."""

    async def checked(args: dict[str, Any], context: ToolContext) -> ToolOutput:
        try:
            parsed = arguments.model_validate(args)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            # The argument's name only: an optional one's location goes on with
            # pydantic's name for the member of `X | None` that failed.
            where = ".".join(str(part) for part in error["loc"][:1]) or "arguments"
            raise ToolFailed(f"`{where}`: {error['msg']}.") from None
        return await run(parsed, context)

    return Tool(name, description, _untitled(arguments.model_json_schema()), checked)
