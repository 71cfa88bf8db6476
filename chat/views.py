"""The chat page: the conversation list and one conversation."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from accounts import quotas
from chat import limits, services, sharing
from chat.services import ChatError
from runners.base import SAMPLING_BOUNDS


@login_required
@require_GET
def chat_page(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    """The chat: the conversation list, and one conversation when its id is in the URL."""
    conversation = None
    if conversation_id is not None:
        try:
            conversation = services.conversation_messages(request.user, conversation_id)
        except ChatError:
            return redirect("chat")
    boot = {
        "conversation": conversation,
        "runners": services.enabled_runners(request.user),
        "image_max_bytes": settings.IMAGE_MAX_BYTES,
        "upload_max_bytes": settings.UPLOAD_MAX_BYTES,
        "csrf_token": get_token(request),
    }
    listed = services.list_conversations(request.user)
    for item in listed:
        item["active"] = item["id"] == conversation_id
    budgets = quotas.status(request.user)
    context = {
        # The budget with the least left (accounts.quotas), as of this page load.
        "budget": min(budgets, key=lambda b: b.remaining, default=None),
        "conversations": listed,
        "blank_item": {"id": 0, "title": "", "project_id": None, "pinned": False},
        "limits": limits,
        "temperature_range": SAMPLING_BOUNDS["temperature"][1:],
        "conversation": conversation,
        "boot": boot,
    }
    return render(request, "chat/chat.html", context)


@require_GET
def shared_page(request: HttpRequest, token: str) -> HttpResponse:
    """`/s/<token>/`: a shared snapshot, read-only, rendered with the chat's
    sanitized markdown; no login needed unless SHARE_LINKS_REQUIRE_LOGIN.
    An unknown, revoked or expired link is the same 404 page."""
    if settings.SHARE_LINKS_REQUIRE_LOGIN and not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    shared = sharing.open_share(token)
    context = {"shared": shared, "boot": {"messages": shared["messages"] if shared else []}}
    response = render(request, "chat/shared.html", context, status=200 if shared else 404)
    # The token is the secret: keep it out of other sites' logs and of search engines.
    response["Referrer-Policy"] = "no-referrer"
    response["X-Robots-Tag"] = "noindex, nofollow"
    response["Cache-Control"] = "private, no-store"
    return response
