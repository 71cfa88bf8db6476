"""Share links: a read-only snapshot that opens logged out, shows nothing once
revoked or expired, never exposes other conversations (or later messages),
and stores no usable token."""

from __future__ import annotations

import json
from datetime import timedelta

from django.test import Client, override_settings
from django.utils import timezone

import pytest

from chat.models import Conversation, Message, ShareLink
from tests.support.clients import client_of

pytestmark = [pytest.mark.django_db, pytest.mark.scaleout]

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def chat(user):
    conversation = Conversation.objects.create(owner=user, title="Sourdough")
    Message.objects.create(conversation=conversation, role="user", content="How long to proof?")
    Message.objects.create(
        conversation=conversation, role="assistant", content=f"About **4 hours**. {HOSTILE}"
    )
    return conversation


def share(client, conversation, **body):
    response = client.post(
        f"/api/conversations/{conversation.pk}/shares",
        json.dumps(body),
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    return response.json()


def boot_of(response) -> dict:
    html = response.content.decode()
    start = html.index('<script id="boot" type="application/json">') + 42
    return json.loads(html[start : html.index("</script>", start)])


def test_a_link_opens_logged_out_with_a_snapshot_only(user, chat):
    owner = client_of(user)
    secret = Conversation.objects.create(owner=user, title="Other plans")
    Message.objects.create(conversation=secret, role="user", content="my other secret")
    link = share(owner, chat)
    assert link["url"].startswith("/s/") and link["active"] is True
    # Said after sharing: not part of the snapshot.
    Message.objects.create(conversation=chat, role="user", content="a later question")

    response = Client().get(link["url"])  # nobody logged in
    assert response.status_code == 200
    assert response["Referrer-Policy"] == "no-referrer"
    html = response.content.decode()
    assert "Sourdough" in html
    messages = boot_of(response)["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "How long to proof?"),
        ("assistant", f"About **4 hours**. {HOSTILE}"),
    ]
    # Hostile text stays inside the JSON data (escaped), never markup of the page.
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "my other secret" not in html and "a later question" not in html
    assert ShareLink.objects.get().views == 1


def test_revoked_expired_and_unknown_links_show_nothing(user, chat):
    owner = client_of(user)
    revoked = share(owner, chat)
    expiring = share(owner, chat, expires_in_days=1)
    response = owner.delete(f"/api/shares/{revoked['id']}")
    assert response.status_code == 200 and response.json()["revoked"] is True
    ShareLink.objects.filter(pk=expiring["id"]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    for url in (revoked["url"], expiring["url"], "/s/not-a-token/"):
        response = Client().get(url)
        assert response.status_code == 404
        assert "proof" not in response.content.decode()
        assert boot_of(response) == {"messages": []}
    listed = owner.get("/api/shares").json()["shares"]
    assert {(s["id"], s["revoked"], s["active"]) for s in listed} == {
        (revoked["id"], True, False),
        (expiring["id"], False, False),
    }


def test_the_token_is_not_stored(user, chat):
    link = share(client_of(user), chat)
    token = link["url"].split("/")[2]
    row = ShareLink.objects.get()
    assert token not in json.dumps(list(ShareLink.objects.values()), default=str)
    assert row.prefix == token[:6] and len(token) >= 32


@override_settings(SHARE_LINKS_REQUIRE_LOGIN=True)
def test_the_admin_can_require_a_login(user, other_user, chat):
    link = share(client_of(user), chat)
    response = Client().get(link["url"])
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert client_of(other_user).get(link["url"]).status_code == 200


def test_nobody_else_shares_lists_or_revokes(user, other_user, chat):
    link = share(client_of(user), chat)
    bob = client_of(other_user)
    path = f"/api/conversations/{chat.pk}/shares"
    assert bob.post(path, "{}", content_type="application/json").status_code == 404
    assert bob.get(path).status_code == 404
    assert bob.delete(f"/api/shares/{link['id']}").status_code == 404
    assert bob.get("/api/shares").json() == {"shares": []}
    assert ShareLink.objects.get().revoked_at is None


@pytest.mark.parametrize("days", [0, 366, "7", 1.5])
def test_a_bad_expiry_is_refused(user, chat, days):
    response = client_of(user).post(
        f"/api/conversations/{chat.pk}/shares",
        json.dumps({"expires_in_days": days}),
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_expires_in_days"
    assert not ShareLink.objects.exists()


def test_a_snapshot_holds_the_shown_branch_only(user):
    """Regenerated answers and edits are branches; the link shares the branch
    shown when it was made, never the others (nor a branch shown later)."""
    conversation = Conversation.objects.create(owner=user, title="Bread")
    question = Message.objects.create(
        conversation=conversation, role="user", content="Rye or wheat?"
    )
    Message.objects.create(conversation=conversation, role="assistant", content="first answer: rye")
    shown = Message.objects.create(
        conversation=conversation, role="assistant", content="regenerated: wheat", parent=question
    )
    edited = Message(conversation=conversation, role="user", content="edited: spelt or emmer?")
    edited.root = True
    edited.save()
    Message.objects.create(
        conversation=conversation, role="assistant", content="edit answer: spelt"
    )
    owner = client_of(user)
    response = owner.patch(
        f"/api/conversations/{conversation.pk}",
        json.dumps({"active_message_id": shown.pk}),
        content_type="application/json",
    )
    assert response.status_code == 200
    link = share(owner, conversation)
    # The owner looks at another branch afterwards: the snapshot does not follow.
    owner.patch(
        f"/api/conversations/{conversation.pk}",
        json.dumps({"active_message_id": edited.pk}),
        content_type="application/json",
    )
    response = Client().get(link["url"])
    assert [(m["role"], m["content"]) for m in boot_of(response)["messages"]] == [
        ("user", "Rye or wheat?"),
        ("assistant", "regenerated: wheat"),
    ]
    html = response.content.decode()
    for hidden in ("first answer", "spelt", "emmer"):
        assert hidden not in html
