"""MCP servers through the `mcp` SDK, against real servers started here
(tests/support/mcp_server.py): one over stdio, one over streamable HTTP with
an auth header, one that dies mid-call; a server that is down is shown as
such and its tools left out, never a failed turn; per-tool policies."""

from __future__ import annotations

import asyncio

from django.contrib.auth.models import Group

import pytest
from asgiref.sync import sync_to_async

from agents import mcp
from agents.models import AgentSettings, McpServer, ToolPolicy
from agents.tools import ToolContext, available_tools
from tests.agents.test_loop import agent, calls, finished, text
from tests.support.mcp_server import McpHttpServer, stdio_command
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_process_state", "agent_runner"),
]

TOKEN = "mcp-test-token-0123456789"


@pytest.fixture(scope="module")
def http_server():
    server = McpHttpServer(TOKEN).start()
    yield server
    server.stop()


@sync_to_async
def stdio_server(name: str = "local") -> McpServer:
    command, args = stdio_command()
    return McpServer.objects.create(
        name=name, transport="stdio", command=command, args=args, timeout_seconds=20
    )


@sync_to_async
def http_row(url: str, token: str, name: str = "remote") -> McpServer:
    row = McpServer(name=name, transport="http", url=url, timeout_seconds=20)
    row.headers = {"Authorization": f"Bearer {token}"}
    row.save()
    return row


async def tools_for(user) -> dict:
    return await available_tools(ToolContext(user=user))


async def failed_call(scripted_server, user, tools, call, answer: str, step_timeout: float):
    """A turn whose one tool `call` (name, arguments) fails, then the model
    answers `answer`: the failed step, once the answer is checked to come through."""
    scripted_server.script(calls(call))
    scripted_server.script(Reply(text=answer))
    events = await agent(user, tools, AgentSettings(step_timeout_seconds=step_timeout))
    [step] = finished(events)
    assert step.status == "error"
    assert text(events) == answer
    return step


async def test_a_stdio_server_lists_its_tools_and_runs_one(user, scripted_server):
    await stdio_server()
    tools = await tools_for(user)
    assert {"local__echo", "local__add", "local__fail", "calculator"} <= set(tools)

    scripted_server.script(calls(("local__add", '{"a": 2, "b": 3}')))
    scripted_server.script(Reply(text="Five."))
    events = await agent(user, tools)
    [step] = finished(events)
    assert (step.status, step.result) == ("ok", "5.0")
    assert text(events) == "Five."
    row = await sync_to_async(McpServer.objects.get)(name="local")
    assert row.status == "up" and "echo" in {t["name"] for t in row.tools}


async def test_an_http_server_with_an_auth_header(user, scripted_server, http_server):
    row = await http_row(http_server.url, TOKEN)
    assert TOKEN not in row.headers_encrypted  # encrypted at rest, like runner keys
    tools = await tools_for(user)
    assert "remote__echo" in tools

    scripted_server.script(calls(("remote__echo", '{"text": "hi"}'), ("remote__fail", "{}")))
    scripted_server.script(Reply(text="Echoed."))
    events = await agent(user, tools)
    by_name = {s.name: s for s in finished(events)}
    assert by_name["remote__echo"].result == "echo: hi"
    assert by_name["remote__fail"].status == "error"
    assert "failed on purpose" in by_name["remote__fail"].error


async def test_a_server_that_refuses_the_credentials_is_down_and_left_out(
    user, scripted_server, http_server
):
    await http_row(http_server.url, "wrong-token")
    tools = await tools_for(user)
    assert not any(name.startswith("remote__") for name in tools)
    assert "calculator" in tools  # the turn goes on with the other tools
    row = await sync_to_async(McpServer.objects.get)(name="remote")
    assert row.status == "down" and row.status_detail
    assert "wrong-token" not in row.status_detail


async def test_a_server_that_is_not_there_is_down(user):
    await http_row("http://127.0.0.1:9/mcp", TOKEN, name="gone")
    tools = await tools_for(user)
    assert not any(name.startswith("gone__") for name in tools)
    row = await sync_to_async(McpServer.objects.get)(name="gone")
    assert row.status == "down"


