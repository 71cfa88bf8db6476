"""Admin for runner configs, run records and guardian rules.

Runner configs: priority and enabled editable in the list, capabilities, the
circuit state and live health per row (fetched lazily by
static/admin/runners/health.js from a small JSON endpoint, so a slow runner
never slows the list), and two actions: "check health" and "send a test
prompt". The API key is write-only (see runners.forms).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from asgiref.sync import async_to_sync

from runners import probes
from runners.forms import (
    GUARDIAN_KIND_HELP,
    GuardianRuleForm,
    LabelledRowForm,
    RunnerConfigForm,
    RunnerConfigListForm,
    TestPromptForm,
    key_status,
)
from runners.models import GuardianRule, RunnerConfig, RunRecord
from runners.registry import runner_class
from runners.router import circuits

TEST_PROMPT_MAX_RUNNERS = 10


def shown_endpoint(url: str) -> str:
    """An endpoint without any user:password@ part (never shown in pages)."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else url.split("@")[-1]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _runner_of(config: RunnerConfig | None):
    """The runner a saved config describes, or None when it cannot be built."""
    if config is None or config.pk is None:
        return None
    try:
        return runner_class(config.kind).from_config(config)
    except Exception:
        return None  # a bad extra_params: the form says what is wrong with it


def _kind_measures(kind: str) -> bool:
    """Whether runners of `kind` keep a measurement of their program (`evaluation()`)."""
    try:
        return hasattr(runner_class(kind), "evaluation")
    except ImproperlyConfigured:
        return False  # an unknown kind: the form says so


