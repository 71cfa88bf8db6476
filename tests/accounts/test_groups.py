"""Groups decide who may use which runner and read which shared collection.

One rule each (`RunnerConfig.objects.usable_by`, `Collection.objects.readable_by`),
checked here on every interface: the router (auto and pinned), the websocket,
the OpenAI API (/v1/models, /v1/models/{id}, /v1/chat/completions), /api/runners,
the chat page's runner picker, the documents API and retrieval. A runner or
collection a user may not use reads exactly like one that does not exist.
Default: with no groups on a runner or collection, everyone may use it."""

from __future__ import annotations

import json

from django.contrib.auth.models import Group
from django.test import Client

import pytest
from asgiref.sync import sync_to_async

from accounts.models import ApiKey
from rag import worker
from rag.models import Collection
from rag.retrieval import retrieve
from runners.base import Capability, ErrorCode, RunnerError
from runners.models import RunnerConfig
from runners.router import load_candidates
from tests.support import documents as docs
from tests.support.clients import call, connect
from tests.support.documents import add_and_ingest
from tests.support.fixtures import runner_config
from tests.support.scripted_server import Reply

LLM = frozenset({Capability.LLM})
PINNED_PRIVATE = {"type": "message", "request_id": "r1", "text": "hi", "runner": "private"}


@pytest.fixture
def staff_runner(scripted_server):
    """A runner only the `staff` group may use (the scripted server answers it);
    `scripted` (open to everyone) stays the lower-priority choice."""
    group = Group.objects.create(name="staff")
    config = runner_config(scripted_server.url, "private", priority=50, timeout_seconds=10)
    config.groups.add(group)
    return config


def _names(configs) -> list[str]:
    return [c.name for c in configs]


# ---- the rule ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.scaleout
def test_without_groups_everyone_may_use_every_runner(user, scripted_runner):
    assert _names(RunnerConfig.objects.usable_by(user)) == ["scripted"]


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_runner_with_groups_is_for_their_members_and_superusers(
    user, other_user, admin_user, scripted_runner, staff_runner
):
    user.groups.add(Group.objects.get(name="staff"))
    other_group = Group.objects.create(name="others")
    other_user.groups.add(other_group)
    assert _names(RunnerConfig.objects.usable_by(user)) == ["private", "scripted"]
    assert _names(RunnerConfig.objects.usable_by(other_user)) == ["scripted"]
    assert _names(RunnerConfig.objects.usable_by(admin_user)) == ["private", "scripted"]
    # A runner shared with two groups is listed once for a member of both.
    staff_runner.groups.add(other_group)
    user.groups.add(other_group)
    assert _names(RunnerConfig.objects.usable_by(user)) == ["private", "scripted"]
    assert _names(RunnerConfig.objects.usable_by(other_user)) == ["private", "scripted"]


@pytest.mark.django_db
def test_the_router_never_offers_a_runner_the_user_may_not_use(
    user, other_user, scripted_runner, staff_runner
):
    user.groups.add(Group.objects.get(name="staff"))
    assert _names(load_candidates(LLM, None, False, user)) == ["private", "scripted"]
    assert _names(load_candidates(LLM, None, False, other_user)) == ["scripted"]
    with pytest.raises(RunnerError) as pinned:
        load_candidates(LLM, "private", False, other_user)
    assert pinned.value.code == ErrorCode.NOT_FOUND
    assert "no runner named 'private' that you may use" in pinned.value.message
    # Exactly what a runner that does not exist says, apart from its name.
    with pytest.raises(RunnerError) as missing:
        load_candidates(LLM, "nothing", False, other_user)
    assert missing.value.message.replace("nothing", "private") == pinned.value.message


@pytest.mark.django_db
def test_a_user_with_no_runner_open_to_them_is_told_so(user, staff_runner):
    with pytest.raises(RunnerError) as caught:
        load_candidates(LLM, None, False, user)
    assert caught.value.code == ErrorCode.NO_RUNNER
    assert "open to you" in caught.value.message


# ---- the HTTP interfaces --------------------------------------------------------------------


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
@pytest.mark.usefixtures("fresh_process_state")
async def test_the_openai_api_hides_and_refuses_a_runner_the_key_owner_may_not_use(
    user, other_user, scripted_runner, staff_runner, scripted_server
):
    await sync_to_async(user.groups.add)(await sync_to_async(Group.objects.get)(name="staff"))
    member = (await sync_to_async(ApiKey.issue)(user, "member"))[1]
    outsider = (await sync_to_async(ApiKey.issue)(other_user, "outsider"))[1]

    assert _ids(await call("GET", "/v1/models", key=member)) == ["auto", "private", "scripted"]
    outsider_models = await call("GET", "/v1/models", key=outsider)
    assert _ids(outsider_models) == ["auto", "scripted"]
    assert outsider_models.json()["data"][0]["metadata"]["runners"] == ["scripted"]
    assert (await call("GET", "/v1/models/private", key=member)).status_code == 200
    hidden = await call("GET", "/v1/models/private", key=outsider)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"

    body = {"model": "private", "messages": [{"role": "user", "content": "hi"}]}
    refused = await call("POST", "/v1/chat/completions", key=outsider, body=body)
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "model_not_found"
    assert not scripted_server.chat_requests()

    # `auto` answers the outsider with the runner open to them, never the private one.
    scripted_server.script(Reply("open answer"))
    auto = await call("POST", "/v1/chat/completions", key=outsider, body={**body, "model": "auto"})
    assert auto.status_code == 200, auto.text
    assert auto.json()["breezeweb"]["runner"] == "scripted"
    scripted_server.script(Reply("private answer"))
    pinned = await call("POST", "/v1/chat/completions", key=member, body=body)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["breezeweb"]["runner"] == "private"


