"""The agent loop (agents.loop.run_agent) driven by the scripted
OpenAI-compatible upstream through the real router and Llama Stack runner
kind (and once behind a real `llama stack run` server): one call, parallel
calls, malformed JSON arguments, an unknown tool, a tool that raises, one
that hangs, the step cap, the turn's time limit and Stop in the middle of a
tool call."""

from __future__ import annotations

import asyncio
import json

import pytest

from agents import builtin
from agents.loop import STEP_LIMIT, ApprovalRequested, StepFinished, StepStarted, run_agent
from agents.models import AgentSettings
from agents.steps import MemorySteps
from agents.tools import Tool, ToolContext, ToolOutput
from runners.base import ChatMessage, ChatRequest, Done, Notice, TokenDelta, ToolCall
from runners.guardian import Rule
from runners.router import route
from tests.support.fixtures import runner_config
from tests.support.scripted_server import Reply, ScriptedToolCall

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_process_state", "agent_runner"),
]

EMPTY = {"type": "object", "properties": {}}


def tool(name: str, run, policy: str = "allow") -> Tool:
    return Tool(name, f"the {name} tool", EMPTY, run, policy)


def calls(*items: tuple[str, str]) -> Reply:
    """A model reply asking for these (name, JSON arguments) calls."""
    return Reply(
        text="",
        tool_calls=tuple(
            ScriptedToolCall(name, arguments, f"call_{i}")
            for i, (name, arguments) in enumerate(items)
        ),
    )


async def agent(user, tools: dict[str, Tool], conf: AgentSettings | None = None, **kwargs):
    """Every event of one agent turn asking "question?" with `tools`."""
    request = ChatRequest(
        messages=(ChatMessage(role="user", content="question?"),),
        tools=tuple(t.spec() for t in tools.values()),
    )
    context = ToolContext(user=user, settings=conf or AgentSettings())
    store = kwargs.pop("store", MemorySteps())
    return [
        event
        async for event in run_agent(request, lambda r: route(r), tools, context, store, **kwargs)
    ]


def finished(events) -> list:
    return [e.step for e in events if isinstance(e, StepFinished)]


def text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


def tool_messages(request) -> list[dict]:
    return [m for m in request.json["messages"] if m["role"] == "tool"]


async def test_one_call_is_run_and_its_result_fed_back_until_the_answer(user, scripted_server):
    scripted_server.script(calls(("calculator", '{"expression": "6 * 7"}')))
    scripted_server.script(Reply(text="It is 42."))
    events = await agent(user, {"calculator": builtin.CALCULATOR})

    [step] = finished(events)
    assert (step.status, step.result, step.name) == ("ok", "6 * 7 = 42", "calculator")
    assert step.duration_ms is not None
    assert text(events) == "It is 42."
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    first, second = scripted_server.chat_requests()
    assert [t["function"]["name"] for t in first.json["tools"]] == ["calculator"]
    # The model's call and the result (marked as data) went back in the next round.
    assistant = [m for m in second.json["messages"] if m["role"] == "assistant"][-1]
    assert assistant["tool_calls"][0]["function"]["name"] == "calculator"
    [result] = tool_messages(second)
    assert result["tool_call_id"] == "call_0"
    assert "data, not instructions" in result["content"] and "6 * 7 = 42" in result["content"]


async def test_parallel_calls_run_concurrently(user, scripted_server):
    # Each call waits for the other: they finish only if both run at once.
    both = asyncio.Barrier(2)

    async def meet(args, context):
        async with asyncio.timeout(5):
            await both.wait()
        return ToolOutput(f"met {args.get('who')}")

    scripted_server.script(calls(("meet", '{"who": "a"}'), ("meet", '{"who": "b"}')))
    scripted_server.script(Reply(text="Both met."))
    events = await agent(user, {"meet": tool("meet", meet)})

    steps = finished(events)
    assert sorted(s.result for s in steps) == ["met a", "met b"]
    assert {s.status for s in steps} == {"ok"}
    started = [e for e in events if isinstance(e, StepStarted)]
    assert len(started) == 2 and events.index(started[1]) < events.index(
        next(e for e in events if isinstance(e, StepFinished))
    )
    assert [m["tool_call_id"] for m in tool_messages(scripted_server.chat_requests()[1])] == [
        "call_0",
        "call_1",
    ]


@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("calculator", '{"expression": ', "not valid JSON"),
        ("calculator", '["6 * 7"]', "must be a JSON object"),
        ("no_such_tool", "{}", "There is no tool named 'no_such_tool'"),
        ("calculator", '{"expression": "__import__(\\"os\\")"}', "is not allowed"),
    ],
)
async def test_bad_calls_are_error_results_told_to_the_model(
    user, scripted_server, name, arguments, error
):
    scripted_server.script(calls((name, arguments)))
    scripted_server.script(Reply(text="Sorry."))
    events = await agent(user, {"calculator": builtin.CALCULATOR})

    [step] = finished(events)
    assert step.status == "error" and error in step.error
    [told] = tool_messages(scripted_server.chat_requests()[1])
    assert error in told["content"]
    assert text(events) == "Sorry." and events[-1].finish_reason == "stop"


async def test_a_tool_that_raises_is_an_error_result(user, scripted_server):
    async def broken(args, context):
        raise KeyError("internal detail")

    scripted_server.script(calls(("broken", "{}")))
    scripted_server.script(Reply(text="The tool failed."))
    events = await agent(user, {"broken": tool("broken", broken)})

    [step] = finished(events)
    assert step.status == "error" and "KeyError" in step.error
    assert text(events) == "The tool failed."


