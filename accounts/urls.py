"""Pages about accounts: signing in (password or single sign-on), the first
run, usage (the user's and the admin's; included before admin/ so
/admin/usage/ is ours)."""

from django.conf import settings
from django.contrib import admin
from django.urls import include, path

from mozilla_django_oidc.views import OIDCLogoutView

from accounts import views

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    # Also ends the single sign-on provider's session (accounts.oidc).
    path("logout/", OIDCLogoutView.as_view(), name="logout"),
    path("setup/", views.first_run, name="first-run"),
    path("settings/usage/", views.usage_page, name="usage"),
    path("settings/password/", views.PasswordChangeView.as_view(), name="password-change"),
    path("settings/sessions/", views.sessions_page, name="sessions"),
    path("invite/<str:token>/", views.accept_invite, name="invite"),
    path("admin/usage/", admin.site.admin_view(views.usage_dashboard), name="usage-dashboard"),
]

if settings.OIDC_ISSUER:
    # /oidc/authenticate/ starts the sign-in, /oidc/callback/ finishes it.
    urlpatterns.append(path("oidc/", include("mozilla_django_oidc.urls")))