@pytest.mark.usefixtures("no_detached_answers")
async def test_a_whole_turn_with_one_server_down_answers_with_the_others(user, scripted_server):
    from tests.chat.test_chat_ws import ask, of, text_of
    from tests.support.clients import connect

    await stdio_server()
    await http_row("http://127.0.0.1:9/mcp", TOKEN, name="gone")
    scripted_server.script(calls(("local__add", '{"a": 2, "b": 3}')))
    scripted_server.script(Reply(text="Five."))
    ws = await connect(user)
    frames = await ask(ws, "2 + 3?", agent=True)

    offered = {t["function"]["name"] for t in scripted_server.chat_requests()[0].json["tools"]}
    assert "local__add" in offered and "calculator" in offered
    assert not any(name.startswith("gone__") for name in offered)
    [result] = of(frames, "tool_result")
    assert (result["name"], result["status"], result["result"]) == ("local__add", "ok", "5.0")
    assert not of(frames, "error")
    assert of(frames, "done")[0]["status"] == "complete"
    assert text_of(frames, "r1") == "Five."
    statuses = await sync_to_async(dict)(McpServer.objects.values_list("name", "status"))
    assert statuses == {"gone": "down", "local": "up"}
    await ws.disconnect()


async def test_a_server_known_to_be_down_is_not_waited_for(user):
    import dataclasses
    import sys
    import time

    from agents import limits

    # Started, but never answers `initialize`: listing it waits its whole time limit.
    row = await sync_to_async(McpServer.objects.create)(
        name="mute",
        transport="stdio",
        command=sys.executable,
        args=["-c", "import time; time.sleep(60)"],
        timeout_seconds=1,
    )
    began = time.monotonic()
    tools = await tools_for(user)
    first_listing = time.monotonic() - began
    assert first_listing >= 1 and not any(n.startswith("mute__") for n in tools)
    first = mcp._listings[row.pk]
    assert not first.ok

    # Once its listing is older than the TTL, a turn goes on with what is
    # known (down) and the server is listed again in the background.
    mcp._listings[row.pk] = dataclasses.replace(
        first, at=first.at - limits.MCP_STATUS_TTL_SECONDS - 1
    )
    began = time.monotonic()
    tools = await tools_for(user)
    assert time.monotonic() - began < first_listing / 2
    assert "calculator" in tools and not any(n.startswith("mute__") for n in tools)
    renewal = mcp._renewals[row.pk]
    await tools_for(user)  # a second turn meanwhile starts no second renewal
    assert mcp._renewals[row.pk] is renewal
    await asyncio.wait_for(renewal, 30)
    assert mcp._listings[row.pk].at > first.at and not mcp._listings[row.pk].ok
    assert row.pk not in mcp._renewals
    saved = await sync_to_async(McpServer.objects.get)(pk=row.pk)
    assert saved.status == "down" and saved.status_detail == "no answer within 1 s"


async def test_a_server_that_dies_mid_call_is_an_error_result(user, scripted_server):
    await stdio_server()
    tools = await tools_for(user)
    step = await failed_call(scripted_server, user, tools, ("local__die", "{}"), "It died.", 20)
    assert step.error
    # The next call starts the server again.
    scripted_server.script(calls(("local__echo", '{"text": "back"}')))
    scripted_server.script(Reply(text="Back."))
    events = await agent(user, tools)
    assert finished(events)[0].result == "echo: back"


async def test_policies_deny_ask_and_groups(user, other_user):
    server = await stdio_server()

    @sync_to_async
    def set_policies():
        ToolPolicy.objects.create(server=server, tool="die", policy="deny")
        ToolPolicy.objects.create(server=server, tool="sleep", policy="ask")
        ToolPolicy.objects.create(tool="calculator", policy="deny")
        staff = Group.objects.create(name="staff")
        policy = ToolPolicy.objects.create(server=server, tool="echo", policy="allow")
        policy.groups.add(staff)
        user.groups.add(staff)

    await set_policies()
    mine = await tools_for(user)
    theirs = await tools_for(other_user)
    assert "local__die" not in mine and "calculator" not in mine
    assert mine["local__sleep"].policy == "ask"
    assert "local__echo" in mine and "local__echo" not in theirs
    # No one to ask on the HTTP API: ask tools are left out there.
    api_tools = await available_tools(ToolContext(user=user), interactive=False)
    assert "local__sleep" not in api_tools


async def test_listings_are_reused_until_the_server_changes(user):
    server = await stdio_server()
    await tools_for(user)
    first = mcp._listings[server.pk]
    await tools_for(user)
    assert mcp._listings[server.pk] is first
    server.timeout_seconds = 15
    await sync_to_async(server.save)()
    await tools_for(user)
    assert mcp._listings[server.pk] is not first


