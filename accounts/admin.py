from django.contrib import admin

from accounts.models import ApiKey, Quota


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]

    def has_add_permission(self, request):
        # Keys are issued from the user's settings page, where the raw key is shown once.
        return False

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for key in queryset.filter(revoked_at__isnull=True):
            key.revoke()


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    """Budgets per user or group (docs/teams.md): checked before each turn."""

    list_display = ("__str__", "user", "group", "metric", "period", "limit", "runner")
    list_filter = ("metric", "period", "group", "runner")
    search_fields = ("user__username", "group__name")
    autocomplete_fields = ("user", "group")
    fields = ("user", "group", "metric", "period", "limit", "runner")
