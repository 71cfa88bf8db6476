from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path, register_converter

from breezeweb import apikeys, health, openai_api, openapi, views
from breezeweb.api_input import IdConverter

# `<id:name>`: a positive 64-bit id in ASCII digits; anything else is an unknown URL.
register_converter(IdConverter, "id")

# Django's own error pages answer JSON under /api and /v1 (breezeweb.api_middleware).
handler400 = "breezeweb.api_middleware.bad_request"
handler403 = "breezeweb.api_middleware.permission_denied"
handler404 = "breezeweb.api_middleware.page_not_found"
handler500 = "breezeweb.api_middleware.server_error"

admin.site.site_header = "BreezeWeb administration"
admin.site.site_title = "BreezeWeb admin"
admin.site.index_template = "admin/runners/index.html"  # adds the runner dashboard link

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("c/<id:conversation_id>/", views.chat_page, name="conversation"),
    path("api/conversations", views.conversations, name="api-conversations"),
    path(
        "api/conversations/<id:conversation_id>",
        views.conversation,
        name="api-conversation",
    ),
    path("api/runners", views.runners, name="api-runners"),
    path("api/", include("rag.urls")),
    path("v1/models", openai_api.models, name="openai-models"),
    path("v1/models/<str:model_id>", openai_api.model_detail, name="openai-model"),
    path("v1/chat/completions", openai_api.chat_completions, name="openai-chat-completions"),
    re_path(r"^v1/(?P<rest>.*)$", openai_api.not_found),
    path("api/schema", openapi.schema_view, name="api-schema"),
    path("api/docs", openapi.docs_view, name="api-docs"),
    path("settings/api-keys/", apikeys.api_keys, name="api-keys"),
    path(
        "settings/api-keys/<id:key_id>/revoke/",
        apikeys.revoke_api_key,
        name="api-key-revoke",
    ),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("", include("runners.urls")),  # /metrics and /admin/runners/dashboard/ (before admin/)
    path("admin/", admin.site.urls),
]
