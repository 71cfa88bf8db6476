"""Per-message token counts and cost: an answer of a runner the admin priced
shows what it cost (prompt and answer tokens at the runner's prices); the
runner list gives each runner's context budget for the page's gauge."""

from __future__ import annotations

from decimal import Decimal

from django.test import Client

import pytest
from asgiref.sync import sync_to_async

from chat.models import RunnerPrice
from tests.chat.test_chat_ws import ask, frames_until, is_end, of
from tests.support.clients import connect
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.scaleout,
    pytest.mark.usefixtures("fresh_process_state", "no_detached_answers"),
]


async def test_an_answer_of_a_priced_runner_shows_its_tokens_and_cost(
    user, scripted_runner, scripted_server
):
    await sync_to_async(RunnerPrice.objects.create)(
        runner=scripted_runner,
        currency="EUR",
        prompt_per_million=Decimal("2.5"),
        completion_per_million=Decimal("10"),
    )
    scripted_server.script(Reply(text="Priced.", usage=(1000, 400)), Reply(text="Free."))
    ws = await connect(user)
    frames = await ask(ws, "How much?")
    cid = of(frames, "accepted")[0]["conversation_id"]
    done = of(frames, "done")[0]
    assert done["usage"] == {"prompt_tokens": 1000, "completion_tokens": 400}
    # The cost travels on the live `done` frame (the page shows it without a
    # reload) and on the `done` of an attach after the end, as the API says it.
    cost = {"amount": pytest.approx(1000 * 2.5e-6 + 400 * 10e-6), "currency": "EUR"}
    assert done["cost"] == cost
    await ws.send_json_to({"type": "attach", "request_id": "a1", "message_id": done["message_id"]})
    attached = await frames_until(ws, is_end("a1"))
    assert of(attached, "done")[0]["cost"] == cost
    await ws.disconnect()

    def check():
        client = Client()
        client.force_login(user)
        answer = client.get(f"/api/conversations/{cid}").json()["messages"][1]
        assert answer["usage"] == {"prompt_tokens": 1000, "completion_tokens": 400}
        assert answer["cost"]["currency"] == "EUR"
        assert answer["cost"]["amount"] == pytest.approx(1000 * 2.5e-6 + 400 * 10e-6)
        runners = client.get("/api/runners").json()["runners"]
        assert runners[0]["context_tokens"] == scripted_runner.context_tokens
        # No price for the runner: no cost (the tokens are still there).
        RunnerPrice.objects.all().delete()
        answer = client.get(f"/api/conversations/{cid}").json()["messages"][1]
        assert answer["cost"] is None and answer["usage"]["prompt_tokens"] == 1000

    await sync_to_async(check)()
    # Nor on the next answer's `done`.
    ws = await connect(user)
    unpriced = of(await ask(ws, "And this?", request_id="r2", conversation_id=cid), "done")[0]
    await ws.disconnect()
    assert unpriced["usage"]["prompt_tokens"] is not None and unpriced["cost"] is None
