"""Agent mode on the chat websocket: `tool_call`, `tool_result` and
`approval_request` frames out, `approve` in; steps saved with the message
and shown again with the conversation; the approval pause kept in the
database (it survives a reconnect and times out cleanly); Stop while a
call waits."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from agents.models import AgentStep, ToolPolicy
from chat.models import Message
from tests.chat.test_chat_ws import ask, frames_until, is_end, of, send_message, text_of
from tests.support.clients import call, connect
from tests.support.scripted_server import Reply, ScriptedToolCall

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_process_state", "no_detached_answers", "agent_runner"),
]


def calculator_call(expression: str = "6 * 7") -> Reply:
    return Reply(
        text="Let me compute. ",
        tool_calls=(ScriptedToolCall("calculator", f'{{"expression": "{expression}"}}', "c1"),),
    )


@sync_to_async
def steps_of(message_id: int) -> list[AgentStep]:
    return list(AgentStep.objects.filter(message_id=message_id).order_by("round", "position"))


@sync_to_async
def ask_for(tool: str) -> None:
    ToolPolicy.objects.create(tool=tool, policy=ToolPolicy.Policy.ASK)


async def paused_at_approval(user, scripted_server, *answers: str):
    """A user's agent turn that calls the calculator, which needs approval:
    returns the socket and the frames up to the `approval_request` (the last),
    the answers after the call scripted."""
    await ask_for("calculator")
    scripted_server.script(calculator_call())
    for answer in answers:
        scripted_server.script(Reply(text=answer))
    ws = await connect(user)
    await send_message(ws, "6*7?", agent=True)
    frames = await frames_until(ws, lambda f: f["type"] == "approval_request")
    return ws, frames


async def test_agent_mode_streams_steps_and_saves_them_with_the_message(user, scripted_server):
    scripted_server.script(calculator_call())
    scripted_server.script(Reply(text="It is 42."))
    ws = await connect(user)
    frames = await ask(ws, "What is 6 * 7?", agent=True, timezone="Europe/Paris")

    [tool_call] = of(frames, "tool_call")
    [result] = of(frames, "tool_result")
    assert (tool_call["name"], tool_call["round"]) == ("calculator", 1)
    assert result["step_id"] == tool_call["step_id"]
    assert (result["status"], result["result"]) == ("ok", "6 * 7 = 42")
    assert frames.index(tool_call) < frames.index(result)
    assert text_of(frames, "r1") == "Let me compute. \n\nIt is 42."
    done = of(frames, "done")[0]
    assert done["status"] == "complete"

    [step] = await steps_of(done["message_id"])
    assert (step.tool, step.status, step.result) == ("calculator", "ok", "6 * 7 = 42")
    # Shown again when the conversation is reopened, with its agent mode.
    response = await call(
        "GET",
        f"/api/conversations/{done['conversation_id']}",
        key=None,
        cookies=await _cookies(user),
    )
    body = response.json()
    assert body["agent"] is True
    # ... exactly as the live `tool_result` frame showed it.
    assert body["messages"][-1]["steps"] == [
        {k: v for k, v in result.items() if k not in ("type", "request_id")}
    ]
    # The next message remembers agent mode without saying it again.
    scripted_server.script(Reply(text="Plain."))
    frames = await ask(ws, "again", request_id="r2", conversation_id=done["conversation_id"])
    assert "calculator" in str(scripted_server.chat_requests()[-1].json.get("tools"))
    await ws.disconnect()


async def _cookies(user) -> dict:
    from django.conf import settings

    from tests.support.clients import logged_in

    client, _ = await sync_to_async(logged_in)(user)
    return {settings.SESSION_COOKIE_NAME: client.cookies[settings.SESSION_COOKIE_NAME].value}


async def test_without_agent_mode_no_tool_is_offered(user, scripted_server):
    ws = await connect(user)
    await ask(ws, "hello")
    assert "tools" not in scripted_server.chat_requests()[-1].json
    await ws.disconnect()


async def test_agent_mode_needs_a_runner_with_the_agent_capability(user, agent_runner):
    agent_runner.enable_agents = False
    await sync_to_async(agent_runner.save)()
    ws = await connect(user)
    frames = await ask(ws, "hello", agent=True)
    [error] = of(frames, "error")
    assert error["code"] == "no_runner"
    await ws.disconnect()


@pytest.mark.parametrize("approved", [True, False])
async def test_an_ask_tool_pauses_for_approval(user, scripted_server, approved):
    ws, frames = await paused_at_approval(user, scripted_server, "Answered.")
    request = frames[-1]
    assert (request["name"], request["arguments"]) == ("calculator", '{"expression": "6 * 7"}')
    assert request["timeout_s"] > 0
    [row] = await steps_of(of(frames, "accepted")[0]["assistant_message_id"])
    assert row.status == "awaiting_approval"

    await ws.send_json_to(
        {"type": "approve", "request_id": "a1", "step_id": request["step_id"], "approved": approved}
    )
    frames = await frames_until(ws, is_end("r1"))
    assert of(frames, "approval")[0]["approved"] is approved
    [result] = of(frames, "tool_result")
    if approved:
        assert (result["status"], result["result"]) == ("ok", "6 * 7 = 42")
    else:
        assert result["status"] == "denied" and "denied" in result["error"]
        told = [
            m for m in scripted_server.chat_requests()[1].json["messages"] if m["role"] == "tool"
        ]
        assert "denied" in told[0]["content"]
    # A second decision on the same step is refused.
    await ws.send_json_to(
        {"type": "approve", "request_id": "a2", "step_id": request["step_id"], "approved": True}
    )
    [error] = await frames_until(ws, lambda f: f["type"] == "error")
    assert error["code"] == "not_found"
    await ws.disconnect()


async def test_the_pause_survives_a_reconnect(user, scripted_server):
    ws, frames = await paused_at_approval(user, scripted_server, "After the reload.")
    message_id = of(frames, "accepted")[0]["assistant_message_id"]
    step_id = frames[-1]["step_id"]
    await ws.disconnect()  # a reload: the turn goes on, paused

    other = await connect(user)
    await other.send_json_to(
        {"type": "approve", "request_id": "a1", "step_id": step_id, "approved": True}
    )
    await frames_until(other, lambda f: f["type"] == "approval")
    for _ in range(200):
        message = await sync_to_async(Message.objects.get)(pk=message_id)
        if message.status != "streaming":
            break
        await asyncio.sleep(0.05)
    assert message.status == "complete"
    assert message.content.endswith("After the reload.")
    [step] = await steps_of(message_id)
    assert step.status == "ok"
    await other.disconnect()


async def test_another_user_cannot_approve(user, other_user, scripted_server):
    ws, frames = await paused_at_approval(user, scripted_server)
    intruder = await connect(other_user)
    await intruder.send_json_to(
        {"type": "approve", "request_id": "a1", "step_id": frames[-1]["step_id"], "approved": True}
    )
    [error] = await frames_until(intruder, lambda f: f["type"] == "error")
    assert error["code"] == "not_found"
    await intruder.disconnect()
    await ws.send_json_to({"type": "stop", "request_id": "r1"})
    await frames_until(ws, is_end("r1"))
    await ws.disconnect()


async def test_an_unanswered_approval_times_out_as_denied(user, scripted_server, agent_settings):
    agent_settings.approval_timeout_seconds = 1
    await sync_to_async(agent_settings.save)()
    await ask_for("calculator")
    scripted_server.script(calculator_call())
    scripted_server.script(Reply(text="Nobody answered."))
    ws = await connect(user)
    frames = await ask(ws, "6*7?", agent=True)
    [result] = of(frames, "tool_result")
    assert result["status"] == "denied" and "in time" in result["error"]
    assert of(frames, "done")[0]["status"] == "complete"
    await ws.disconnect()


async def test_stop_while_a_call_waits_cancels_it(user, scripted_server):
    ws, frames = await paused_at_approval(user, scripted_server)
    await ws.send_json_to({"type": "stop", "request_id": "r1"})
    frames = await frames_until(ws, is_end("r1"))
    done = of(frames, "done")[0]
    assert done["status"] == "stopped"
    [step] = await steps_of(done["message_id"])
    assert step.status == "cancelled"
    assert len(scripted_server.chat_requests()) == 1
    await ws.disconnect()


async def test_stop_while_a_call_runs_cancels_it(user, scripted_server):
    import time

    from tests.agents.test_mcp import stdio_server

    await stdio_server()  # a real MCP server whose `sleep` tool takes its time
    scripted_server.script(
        Reply(text="", tool_calls=(ScriptedToolCall("local__sleep", '{"seconds": 60}', "s1"),))
    )
    ws = await connect(user)
    await send_message(ws, "wait", agent=True)
    frames = await frames_until(ws, lambda f: f["type"] == "tool_call", timeout=30)
    message_id = of(frames, "accepted")[0]["assistant_message_id"]
    [row] = await steps_of(message_id)
    assert row.status == "running"  # no approval: the call itself is under way
    await asyncio.sleep(1.5)  # the server started and working on the call

    stopped_at = time.monotonic()
    await ws.send_json_to({"type": "stop", "request_id": "r1"})
    frames = await frames_until(ws, is_end("r1"), timeout=15)
    assert time.monotonic() - stopped_at < 10  # not the minute the call would take
    done = of(frames, "done")[0]
    assert (done["status"], done["finish_reason"]) == ("stopped", "cancelled")
    assert not of(frames, "error")
    [step] = await steps_of(message_id)
    assert (step.status, step.error) == ("cancelled", "Stopped by the user.")
    assert step.duration_ms is not None and step.duration_ms >= 1000
    assert len(scripted_server.chat_requests()) == 1  # the model was not asked again
    await ws.disconnect()


async def test_document_search_citations_are_kept_with_the_answer(user, scripted_server):
    from tests.support.documents import add_and_ingest, drop_all_chroma_collections, lighthouse_pdf

    await sync_to_async(drop_all_chroma_collections)()
    document = await sync_to_async(add_and_ingest)(user, "aldermoor.pdf", lighthouse_pdf())
    scripted_server.script(
        Reply(
            text="",
            tool_calls=(
                ScriptedToolCall(
                    "search_documents", '{"query": "Who built the Aldermoor lighthouse?"}', "s1"
                ),
            ),
        )
    )
    scripted_server.script(Reply(text="Thomas Vell built it in 1887 [1]."))
    ws = await connect(user)
    frames = await ask(ws, "Who built the lighthouse?", agent=True)

    [result] = of(frames, "tool_result")
    assert result["status"] == "ok" and result["result"].startswith("[1] aldermoor.pdf")
    [sources] = of(frames, "sources")
    assert sources["sources"][0]["document_id"] == document.pk
    assert sources["sources"][0]["page"] == 1
    done = of(frames, "done")[0]
    saved = await sync_to_async(Message.objects.get)(pk=done["message_id"])
    assert saved.sources[0]["document_id"] == document.pk
    assert "Thomas Vell" in saved.content
    await ws.disconnect()
