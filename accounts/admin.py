from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from accounts import selfservice
from accounts.models import ApiKey, Invite, Quota


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

    @admin.action(description=_("Revoke selected keys"))
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


class InviteForm(forms.ModelForm):
    days = forms.IntegerField(
        min_value=1, max_value=90, initial=selfservice.INVITE_DAYS, help_text="Valid for days."
    )

    class Meta:
        model = Invite
        fields = ("note", "groups")


@admin.register(Invite)
class InviteAdmin(admin.ModelAdmin):
    """One-time links to create an account (docs/teams.md). The link is shown
    once, right after the invite is made; only its hash is kept."""

    form = InviteForm
    list_display = ("__str__", "created_by", "created_at", "expires_at", "used_at", "user")
    readonly_fields = ("created_by", "created_at", "expires_at", "used_at", "user")
    filter_horizontal = ("groups",)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("note", "groups", "days")
        return ("note", "groups", *self.readonly_fields)

    def get_form(self, request, obj=None, **kwargs):
        if obj is not None:
            kwargs["form"] = forms.ModelForm
        return super().get_form(request, obj, **kwargs)

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        raw, obj.token_hash = Invite.new_token()
        obj.created_by = request.user
        obj.expires_at = timezone.now() + timedelta(days=form.cleaned_data["days"])
        super().save_model(request, obj, form, change)
        link = request.build_absolute_uri(reverse("invite", args=[raw]))
        messages.warning(
            request,
            format_html("Send this link; it is shown only now and works once: {}", link),
        )


class TeamUserAdmin(UserAdmin):
    """Django's user admin plus deactivation that ends sessions and sockets."""

    actions = ["deactivate"]

    @admin.action(description=_("Deactivate (ends their sessions and open chats at once)"))
    def deactivate(self, request, queryset):
        for user in queryset.filter(is_active=True):
            selfservice.deactivate(user)


admin.site.unregister(User)
admin.site.register(User, TeamUserAdmin)
