"""What both interfaces need to know about callers: API keys, quotas, and the
record of the first run."""

from __future__ import annotations

import copy
import hashlib
import secrets
import threading
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from core import generation
from core.fields import optional_link
from core.generation import WatchedQuerySet


def _hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


# When this process last wrote each key's `last_used_at`, by the key's hash
# (ApiKey.lookup).
_last_used: dict[str, datetime] = {}
_last_used_lock = threading.Lock()


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def active(self) -> ApiKeyQuerySet:
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A bearer key for the HTTP and websocket APIs. Only its sha256 is stored."""

    PREFIX = "bw_"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="First characters, to recognise a key.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        db_table = "breezeweb_apikey"  # the table keeps the name it had before the app split
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(cls, user, name: str) -> tuple[ApiKey, str]:
        """Create a key; returns the row and the raw key, which is shown once."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(user=user, name=name, prefix=raw[:10], key_hash=_hash_key(raw))
        return key, raw

    # `last_used_at` is kept to the minute: a key's requests within a minute
    # of its last recorded use write nothing (a database write per request
    # was the largest single cost of an API call).
    LAST_USED_RESOLUTION = timedelta(minutes=1)

    @classmethod
    def lookup(cls, raw: str) -> ApiKey | None:
        """The active key of an active user for a raw key, or None (a copy of
        its own: the caller may set attributes on it and its user). Read from
        the database once per config version (core.generation: saving or
        deleting a key or a user moves it, in every process, so a revoked
        key or a deactivated user is refused on the next request). Updates
        last_used_at when it is more than LAST_USED_RESOLUTION old."""
        if not raw or not raw.startswith(cls.PREFIX):
            return None
        digest = _hash_key(raw)
        found = generation.memo(("api-key", digest), lambda: cls._active(digest))
        if found is None:
            return None
        key = copy.copy(found)
        key.user = copy.copy(found.user)
        now = timezone.now()
        with _last_used_lock:
            last = _last_used.get(digest, key.last_used_at)
            due = last is None or now - last >= cls.LAST_USED_RESOLUTION
            if due:
                _last_used[digest] = now
        if due:
            cls.objects.filter(pk=key.pk).update(last_used_at=now)
            key.last_used_at = now
        else:
            key.last_used_at = last
        return key

    @classmethod
    def _active(cls, digest: str) -> ApiKey | None:
        return (
            cls.objects.active()
            .select_related("user")
            .filter(key_hash=digest, user__is_active=True)
            .first()
        )

    @classmethod
    def authenticate(cls, raw: str):
        """The active user of a raw key, or None. Updates last_used_at."""
        key = cls.lookup(raw)
        return key.user if key else None

    def revoke(self) -> None:
        self.revoked_at = timezone.now()
        self.save(update_fields=["revoked_at"])


class FirstRun(models.Model):
    """The record that the first admin account was created in the browser.

    There can be only one row (its primary key is fixed at 1 and checked), so
    two browsers submitting the first-run form at the same moment race on a
    database constraint: one insert wins, the other fails and is told the
    account exists. The row stays, so the page is never offered again, even
    if every account is later deleted."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1, editable=False)
    username = models.CharField(max_length=150, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(id=1), name="first_run_once")]
        verbose_name = "first run"

    def __str__(self) -> str:
        return f"first admin {self.username!r} created {self.created_at:%Y-%m-%d %H:%M}"


def _quota_scope(to: str, help_text: str) -> models.ForeignKey:
    """What a quota is for (its user, its group, its runner): optional, reached
    as `.quotas`, and deleting it deletes its quotas."""
    return optional_link(to, on_delete=models.CASCADE, related_name="quotas", help_text=help_text)


class Quota(models.Model):
    """A budget of tokens or messages per day or month, for one user or for a
    group's members together, on every runner or on one (docs/teams.md).
    Checked before each turn starts; a user is held to every quota that names
    them or one of their groups."""

    class Metric(models.TextChoices):
        TOKENS = "tokens", "tokens (prompt + answer)"
        MESSAGES = "messages", "messages (turns)"

    class Period(models.TextChoices):
        DAY = "day", "per day"
        MONTH = "month", "per month"

    user = _quota_scope(
        settings.AUTH_USER_MODEL, "This user's own budget. Set a user or a group, not both."
    )
    group = _quota_scope("auth.Group", "One budget shared by the group's members together.")
    runner = _quota_scope(
        "runners.RunnerConfig",
        "Only turns answered by this runner count, and only it is refused when "
        "the budget is spent (auto then picks another). Empty: every runner.",
    )
    metric = models.CharField(max_length=8, choices=Metric.choices)
    period = models.CharField(max_length=5, choices=Period.choices)
    limit = models.PositiveBigIntegerField(help_text="0 refuses every turn.")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = WatchedQuerySet.as_manager()

    class Meta:
        ordering = ["group__name", "user__username", "metric", "period"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False, group__isnull=True)
                | models.Q(user__isnull=True, group__isnull=False),
                name="quota_for_a_user_or_a_group",
            )
        ]

    def __str__(self) -> str:
        who = f"group {self.group}" if self.group_id else f"user {self.user}"
        on = f" on {self.runner}" if self.runner_id else ""
        return f"{who}: {self.limit} {self.metric} {self.get_period_display()}{on}"

    def clean(self) -> None:
        if bool(self.user_id) == bool(self.group_id):
            raise ValidationError("Choose a user or a group (one of them).")


class OidcIdentity(models.Model):
    """Who a user is at the single sign-on provider: its `sub` for one issuer
    (accounts.oidc). The only way a provider account finds its local user."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="oidc_identity"
    )
    issuer = models.CharField(max_length=255)
    subject = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["issuer", "subject"], name="one_user_per_oidc_subject")
        ]
        verbose_name = "single sign-on identity"

    def __str__(self) -> str:
        return f"{self.user} = {self.subject} at {self.issuer}"


class UserSession(models.Model):
    """A browser session of a user, recorded at sign-in so the user can see
    their sessions and a password change can end the others (with their
    websockets). The session's data stays in Django's session store."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="browser_sessions"
    )
    session_key = models.CharField(max_length=40, unique=True)
    user_agent = models.CharField(max_length=200, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.user} since {self.created_at:%Y-%m-%d %H:%M}"


def _token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class Invite(models.Model):
    """A one-time link an admin sends to let someone create their account.
    Only the token's sha256 is stored; the link is shown once, when made."""

    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    note = models.CharField(
        max_length=200, blank=True, help_text="Who it is for (shown only in the admin)."
    )
    groups = models.ManyToManyField(
        "auth.Group", blank=True, help_text="The new account joins these groups."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True, editable=False)
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="invite",
        editable=False,
        help_text="The account made with it.",
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.note or f"invite {self.pk}"

    @staticmethod
    def new_token() -> tuple[str, str]:
        """(raw token for the link, its hash to store)."""
        raw = secrets.token_urlsafe(32)
        return raw, _token_hash(raw)

    @classmethod
    def open_for(cls, raw: str) -> Invite | None:
        """The unused, unexpired invite of a raw token, or None."""
        return cls.objects.filter(
            token_hash=_token_hash(raw), used_at__isnull=True, expires_at__gt=timezone.now()
        ).first()
