"""One turn, one record of it: the websocket and the HTTP API save the same
rows for the same answer (docs/architecture.md, *One turn, one record of it*).

The same scripted answer is asked for once through `/ws/chat/` and once
through `POST /v1/chat/completions` with `breezeweb.save`; both go through
`chat.turns.TurnRecorder` and `chat.services`, so the conversation, the user
and assistant `Message` rows and the runner's `RunRecord` agree field for
field, except what names the path (`RunRecord.source`), ids and clocks.
"""

from __future__ import annotations

import json

import httpx
import pytest
from asgiref.sync import sync_to_async

from accounts.models import ApiKey
from breezeweb.asgi import application
from chat.consumers import finish_detached
from chat.models import Conversation, Message
from runners.models import RunRecord
from tests.support.clients import connect
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("user", "fresh_process_state"),
]

QUESTION = "What is the capital of France?"
ANSWER = Reply(text="The capital of France is Paris.", usage=(12, 7))

# Fields of a Message that must agree; ids, conversation, times are the row's own.
MESSAGE_FIELDS = (
    "role",
    "content",
    "images",
    "status",
    "runner_name",
    "model_id",
    "fallback",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "sources",
    "error_code",
    "error",
)
RUN_FIELDS = (
    "runner_name",
    "model_id",
    "capability",
    "status",
    "error_code",
    "error",
    "fallback",
    "prompt_tokens",
    "completion_tokens",
)


async def _over_the_websocket(user) -> int:
    ws = await connect(user)
    await ws.send_json_to(
        {"type": "message", "request_id": "r1", "conversation_id": None, "text": QUESTION}
    )
    while True:
        frame = json.loads(await ws.receive_from(timeout=20))
        assert frame["type"] != "error", frame
        if frame["type"] == "done":
            break
    await ws.disconnect()
    await finish_detached()
    return frame["conversation_id"]


async def _over_http(key: str) -> int:
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": QUESTION}],
        "breezeweb": {"save": True},
    }
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        response = await client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200, response.text
    return response.json()["breezeweb"]["conversation_id"]


def _saved(conversation_id: int, source: str) -> dict:
    conversation = Conversation.objects.get(pk=conversation_id)
    messages = list(conversation.messages.order_by("id"))
    runs = list(RunRecord.objects.filter(source=source).order_by("id"))
    return {
        "title": conversation.title,
        "messages": [{f: getattr(m, f) for f in MESSAGE_FIELDS} for m in messages],
        "timed": [
            (m.time_to_first_token_ms is not None, m.tokens_per_second is not None, m.total_ms)
            for m in messages
        ],
        "runs": [{f: getattr(r, f) for f in RUN_FIELDS} for r in runs],
    }


async def test_the_websocket_and_the_api_save_identical_rows_for_the_same_answer(
    user, scripted_runner, scripted_server
):
    key = await sync_to_async(lambda: ApiKey.issue(user, "tests")[1])()
    scripted_server.script(ANSWER, ANSWER)
    over_ws = await sync_to_async(_saved)(await _over_the_websocket(user), "chat")
    over_api = await sync_to_async(_saved)(await _over_http(key), "api")

    assert over_ws["title"] == over_api["title"] == QUESTION
    assert over_ws["messages"] == over_api["messages"]
    user_row, answer = over_ws["messages"]
    assert (user_row["role"], user_row["content"]) == ("user", QUESTION)
    assert (answer["status"], answer["content"]) == ("complete", ANSWER.text)
    assert (answer["runner_name"], answer["finish_reason"]) == ("scripted", "stop")
    assert (answer["prompt_tokens"], answer["completion_tokens"]) == (12, 7)
    # Timings are measured the same way on both paths: present on the answer,
    # absent on the user's message.
    for timed in (over_ws["timed"], over_api["timed"]):
        assert timed[0] == (False, False, None)
        assert timed[1][:2] == (True, True) and timed[1][2] > 0
    assert over_ws["runs"] == over_api["runs"] and len(over_ws["runs"]) == 1
    assert over_ws["runs"][0]["status"] == "ok"
    # The websocket's run is linked to its answer; the API saves only once the
    # answer is known, after the router wrote its run (docs/architecture.md).
    answer_id = await sync_to_async(
        lambda: Message.objects.filter(role="assistant").order_by("id").first().pk
    )()
    linked = await sync_to_async(
        lambda: list(RunRecord.objects.order_by("id").values_list("source", "message_id"))
    )()
    assert linked == [("chat", answer_id), ("api", None)]
