"""Chat pages and the small JSON endpoints behind the conversation list.
Views stay thin: they check access, parse the request and call breezeweb.chat."""

from __future__ import annotations

import json

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from breezeweb import chat
from breezeweb.api_auth import api_view, json_error
from breezeweb.chat import ChatError

_STATUS = {"not_found": 404}


def _chat_error(exc: ChatError) -> JsonResponse:
    return json_error(_STATUS.get(exc.code, 400), exc.code, exc.message)


@login_required
@require_GET
def chat_page(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    """The chat: the conversation list, and one conversation when its id is in the URL."""
    conversation = None
    if conversation_id is not None:
        try:
            conversation = chat.conversation_messages(request.user, conversation_id)
        except ChatError:
            return redirect("chat")
    boot = {
        "conversation": conversation,
        "runners": chat.enabled_runners(),
        "image_max_bytes": settings.IMAGE_MAX_BYTES,
        "upload_max_bytes": settings.UPLOAD_MAX_BYTES,
        "csrf_token": get_token(request),
    }
    listed = chat.list_conversations(request.user)
    for item in listed:
        item["active"] = item["id"] == conversation_id
    context = {
        "conversations": listed,
        "blank_item": {"id": 0, "title": ""},
        "conversation": conversation,
        "boot": boot,
    }
    return render(request, "chat/chat.html", context)


@api_view()
@require_GET
def conversations(request: HttpRequest) -> JsonResponse:
    """GET /api/conversations?q=title words: the user's conversations, newest first."""
    query = request.GET.get("q", "").strip()[:200]
    return JsonResponse({"conversations": chat.list_conversations(request.user, query=query)})


@api_view()
@require_http_methods(["GET", "PATCH", "DELETE"])
def conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """GET: the conversation with its messages; PATCH {"title"}: rename; DELETE."""
    try:
        if request.method == "GET":
            return JsonResponse(chat.conversation_messages(request.user, conversation_id))
        if request.method == "DELETE":
            chat.delete_conversation(request.user, conversation_id)
            return HttpResponse(status=204)
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return json_error(400, "bad_json", "The request body is not valid JSON.")
        title = body.get("title") if isinstance(body, dict) else None
        if not isinstance(title, str):
            return json_error(400, "bad_title", 'Send {"title": "..."}.')
        return JsonResponse(chat.rename_conversation(request.user, conversation_id, title))
    except ChatError as exc:
        return _chat_error(exc)


@api_view()
@require_GET
def runners(request: HttpRequest) -> JsonResponse:
    """GET /api/runners: enabled runners (name, kind, capabilities, model_id)."""
    return JsonResponse({"runners": chat.enabled_runners()})
