"""Ending the websockets of a credential that ended.

Every chat socket joins channel-layer groups for the credential it
authenticated with: its API key (`auth.key.<id>`), or its session
(`auth.session.<digest>`, a digest so the session key never reaches Redis),
and its user (`auth.user.<id>`). When the key is revoked or deleted, the
session logs out, or the user is deactivated or deleted, a `credential.ended`
message (naming the group) goes to that group once the change is committed:
the consumer stops its answers (saved as `stopped`) and closes the socket with
4401. Answers that outlived their socket (CHAT_CONTINUE_AFTER_DISCONNECT) are
stopped the same way by the answer hub of their process, which joins the
groups of the socket that started them when it closes (chat/live.py). With
REDIS_URL the channel layer is Redis, so this reaches sockets on every web
process; without it, the in-memory layer of this process.

The receivers are connected in `BreezeWebConfig.ready()`.
"""

from __future__ import annotations

import hashlib
import logging

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

MESSAGE_TYPE = "credential.ended"


def key_group(key_id: int) -> str:
    return f"auth.key.{int(key_id)}"


def user_group(user_id: int) -> str:
    return f"auth.user.{int(user_id)}"


def session_group(session_key: str) -> str:
    digest = hashlib.sha256(f"breezeweb-ws-session:{session_key}".encode()).hexdigest()
    return f"auth.session.{digest[:48]}"


def groups_for(scope) -> list[str]:
    """The groups a socket authenticated by `scope` belongs to."""
    user = scope.get("user")
    groups = [user_group(user.pk)] if user is not None and user.pk is not None else []
    if scope.get("auth") == "api_key" and scope.get("api_key_id") is not None:
        groups.append(key_group(scope["api_key_id"]))
    elif scope.get("auth") == "session":
        session = scope.get("session")
        key = getattr(session, "session_key", None) if session is not None else None
        if key:
            groups.append(session_group(key))
    return groups


def end_sockets(group: str, reason: str) -> None:
    """Tell every socket in `group` (any process) that its credential ended,
    after the surrounding transaction commits."""

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(
                group, {"type": MESSAGE_TYPE, "reason": reason, "group": group}
            )
        except Exception:
            # The change itself stands; the sockets then end on their next
            # reconnect. Logged without the group name's credential digest.
            log.exception("could not notify the websockets of an ended credential (%s)", reason)

    transaction.on_commit(send)


# ---- receivers ------------------------------------------------------------------------------


def _key_saved(sender, instance, **kwargs) -> None:
    if instance.revoked_at is not None:
        end_sockets(key_group(instance.pk), "The API key was revoked.")


def _key_deleted(sender, instance, **kwargs) -> None:
    end_sockets(key_group(instance.pk), "The API key was deleted.")


def _logged_out(sender, request, user, **kwargs) -> None:
    session = getattr(request, "session", None)
    key = getattr(session, "session_key", None) if session is not None else None
    if key:
        end_sockets(session_group(key), "You logged out.")


def _user_saved(sender, instance, created, **kwargs) -> None:
    if not created and not instance.is_active:
        end_sockets(user_group(instance.pk), "The account was deactivated.")


def _user_deleted(sender, instance, **kwargs) -> None:
    end_sockets(user_group(instance.pk), "The account was deleted.")


def connect_receivers() -> None:
    from accounts.models import ApiKey

    user_model = get_user_model()
    post_save.connect(_key_saved, sender=ApiKey, dispatch_uid="ws-revocation-key-saved")
    post_delete.connect(_key_deleted, sender=ApiKey, dispatch_uid="ws-revocation-key-deleted")
    user_logged_out.connect(_logged_out, dispatch_uid="ws-revocation-logout")
    post_save.connect(_user_saved, sender=user_model, dispatch_uid="ws-revocation-user-saved")
    post_delete.connect(_user_deleted, sender=user_model, dispatch_uid="ws-revocation-user-del")


def credential_still_valid(scope) -> bool:
    """Whether the socket's credential is still good (read from the database):
    the key not revoked, the session not logged out, the user active."""
    from importlib import import_module

    from django.conf import settings

    from accounts.models import ApiKey

    user = scope.get("user")
    if user is None or not get_user_model().objects.filter(pk=user.pk, is_active=True).exists():
        return False
    if scope.get("auth") == "api_key":
        return ApiKey.objects.active().filter(pk=scope.get("api_key_id"), user=user).exists()
    if scope.get("auth") == "session":
        key = getattr(scope.get("session"), "session_key", None)
        store = import_module(settings.SESSION_ENGINE).SessionStore
        return bool(key) and store().exists(key)
    return True
