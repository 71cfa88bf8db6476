"""`api_view`: what every HTTP API view needs before it runs: the caller
(API key or session, CSRF for sessions), the request-rate limit, and input
errors answered in the API's own error shape."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from asgiref.sync import iscoroutinefunction, sync_to_async

from accounts import limits
from accounts.auth import bearer_key, csrf_failure_reason, limit_subject
from accounts.models import ApiKey
from api.errors import json_error
from chat.errors import ChatError


def rate_limited(error: Callable[..., JsonResponse], decision, per: str) -> JsonResponse:
    return error(
        429,
        "rate_limit_exceeded",
        f"Too many requests: at most {decision.limit} per minute for this {per}. "
        f"Try again in {decision.retry_after} s.",
        retry_after=decision.retry_after,
    )


def _subject_name() -> str:
    return "key" if settings.API_RATE_LIMIT_PER_KEY else "user"


def _refused(error: Callable[..., JsonResponse], exc: ChatError) -> JsonResponse:
    return error(exc.status, exc.code, exc.message, param=exc.param, retry_after=exc.retry_after)


def api_view(*, error: Callable[..., JsonResponse] = json_error, limit: str | None = None):
    """Decorate a view of the HTTP API: sets `request.user` from a valid API key
    (and `request.api_key_auth = True`, `request.api_key_id`: the key's id,
    None for a session) or requires a logged-in session.
    `request.client_id` names whose limits the request spends (`limit_subject`).
    With `limit` (the name of a requests-per-minute setting) the request is
    counted against it first: 429 `rate_limit_exceeded` with Retry-After.
    A `ChatError` raised by the view (an `InputError`, a refusal of the chat
    service) becomes its 4xx in the API's shape.
    Works on sync and async views (an async view gets an async wrapper: the
    key lookup runs in a thread, the session user via `auser()`)."""

    def decorator(view):
        if iscoroutinefunction(view):
            return _async_api_view(view, error, limit)

        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            raw = bearer_key(request)
            request.api_key_id = None
            if raw:
                key = ApiKey.lookup(raw)
                if key is None:
                    return error(401, "invalid_api_key", "Invalid or revoked API key.")
                request.user = key.user
                request.api_key_auth = True
                request.api_key_id = key.pk
            elif request.user.is_authenticated:
                request.api_key_auth = False
                if request.method not in ("GET", "HEAD", "OPTIONS"):
                    reason = csrf_failure_reason(request)
                    if reason:
                        return error(403, "csrf_failed", reason)
            else:
                return error(
                    401, "not_authenticated", "Send `Authorization: Bearer <API key>` or log in."
                )
            request.client_id = limit_subject(request.user, raw)
            if limit:
                decision = _count(request.client_id, limit)
                if not decision.allowed:
                    return rate_limited(error, decision, _subject_name())
            try:
                return view(request, *args, **kwargs)
            except ChatError as exc:
                return _refused(error, exc)

        return wrapper

    return decorator


def _rate_key(client_id: str) -> str:
    return f"api:{client_id}"


def _count(client_id: str, limit: str) -> limits.RateDecision:
    """One request counted against `client_id`'s budget of setting `limit` a minute."""
    return limits.hit(_rate_key(client_id), getattr(settings, limit), 60)


def _key_and_count(raw: str, limit: str | None) -> tuple[ApiKey | None, limits.RateDecision | None]:
    """The active key for `raw` and, when it is one and `limit` is set, the
    request counted against the key's (or its user's) budget."""
    key = ApiKey.lookup(raw)
    if key is None or not limit:
        return key, None
    return key, _count(limit_subject(key.user, raw), limit)


def _async_api_view(view, error: Callable[..., JsonResponse], limit: str | None):
    @csrf_exempt
    @wraps(view)
    async def wrapper(request: HttpRequest, *args, **kwargs):
        raw = bearer_key(request)
        request.api_key_id = None
        decision = None
        if raw:
            # The key and, when it is valid, the request counted: one trip.
            key, decision = await sync_to_async(_key_and_count)(raw, limit)
            if key is None:
                return error(401, "invalid_api_key", "Invalid or revoked API key.")
            request.user = key.user
            request.api_key_auth = True
            request.api_key_id = key.pk
        else:
            user = await request.auser()
            if not user.is_authenticated:
                return error(
                    401, "not_authenticated", "Send `Authorization: Bearer <API key>` or log in."
                )
            request.user = user
            request.api_key_auth = False
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                reason = csrf_failure_reason(request)
                if reason:
                    return error(403, "csrf_failed", reason)
        request.client_id = limit_subject(request.user, raw)
        if limit and decision is None:
            decision = await limits.ahit(_rate_key(request.client_id), getattr(settings, limit), 60)
        if decision is not None and not decision.allowed:
            return rate_limited(error, decision, _subject_name())
        try:
            return await view(request, *args, **kwargs)
        except ChatError as exc:
            return _refused(error, exc)

    return wrapper