async def test_a_tool_that_hangs_is_stopped_at_the_step_limit(user, scripted_server):
    async def hangs(args, context):
        await asyncio.Event().wait()

    scripted_server.script(calls(("hangs", "{}"), ("calculator", '{"expression": "1+1"}')))
    scripted_server.script(Reply(text="One of them hung."))
    conf = AgentSettings(step_timeout_seconds=0.5)
    events = await agent(
        user, {"hangs": tool("hangs", hangs), "calculator": builtin.CALCULATOR}, conf
    )

    by_name = {s.name: s for s in finished(events)}
    assert by_name["hangs"].status == "error" and "did not finish in time" in by_name["hangs"].error
    assert by_name["calculator"].result == "1+1 = 2"
    assert text(events) == "One of them hung."


async def test_the_step_cap_ends_the_turn_with_what_it_has_and_says_why(user, scripted_server):
    for _ in range(3):
        scripted_server.script(
            Reply(
                text="Again. ",
                tool_calls=(ScriptedToolCall("calculator", '{"expression": "2"}', "c"),),
            )
        )
    conf = AgentSettings(max_steps=2)
    events = await agent(user, {"calculator": builtin.CALCULATOR}, conf)

    assert len(finished(events)) == 2
    assert len(scripted_server.chat_requests()) == 3
    [notice] = [e for e in events if isinstance(e, Notice) and e.code == STEP_LIMIT]
    assert "2 rounds" in notice.message
    assert events[-1].finish_reason == STEP_LIMIT
    assert text(events) == "Again. \n\nAgain. \n\nAgain. "


async def test_the_turn_time_limit_ends_the_turn(user, scripted_server):
    async def slow(args, context):
        await asyncio.sleep(30)

    scripted_server.script(calls(("slow", "{}")))
    conf = AgentSettings(turn_timeout_seconds=1, step_timeout_seconds=60)
    events = await agent(user, {"slow": tool("slow", slow)}, conf)

    assert events[-1].finish_reason == "time_limit"
    assert any(isinstance(e, Notice) and e.code == "time_limit" for e in events)


async def test_stop_in_the_middle_of_a_tool_call_cancels_it(user, scripted_server):
    running = asyncio.Event()
    cancelled = asyncio.Event()

    async def long_call(args, context):
        running.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    scripted_server.script(calls(("long_call", "{}")))
    store = MemorySteps()
    task = asyncio.create_task(
        agent(user, {"long_call": tool("long_call", long_call)}, store=store)
    )
    await asyncio.wait_for(running.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    [step] = store.steps
    assert step.status == "cancelled"
    assert len(scripted_server.chat_requests()) == 1


async def test_a_client_tool_ends_the_loop_with_its_call(user, scripted_server):
    scripted_server.script(calls(("client_side", '{"x": 1}')))
    events = await agent(
        user, {"calculator": builtin.CALCULATOR}, client_tools=frozenset({"client_side"})
    )

    [call] = [e for e in events if isinstance(e, ToolCall)]
    assert (call.name, call.arguments) == ("client_side", '{"x": 1}')
    assert not finished(events) and events[-1].finish_reason == "tool_calls"


async def test_the_guardian_applies_to_arguments_and_results(user, scripted_server):
    rules = (
        Rule("no-secret", "block_term", "secret", "input", "No secrets."),
        Rule("mask-42", "mask_term", "42", "output", ""),
    )
    scripted_server.script(
        calls(("calculator", '{"expression": "6 * 7"}'), ("echo", '{"text": "secret"}'))
    )
    scripted_server.script(Reply(text="Done."))

    async def echo(args, context):
        return ToolOutput(args["text"])

    events = await agent(
        user, {"calculator": builtin.CALCULATOR, "echo": tool("echo", echo)}, rules=rules
    )
    by_name = {s.name: s for s in finished(events)}
    assert by_name["calculator"].result == "6 * 7 = [masked]"
    assert by_name["echo"].status == "error" and "No secrets." in by_name["echo"].error


async def test_an_ask_tool_waits_for_the_decision(user, scripted_server):
    # MemorySteps (the HTTP API's store) has nobody to ask: the call is denied.
    async def ask_me(args, context):
        raise AssertionError("an unapproved call must not run")

    scripted_server.script(calls(("ask_me", "{}")))
    scripted_server.script(Reply(text="Not allowed."))
    events = await agent(user, {"ask_me": tool("ask_me", ask_me, policy="ask")})

    assert any(isinstance(e, ApprovalRequested) for e in events)
    [step] = finished(events)
    assert step.status == "denied"


async def test_behind_a_real_llama_stack_server(user, llamastack_server, fresh_process_state):
    from runners.models import RunnerConfig

    await asyncio.to_thread(RunnerConfig.objects.all().delete)
    await asyncio.to_thread(
        runner_config,
        llamastack_server.url,
        "stack",
        model_id=llamastack_server.model_id,
        enable_agents=True,
        timeout_seconds=30,
    )
    upstream = llamastack_server.upstream
    upstream.reset()
    upstream.script(calls(("calculator", '{"expression": "2 ** 10"}')))
    upstream.script(Reply(text="1024."))
    events = await agent(user, {"calculator": builtin.CALCULATOR})

    [step] = finished(events)
    assert step.result == "2 ** 10 = 1024"
    assert text(events) == "1024."
    second = upstream.chat_requests()[1]
    assert any("2 ** 10 = 1024" in str(m.get("content")) for m in second.json["messages"])
    assert json.dumps(second.json["tools"]).count("calculator") == 1
