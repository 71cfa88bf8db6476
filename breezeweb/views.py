"""Chat pages and the small JSON endpoints behind the conversation list.
Views stay thin: they check access, parse the request and call breezeweb.chat."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from breezeweb import chat
from breezeweb.api_auth import api_view, json_error
from breezeweb.api_input import clean_name, read_json
from breezeweb.chat import ChatError

_STATUS = {"not_found": 404}
# The conversation endpoints take a title at most: a small body is plenty.
MAX_BODY_BYTES = 64 * 1024
LIMIT = "APP_API_REQUESTS_PER_MINUTE"


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


@api_view(limit=LIMIT)
@require_GET
def conversations(request: HttpRequest) -> JsonResponse:
    """GET /api/conversations?q=title words: the user's conversations, newest first."""
    query = clean_name(request.GET.get("q", ""))[:200]
    return JsonResponse({"conversations": chat.list_conversations(request.user, query=query)})


@api_view(limit=LIMIT)
@require_http_methods(["GET", "PATCH", "DELETE"])
def conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """GET: the conversation with its messages; PATCH {"title"}: rename; DELETE."""
    try:
        if request.method == "GET":
            return JsonResponse(chat.conversation_messages(request.user, conversation_id))
        if request.method == "DELETE":
            chat.delete_conversation(request.user, conversation_id)
            return HttpResponse(status=204)
        # NUL and other control characters are allowed here: the title drops them.
        body = read_json(request, max_bytes=MAX_BODY_BYTES, allow_nul=True, empty={})
        title = body.get("title") if isinstance(body, dict) else None
        if not isinstance(title, str):
            return json_error(400, "bad_title", 'Send {"title": "..."}.')
        return JsonResponse(chat.rename_conversation(request.user, conversation_id, title))
    except ChatError as exc:
        return _chat_error(exc)


@api_view(limit=LIMIT)
@require_GET
def runners(request: HttpRequest) -> JsonResponse:
    """GET /api/runners: enabled runners (name, kind, capabilities, model_id)."""
    return JsonResponse({"runners": chat.enabled_runners()})


def login_locked_out(request: HttpRequest, *args, **kwargs) -> HttpResponse:
    """django-axes' answer to a login refused for too many failures (for this
    username or from this address): the login page with a clear message, 429
    and Retry-After. The password was not even checked."""
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    message = (
        f"Too many failed sign-ins for this account or from your address. "
        f"Sign-in is paused for {minutes} minutes; try again later."
    )
    context = {"form": AuthenticationForm(request), "locked_out": message, "next": ""}
    response = render(request, "registration/login.html", context, status=429)
    response["Retry-After"] = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    return response
