"""Admin for agents: the settings (step cap, time limits, URL fetching), MCP
servers (headers write-only and encrypted like runner API keys, status and
tools as last listed, a "check now" action), per-tool policies with groups
(the tool name checked against what exists; a warning when it could not be),
and the saved steps of agent turns (read-only)."""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from asgiref.sync import async_to_sync

from agents import limits, mcp
from agents.models import AgentSettings, AgentStep, McpServer, ToolPolicy


@admin.register(AgentSettings)
class AgentSettingsAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "max_steps",
        "step_timeout_seconds",
        "turn_timeout_seconds",
        "fetch_enabled",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        # One row: the settings every agent turn reads.
        return not AgentSettings.objects.exists()


class McpServerForm(forms.ModelForm):
    """Headers are write-only: never rendered back, blank keeps them."""

    headers = forms.CharField(
        label="Headers",
        required=False,
        max_length=limits.MAX_MCP_HEADER_CHARS,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text='Write-only JSON object sent with every request, e.g. {"Authorization": '
        '"Bearer ..."}; stored encrypted with a key derived from SECRET_KEY (as runner API '
        "keys are). Leave blank to keep the stored headers.",
    )
    clear_headers = forms.BooleanField(label="Clear the stored headers", required=False)

    class Meta:
        model = McpServer
        fields = ["name", "transport", "enabled", "url", "command", "args", "timeout_seconds"]

    def clean_headers(self) -> dict[str, str] | None:
        raw = self.cleaned_data.get("headers") or ""
        if not raw.strip():
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            # Never echo the value: it holds secrets.
            raise ValidationError("Enter the headers as a JSON object of strings.") from None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValidationError("Enter the headers as a JSON object of strings.")
        return value

    def save(self, commit: bool = True) -> McpServer:
        server = super().save(commit=False)
        if self.cleaned_data.get("clear_headers"):
            server.headers = {}
        elif self.cleaned_data.get("headers"):
            server.headers = self.cleaned_data["headers"]
        if commit:
            server.save()
        return server


@admin.register(McpServer)
class McpServerAdmin(admin.ModelAdmin):
    form = McpServerForm
    list_display = (
        "name",
        "transport",
        "enabled",
        "status",
        "status_detail",
        "checked_at",
        "tool_names",
    )
    list_filter = ("transport", "enabled", "status")
    readonly_fields = ("stored_headers", "status", "status_detail", "checked_at", "tool_names")
    actions = ["check_now"]
    fieldsets = (
        (None, {"fields": ("name", "transport", "enabled", "timeout_seconds")}),
        (_("Streamable HTTP"), {"fields": ("url", "stored_headers", "headers", "clear_headers")}),
        ("stdio", {"fields": ("command", "args")}),
        (_("Last listed"), {"fields": ("status", "status_detail", "checked_at", "tool_names")}),
    )

    @admin.display(description=_("Stored headers"))
    def stored_headers(self, obj: McpServer) -> str:
        if not obj.headers_encrypted:
            return "None stored."
        names = sorted(obj.headers)
        if not names:
            return "Stored but cannot be decrypted with the current SECRET_KEY: enter them again."
        # Names only: a header's value is a secret.
        return "Stored, encrypted: " + ", ".join(f"{n}: ••••••••" for n in names)

    @admin.display(description=_("Tools"))
    def tool_names(self, obj: McpServer) -> str:
        return ", ".join(t.get("name", "") for t in obj.tools or []) or "-"

    @admin.action(description=_("List their tools now (shows whether they are up)"))
    def check_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        for server in queryset:
            ok, detail, _ = async_to_sync(mcp.check)(server)
            level = messages.SUCCESS if ok else messages.WARNING
            self.message_user(request, f"{server.name}: {'up' if ok else 'down'} ({detail})", level)


@admin.register(ToolPolicy)
class ToolPolicyAdmin(admin.ModelAdmin):
    list_display = ("tool", "server", "policy", "group_names")
    list_editable = ("policy",)
    list_filter = ("policy", "server")
    filter_horizontal = ("groups",)

    def save_model(self, request: HttpRequest, obj: ToolPolicy, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if obj.unchecked:
            self.message_user(request, obj.unchecked, messages.WARNING)

    @admin.display(description=_("Groups"))
    def group_names(self, obj: ToolPolicy) -> str:
        return ", ".join(g.name for g in obj.groups.all()) or "everyone"


@admin.register(AgentStep)
class AgentStepAdmin(admin.ModelAdmin):
    list_display = ("tool", "status", "message", "round", "duration_ms", "created_at")
    list_filter = ("status",)
    search_fields = ("tool",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
