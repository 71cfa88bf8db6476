from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from breezeweb import health, views

admin.site.site_header = "BreezeWeb administration"
admin.site.site_title = "BreezeWeb admin"

urlpatterns = [
    path("", views.chat, name="chat"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
]
