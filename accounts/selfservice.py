"""Self-service and account admin (docs/teams.md): the sessions a user has,
ending them (a password change ends all but the current one, with their
websockets, through accounts.revocation), deactivation, and invites.

Sessions are recorded at sign-in (`UserSession`); their data stays in
Django's session store, so ending one deletes it there and tells its sockets
(any process, over the channel layer) that their credential ended.
"""

from __future__ import annotations

from datetime import timedelta
from importlib import import_module

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out
from django.db import transaction
from django.db.models.signals import post_save
from django.utils import timezone

from accounts.models import Invite, UserSession
from accounts.revocation import end_sockets, session_group

INVITE_DAYS = 7


def _store():
    return import_module(settings.SESSION_ENGINE).SessionStore


def end_session(key: str, reason: str) -> None:
    """Delete one session and close its websockets."""
    _store()(session_key=key).delete()
    UserSession.objects.filter(session_key=key).delete()
    end_sockets(session_group(key), reason)


def end_other_sessions(user, keep: str | None, reason: str) -> int:
    """End every recorded session of `user` but `keep`; returns how many."""
    keys = list(
        UserSession.objects.filter(user=user)
        .exclude(session_key=keep or "")
        .values_list("session_key", flat=True)
    )
    for key in keys:
        end_session(key, reason)
    return len(keys)


def session_renamed(before: str | None, now: str | None) -> None:
    """Keep the record of a session whose key changed (a password change
    cycles it) pointing at the live key."""
    if before and now and before != now:
        UserSession.objects.filter(session_key=before).update(session_key=now)


def sessions_of(user) -> list[UserSession]:
    """The user's live sessions (records of expired or deleted ones are dropped)."""
    store = _store()()
    live = []
    for row in UserSession.objects.filter(user=user):
        if store.exists(row.session_key):
            live.append(row)
        else:
            row.delete()
    return live


def deactivate(user) -> None:
    """Deactivate `user` and end every session and socket at once."""
    user.is_active = False
    user.save(update_fields=["is_active"])  # accounts.revocation ends the sockets


# ---- invites ----------------------------------------------------------------------------


def make_invite(created_by, note: str = "", groups=(), days: int = INVITE_DAYS) -> tuple:
    """A new invite and the raw token of its link (shown once)."""
    raw, digest = Invite.new_token()
    invite = Invite.objects.create(
        token_hash=digest,
        note=note,
        created_by=created_by,
        expires_at=timezone.now() + timedelta(days=days),
    )
    invite.groups.set(groups)
    return invite, raw


class InviteUsed(Exception):
    """The link was used, expired or never existed."""


def accept_invite(raw: str, form):
    """Create the account of a valid user-creation `form` with the invite of
    `raw`, once: the invite is claimed by a conditional update, so two
    submissions of the same link create one account. Raises InviteUsed."""
    with transaction.atomic():
        invite = Invite.open_for(raw)
        if invite is None:
            raise InviteUsed
        now = timezone.now()
        claimed = Invite.objects.filter(pk=invite.pk, used_at__isnull=True).update(used_at=now)
        if claimed != 1:
            raise InviteUsed
        user = form.save()
        user.groups.set(invite.groups.all())
        Invite.objects.filter(pk=invite.pk).update(user=user)
        return user


# ---- receivers --------------------------------------------------------------------------


def _logged_in(sender, request, user, **kwargs) -> None:
    session = getattr(request, "session", None)
    if session is None:
        return
    if session.session_key is None:
        session.save()
    meta = getattr(request, "META", {})
    UserSession.objects.update_or_create(
        session_key=session.session_key,
        defaults={
            "user": user,
            "user_agent": str(meta.get("HTTP_USER_AGENT", ""))[:200],
            "ip_address": meta.get("REMOTE_ADDR") or None,
        },
    )


def _logged_out(sender, request, user, **kwargs) -> None:
    key = getattr(getattr(request, "session", None), "session_key", None)
    if key:
        UserSession.objects.filter(session_key=key).delete()


def _user_saved(sender, instance, created, **kwargs) -> None:
    if not created and not instance.is_active:
        for key in UserSession.objects.filter(user=instance).values_list("session_key", flat=True):
            end_session(key, "The account was deactivated.")


def connect_receivers() -> None:
    user_logged_in.connect(_logged_in, dispatch_uid="selfservice-logged-in")
    user_logged_out.connect(_logged_out, dispatch_uid="selfservice-logged-out")
    post_save.connect(_user_saved, sender=get_user_model(), dispatch_uid="selfservice-user-saved")
