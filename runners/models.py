"""Runner configuration (admin-edited), per-attempt run records, guardian rules."""

from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models
from django.db.models import Exists, OuterRef

from core.fields import optional_link
from core.generation import WatchedQuerySet
from runners import crypto
from runners.registry import KIND_CHOICES, RUNNER_KINDS, runner_class


class RunnerConfigQuerySet(WatchedQuerySet):
    def usable_by(self, user) -> RunnerConfigQuerySet:
        """The runners `user` may use: every runner with no groups (open to
        everyone, so an install without groups works as before), and those
        whose groups include one of the user's; every runner for a superuser.
        The one rule: the router, the picker and both APIs ask it."""
        if user.is_superuser:
            return self.all()
        restricted = RunnerConfig.groups.through.objects.filter(runnerconfig=OuterRef("pk"))
        mine = restricted.filter(group__in=user.groups.values("pk"))
        return self.filter(~Exists(restricted) | Exists(mine))


class RunnerConfig(models.Model):
    """One configured inference runner. Saving bumps `version`, which every
    process compares to rebuild its cached runner (no restart needed)."""

    name = models.SlugField(
        max_length=100, unique=True, help_text="Shown to users and used as the API model id."
    )
    kind = models.CharField(max_length=32, choices=KIND_CHOICES)
    enabled = models.BooleanField(default=True)
    priority = models.IntegerField(
        default=0,
        validators=[MinValueValidator(0)],
        help_text="Higher answers first; the router falls back to the next one on failure.",
    )
    model_id = models.CharField(
        max_length=200,
        blank=True,
        help_text="Llama Stack: the served model id (e.g. PROVIDER/MODEL). "
        "ExecuTorch: a label; the files come from extra params or the prepared model.",
    )
    endpoint = models.CharField(
        max_length=500, blank=True, help_text="Llama Stack server URL, e.g. http://localhost:8321"
    )
    api_key_encrypted = models.TextField(blank=True, editable=False)
    temperature = models.FloatField(
        default=0.7, validators=[MinValueValidator(0.0), MaxValueValidator(2.0)]
    )
    max_tokens = models.PositiveIntegerField(
        default=512, validators=[MinValueValidator(1), MaxValueValidator(32768)]
    )
    context_tokens = models.PositiveIntegerField(
        default=2048,
        validators=[MinValueValidator(256), MaxValueValidator(1_048_576)],
        help_text="Context budget in the model's tokens: prompt + answer.",
    )
    enable_vision = models.BooleanField(default=False)
    enable_rag = models.BooleanField(default=True)
    enable_agents = models.BooleanField(default=False)
    timeout_seconds = models.FloatField(
        default=60.0, validators=[MinValueValidator(1.0), MaxValueValidator(3600.0)]
    )
    extra_params = models.JSONField(
        default=dict,
        blank=True,
        help_text="Kind-specific options as a JSON object (see docs/runners.md).",
    )
    groups = models.ManyToManyField(
        "auth.Group",
        blank=True,
        related_name="runners",
        help_text="Only members of these groups (and superusers) may use this runner; "
        "to everyone else it does not exist. Empty: everyone may use it.",
    )
    version = models.PositiveIntegerField(default=1, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = RunnerConfigQuerySet.as_manager()

    class Meta:
        ordering = ["-priority", "name"]
        indexes = [models.Index(fields=["enabled", "-priority"])]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        if self.pk:
            self.version = (self.version or 0) + 1
            if kwargs.get("update_fields") is not None:
                kwargs["update_fields"] = {*kwargs["update_fields"], "version", "updated_at"}
        super().save(*args, **kwargs)

    @property
    def api_key(self) -> str:
        return crypto.decrypt(self.api_key_encrypted)

    @api_key.setter
    def api_key(self, value: str) -> None:
        self.api_key_encrypted = crypto.encrypt(value)

    @property
    def capabilities(self) -> list[str]:
        caps = ["llm"]
        if self.enable_vision:
            caps.append("vlm")
        if self.enable_agents:
            caps.append("agent")
        return caps

    def clean(self) -> None:
        errors = {}
        if self.endpoint:
            try:
                URLValidator(schemes=["http", "https"])(self.endpoint)
            except ValidationError:
                errors["endpoint"] = "Enter an http:// or https:// URL, e.g. http://localhost:8321"
        if self.kind in RUNNER_KINDS and self.enabled:
            for field, message in runner_class(self.kind).validate_config(self).items():
                errors.setdefault(field, message)
        if not isinstance(self.extra_params, dict):
            errors["extra_params"] = "Extra params must be a JSON object."
        else:
            from runners.loopguard import settings_problem

            problem = settings_problem(self.extra_params.get("loop_guard"))
            if problem:
                errors.setdefault("extra_params", problem)
        if errors:
            raise ValidationError(errors)


def _whose_turn(to: str, help_text: str) -> models.ForeignKey:
    """Who a run record's turn was for (its user, its API key): optional, reached
    as `.run_records`; deleting them keeps the records (the link empties)."""
    return optional_link(
        to, on_delete=models.SET_NULL, related_name="run_records", help_text=help_text
    )


class RunRecord(models.Model):
    """One attempt by one runner to answer one request."""

    class Status(models.TextChoices):
        OK = "ok"
        FAILED = "failed"
        STOPPED = "stopped"

    runner = models.ForeignKey(
        RunnerConfig, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    runner_name = models.CharField(max_length=100)
    model_id = models.CharField(max_length=200, blank=True)
    capability = models.CharField(max_length=16, default="llm")
    status = models.CharField(max_length=16, choices=Status.choices)
    error_code = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True)
    fallback = models.BooleanField(default=False, help_text="Another runner was tried first.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    total_ms = models.FloatField(null=True, blank=True)
    tokens_per_second = models.FloatField(null=True, blank=True)
    source = models.CharField(max_length=16, default="chat", help_text="chat, api, admin")
    message = models.ForeignKey(
        "chat.Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    # Whose turn it was, for usage accounting and quotas (docs/teams.md). Lazy
    # references, database links only: runners imports neither app.
    user = _whose_turn(
        settings.AUTH_USER_MODEL, "Whose turn it was; empty for the admin's test prompt."
    )
    api_key = _whose_turn(
        "accounts.ApiKey", "The API key the turn came with; empty for the browser's session."
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["runner_name", "-created_at"]),
            # The usage page and the quotas read one user's records over a period.
            models.Index(fields=["user", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.runner_name} {self.status} @ {self.created_at:%Y-%m-%d %H:%M:%S}"


class GuardianRule(models.Model):
    """An admin-managed content rule applied to input and/or streamed output."""

    class Kind(models.TextChoices):
        MAX_LENGTH = "max_length", "Maximum input length (characters)"
        BLOCK_TERM = "block_term", "Block a term (case-insensitive)"
        BLOCK_PATTERN = "block_pattern", "Block a regular expression"
        MASK_TERM = "mask_term", "Mask a term in output"
        MASK_PATTERN = "mask_pattern", "Mask a regular expression in output"

    class Applies(models.TextChoices):
        INPUT = "input"
        OUTPUT = "output"
        BOTH = "both"

    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    value = models.CharField(
        max_length=500, help_text="The term, the pattern, or the maximum length."
    )
    applies_to = models.CharField(max_length=8, choices=Applies.choices, default=Applies.BOTH)
    message = models.CharField(
        max_length=300,
        blank=True,
        help_text="Told to the user when the rule blocks something.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = WatchedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.kind == self.Kind.MAX_LENGTH and (not self.value.isdigit() or int(self.value) < 1):
            raise ValidationError({"value": "Enter a positive whole number of characters."})
        if self.kind in {self.Kind.BLOCK_PATTERN, self.Kind.MASK_PATTERN}:
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValidationError({"value": f"Not a valid regular expression: {exc}"}) from None