@admin.register(RunnerConfig)
class RunnerConfigAdmin(admin.ModelAdmin):
    form = RunnerConfigForm
    list_display = (
        "name",
        "kind_shown",
        "enabled",
        "priority",
        "capabilities_shown",
        "model_id",
        "endpoint_shown",
        "circuit",
        "health",
    )
    list_display_links = ("name",)
    list_editable = ("enabled", "priority")
    list_filter = ("kind", "enabled")
    search_fields = ("name", "model_id", "endpoint")
    actions = ["check_health", "send_test_prompt"]
    readonly_fields = ("stored_key", "measured", "version", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled", "priority")}),
        (
            _("Model and endpoint"),
            {
                "fields": (
                    "model_id",
                    "endpoint",
                    "stored_key",
                    "api_key",
                    "clear_api_key",
                    "measured",
                )
            },
        ),
        (
            _("Generation"),
            {"fields": ("temperature", "max_tokens", "context_tokens", "timeout_seconds")},
        ),
        (
            _("Capabilities"),
            {
                "fields": ("enable_vision", "enable_agents", "enable_rag"),
                "description": "Every runner has llm. A request with an image needs vlm "
                "(vision); a request with tools needs agent. The router only considers "
                "enabled runners that have every capability a request needs.",
            },
        ),
        (
            _("Access"),
            {
                "fields": ("groups",),
                "description": "Which groups may use this runner (docs/teams.md). With no "
                "groups every user may; with groups only their members and superusers see "
                "and use it.",
            },
        ),
        (_("Advanced"), {"fields": ("extra_params", "version", "created_at", "updated_at")}),
    )
    filter_horizontal = ("groups",)

    class Media:
        js = ("admin/runners/health.js",)
        css = {"all": ("admin/runners/runners.css",)}

    # ---- list columns ---------------------------------------------------------------

    @admin.display(description=_("Kind"), ordering="kind")
    def kind_shown(self, obj: RunnerConfig) -> str:
        return obj.kind  # the short name: the list is wide enough already

    @admin.display(description=_("Capabilities"))
    def capabilities_shown(self, obj: RunnerConfig) -> str:
        return ", ".join(obj.capabilities)

    @admin.display(description=_("Endpoint"), ordering="endpoint")
    def endpoint_shown(self, obj: RunnerConfig) -> str:
        return shown_endpoint(obj.endpoint)

    @admin.display(description=_("Circuit"))
    def circuit(self, obj: RunnerConfig) -> str:
        state = circuits.state(obj.name)
        failures = circuits.circuits.get(obj.name)
        count = failures.failures if failures else 0
        return format_html(
            '<span class="runner-circuit runner-circuit-{}">{}</span>{}',
            state,
            state,
            f" ({count} failures)" if count else "",
        )

    @admin.display(description=_("Health"))
    def health(self, obj: RunnerConfig) -> str:
        url = reverse("admin:runners_runnerconfig_health", args=[obj.pk])
        return format_html(
            '<span class="runner-health" data-health-url="{}">{}</span>', url, gettext("checking…")
        )

    @admin.display(description=_("Stored API key"))
    def stored_key(self, obj: RunnerConfig | None) -> str:
        return key_status(obj if obj and obj.pk else None)

    @admin.display(description=_("Measured on this machine"))
    def measured(self, obj: RunnerConfig | None) -> str:
        """A local runner's program: its speed here and its answer agreement
        with fp32, as `manage.py evaluate_model` measured them."""
        runner = _runner_of(obj)
        if runner is None or not hasattr(runner, "evaluation"):
            return "-"
        evaluation = runner.evaluation()
        if evaluation is None:
            return gettext(
                "Not measured yet. Run `python manage.py evaluate_model` on the server (a few "
                "minutes; the first run also prepares the fp32 reference) to see this "
                "model's speed and how often its answers are the full-precision model's."
            )
        return evaluation.summary()

    def get_fieldsets(self, request: HttpRequest, obj: RunnerConfig | None = None):
        fieldsets = super().get_fieldsets(request, obj)
        # Whether the kind measures its program is a property of its class:
        # no runner is built for it (Django asks for the fieldsets repeatedly).
        measures = obj is not None and obj.pk is not None and _kind_measures(obj.kind)
        if not measures:
            return [
                (name, {**options, "fields": [f for f in options["fields"] if f != "measured"]})
                for name, options in fieldsets
            ]
        return fieldsets

    def get_changelist_form(self, request: HttpRequest, **kwargs):
        kwargs.setdefault("form", RunnerConfigListForm)
        return super().get_changelist_form(request, **kwargs)

    # ---- extra views ----------------------------------------------------------------

    def get_urls(self):
        urls = super().get_urls()
        return [
            path(
                "<path:object_id>/health/",
                self.admin_site.admin_view(self.health_view),
                name="runners_runnerconfig_health",
            ),
            *urls,
        ]

    def health_view(self, request: HttpRequest, object_id: str) -> JsonResponse:
        """JSON health of one runner, for the list's lazy health column."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        config = get_object_or_404(RunnerConfig, pk=object_id)
        report = async_to_sync(probes.check_health)(config)
        return JsonResponse(report.as_dict())

    # ---- actions --------------------------------------------------------------------

    @admin.action(description=_("Check health of the selected runners"))
    def check_health(self, request: HttpRequest, queryset: QuerySet[RunnerConfig]) -> None:
        configs = list(queryset)

        async def run_all() -> list[probes.HealthReport]:
            return list(await asyncio.gather(*(probes.check_health(c) for c in configs)))

        for report in async_to_sync(run_all)():
            text = (
                f"{report.name}: {'healthy' if report.ok else 'unhealthy'}: {report.detail} "
                f"({_ms(report.latency_ms)}; circuit {report.circuit})"
            )
            self.message_user(request, text, messages.SUCCESS if report.ok else messages.ERROR)

    # Runs real inference (and may cost money on a remote server): editors only.
    @admin.action(
        description=_("Send a test prompt to the selected runners"), permissions=["change"]
    )
    def send_test_prompt(
        self, request: HttpRequest, queryset: QuerySet[RunnerConfig]
    ) -> HttpResponse | None:
        configs = list(queryset.order_by("-priority", "name"))
        if len(configs) > TEST_PROMPT_MAX_RUNNERS:
            self.message_user(
                request,
                f"Select at most {TEST_PROMPT_MAX_RUNNERS} runners for a test prompt.",
                messages.ERROR,
            )
            return None
        trials: list[probes.PromptTrial] = []
        if "run_prompt" in request.POST:
            form = TestPromptForm(request.POST)
            if form.is_valid():
                for config in configs:
                    trials.append(
                        async_to_sync(probes.try_prompt)(
                            config.name,
                            form.cleaned_data["prompt"],
                            max_tokens=form.cleaned_data["max_tokens"],
                            limit_s=config.timeout_seconds + 5,
                        )
                    )
        else:
            form = TestPromptForm()
        context = {
            **self.admin_site.each_context(request),
            "title": "Send a test prompt",
            "opts": self.model._meta,
            "configs": configs,
            "form": form,
            "trials": trials,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        return TemplateResponse(request, "admin/runners/runnerconfig/test_prompt.html", context)


@admin.register(RunRecord)
class RunRecordAdmin(admin.ModelAdmin):
    """Read-only: records are written by the router, one per attempt."""

    list_display = (
        "created_at",
        "runner_name",
        "model_id",
        "capability",
        "status",
        "error_code",
        "fallback",
        "source",
        "ttft",
        "total",
        "tokens_per_second_shown",
        "completion_tokens",
    )
    list_filter = ("runner_name", "status", "fallback", "error_code", "source", "capability")
    date_hierarchy = "created_at"
    search_fields = ("runner_name", "model_id", "error")
    list_per_page = 50

    @admin.display(description=_("TTFT"), ordering="time_to_first_token_ms")
    def ttft(self, obj: RunRecord) -> str:
        return _ms(obj.time_to_first_token_ms)

    @admin.display(description=_("Total"), ordering="total_ms")
    def total(self, obj: RunRecord) -> str:
        return _ms(obj.total_ms)

    @admin.display(description=_("Tokens/s"), ordering="tokens_per_second")
    def tokens_per_second_shown(self, obj: RunRecord) -> str:
        return "-" if obj.tokens_per_second is None else f"{obj.tokens_per_second:.1f}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: RunRecord | None = None) -> bool:
        return False


@admin.register(GuardianRule)
class GuardianRuleAdmin(admin.ModelAdmin):
    form = GuardianRuleForm
    list_display = ("name", "kind", "value", "applies_to", "enabled", "updated_at")
    list_editable = ("enabled",)
    list_filter = ("kind", "applies_to", "enabled")

    def get_changelist_form(self, request: HttpRequest, **kwargs):
        kwargs.setdefault("form", LabelledRowForm)
        return super().get_changelist_form(request, **kwargs)

    search_fields = ("name", "value", "message")
    fieldsets = (
        (
            None,
            {
                "fields": ("name", "kind", "value", "applies_to", "message", "enabled"),
                "description": format_html(
                    "Rules are read on every chat turn (no restart needed). Kinds:<ul>{}</ul>",
                    format_html(
                        "".join("<li><b>{}</b>: {}</li>" for _ in GUARDIAN_KIND_HELP),
                        *(x for pair in GUARDIAN_KIND_HELP.items() for x in pair),
                    ),
                ),
            },
        ),
    )
