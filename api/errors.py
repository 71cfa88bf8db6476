"""Error bodies of the HTTP APIs: the project's own under /api, OpenAI's shape
under /v1. Every 4xx and 5xx the APIs answer goes through these."""

from __future__ import annotations

from django.http import JsonResponse


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
