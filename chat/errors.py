"""The one error type of the chat and of the interfaces built on it.

A `ChatError` is a refusal the caller can be told about: a stable `code`, a
human `message` (never a secret), whether sending the same request again can
help (`retryable`), the HTTP `status` an HTTP interface answers with, and the
offending `param` (a JSON path) when there is one. Frames, the chat service,
the input rules (chat/inputs.py) and the HTTP API all raise it.

Each interface maps it, and the services' own errors (`RunnerError`,
`GuardianBlocked`, an upload's `UploadRejected`), to its shape through one
table: the websocket through `TURN_ERRORS` and `WEBSOCKET_CODES` below (its codes are
`WEBSOCKET_CODES`, the table of docs/websocket.md), the HTTP API through
`api.errors.HTTP_ERRORS`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from accounts.quotas import QuotaExceeded
from runners.base import ErrorCode, RunnerError
from runners.guardian import GuardianBlocked

log = logging.getLogger(__name__)


class ChatError(Exception):
    """A request refused with `code` and `message` (see the module docstring)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        status: int = 400,
        param: str | None = None,
        retry_after: float | None = None,
        data: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        self.param = param
        self.retry_after = retry_after
        self.data = data or {}  # more fields for the error frame (e.g. `quota`)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, status={self.status})"


def rate_limited(message: str, retry_after: float) -> ChatError:
    """A `rate_limited` refusal (HTTP 429) that says when to try again."""
    return ChatError("rate_limited", message, retryable=True, status=429, retry_after=retry_after)


# ---- the websocket ---------------------------------------------------------------------

# Every code an `error` frame can carry: the websocket's own and the runners'
# `ErrorCode`s (forwarded as they are). docs/websocket.md lists exactly these
# (tests/chat/test_ws_error_codes.py reads this table).
WEBSOCKET_CODES: frozenset[str] = frozenset(
    {
        "bad_json",
        "bad_frame",
        "frame_too_large",
        "unknown_type",
        "missing_field",
        "bad_field",
        "invalid_input",
        "text_too_long",
        "too_many_images",
        "bad_image",
        "duplicate_request_id",
        "conversation_busy",
        "not_running",
        "not_found",
        "not_editable",
        "nothing_to_regenerate",
        "unknown_runner",
        "rate_limited",
        "quota_exceeded",
        "guardian_blocked",
        "credential_ended",
        "internal_error",
    }
    | {code.value for code in ErrorCode}
)

INTERNAL_ERROR = "internal_error"

# How the services' errors read as the chat's own: exception type -> ChatError.
# The websocket sends these (through `websocket_error`), and both interfaces
# save them onto a failed answer (`Message.error_code`, `Message.error`).
TURN_ERRORS: dict[type[BaseException], Callable[[BaseException], ChatError]] = {
    ChatError: lambda exc: exc,
    RunnerError: lambda exc: ChatError(
        exc.code.value, exc.message, retryable=exc.retryable, retry_after=exc.retry_after
    ),
    GuardianBlocked: lambda exc: ChatError("guardian_blocked", exc.message),
    QuotaExceeded: lambda exc: ChatError(
        "quota_exceeded",
        exc.message,
        retryable=True,
        status=429,
        retry_after=exc.retry_after,
        data=exc.details(),
    ),
}


def turn_error(exc: BaseException) -> ChatError | None:
    """`exc` as a ChatError, or None for an exception the table does not know (a bug)."""
    for kind, convert in TURN_ERRORS.items():
        if isinstance(exc, kind):
            return convert(exc)
    return None


def websocket_error(exc: BaseException, fallback: str = "Something went wrong.") -> ChatError:
    """`exc` as the websocket reports it. Anything the table does not know,
    or a code missing from WEBSOCKET_CODES, is a bug: `internal_error` with
    `fallback` (the details stay in the server log)."""
    error = turn_error(exc)
    if error is not None and error.code in WEBSOCKET_CODES:
        return error
    if error is not None:
        log.error("undocumented websocket error code %r", error.code)
    return ChatError(INTERNAL_ERROR, fallback, retryable=True, status=500)


def error_frame(request_id: str | None, error: ChatError) -> dict:
    """The `error` frame of docs/websocket.md; `retry_after_s` (whole seconds,
    at least 1) when the error says when to try again."""
    frame = {
        "type": "error",
        "request_id": request_id,
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        **error.data,
    }
    if error.retry_after is not None:
        frame["retry_after_s"] = max(1, math.ceil(error.retry_after))
    return frame
