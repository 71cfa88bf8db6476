"""What agents keep: the admin's settings, MCP servers and per-tool policies,
each conversation's agent mode, and the steps of every agent turn.

Links to chat are lazy ("chat.Message", "chat.Conversation"): database
references, not imports, so `agents` stays a service that `chat` uses.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models

from agents import limits
from core.fields import optional_link
from runners import crypto


class AgentSettings(models.Model):
    """The one row of agent settings (`AgentSettings.current()`)."""

    max_steps = models.PositiveSmallIntegerField(
        default=limits.DEFAULT_MAX_STEPS,
        validators=[
            MinValueValidator(limits.MAX_STEPS_RANGE[0]),
            MaxValueValidator(limits.MAX_STEPS_RANGE[1]),
        ],
        help_text="Model rounds that may call tools in one turn; a turn that reaches it "
        "ends with what it has and says why.",
    )
    step_timeout_seconds = models.FloatField(
        default=limits.DEFAULT_STEP_TIMEOUT_SECONDS,
        validators=[MinValueValidator(0.1), MaxValueValidator(600)],
        help_text="One tool call's time limit; a slower call is an error result for the model.",
    )
    turn_timeout_seconds = models.FloatField(
        default=limits.DEFAULT_TURN_TIMEOUT_SECONDS,
        validators=[MinValueValidator(1), MaxValueValidator(3600)],
        help_text="The whole agent turn's time limit (model rounds and tools).",
    )
    approval_timeout_seconds = models.FloatField(
        default=limits.DEFAULT_APPROVAL_TIMEOUT_SECONDS,
        validators=[MinValueValidator(1), MaxValueValidator(86400)],
        help_text="How long an 'ask' tool waits for the user; then it counts as denied.",
    )
    fetch_enabled = models.BooleanField(
        default=False, help_text="Offer the fetch_url tool (only to the hosts below)."
    )
    fetch_allowed_hosts = models.TextField(
        blank=True,
        help_text="Host names fetch_url may read, one a line (exact match; "
        "'*.example.com' allows subdomains).",
    )
    fetch_max_bytes = models.PositiveIntegerField(
        default=limits.DEFAULT_FETCH_MAX_BYTES,
        validators=[MinValueValidator(1024), MaxValueValidator(16 * 1024 * 1024)],
    )
    fetch_timeout_seconds = models.FloatField(
        default=limits.DEFAULT_FETCH_TIMEOUT_SECONDS,
        validators=[MinValueValidator(0.5), MaxValueValidator(120)],
    )

    class Meta:
        verbose_name = "agent settings"
        verbose_name_plural = "agent settings"

    def __str__(self) -> str:
        return "Agent settings"

    @classmethod
    def current(cls) -> AgentSettings:
        return cls.objects.order_by("pk").first() or cls()

    @property
    def allowed_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.fetch_allowed_hosts.splitlines() if h.strip()]


class ConversationAgent(models.Model):
    """A conversation's agent mode (the toggle beside "Documents")."""

    conversation = models.OneToOneField(
        "chat.Conversation", on_delete=models.CASCADE, related_name="agent_mode"
    )
    enabled = models.BooleanField(default=False)

    def __str__(self) -> str:
        return (
            f"agent mode {'on' if self.enabled else 'off'} for conversation {self.conversation_id}"
        )


class McpServer(models.Model):
    """A Model Context Protocol server whose tools agents may call."""

    class Transport(models.TextChoices):
        HTTP = "http", "Streamable HTTP"
        STDIO = "stdio", "stdio (a local command)"

    name = models.SlugField(
        max_length=64, unique=True, help_text="Prefix of its tools' names (name__tool)."
    )
    transport = models.CharField(max_length=8, choices=Transport.choices)
    enabled = models.BooleanField(default=True)
    url = models.CharField(max_length=500, blank=True, help_text="Streamable HTTP: the MCP URL.")
    headers_encrypted = models.TextField(blank=True, editable=False)
    command = models.CharField(
        max_length=500, blank=True, help_text="stdio: the program to start (absolute path)."
    )
    args = models.JSONField(default=list, blank=True, help_text="stdio: its arguments (a list).")
    timeout_seconds = models.FloatField(
        default=30.0, validators=[MinValueValidator(1), MaxValueValidator(600)]
    )
    # Last time the server was listed (by the admin or a turn): shown in the admin.
    status = models.CharField(max_length=16, default="unknown", editable=False)
    status_detail = models.TextField(blank=True, editable=False)
    checked_at = models.DateTimeField(null=True, blank=True, editable=False)
    tools = models.JSONField(default=list, blank=True, editable=False)
    version = models.PositiveIntegerField(default=1, editable=False)

    class Meta:
        ordering = ["name"]
        verbose_name = "MCP server"

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        if self.pk and kwargs.get("update_fields") is None:
            self.version = (self.version or 0) + 1
        super().save(*args, **kwargs)

    @property
    def headers(self) -> dict[str, str]:
        """The HTTP headers (secrets), decrypted like runner API keys (runners.crypto)."""
        import json

        plain = crypto.decrypt(self.headers_encrypted)
        try:
            value = json.loads(plain) if plain else {}
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        import json

        self.headers_encrypted = crypto.encrypt(json.dumps(value)) if value else ""

    def clean(self) -> None:
        errors = {}
        if self.transport == self.Transport.HTTP:
            try:
                URLValidator(schemes=["http", "https"])(self.url)
            except ValidationError:
                errors["url"] = "Enter the server's http:// or https:// MCP URL."
            else:
                if urlsplit(self.url).username is not None:
                    # Shown in the admin's list and in errors: secrets go in the headers.
                    errors["url"] = "Do not put credentials in the URL; use the headers field."
        if self.transport == self.Transport.STDIO and not self.command.strip():
            errors["command"] = "Enter the command that starts the server."
        if not isinstance(self.args, list) or not all(isinstance(a, str) for a in self.args):
            errors["args"] = "Arguments must be a JSON list of strings."
        if errors:
            raise ValidationError(errors)


