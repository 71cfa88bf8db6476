"""Chat data: projects, conversations and their messages."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils.translation import gettext_lazy

from chat import limits
from core.fields import optional_link
from runners.base import SAMPLING_BOUNDS


def _sampling_field(name: str) -> models.FloatField:
    """An optional sampling parameter, within the bounds every runner accepts."""
    low, high = SAMPLING_BOUNDS[name][1:3]
    validators = [MinValueValidator(low), MaxValueValidator(high)]
    return models.FloatField(null=True, blank=True, validators=validators)


class Project(models.Model):
    """A folder of conversations with its own defaults. Its instructions are
    read at every turn of its conversations (edit them and the next answer
    follows them); its runner, documents and parameters are copied onto a
    conversation when it is started in the project, and remain the
    conversation's own afterwards (the user may change them per chat)."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="projects"
    )
    name = models.CharField(max_length=limits.MAX_TITLE_CHARS)
    instructions = models.TextField(
        blank=True,
        max_length=limits.MAX_INSTRUCTIONS_CHARS,
        help_text="A system prompt given to the model before every turn of its conversations.",
    )
    runner = optional_link(
        "runners.RunnerConfig",
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="New chats answer with this runner; empty means the router chooses.",
    )
    rag_enabled = models.BooleanField(default=False, help_text="New chats answer from documents.")
    collections = models.ManyToManyField(
        "rag.Collection",
        blank=True,
        related_name="+",
        help_text="The documents new chats search (default: all the user may read).",
    )
    temperature = _sampling_field("temperature")
    top_p = _sampling_field("top_p")
    max_tokens = models.PositiveIntegerField(
        null=True, blank=True, validators=[MaxValueValidator(limits.MAX_TOKENS)]
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        indexes = [models.Index(fields=["owner", "name"])]

    def __str__(self) -> str:
        return self.name


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, default=gettext_lazy("New chat"))
    pinned_runner = optional_link(
        "runners.RunnerConfig",
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Answer with this runner only; empty means the router chooses.",
    )
    rag_enabled = models.BooleanField(default=False)
    collections = models.ManyToManyField("rag.Collection", blank=True, related_name="+")
    project = optional_link(
        Project,
        on_delete=models.SET_NULL,
        related_name="conversations",
        help_text="Deleting a project keeps its conversations, outside any project.",
    )
    pinned = models.BooleanField(default=False, help_text="Listed first.")
    active_leaf = optional_link(
        "Message",
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The last message of the branch shown and answered (the active path ends here).",
    )
    temperature = models.FloatField(null=True, blank=True)
    top_p = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "breezeweb_conversation"  # the table keeps the name it had before the app split
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
    parent = optional_link(
        "self",
        on_delete=models.CASCADE,
        related_name="children",
        help_text="The message this one follows; siblings (same parent) are branches.",
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
        db_table = "breezeweb_message"
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "created_at"])]

    def __str__(self) -> str:
        preview = self.content[:40].replace("\n", " ")
        return f"{self.role}: {preview}"

    # Set to True on an unsaved message to make it a root (the first message of
    # a conversation has no parent anyway; an edit of it is a second root).
    root = False

    def save(self, *args, move_leaf: bool = True, **kwargs) -> None:
        """A new message follows its conversation's active path unless given a
        parent (a regenerated answer, an edited message: a sibling, i.e. a new
        branch), and becomes the end of that path: a conversation is a tree of
        messages, and what the page shows and the model reads is one path of it.
        `move_leaf=False`: the caller moves the conversation's leaf itself."""
        adding = self._state.adding
        if adding and self.parent_id is None and not self.root:
            self.parent_id = (
                Conversation.objects.filter(pk=self.conversation_id)
                .values_list("active_leaf_id", flat=True)
                .first()
            ) or (
                Message.objects.filter(conversation_id=self.conversation_id)
                .order_by("-id")
                .values_list("id", flat=True)
                .first()
            )
        super().save(*args, **kwargs)
        if adding and move_leaf:
            Conversation.objects.filter(pk=self.conversation_id).update(active_leaf_id=self.pk)


class ShareLink(models.Model):
    """A read-only link to a snapshot of one conversation's active branch, as
    it was when the link was made. Only a hash of its token is kept (the URL
    is shown once); revoking or expiry ends it at once."""

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="share_links"
    )
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=12, editable=False, help_text="To recognise it.")
    title = models.CharField(max_length=limits.MAX_TITLE_CHARS)
    snapshot = models.JSONField(help_text="The shared messages, frozen when the link was made.")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    views = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.title})"


class ImportJob(models.Model):
    """One upload of conversations to import, worked through off the request
    (chat.transfer): its progress and, once done, what was imported and what
    was skipped, and why."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    source_format = models.CharField(max_length=16, blank=True)
    total = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    report = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    # Which of chat.transfer.IMPORT_ERRORS `error` is (the page shows it translated).
    error_code = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"import {self.pk} ({self.status}, {self.done}/{self.total})"


def _price_field(help_text: str) -> models.DecimalField:
    """A runner price per million tokens, in its currency: not negative, 0 by default."""
    return models.DecimalField(
        max_digits=12,
        decimal_places=4,
        default=0,
        validators=[MinValueValidator(0)],
        help_text=help_text,
    )


class RunnerPrice(models.Model):
    """What the admin says one runner's tokens cost, so each answer can show
    its cost (chat.services.message_dict). Prices are per million tokens."""

    runner = models.OneToOneField(
        "runners.RunnerConfig", on_delete=models.CASCADE, related_name="price"
    )
    currency = models.CharField(max_length=3, default="USD", help_text="ISO 4217, e.g. USD, EUR.")
    prompt_per_million = _price_field("Price of one million prompt (input) tokens.")
    completion_per_million = _price_field("Price of one million answer (output) tokens.")

    class Meta:
        verbose_name = "runner price"

    def __str__(self) -> str:
        return f"{self.runner} ({self.currency})"

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        per_token = (prompt_tokens or 0) * self.prompt_per_million + (
            completion_tokens or 0
        ) * self.completion_per_million
        return float(per_token / 1_000_000)
