"""The chat pages and the JSON endpoints behind the conversation list."""

from __future__ import annotations

import json
import re

import pytest

from accounts.models import ApiKey
from chat.models import Conversation, Message
from runners.models import RunnerConfig
from tests.support.fixtures import runner_config

pytestmark = [pytest.mark.django_db, pytest.mark.scaleout]


@pytest.fixture
def conversation(user):
    c = Conversation.objects.create(owner=user, title="Trip to Lisbon")
    Message.objects.create(conversation=c, role="user", content="<img src=x onerror=alert(1)>")
    Message.objects.create(
        conversation=c,
        role="assistant",
        content="Half an answer",
        status="stopped",
        runner_name="local",
        model_id="SmolLM2",
        time_to_first_token_ms=42.0,
        tokens_per_second=200.0,
    )
    return c


@pytest.fixture
def alice(client, user):
    client.force_login(user)
    return client


def test_the_chat_page_needs_a_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_the_chat_page_lists_conversations_and_loads_the_module_without_inline_script(
    alice, conversation
):
    response = alice.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Trip to Lisbon" in html
    assert 'type="module" src="/static/js/chat.js"' in html
    # Strict CSP: every script has a src (the module, the translation catalog, the
    # service worker's registration); the only inline one is the JSON data block.
    tags = re.findall(r"<script\b[^>]*>", html)
    assert [t for t in tags if " src=" not in t] == ['<script id="boot" type="application/json">']
    assert '<script id="boot" type="application/json">' in html
    assert "onclick" not in html and "onerror=" not in html
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp


def test_a_conversation_page_embeds_its_messages_escaped(alice, conversation):
    response = alice.get(f"/c/{conversation.pk}/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "<img src=x" not in html  # escaped inside the JSON block
    boot = json.loads(
        html.split('<script id="boot" type="application/json">')[1].split("</script>")[0]
    )
    messages = boot["conversation"]["messages"]
    assert [m["content"] for m in messages] == ["<img src=x onerror=alert(1)>", "Half an answer"]
    assert messages[1]["status"] == "stopped"
    assert messages[1]["timings"]["time_to_first_token_ms"] == 42.0


def test_another_users_conversation_page_redirects_to_the_chat(client, other_user, conversation):
    client.force_login(other_user)
    response = client.get(f"/c/{conversation.pk}/")
    assert response.status_code == 302
    assert response["Location"] == "/"


def test_conversations_are_listed_newest_first_and_searched_by_title(alice, user, conversation):
    Conversation.objects.create(owner=user, title="Birthday ideas")
    listed = alice.get("/api/conversations").json()["conversations"]
    assert [c["title"] for c in listed] == ["Birthday ideas", "Trip to Lisbon"]
    found = alice.get("/api/conversations", {"q": "lisbon"}).json()["conversations"]
    assert [c["title"] for c in found] == ["Trip to Lisbon"]


def test_the_list_shows_only_the_users_own_conversations(client, other_user, conversation):
    client.force_login(other_user)
    assert client.get("/api/conversations").json() == {"conversations": []}


def test_messages_of_a_conversation_come_back_in_order(alice, conversation):
    body = alice.get(f"/api/conversations/{conversation.pk}").json()
    assert body["title"] == "Trip to Lisbon"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]


