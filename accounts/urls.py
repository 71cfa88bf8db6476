"""Pages about accounts: signing in, the first run, usage (the user's and
the admin's; included before admin/ so /admin/usage/ is ours)."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from accounts import views

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("setup/", views.first_run, name="first-run"),
    path("settings/usage/", views.usage_page, name="usage"),
    path("admin/usage/", admin.site.admin_view(views.usage_dashboard), name="usage-dashboard"),
]
