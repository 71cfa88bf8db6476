"""Scale-out for real: two Daphne processes and a Channels ingestion worker
sharing PostgreSQL and Redis. They run in the scale-out pass of `make test`
(BREEZEWEB_SCALEOUT_PASS=1, DATABASE_URL / REDIS_URL set); CI requires it."""

from __future__ import annotations

import asyncio
import json
import os
import time

from django.conf import settings
from django.db import connection

import httpx
import pytest
import websockets

from accounts.models import ApiKey
from rag.models import Collection, Document
from runners.models import RunnerConfig
from tests.support.processes import Daphne, Worker
from tests.support.scripted_server import Reply

pytestmark = [
    pytest.mark.scaleout,
    pytest.mark.skipif(
        os.environ.get("BREEZEWEB_SCALEOUT_PASS") != "1",
        reason="multi-process test: runs in the scale-out pass (PostgreSQL + Redis)",
    ),
]


def _shared_env() -> dict[str, str]:
    db = connection.settings_dict
    url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    return {
        "DATABASE_URL": url,
        "REDIS_URL": settings.REDIS_URL,
        "DATA_DIR": str(settings.DATA_DIR),
        "SECRET_KEY": settings.SECRET_KEY,
        "BREEZEWEB_ENV_FILE": "/nonexistent",
        "RAG_INGEST_WORKER": "channels",
    }


@pytest.fixture
def two_web_processes(transactional_db):
    env = _shared_env()
    first, second = Daphne(env), Daphne(env)
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        first.stop()
        second.stop()


def _models(server: Daphne, key: str) -> list[str]:
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


def test_an_admin_edit_reaches_every_web_process_on_its_next_request(
    two_web_processes, user, scripted_server
):
    first, second = two_web_processes
    _, key = ApiKey.issue(user, "scaleout")
    config = RunnerConfig.objects.create(
        name="remote",
        kind="llamastack",
        endpoint=scripted_server.url,
        model_id="scripted-model",
        priority=10,
    )
    assert "remote" in _models(first, key) and "remote" in _models(second, key)

    config.enabled = False
    config.save()
    assert "remote" not in _models(first, key)
    assert "remote" not in _models(second, key)

    # A chat answered by either process uses the edited config, not a cached one.
    config.enabled = True
    config.endpoint = scripted_server.url
    config.model_id = "renamed-model"
    config.save()
    scripted_server.models = ["renamed-model"]
    scripted_server.default_reply = Reply(text="from the renamed model")
    for server in (first, second):
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "remote", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "from the renamed model"
    sent_models = {r.json["model"] for r in scripted_server.chat_requests()}
    assert sent_models == {"renamed-model"}


def test_a_worker_ingests_an_upload_and_the_status_reaches_a_websocket_on_another_process(
    two_web_processes, user, tmp_path
):
    first, second = two_web_processes
    _, key = ApiKey.issue(user, "scaleout")
    worker = Worker(_shared_env()).start()
    try:

        async def scenario():
            headers = {"Authorization": f"Bearer {key}"}
            async with websockets.connect(
                f"ws://127.0.0.1:{second.port}/ws/chat/", additional_headers=headers
            ) as ws:
                async with httpx.AsyncClient() as client:
                    response = await client.post(
                        f"{first.url}/api/documents",
                        headers=headers,
                        files={
                            "file": (
                                "falcon.md",
                                b"# Falcon\n\nThe falcon project ships "
                                b"in March and its codename is Peregrine.\n",
                            )
                        },
                        timeout=60,
                    )
                assert response.status_code in (200, 201, 202), response.text
                statuses = []
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and "ready" not in statuses:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=120))
                    if frame.get("type") == "document_status":
                        statuses.append(frame["document"]["status"])
                        assert frame["document"]["status"] != "failed", frame
                return statuses

        statuses = asyncio.run(scenario())
        assert statuses[-1] == "ready", (statuses, worker.log_tail())
        document = Document.objects.get(owner=user)
        assert document.chunk_count > 0
        assert document.collection == Collection.personal_for(user)
    finally:
        worker.stop()
