"""Chat data: conversations, their messages, and API keys."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, default="New chat")
    pinned_runner = models.ForeignKey(
        "runners.RunnerConfig",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Answer with this runner only; empty means the router chooses.",
    )
    rag_enabled = models.BooleanField(default=False)
    collections = models.ManyToManyField("rag.Collection", blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"

    class Status(models.TextChoices):
        COMPLETE = "complete"
        STREAMING = "streaming"
        STOPPED = "stopped"
        FAILED = "failed"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    images = models.JSONField(default=list, blank=True, help_text="Attached images as data URLs.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    runner_name = models.CharField(max_length=100, blank=True)
    model_id = models.CharField(max_length=200, blank=True)
    fallback = models.BooleanField(default=False)
    finish_reason = models.CharField(max_length=32, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    tokens_per_second = models.FloatField(null=True, blank=True)
    total_ms = models.FloatField(null=True, blank=True)
    sources = models.JSONField(default=list, blank=True)
    error_code = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "created_at"])]

    def __str__(self) -> str:
        preview = self.content[:40].replace("\n", " ")
        return f"{self.role}: {preview}"


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
    def authenticate(cls, raw: str):
        """The active user of a raw key, or None. Updates last_used_at."""
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
        return key.user

    def revoke(self) -> None:
        self.revoked_at = timezone.now()
        self.save(update_fields=["revoked_at"])
