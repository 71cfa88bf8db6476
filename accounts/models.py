"""What both interfaces need to know about callers: API keys."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone


def _hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


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

    @classmethod
    def lookup(cls, raw: str) -> ApiKey | None:
        """The active key of an active user for a raw key, or None. Updates last_used_at."""
        if not raw or not raw.startswith(cls.PREFIX):
            return None
        key = (
            cls.objects.active()
            .select_related("user")
            .filter(key_hash=_hash_key(raw), user__is_active=True)
            .first()
        )
        if key is None:
            return None
        cls.objects.filter(pk=key.pk).update(last_used_at=timezone.now())
        return key

    @classmethod
    def authenticate(cls, raw: str):
        """The active user of a raw key, or None. Updates last_used_at."""
        key = cls.lookup(raw)
        return key.user if key else None

    def revoke(self) -> None:
        self.revoked_at = timezone.now()
        self.save(update_fields=["revoked_at"])
