"""Django's own middleware, without a worker thread for every hook under ASGI.

For an async request Django runs each `MiddlewareMixin` hook (`process_request`,
`process_response`) in a worker thread and back (`sync_to_async`): two thread
hops per middleware, sixteen for a page here, about 2 ms of a 2.8 ms `/healthz`.
The hooks below only read and write headers and cookies, so they run on the
event loop instead. What can touch the database still runs in the thread, as
before: saving a session that changed, storing messages that were used. (The
CSRF check, `process_view`, keeps its thread too: for a POST it reads the
body.) Anything else that reached for the database on the loop would raise
Django's SynchronousOnlyOperation, not block it.

settings.MIDDLEWARE keeps naming Django's classes (its system checks look for
those names, and WSGI or the test client use them as they are); the ASGI
handlers (breezeweb/asgi.py) are built with these in their place (`ON_THE_LOOP`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware as _Authentication
from django.contrib.messages.middleware import MessageMiddleware as _Messages
from django.contrib.sessions.middleware import SessionMiddleware as _Sessions
from django.middleware.clickjacking import XFrameOptionsMiddleware as _XFrameOptions
from django.middleware.common import CommonMiddleware as _Common
from django.middleware.csp import ContentSecurityPolicyMiddleware as _ContentSecurityPolicy
from django.middleware.csrf import CsrfViewMiddleware as _Csrf
from django.middleware.locale import LocaleMiddleware as _Locale
from django.middleware.security import SecurityMiddleware as _Security

from asgiref.sync import sync_to_async

Predicate = Callable[[Any, Any], bool]


def on_the_loop(base: type, response_needs_thread: Predicate | None = None) -> type:
    """`base` with its hooks run on the event loop for async requests;
    `process_response` in the worker thread when `response_needs_thread(request,
    response)` says it may touch the database."""

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if response_needs_thread and response_needs_thread(request, response):
                hook = sync_to_async(self.process_response, thread_sensitive=True)
                response = await hook(request, response)
            else:
                response = self.process_response(request, response)
        return response

    return type(base.__name__, (base,), {"__acall__": __acall__, "__module__": __name__})


def _session_is_saved(request, response) -> bool:
    session = getattr(request, "session", None)
    return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


def _messages_are_stored(request, response) -> bool:
    storage = getattr(request, "_messages", None)
    return storage is not None and (storage.used or storage.added_new)


SecurityMiddleware = on_the_loop(_Security)
SessionMiddleware = on_the_loop(_Sessions, _session_is_saved)
LocaleMiddleware = on_the_loop(_Locale)
CommonMiddleware = on_the_loop(_Common)
CsrfViewMiddleware = on_the_loop(_Csrf)
AuthenticationMiddleware = on_the_loop(_Authentication)
MessageMiddleware = on_the_loop(_Messages, _messages_are_stored)
XFrameOptionsMiddleware = on_the_loop(_XFrameOptions)
ContentSecurityPolicyMiddleware = on_the_loop(_ContentSecurityPolicy)

# Django's middleware path -> the class here that the ASGI handlers use instead.
ON_THE_LOOP = {
    f"{base.__module__}.{base.__name__}": f"{__name__}.{base.__name__}"
    for base in (
        _Security,
        _Sessions,
        _Locale,
        _Common,
        _Csrf,
        _Authentication,
        _Messages,
        _XFrameOptions,
        _ContentSecurityPolicy,
    )
}
