from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from breezeweb import health, views

admin.site.site_header = "BreezeWeb administration"
admin.site.site_title = "BreezeWeb admin"
admin.site.index_template = "admin/runners/index.html"  # adds the runner dashboard link

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("c/<int:conversation_id>/", views.chat_page, name="conversation"),
    path("api/conversations", views.conversations, name="api-conversations"),
    path(
        "api/conversations/<int:conversation_id>",
        views.conversation,
        name="api-conversation",
    ),
    path("api/runners", views.runners, name="api-runners"),
    path("api/", include("rag.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("", include("runners.urls")),  # /metrics and /admin/runners/dashboard/ (before admin/)
    path("admin/", admin.site.urls),
]
