"""Error bodies of the HTTP APIs: the project's own under /api, OpenAI's shape
under /v1. Every 4xx and 5xx the APIs answer goes through these, and the
services' errors (a failed turn's `RunnerError` or `GuardianBlocked`, the chat
service's `ChatError`, an upload's `UploadRejected`) become HTTP errors through
one table, `HTTP_ERRORS` (`http_error`)."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import JsonResponse

from chat.errors import ChatError, turn_error
from runners.base import ErrorCode


def json_error(
    status: int, code: str, message: str, *, retry_after=None, param=None, **extra
) -> JsonResponse:
    """BreezeWeb's own API error body: {"error": {"code", "message", ...}}
    (`param` names the offending field when there is one)."""
    if param:
        extra["param"] = param
    response = JsonResponse({"error": {"code": code, "message": message, **extra}}, status=status)
    if retry_after is not None:
        response["Retry-After"] = str(max(1, int(retry_after)))
    return response


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_body(status: int, code: str, message: str, *, type_: str = "", param=None) -> dict:
    """The `{"error": {...}}` object in OpenAI's shape (also sent inside SSE streams)."""
    default_type = OPENAI_ERROR_TYPES.get(status, "api_error")
    return {
        "error": {"message": message, "type": type_ or default_type, "param": param, "code": code}
    }


def openai_error(
    status: int, code: str, message: str, *, type_: str = "", param=None, retry_after=None
) -> JsonResponse:
    """An error body in OpenAI's shape, for /v1/* endpoints."""
    response = JsonResponse(
        openai_error_body(status, code, message, type_=type_, param=param), status=status
    )
    if retry_after is not None:
        response["Retry-After"] = str(max(1, int(retry_after)))
    return response


# ---- the one table from the services' errors to HTTP ------------------------------------


@dataclass(frozen=True)
class HttpError:
    """How one kind of failed turn is answered over HTTP (docs/http-api.md)."""

    status: int
    code: str
    param: str | None = None
    retry_after: float | None = None  # a default when the runner gave none

    @property
    def type_(self) -> str:
        # A runner's failure is the server's, whatever OpenAI's table says about the status.
        return "server_error" if self.status >= 500 else ""


# A chat code (chat.errors.TURN_ERRORS: the runners' ErrorCode values and
# `guardian_blocked`) -> its HTTP error. `no_runner` depends on whether the
# client chose the model: a model that cannot do this (images, tools) means the
# request must change; with `auto`, the server lacks a runner and an admin must act.
HTTP_ERRORS: dict[str, HttpError] = {
    "guardian_blocked": HttpError(400, "content_blocked", "messages"),
    ErrorCode.INVALID_INPUT: HttpError(400, "invalid_input", "messages"),
    ErrorCode.NOT_FOUND: HttpError(404, "model_not_found", "model"),
    "no_runner/pinned": HttpError(400, "model_not_capable", "model"),
    ErrorCode.NO_RUNNER: HttpError(503, "no_runner_available"),
    ErrorCode.TIMEOUT: HttpError(504, "runner_timeout"),
    # The runner's own credentials were refused: the server's fault, not the client's.
    ErrorCode.AUTH: HttpError(502, "runner_auth_failed"),
    ErrorCode.RUNTIME: HttpError(502, "runner_error"),
    ErrorCode.RATE_LIMITED: HttpError(503, "runner_rate_limited", retry_after=5),
    ErrorCode.UNAVAILABLE: HttpError(503, "runner_unavailable"),
    ErrorCode.NOT_LOADED: HttpError(503, "runner_unavailable"),
    # A budget (accounts.quotas) is spent; Retry-After is when it starts over.
    "quota_exceeded": HttpError(429, "quota_exceeded"),
}


def http_error(exc: BaseException, *, pinned: bool = False) -> ChatError | None:
    """The HTTP error for an exception of the services, through HTTP_ERRORS
    (a `ChatError` keeps its own status; an upload's `UploadRejected` its own
    status and code); None for anything else, which is a bug (a 500)."""
    from rag.uploads import UploadRejected

    if isinstance(exc, UploadRejected):
        return ChatError(exc.code, exc.message, status=exc.status)
    error = turn_error(exc)
    if error is None:
        return None
    key = error.code
    if key == ErrorCode.NO_RUNNER and pinned:
        key = "no_runner/pinned"
    row = HTTP_ERRORS.get(key)
    if row is None:  # the chat's own refusals (not_found, bad_title, ...)
        return error
    retry_after = getattr(exc, "retry_after", None) or row.retry_after
    return ChatError(
        row.code,
        error.message,
        status=row.status,
        param=row.param,
        retryable=error.retryable,
        retry_after=retry_after,
    )
