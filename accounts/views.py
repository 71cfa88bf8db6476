"""Pages about signing in."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.translation import ngettext


def login_locked_out(request: HttpRequest, *args, **kwargs) -> HttpResponse:
    """django-axes' answer to a login refused for too many failures (for this
    username or from this address): the login page with a clear message, 429
    and Retry-After. The password was not even checked."""
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    message = ngettext(
        "Too many failed sign-ins for this account or from your address. "
        "Sign-in is paused for %(minutes)d minute; try again later.",
        "Too many failed sign-ins for this account or from your address. "
        "Sign-in is paused for %(minutes)d minutes; try again later.",
        minutes,
    ) % {"minutes": minutes}
    context = {"form": AuthenticationForm(request), "locked_out": message, "next": ""}
    response = render(request, "registration/login.html", context, status=429)
    response["Retry-After"] = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    return response
