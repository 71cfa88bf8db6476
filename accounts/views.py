"""Pages about accounts: signing in, the first run, usage, self-service
(password, sessions) and invites."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm, UserCreationForm
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from accounts import firstrun, quotas, selfservice, usage
from accounts.models import ApiKey, Invite


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


class LoginView(auth_views.LoginView):
    """Django's login page, with the single sign-on button when OIDC is on
    and without the password form when PASSWORD_LOGIN is off. On a fresh
    install (no account yet) it sends the browser to the first-run page."""

    def get(self, request, *args, **kwargs):
        if firstrun.is_open():
            return redirect("first-run")
        return super().get(request, *args, **kwargs)

    def post(self, request, *args, **kwargs):
        if not settings.PASSWORD_LOGIN:
            raise PermissionDenied(_("Password sign-in is turned off; use single sign-on."))
        return super().post(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        return {
            **super().get_context_data(**kwargs),
            "password_login": settings.PASSWORD_LOGIN,
            "sso_name": settings.OIDC_PROVIDER_NAME if settings.OIDC_ISSUER else "",
        }


class FirstAdminForm(UserCreationForm):
    """Username and password (twice, checked by AUTH_PASSWORD_VALIDATORS)."""


@never_cache
@require_http_methods(["GET", "POST"])
def first_run(request: HttpRequest) -> HttpResponse:
    """Create the admin account while none exists; 404 ever after. The
    account is signed in at once and lands in the chat."""
    if not firstrun.is_open():
        raise Http404(_("The admin account exists already; sign in instead."))
    form = FirstAdminForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = firstrun.create_first_admin(form)
        except firstrun.FirstRunClosed:
            # Another browser won the race a moment ago: say so, plainly.
            closed = _("The admin account was just created from another browser; sign in instead.")
            return render(request, "accounts/first_run.html", {"closed": closed}, status=409)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat")
    return render(request, "accounts/first_run.html", {"form": form})


# ---- usage ----------------------------------------------------------------------------


@never_cache
@login_required
@require_GET
def usage_page(request: HttpRequest) -> HttpResponse:
    """The user's own usage (today, this month, this month by runner and by
    key) and budgets."""
    summary = usage.user_summary(request.user)
    context = {
        "usage": summary,
        "periods": [
            (("today", _("Today")), summary["today"]),
            (("month", _("This month")), summary["month"]),
        ],
        "quota": quotas.status(request.user),
        "TIME_ZONE": settings.TIME_ZONE,
    }
    return render(request, "accounts/usage.html", context)


class UsageFilter(forms.Form):
    """The admin dashboard's question: how many days back, per user or per group."""

    days = forms.IntegerField(min_value=1, max_value=usage.MAX_DASHBOARD_DAYS, initial=30)
    by = forms.ChoiceField(
        choices=[("user", _("user")), ("group", _("group"))], initial="user", required=False
    )


def usage_dashboard(request: HttpRequest) -> HttpResponse:
    """Staff: tokens and turns per day, per user or group and runner, over the
    last N days; `?format=csv` downloads the same rows. Wrapped by
    `admin.site.admin_view` in urls (staff only)."""
    if not request.user.has_perm("runners.view_runrecord"):
        raise PermissionDenied
    form = UsageFilter(request.GET or {"days": 30, "by": "user"})
    if not form.is_valid():
        return HttpResponseBadRequest(" ".join(m for e in form.errors.values() for m in e))
    days, by = form.cleaned_data["days"], form.cleaned_data["by"] or "user"
    until = usage.start_of_day() + timedelta(days=1)
    rows = usage.over_time(until - timedelta(days=days), until, by)
    if request.GET.get("format") == "csv":
        response = HttpResponse(usage.as_csv(rows, by), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="breezeweb-usage-{by}-{days}d.csv"'
        return response
    totals: dict[str, usage.Totals] = {}
    for row in rows:
        t = totals.get(row.who, usage.Totals())
        totals[row.who] = usage.Totals(
            t.prompt_tokens + row.totals.prompt_tokens,
            t.completion_tokens + row.totals.completion_tokens,
            t.turns + row.totals.turns,
        )
    context = {
        **admin.site.each_context(request),
        "title": _("Usage"),
        "form": form,
        "by": by,
        "days": days,
        "rows": rows,
        "totals": sorted(totals.items(), key=lambda item: -item[1].total_tokens),
        "generated_at": timezone.now(),
    }
    return render(request, "admin/accounts/usage.html", context)


# ---- self-service -----------------------------------------------------------------------


class PasswordChangeView(auth_views.PasswordChangeView):
    """Change the password: every other session of the user ends, with its
    websockets (this one stays signed in)."""

    template_name = "accounts/password.html"

    def dispatch(self, request, *args, **kwargs):
        if request.user.is_authenticated and not request.user.has_usable_password():
            return render(request, "accounts/password.html", {"sso_only": True})
        return super().dispatch(request, *args, **kwargs)

    def form_valid(self, form):
        before = self.request.session.session_key
        response = super().form_valid(form)  # this session gets a new key (Django's cycle_key)
        now = self.request.session.session_key
        selfservice.session_renamed(before, now)
        ended = selfservice.end_other_sessions(self.request.user, now, "The password was changed.")
        messages.success(
            self.request,
            _("Password changed. Other sessions signed out: %(n)d.") % {"n": ended},
        )
        return response

    def get_success_url(self):
        return reverse("sessions")


@never_cache
@login_required
@require_http_methods(["GET", "POST"])
def sessions_page(request: HttpRequest) -> HttpResponse:
    """The user's browser sessions and API keys; POST signs out the others."""
    if request.method == "POST":
        ended = selfservice.end_other_sessions(
            request.user, request.session.session_key, "Signed out from another session."
        )
        messages.success(request, _("Other sessions signed out: %(n)d.") % {"n": ended})
        return redirect("sessions")
    context = {
        "sessions": selfservice.sessions_of(request.user),
        "current": request.session.session_key,
        "keys": ApiKey.objects.active().filter(user=request.user),
    }
    return render(request, "accounts/sessions.html", context)


@never_cache
@require_http_methods(["GET", "POST"])
def accept_invite(request: HttpRequest, token: str) -> HttpResponse:
    """An invite link: choose a username and password, once."""
    if Invite.open_for(token) is None:
        return render(request, "accounts/invite.html", {"closed": True}, status=410)
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = selfservice.accept_invite(token, form)
        except selfservice.InviteUsed:
            return render(request, "accounts/invite.html", {"closed": True}, status=410)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat")
    return render(request, "accounts/invite.html", {"form": form})
