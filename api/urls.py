"""Routes of the HTTP API: the JSON endpoints under /api/, the OpenAI-compatible
ones under /v1/, and the API-keys page."""

from django.urls import path, re_path

from api import apikeys, documents, openai_api, openapi, views

CONVERSATION = "api/conversations/<id:conversation_id>"
DOCUMENT = "api/documents/<id:pk>"

urlpatterns = [
    path("api/conversations", views.conversations, name="api-conversations"),
    path("api/conversations/export", views.export_all, name="api-conversations-export"),
    path(CONVERSATION, views.conversation, name="api-conversation"),
    path(f"{CONVERSATION}/export", views.export_one, name="api-conversation-export"),
    path(f"{CONVERSATION}/fork", views.fork, name="api-conversation-fork"),
    path(f"{CONVERSATION}/shares", views.conversation_shares, name="api-conversation-shares"),
    path("api/imports", views.imports, name="api-imports"),
    path("api/imports/<id:job_id>", views.import_job, name="api-import"),
    path("api/shares", views.shares, name="api-shares"),
    path("api/shares/<id:share_id>", views.share, name="api-share"),
    path("api/projects", views.projects, name="api-projects"),
    path("api/projects/<id:project_id>", views.project, name="api-project"),
    path("api/runners", views.runners, name="api-runners"),
    path("api/usage", views.usage, name="api-usage"),
    path("api/documents", documents.documents, name="rag-documents"),
    path(DOCUMENT, documents.document_detail, name="rag-document"),
    path(f"{DOCUMENT}/reingest", documents.document_reingest, name="rag-document-reingest"),
    path("api/collections", documents.collections, name="rag-collections"),
    path("api/search", documents.search_view, name="rag-search"),
    path("api/schema", openapi.schema_view, name="api-schema"),
    path("api/docs", openapi.docs_view, name="api-docs"),
    path("v1/models", openai_api.models, name="openai-models"),
    path("v1/models/<str:model_id>", openai_api.model_detail, name="openai-model"),
    path("v1/chat/completions", openai_api.chat_completions, name="openai-chat-completions"),
    re_path(r"^v1/(?P<rest>.*)$", openai_api.not_found),
    path("settings/api-keys/", apikeys.api_keys, name="api-keys"),
    path("settings/api-keys/<id:key_id>/revoke/", apikeys.revoke_api_key, name="api-key-revoke"),
]