@pytest.mark.django_db
def test_the_runner_picker_and_api_runners_list_only_usable_runners(
    user, other_user, scripted_runner, staff_runner
):
    user.groups.add(Group.objects.get(name="staff"))
    for person, expected in ((user, ["private", "scripted"]), (other_user, ["scripted"])):
        browser = Client()
        browser.force_login(person)
        listed = browser.get("/api/runners").json()["runners"]
        assert [r["name"] for r in listed] == expected
        page = browser.get("/").content.decode()
        assert ('"private"' in page) == ("private" in expected)


# ---- the websocket --------------------------------------------------------------------------


async def _frames_until_end(ws, request_id: str) -> list[dict]:
    frames = []
    while True:
        frame = json.loads(await ws.receive_from(timeout=10))
        frames.append(frame)
        if frame.get("request_id") == request_id and frame["type"] in ("done", "error"):
            return frames


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
@pytest.mark.usefixtures("fresh_process_state", "no_detached_answers")
async def test_the_websocket_refuses_pinning_a_runner_the_user_may_not_use(
    user, other_user, scripted_runner, staff_runner, scripted_server
):
    ws = await connect(other_user)
    await ws.send_json_to(PINNED_PRIVATE)
    frame = await ws.receive_json_from(timeout=5)
    assert (frame["type"], frame["code"]) == ("error", "unknown_runner")
    assert "that you may use" in frame["message"]
    await ws.disconnect()
    assert not scripted_server.chat_requests()


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
@pytest.mark.usefixtures("fresh_process_state", "no_detached_answers")
async def test_losing_a_group_stops_a_conversation_pinned_to_its_runner(
    user, scripted_runner, staff_runner, scripted_server
):
    staff = await sync_to_async(Group.objects.get)(name="staff")
    await sync_to_async(user.groups.add)(staff)
    ws = await connect(user)
    scripted_server.script(Reply("first answer"))
    await ws.send_json_to(PINNED_PRIVATE)
    frames = await _frames_until_end(ws, "r1")
    assert frames[-1]["type"] == "done", frames
    conversation_id = next(f for f in frames if f["type"] == "accepted")["conversation_id"]

    await sync_to_async(user.groups.remove)(staff)
    await ws.send_json_to(
        {"type": "message", "request_id": "r2", "text": "again", "conversation_id": conversation_id}
    )
    frames = await _frames_until_end(ws, "r2")
    await ws.disconnect()
    error = frames[-1]
    assert (error["type"], error["code"]) == ("error", "not_found"), frames
    assert "'private' that you may use" in error["message"]
    assert len(scripted_server.chat_requests()) == 1


# ---- collections ----------------------------------------------------------------------------


@pytest.fixture
def team_collection(admin_user):
    """A shared collection only the `research` group may read."""
    group = Group.objects.create(name="research")
    collection = Collection.objects.create(name="Research notes", shared=True)
    collection.groups.add(group)
    return collection


@pytest.mark.django_db
@pytest.mark.scaleout
def test_a_shared_collection_with_groups_is_readable_only_by_their_members(
    user, other_user, admin_user, team_collection
):
    open_to_all = Collection.objects.create(name="Handbook", shared=True)
    user.groups.add(Group.objects.get(name="research"))

    def readable(person) -> set[str]:
        return set(Collection.objects.readable_by(person).values_list("name", flat=True))

    assert readable(user) == {"Research notes", "Handbook"}
    assert readable(other_user) == {"Handbook"}
    assert readable(admin_user) >= {"Research notes", "Handbook"}
    # The owner of a personal collection always reads it, groups or not.
    mine = Collection.personal_for(other_user)
    mine.groups.add(Group.objects.get(name="research"))
    assert mine.name in readable(other_user)
    assert open_to_all.pk in Collection.objects.readable_by(other_user).values_list("pk", flat=True)


@pytest.mark.django_db
def test_the_documents_api_and_retrieval_honour_collection_groups(
    user, other_user, admin_user, team_collection, settings
):
    settings.RAG_INGEST_WORKER = "thread"
    user.groups.add(Group.objects.get(name="research"))
    try:
        pdf = docs.lighthouse_pdf()
        document = add_and_ingest(admin_user, "lighthouse.pdf", pdf, team_collection)
        question = docs.LIGHTHOUSE_QUESTIONS[0][0]
        assert retrieve(user, question).sources
        assert retrieve(other_user, question).sources == ()
        assert retrieve(other_user, question, [team_collection.pk]).sources == ()

        member, outsider = Client(), Client()
        member.force_login(user)
        outsider.force_login(other_user)
        names = lambda c: [x["name"] for x in c.get("/api/collections").json()["collections"]]  # noqa: E731
        assert "Research notes" in names(member) and "Research notes" not in names(outsider)
        assert member.get(f"/api/documents/{document.pk}").status_code == 200
        assert outsider.get(f"/api/documents/{document.pk}").status_code == 404
        search = {"query": question, "collections": [team_collection.pk]}
        found = member.post("/api/search", search, content_type="application/json")
        assert found.json()["results"]
        hidden = outsider.post("/api/search", search, content_type="application/json")
        assert hidden.status_code == 200 and hidden.json()["results"] == []
    finally:
        worker.wait_until_idle(timeout=60)
        docs.drop_all_chroma_collections()
