"""The API keys settings page: a user creates (named), lists and revokes keys.

The raw key is shown exactly once, in the response to the form that created
it (never stored, never put in a URL, a message or the session), and the page
is never cached. Admins see and revoke every key in the admin (ApiKeyAdmin).
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext, gettext_lazy
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from accounts.models import ApiKey
from chat.inputs import clean_name as display_name
from chat.limits import MAX_ACTIVE_KEYS


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        strip=True,
        help_text=gettext_lazy("What the key is for, e.g. “laptop scripts” or “CI”."),
        widget=forms.TextInput(
            attrs={"autocomplete": "off", "placeholder": gettext_lazy("e.g. laptop scripts")}
        ),
    )

    def __init__(self, *args, user=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_name(self) -> str:
        """The name as shown (chat.inputs.clean_name: control characters
        removed, whitespace collapsed); one of nothing but those is missing."""
        name = display_name(self.cleaned_data["name"])
        if not name:
            raise forms.ValidationError(self.fields["name"].error_messages["required"])
        return name

    def clean(self):
        cleaned = super().clean()
        if self.user is not None and ApiKey.objects.active().filter(user=self.user).count() >= (
            MAX_ACTIVE_KEYS
        ):
            raise forms.ValidationError(
                gettext(
                    "You already have %(count)d active keys; revoke one you no longer "
                    "use before creating another."
                )
                % {"count": MAX_ACTIVE_KEYS}
            )
        return cleaned


@never_cache
@login_required
@require_http_methods(["GET", "POST"])
def api_keys(request: HttpRequest) -> HttpResponse:
    """List the user's keys; POST creates one and shows its raw value once."""
    form = ApiKeyForm(user=request.user)
    created_key, raw_key = None, ""
    status = 200
    if request.method == "POST":
        form = ApiKeyForm(request.POST, user=request.user)
        if form.is_valid():
            created_key, raw_key = ApiKey.issue(request.user, form.cleaned_data["name"])
            form = ApiKeyForm(user=request.user)
            status = 201
        else:
            status = 400
    keys = ApiKey.objects.filter(user=request.user).order_by("revoked_at", "-created_at")
    context = {
        "form": form,
        "keys": keys,
        "created_key": created_key,
        "raw_key": raw_key,
        "max_active": MAX_ACTIVE_KEYS,
    }
    return render(request, "apikeys/list.html", context, status=status)


@never_cache
@login_required
@require_POST
def revoke_api_key(request: HttpRequest, key_id: int) -> HttpResponse:
    """Revoke one of the user's own keys (another user's key is a 404)."""
    key = get_object_or_404(ApiKey, pk=key_id, user=request.user)
    if key.revoked_at is None:
        key.revoke()
        messages.success(
            request,
            gettext("The key “%(name)s” (%(prefix)s…) was revoked.")
            % {"name": key.name, "prefix": key.prefix},
        )
    else:
        messages.info(
            request, gettext("The key “%(name)s” was already revoked.") % {"name": key.name}
        )
    return redirect("api-keys")
