"""The JSON endpoints behind the conversation list (/api/conversations, /api/runners).
Views stay thin: they check access, parse the request and call chat.services."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_http_methods

from api import schemas
from api.decorators import api_view
from api.errors import json_error
from api.inputs import read_json
from chat import services
from chat.inputs import clean_name
from chat.limits import MAX_SMALL_BODY_BYTES, MAX_TITLE_CHARS
from chat.services import ChatError

LIMIT = "APP_API_REQUESTS_PER_MINUTE"


def _chat_error(exc: ChatError) -> JsonResponse:
    return json_error(exc.status, exc.code, exc.message)


@api_view(limit=LIMIT)
@require_GET
def conversations(request: HttpRequest) -> JsonResponse:
    """GET /api/conversations?q=title words: the user's conversations, newest first."""
    query = clean_name(request.GET.get("q", ""))[:MAX_TITLE_CHARS]
    return JsonResponse({"conversations": services.list_conversations(request.user, query=query)})


@api_view(limit=LIMIT)
@require_http_methods(["GET", "PATCH", "DELETE"])
def conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """GET: the conversation with its messages; PATCH {"title"}: rename; DELETE."""
    try:
        if request.method == "GET":
            return JsonResponse(services.conversation_messages(request.user, conversation_id))
        if request.method == "DELETE":
            services.delete_conversation(request.user, conversation_id)
            return HttpResponse(status=204)
        # NUL and other control characters are allowed here: the title drops them.
        body = read_json(request, max_bytes=MAX_SMALL_BODY_BYTES, allow_nul=True, empty={})
        body = body if isinstance(body, dict) else {}  # anything else lacks a title
        title = schemas.parse(schemas.RenameRequest, body, field_codes=True).title
        return JsonResponse(services.rename_conversation(request.user, conversation_id, title))
    except ChatError as exc:
        return _chat_error(exc)


@api_view(limit=LIMIT)
@require_GET
def runners(request: HttpRequest) -> JsonResponse:
    """GET /api/runners: enabled runners (name, kind, capabilities, model_id)."""
    return JsonResponse({"runners": services.enabled_runners()})
