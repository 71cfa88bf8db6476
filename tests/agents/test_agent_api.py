"""Agent mode on /v1/chat/completions: opted into with `breezeweb.agent`;
the steps come back in `breezeweb.steps` and, streamed, as `breezeweb.step`
events that OpenAI clients pass over; client-side tools work as before."""

from __future__ import annotations

import json

import httpx
import pytest
from asgiref.sync import sync_to_async

from agents.models import ToolPolicy
from tests.support.clients import call
from tests.support.scripted_server import Reply, ScriptedToolCall

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_process_state", "agent_runner"),
]


def body(**breezeweb) -> dict:
    return {
        "model": "auto",
        "messages": [{"role": "user", "content": "What is 6 * 7?"}],
        "breezeweb": {"agent": True, **breezeweb},
    }


def script_calculation(server) -> None:
    server.script(
        Reply(text="", tool_calls=(ScriptedToolCall("calculator", '{"expression": "6*7"}', "c1"),))
    )
    server.script(Reply(text="It is 42."))


def sse_blocks(text: str) -> list[tuple[str | None, object]]:
    """(event name, data) of each SSE block."""
    found = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                raw = line[len("data: ") :]
                data = raw if raw == "[DONE]" else json.loads(raw)
        found.append((name, data))
    return found


async def test_a_completion_in_agent_mode_returns_its_steps(api_key, scripted_server):
    script_calculation(scripted_server)
    response = await call("POST", "/v1/chat/completions", key=api_key, body=body())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["content"] == "It is 42."
    assert answer["choices"][0]["finish_reason"] == "stop"
    [step] = answer["breezeweb"]["steps"]
    assert (step["name"], step["status"], step["result"]) == ("calculator", "ok", "6*7 = 42")
    assert step["step_id"] is None


async def test_without_the_extension_tools_stay_the_clients(api_key, scripted_server):
    scripted_server.script(
        Reply(text="", tool_calls=(ScriptedToolCall("lookup", '{"q": "x"}', "c1"),))
    )
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    request = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    answer = (await call("POST", "/v1/chat/completions", key=api_key, body=request)).json()
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert "steps" not in answer["breezeweb"]
    sent = [t["function"]["name"] for t in scripted_server.chat_requests()[0].json["tools"]]
    assert sent == ["lookup"]


async def test_client_tools_beside_server_tools(api_key, scripted_server):
    script = Reply(text="", tool_calls=(ScriptedToolCall("lookup", '{"q": "x"}', "c9"),))
    scripted_server.script(script)
    request = body()
    request["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    answer = (await call("POST", "/v1/chat/completions", key=api_key, body=request)).json()
    assert answer["choices"][0]["message"]["tool_calls"][0]["id"] == "c9"
    sent = {t["function"]["name"] for t in scripted_server.chat_requests()[0].json["tools"]}
    assert {"lookup", "calculator", "search_documents"} <= sent


async def test_ask_tools_are_not_offered_on_the_api(api_key, scripted_server):
    await sync_to_async(ToolPolicy.objects.create)(tool="calculator", policy="ask")
    scripted_server.script(Reply(text="No calculator."))
    await call("POST", "/v1/chat/completions", key=api_key, body=body())
    sent = {t["function"]["name"] for t in scripted_server.chat_requests()[0].json["tools"]}
    assert "calculator" not in sent and "current_time" in sent


async def test_a_stream_carries_steps_as_named_events(api_key, scripted_server):
    script_calculation(scripted_server)
    response = await call(
        "POST", "/v1/chat/completions", key=api_key, body={**body(), "stream": True}
    )
    assert response.status_code == 200
    blocks = sse_blocks(response.text)
    steps = [data["breezeweb"] for name, data in blocks if name == "breezeweb.step"]
    assert [s["event"] for s in steps] == ["tool_call", "tool_result"]
    assert steps[1]["step"]["result"] == "6*7 = 42"
    for name, data in blocks:
        if name == "breezeweb.step":
            assert data["object"] == "chat.completion.chunk"
            assert data["choices"][0]["delta"] == {}
    text = "".join(
        d["choices"][0]["delta"].get("content", "")
        for n, d in blocks
        if n is None and isinstance(d, dict) and d.get("choices")
    )
    assert text == "It is 42."
    final = [d for n, d in blocks if isinstance(d, dict) and d.get("breezeweb", {}).get("runner")]
    assert final[-1]["breezeweb"]["steps"][0]["name"] == "calculator"


async def test_the_openai_client_reads_an_agent_stream(api_key, scripted_server):
    import openai

    from breezeweb.asgi import application

    script_calculation(scripted_server)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=application))
    client = openai.AsyncOpenAI(
        base_url="http://localhost/v1", api_key=api_key, http_client=http, max_retries=0
    )
    stream = await client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "6*7?"}],
        stream=True,
        extra_body={"breezeweb": {"agent": True}},
    )
    pieces, steps = [], []
    async for chunk in stream:
        ext = (chunk.model_extra or {}).get("breezeweb") or {}
        if "step" in ext:
            steps.append(ext["step"]["status"])
        elif chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "It is 42."
    assert steps == ["running", "ok"]
    await http.aclose()


