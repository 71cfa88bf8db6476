"""Runner pages outside the model admin: the staff dashboard and /metrics."""

from django.contrib import admin
from django.urls import path

from runners import views

urlpatterns = [
    path(
        "admin/runners/dashboard/",
        admin.site.admin_view(views.dashboard),
        name="runners-dashboard",
    ),
    path("metrics", views.metrics, name="metrics"),
]
