"""JSON errors for every answer under /api and /v1, whoever produced it.

Django itself answers some requests before (or instead of) our views: the URL
resolver (404, e.g. a negative id), `require_http_methods` (an empty 405), the
request parser (HTML 400 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE, 400 for
multipart without a boundary), the CSRF middleware (HTML 403), the 500 page.
Under /api and /v1 all of them become JSON in the API's own shape: OpenAI's
`{"error": {"message", "type", "param", "code"}}` under /v1, BreezeWeb's
`{"error": {"code", "message"}}` under /api. Three layers do it:

- `ApiMiddleware` (first in MIDDLEWARE): refuses an API key sent in the query
  string and a declared body over the limit before anything reads the body,
  and rewrites any other non-JSON error response into JSON.
- `bad_request`, `permission_denied`, `page_not_found`, `server_error`
  (the URLconf's handler400/403/404/500) and `csrf_failure`
  (CSRF_FAILURE_VIEW) answer JSON on API paths, knowing the exception
  (a too-large body is a 413, a broken multipart body a 400 `bad_multipart`).

Keys in query strings are also masked in every log (breezeweb.log_redaction).
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views import csrf as csrf_views
from django.views import defaults

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from api.errors import json_error, openai_error
from api.inputs import declared_length, too_large
from breezeweb.log_redaction import KEY_PATTERN

log = logging.getLogger(__name__)

# Query parameter names that only ever carry a credential.
_KEY_PARAMS = {"api_key", "apikey", "api-key", "access_token", "key", "token", "authorization"}
# Multipart uploads are limited per file by the documents API; this bounds the
# whole body (chat.limits.MAX_FILES_PER_REQUEST files at the upload limit).
_MULTIPART_SLACK = 1024 * 1024

STATUS_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "unknown_url",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_exceeded",
}
_MESSAGES = {
    400: "The request could not be read.",
    403: "This request is not allowed.",
    404: "There is nothing at this URL.",
    405: "This method is not allowed on this URL.",
    413: "The request body is too large.",
    429: "Too many requests.",
    500: "Something went wrong on the server; the error was logged.",
}


def is_api_path(path: str) -> bool:
    return path in ("/api", "/v1") or path.startswith(("/api/", "/v1/"))


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def api_error(
    request: HttpRequest,
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    retry_after: int | None = None,
) -> JsonResponse:
    """An error in the shape of the API `request` is for."""
    if is_openai_path(request.path):
        return openai_error(status, code, message, param=param, retry_after=retry_after)
    return json_error(status, code, message, param=param, retry_after=retry_after)


def _status_error(request: HttpRequest, status: int, message: str = "") -> JsonResponse:
    code = STATUS_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    if status == 404:
        message = message or (
            f"Unknown endpoint {request.method} {request.path}; see /api/docs for what "
            "BreezeWeb serves."
        )
    return api_error(request, status, code, message or _MESSAGES.get(status, _MESSAGES[400]))


def key_in_query(request: HttpRequest) -> bool:
    query = request.META.get("QUERY_STRING", "")
    if not query:
        return False
    if KEY_PATTERN.search(query):
        return True
    return any(
        name.lower() in _KEY_PARAMS or KEY_PATTERN.search(value)
        for name, value in parse_qsl(query, keep_blank_values=True)
    )


def _body_limit(request: HttpRequest) -> int:
    if request.content_type.startswith("multipart/"):
        from chat.limits import MAX_FILES_PER_REQUEST

        return settings.UPLOAD_MAX_BYTES * MAX_FILES_PER_REQUEST + _MULTIPART_SLACK
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def _is_json(response: HttpResponse) -> bool:
    return response.get("Content-Type", "").startswith("application/json")


class ApiMiddleware:
    """See the module docstring. Sync and async capable, so async views stay async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _before(self, request: HttpRequest) -> HttpResponse | None:
        if key_in_query(request):
            return api_error(
                request,
                400,
                "api_key_in_query",
                "Do not put an API key in the URL (URLs end up in logs and browser "
                "history): send it as `Authorization: Bearer <key>`. If this key was "
                "real, revoke it and create a new one.",
            )
        declared = declared_length(request)
        limit = _body_limit(request)
        if declared is not None and declared > limit:
            error = too_large(limit)
            return api_error(request, error.status, error.code, error.message)
        return None

    def _after(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        status = response.status_code
        if status < 400 or _is_json(response) or getattr(response, "streaming", False):
            return response
        message = ""
        if status == 405 and response.get("Allow"):
            message = f"Use {response['Allow']} on this URL."
        replaced = _status_error(request, status, message)
        for header in ("Allow", "Retry-After"):
            if header in response:
                replaced[header] = response[header]
        return replaced

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self.__acall__(request)
        if not is_api_path(request.path):
            return self.get_response(request)
        early = self._before(request)
        if early is not None:
            return early
        return self._after(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest):
        if not is_api_path(request.path):
            return await self.get_response(request)
        early = self._before(request)
        if early is not None:
            return early
        return self._after(request, await self.get_response(request))


# ---- handlers for Django's own error responses (set in breezeweb/urls.py) -------------


def bad_request(request: HttpRequest, exception=None, *args, **kwargs) -> HttpResponse:
    if not is_api_path(request.path):
        return defaults.bad_request(request, exception, *args, **kwargs)
    if isinstance(exception, RequestDataTooBig):
        error = too_large(_body_limit(request))
        return api_error(request, error.status, error.code, error.message)
    if isinstance(exception, TooManyFieldsSent | TooManyFilesSent):
        return api_error(request, 400, "too_many_fields", "The form has too many fields or files.")
    if isinstance(exception, MultiPartParserError):
        return api_error(
            request,
            400,
            "bad_multipart",
            "The multipart body could not be read (is its boundary missing?).",
        )
    return _status_error(request, 400)


def permission_denied(request: HttpRequest, exception=None, *args, **kwargs) -> HttpResponse:
    if not is_api_path(request.path):
        return defaults.permission_denied(request, exception, *args, **kwargs)
    return _status_error(request, 403)


def page_not_found(request: HttpRequest, exception=None, *args, **kwargs) -> HttpResponse:
    if not is_api_path(request.path):
        return defaults.page_not_found(request, exception, *args, **kwargs)
    return _status_error(request, 404)


def server_error(request: HttpRequest, *args, **kwargs) -> HttpResponse:
    if not is_api_path(request.path):
        return defaults.server_error(request, *args, **kwargs)
    return _status_error(request, 500)


def csrf_failure(request: HttpRequest, reason: str = "", **kwargs) -> HttpResponse:
    if not is_api_path(request.path):
        return csrf_views.csrf_failure(request, reason, **kwargs)
    return api_error(
        request,
        403,
        "csrf_failed",
        "CSRF check failed: send the X-CSRFToken header with the session's token "
        "from the site's own origin.",
    )
