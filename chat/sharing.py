"""Share links: a read-only snapshot of a conversation's active branch, at
`/s/<token>/`, revocable and optionally expiring (docs/conversations.md).

The snapshot is taken when the link is made, so later messages, other
branches and the user's other conversations are never reachable through it.
Only a SHA-256 of the token is stored (as for API keys): the URL is shown
once, and a database leak reveals no working link.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from chat import services
from chat.errors import ChatError
from chat.models import ShareLink

TOKEN_BYTES = 24  # 32 URL-safe characters
PREFIX_CHARS = 6
SNAPSHOT_FIELDS = ("role", "content", "status", "runner", "model", "sources", "created_at")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def share_path(token: str) -> str:
    return f"/s/{token}/"


def _share_dict(link: ShareLink) -> dict[str, Any]:
    now = timezone.now()
    return {
        "id": link.pk,
        "conversation_id": link.conversation_id,
        "title": link.title,
        "prefix": link.prefix,
        "created_at": link.created_at.isoformat(),
        "expires_at": link.expires_at.isoformat() if link.expires_at else None,
        "revoked": link.revoked_at is not None,
        "active": link.revoked_at is None and (link.expires_at is None or link.expires_at > now),
        "views": link.views,
    }


def create_share(user, conversation_id: int, *, expires_in_days: int | None = None) -> dict:
    """A new link to a snapshot of the conversation's active branch as it is
    now (text, sources, runner; not attached images). The answer holds the
    link's `url` path, shown this once. `expires_in_days` is checked by the
    caller's request model (1..chat.limits.MAX_SHARE_DAYS). Raises ChatError(not_found)."""
    conversation = services.conversation_messages(user, conversation_id)
    snapshot = [
        {key: m[key] for key in SNAPSHOT_FIELDS}
        for m in conversation["messages"]
        if m["role"] in ("user", "assistant") and m["status"] != "streaming"
    ]
    token = secrets.token_urlsafe(TOKEN_BYTES)
    expires = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
    link = ShareLink.objects.create(
        conversation_id=conversation["id"],
        token_hash=_digest(token),
        prefix=token[:PREFIX_CHARS],
        title=conversation["title"],
        snapshot=snapshot,
        expires_at=expires,
    )
    return _share_dict(link) | {"url": share_path(token)}


def list_shares(user, *, conversation_id: int | None = None) -> list[dict[str, Any]]:
    """The user's links (of one conversation with `conversation_id`), newest first."""
    links = ShareLink.objects.filter(conversation__owner=user)
    if conversation_id is not None:
        links = links.filter(conversation_id=conversation_id)
    return [_share_dict(link) for link in links]


def revoke_share(user, share_id: int) -> dict[str, Any]:
    """End one of the user's links now (idempotent). Raises ChatError(not_found)."""
    with transaction.atomic():
        link = ShareLink.objects.filter(pk=share_id, conversation__owner=user).first()
        if link is None:
            raise ChatError("not_found", f"Share link {share_id} was not found.", status=404)
        if link.revoked_at is None:
            link.revoked_at = timezone.now()
            link.save(update_fields=["revoked_at"])
        return _share_dict(link)


def open_share(token: str) -> dict[str, Any] | None:
    """The snapshot behind a token (counting the view), or None when the
    token is unknown, revoked or expired: all look the same to the visitor."""
    link = ShareLink.objects.filter(token_hash=_digest(token), revoked_at__isnull=True).first()
    if link is None or (link.expires_at is not None and link.expires_at <= timezone.now()):
        return None
    ShareLink.objects.filter(pk=link.pk).update(views=F("views") + 1)
    return {"title": link.title, "messages": link.snapshot, "created_at": link.created_at}
