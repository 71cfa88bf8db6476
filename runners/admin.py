from django.contrib import admin

from runners.models import GuardianRule, RunnerConfig, RunRecord


@admin.register(RunnerConfig)
class RunnerConfigAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "enabled", "priority", "model_id", "endpoint")
    list_editable = ("enabled", "priority")
    exclude = ("api_key_encrypted",)


@admin.register(RunRecord)
class RunRecordAdmin(admin.ModelAdmin):
    list_display = ("created_at", "runner_name", "status", "error_code", "fallback", "total_ms")
    list_filter = ("status", "runner_name", "fallback", "error_code")


@admin.register(GuardianRule)
class GuardianRuleAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "applies_to", "enabled")
    list_editable = ("enabled",)