async def test_the_step_cap_ends_the_completion_and_says_why(
    api_key, scripted_server, agent_settings
):
    from chat.models import Message

    agent_settings.max_steps = 1
    await sync_to_async(agent_settings.save)()
    for n in (1, 2):
        scripted_server.script(
            Reply(
                text=f"Step {n}. ",
                tool_calls=(ScriptedToolCall("calculator", '{"expression": "6*7"}', f"c{n}"),),
            )
        )
    response = await call("POST", "/v1/chat/completions", key=api_key, body=body(save=True))
    assert response.status_code == 200, response.text
    answer = response.json()
    # OpenAI's finish_reason stays one of its own; the notice says why it ended.
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["content"] == "Step 1. \n\nStep 2. "
    [notice] = [n for n in answer["breezeweb"]["notices"] if n["code"] == "step_limit"]
    assert notice["max_steps"] == 1 and "1 rounds" in notice["message"]
    assert [s["status"] for s in answer["breezeweb"]["steps"]] == ["ok"]
    assert len(scripted_server.chat_requests()) == 2
    saved = await sync_to_async(Message.objects.get)(
        conversation_id=answer["breezeweb"]["conversation_id"], role="assistant"
    )
    assert (saved.status, saved.finish_reason) == ("complete", "step_limit")


async def test_the_time_limit_ends_a_streamed_completion_and_says_why(
    api_key, scripted_server, agent_settings
):
    agent_settings.turn_timeout_seconds = 2
    await sync_to_async(agent_settings.save)()
    # The model is still writing when the turn's time is up (4 s of tokens).
    words = ("Thinking", " hard", " about", " it", " for", " a", " long", " while")
    scripted_server.script(Reply(tokens=words, token_delay=0.5))
    response = await call(
        "POST", "/v1/chat/completions", key=api_key, body={**body(), "stream": True}
    )
    assert response.status_code == 200
    blocks = sse_blocks(response.text)
    assert blocks[-1] == (None, "[DONE]")
    chunks = [d for n, d in blocks if n is None and isinstance(d, dict) and d.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith("Thinking") and not text.endswith(" while")  # what came is kept
    [finish] = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert finish["choices"][0]["finish_reason"] == "stop"
    [notice] = [n for n in finish["breezeweb"]["notices"] if n["code"] == "time_limit"]
    assert notice["seconds"] == 2 and "time limit of 2 s" in notice["message"]


@pytest.mark.parametrize(
    ("extension", "param"),
    [({"agent": "yes"}, "breezeweb.agent"), ({"timezone": "x" * 65}, "breezeweb.timezone")],
)
async def test_bad_extension_fields_are_400(api_key, extension, param):
    request = {
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
        "breezeweb": extension,
    }
    response = await call("POST", "/v1/chat/completions", key=api_key, body=request)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