def test_rename_needs_the_csrf_token_with_a_session(user, conversation):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    response = strict.patch(
        f"/api/conversations/{conversation.pk}",
        json.dumps({"title": "Hijacked"}),
        content_type="application/json",
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"
    conversation.refresh_from_db()
    assert conversation.title == "Trip to Lisbon"


def test_rename_changes_the_title(alice, conversation):
    response = alice.patch(
        f"/api/conversations/{conversation.pk}",
        json.dumps({"title": "  Lisbon,   May  "}),
        content_type="application/json",
    )
    assert response.status_code == 200
    assert response.json() | {"updated_at": None} == {
        "id": conversation.pk,
        "title": "Lisbon, May",
        "project_id": None,
        "pinned": False,
        "updated_at": None,
    }
    conversation.refresh_from_db()
    assert conversation.title == "Lisbon, May"


@pytest.mark.parametrize(
    ("body", "code"),
    [("not json", "bad_json"), ('{"title": ""}', "bad_title"), ('{"name": "x"}', "bad_title")],
)
def test_a_bad_rename_is_refused_and_the_title_is_kept(alice, conversation, body, code):
    response = alice.patch(
        f"/api/conversations/{conversation.pk}", body, content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    conversation.refresh_from_db()
    assert conversation.title == "Trip to Lisbon"


def test_delete_removes_the_conversation_and_its_messages(alice, conversation):
    response = alice.delete(f"/api/conversations/{conversation.pk}")
    assert response.status_code == 204
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()


def test_another_user_can_neither_read_rename_nor_delete(client, other_user, conversation):
    client.force_login(other_user)
    url = f"/api/conversations/{conversation.pk}"
    assert client.get(url).status_code == 404
    rename = client.patch(url, json.dumps({"title": "mine"}), content_type="application/json")
    assert rename.status_code == 404
    assert rename.json()["error"]["code"] == "not_found"
    assert client.delete(url).status_code == 404
    conversation.refresh_from_db()
    assert conversation.title == "Trip to Lisbon"
    assert conversation.messages.count() == 2


def test_the_json_endpoints_need_a_login_or_an_api_key(client, user, conversation):
    response = client.get("/api/conversations")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    _, raw = ApiKey.issue(user, "cli")
    keyed = client.get("/api/conversations", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert [c["title"] for c in keyed.json()["conversations"]] == ["Trip to Lisbon"]


def test_runners_lists_enabled_runners_with_capabilities_and_no_secrets(alice):
    runner_config(
        "http://127.0.0.1:9",
        "remote-vision",
        api_key="sk-very-secret",
        model_id="llava",
        enable_vision=True,
        priority=5,
    )
    RunnerConfig.objects.create(name="off", kind="llamastack", enabled=False)
    response = alice.get("/api/runners")
    assert response.status_code == 200
    assert response.json() == {
        "runners": [
            {
                "name": "remote-vision",
                "kind": "llamastack",
                "capabilities": ["llm", "vlm"],
                "model_id": "llava",
                "priority": 5,
                "context_tokens": 2048,
            }
        ]
    }
    assert b"sk-very-secret" not in response.content
    assert b"sk-very-secret" not in alice.get("/").content


def test_an_answer_cut_off_by_a_crash_is_shown_as_stopped_with_its_saved_text(alice, user):
    from datetime import timedelta

    from django.utils import timezone

    c = Conversation.objects.create(owner=user, title="Crash")
    Message.objects.create(conversation=c, role="user", content="Q")
    stale = Message.objects.create(
        conversation=c, role="assistant", content="Saved half", status="streaming"
    )
    Message.objects.filter(pk=stale.pk).update(updated_at=timezone.now() - timedelta(minutes=5))
    live = Message.objects.create(
        conversation=c, role="assistant", content="Live", status="streaming"
    )
    body = alice.get(f"/api/conversations/{c.pk}").json()
    by_id = {m["id"]: m for m in body["messages"]}
    assert by_id[stale.pk]["status"] == "stopped"
    assert by_id[stale.pk]["content"] == "Saved half"
    assert by_id[stale.pk]["error_code"] == "interrupted"
    assert by_id[live.pk]["status"] == "streaming"  # still being written


def test_a_late_periodic_save_never_overwrites_a_finished_answer(user):
    from chat import services

    c = Conversation.objects.create(owner=user, title="Race")
    done = Message.objects.create(
        conversation=c, role="assistant", content="The full answer.", status="complete"
    )
    streaming = Message.objects.create(conversation=c, role="assistant", status="streaming")
    services.flush_contents({done.pk: "The full", streaming.pk: "So far"})
    done.refresh_from_db()
    streaming.refresh_from_db()
    assert done.content == "The full answer."
    assert streaming.content == "So far"