def test_the_admin_shows_status_and_never_the_headers(admin_client, user):
    from asgiref.sync import async_to_sync

    row = McpServer(name="gone", transport="http", url="http://127.0.0.1:9/mcp")
    row.headers = {"Authorization": f"Bearer {TOKEN}"}
    row.save()
    async_to_sync(tools_for)(user)  # lists it: down

    listing = admin_client.get("/admin/agents/mcpserver/").content.decode()
    assert "down" in listing
    page = admin_client.get(f"/admin/agents/mcpserver/{row.pk}/change/").content.decode()
    assert TOKEN not in page and row.headers_encrypted not in page
    assert "Stored, encrypted: Authorization" in page

    # A blank headers field keeps them; new ones replace them, encrypted.
    form = {
        "name": "gone",
        "transport": "http",
        "enabled": "on",
        "url": "http://127.0.0.1:9/mcp",
        "command": "",
        "args": "[]",
        "timeout_seconds": "30",
        "headers": "",
    }
    response = admin_client.post(f"/admin/agents/mcpserver/{row.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    row.refresh_from_db()
    assert row.headers == {"Authorization": f"Bearer {TOKEN}"}
    response = admin_client.post(
        f"/admin/agents/mcpserver/{row.pk}/change/", form | {"headers": "not json"}
    )
    assert response.status_code == 200 and "JSON object" in response.content.decode()
    assert "not json" not in response.content.decode()


def test_a_policy_names_a_tool_that_exists(admin_client):
    from asgiref.sync import async_to_sync

    local = async_to_sync(stdio_server)()
    gone = McpServer.objects.create(name="gone", transport="http", url="http://127.0.0.1:9/mcp")

    def add(**fields):
        form = {"server": "", "tool": "", "policy": "ask"} | fields
        return admin_client.post("/admin/agents/toolpolicy/add/", form, follow=True)

    # A typo would leave the real tool allowed: refused, with the real names.
    page = add(tool="calculater").content.decode()
    assert "There is no built-in tool named &#x27;calculater&#x27;" in page
    assert "calculator, current_time, fetch_url" in page
    page = add(server=local.pk, tool="ecko").content.decode()
    assert "The MCP server local lists no tool named &#x27;ecko&#x27;" in page
    assert "echo" in page and "sleep" in page
    assert not ToolPolicy.objects.exists()

    assert add(tool="fetch_url").redirect_chain
    page = add(server=local.pk, tool="echo")
    assert page.redirect_chain and "down" not in page.content.decode()
    assert set(ToolPolicy.objects.values_list("tool", "policy")) == {
        ("fetch_url", "ask"),
        ("echo", "ask"),
    }
    # A server that is down cannot be asked: kept, with a warning saying so.
    page = add(server=gone.pk, tool="anything")
    assert page.redirect_chain
    assert "The MCP server gone is down (" in page.content.decode()
    assert "could not be checked against its tools" in page.content.decode()
    assert ToolPolicy.objects.filter(server=gone, tool="anything").exists()


async def test_stop_during_an_mcp_call_and_a_hanging_one(user, scripted_server):
    from agents.loop import StepStarted, run_agent
    from agents.steps import MemorySteps
    from runners.base import ChatMessage, ChatRequest
    from runners.router import route

    await stdio_server()
    tools = await tools_for(user)
    # A call that hangs past the step limit is stopped and told to the model.
    hanging = ("local__sleep", '{"seconds": 60}')
    step = await failed_call(scripted_server, user, tools, hanging, "Too slow.", 3)
    assert "in time" in step.error

    # Stop while the MCP server is working: the call is cancelled promptly.
    scripted_server.script(calls(("local__sleep", '{"seconds": 60}')))
    request = ChatRequest(
        messages=(ChatMessage(role="user", content="wait"),),
        tools=tuple(t.spec() for t in tools.values()),
    )
    store = MemorySteps()
    started = asyncio.Event()

    async def consume():
        async for event in run_agent(
            request, lambda r: route(r), tools, ToolContext(user=user), store
        ):
            if isinstance(event, StepStarted):
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.sleep(1.5)  # the server is started and the call under way
    task.cancel()
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [s.status for s in store.steps] == ["cancelled"]