class ToolPolicy(models.Model):
    """Whether a tool may run (allow), must be approved by the user first (ask)
    or is never offered (deny), and to whom. A tool without a policy row is
    allowed to everyone; with groups, only their members may use it."""

    class Policy(models.TextChoices):
        ALLOW = "allow"
        ASK = "ask"
        DENY = "deny"

    server = optional_link(
        McpServer,
        on_delete=models.CASCADE,
        related_name="policies",
        help_text="Empty for a built-in tool.",
    )
    tool = models.CharField(max_length=128, help_text="The tool's name on its server.")
    policy = models.CharField(max_length=8, choices=Policy.choices, default=Policy.ALLOW)
    groups = models.ManyToManyField(
        Group, blank=True, help_text="Only members of these groups may use it (empty: everyone)."
    )

    class Meta:
        ordering = ["server__name", "tool"]
        verbose_name = "tool policy"
        verbose_name_plural = "tool policies"
        constraints = [
            models.UniqueConstraint(fields=["server", "tool"], name="one_policy_per_tool"),
            models.UniqueConstraint(
                fields=["tool"],
                condition=models.Q(server__isnull=True),
                name="one_policy_per_builtin_tool",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.server.name + '__' if self.server_id else ''}{self.tool}: {self.policy}"

    # Set by clean() when the server could not be asked for its tools (the
    # admin shows it as a warning): the name was saved unchecked.
    unchecked = ""

    def clean(self) -> None:
        """The tool must exist: a built-in one's name, or one the server lists
        now (a typo would leave the real tool on its default, *allow*). A
        server that is down cannot say: the name is kept, and `unchecked`
        says why."""
        from asgiref.sync import async_to_sync

        from agents import builtin, mcp

        self.unchecked = ""
        if self.server_id is None:
            if self.tool not in builtin.BUILTIN_NAMES:
                raise ValidationError(
                    {
                        "tool": f"There is no built-in tool named {self.tool!r}. Built-in tools: "
                        f"{', '.join(builtin.BUILTIN_NAMES)}. For an MCP server's tool, choose "
                        "its server."
                    }
                )
            return
        listing = async_to_sync(mcp.current_listing)(self.server)
        if not listing.ok:
            self.unchecked = (
                f"The MCP server {self.server.name} is down ({listing.detail}): the tool name "
                f"{self.tool!r} could not be checked against its tools."
            )
            return
        names = listing.names()
        if self.tool not in names:
            raise ValidationError(
                {
                    "tool": f"The MCP server {self.server.name} lists no tool named "
                    f"{self.tool!r}. Its tools: {', '.join(names) or 'none'}."
                }
            )


class AgentStep(models.Model):
    """One tool call of an agent turn, saved as it happens: the chat shows it
    live and again on reload, and a pause for approval lives here so it
    survives a reload (and any process may record the decision)."""

    class Status(models.TextChoices):
        RUNNING = "running"
        AWAITING_APPROVAL = "awaiting_approval"
        OK = "ok"
        ERROR = "error"
        DENIED = "denied"
        CANCELLED = "cancelled"

    message = models.ForeignKey("chat.Message", on_delete=models.CASCADE, related_name="steps")
    round = models.PositiveSmallIntegerField(
        help_text="The model round that asked for it (1-based)."
    )
    position = models.PositiveSmallIntegerField(help_text="Its place among the round's calls.")
    call_id = models.CharField(max_length=128)
    tool = models.CharField(max_length=200)
    arguments = models.TextField(blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    approved = models.BooleanField(
        null=True, blank=True, help_text="The user's decision (ask tools)."
    )
    result = models.TextField(blank=True)
    error = models.TextField(blank=True)
    sources = models.JSONField(default=list, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["message", "round", "position"]
        indexes = [models.Index(fields=["message", "round", "position"])]

    def __str__(self) -> str:
        return f"{self.tool} ({self.status})"
