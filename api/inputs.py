"""Reading untrusted input for the HTTP APIs, in one place: JSON bodies, ids,
and text.

Every check here is cheap and runs before any expensive work (tokenizing,
guardian rules, retrieval, the database): the body's size is known before it
is decoded, and the decoded value is walked once, without recursion, to bound
its nesting depth, its integers and its strings. A refusal is an `InputError`
with a stable code; each API turns it into its own error shape.

- `read_json(request, ...)`: the body as JSON, or InputError (400/413).
- `parse_id(raw)`: a database id from a string or a JSON value (1 .. 2**63-1),
  ASCII digits only (`"²".isdigit()` is True, `int("²")` fails), or None.
- `IdConverter`: the same rule as a URL converter (`<id:pk>`): a negative,
  non-ASCII or 64-bit-overflowing id is simply an unknown URL (JSON 404).

The rules on text and ids themselves (`check_text`, `clean_name`, `parse_id`,
`InputError`) are the chat service's (chat/inputs.py): the websocket applies
the same ones.
"""

from __future__ import annotations

import json
import math
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest

from chat.inputs import MAX_ID, InputError, check_text, json_path, parse_id
from chat.limits import MAX_APP_JSON_DEPTH

# Integers in JSON bodies: more digits than any id, count or limit needs
# (Python refuses to convert > 4300 digits and raises ValueError deep in json).
MAX_INT_DIGITS = 19
DEFAULT_MAX_DEPTH = MAX_APP_JSON_DEPTH


def too_large(limit: int) -> InputError:
    if limit >= 1024 * 1024:
        size = f"{limit / (1024 * 1024):g} MB"
    elif limit >= 1024:
        size = f"{limit / 1024:g} KB"
    else:
        size = f"{limit} bytes"
    return InputError(413, "request_too_large", f"The request body is larger than {size}.")


def declared_length(request: HttpRequest) -> int | None:
    """The Content-Length the client declared, or None when absent or garbled."""
    raw = request.META.get("CONTENT_LENGTH") or ""
    if raw.isascii() and raw.isdigit() and len(raw) <= MAX_INT_DIGITS:
        return int(raw)
    return None


def _int_hook(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _NumberTooLarge
    return int(digits)


def _constant_hook(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


class _NumberTooLarge(Exception):
    pass


class _NotJson(Exception):
    pass


def _walk(value: Any, max_depth: int, allow_nul: bool) -> None:
    """Check every value of a decoded JSON document, iteratively."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, (dict, list)) and depth > max_depth:
            raise InputError(
                400,
                "nesting_too_deep",
                f"The JSON body is nested more than {max_depth} levels deep.",
                json_path(path),
            )
        if isinstance(item, dict):
            for key, child in item.items():
                check_text(key, json_path((*path, key)) or "", allow_nul=allow_nul, what="A key")
                stack.append((child, (*path, key), depth + 1))
        elif isinstance(item, list):
            stack.extend((child, (*path, i), depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            check_text(item, json_path(path), allow_nul=allow_nul)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InputError(
                    400, "number_too_large", "Numbers must be finite.", json_path(path)
                )
        elif isinstance(item, int) and not -MAX_ID - 1 <= item <= MAX_ID:
            raise InputError(
                400,
                "number_too_large",
                "Integers must fit in 64 bits.",
                json_path(path),
            )


def read_body(request: HttpRequest, limit: int | None = None) -> bytes:
    """The request body's bytes, at most `limit` of them (the upload limit by
    default). Raises InputError 413 `request_too_large` before reading what
    is declared too long, and after reading what turns out too long."""
    limit = limit if limit is not None else settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise too_large(limit)
    try:
        raw = request.body
    except RequestDataTooBig:
        raise too_large(limit) from None
    if len(raw) > limit:
        raise too_large(limit)
    return raw


def read_json(
    request: HttpRequest,
    *,
    max_bytes: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    syntax_code: str = "bad_json",
    allow_nul: bool = False,
    empty: Any = ...,
) -> Any:
    """The request body decoded as JSON, checked. Raises InputError:
    413 `request_too_large`; 400 `syntax_code` (not UTF-8, not JSON, empty
    unless `empty` is given), `nesting_too_deep`, `number_too_large`,
    `invalid_text` (lone surrogates; NUL unless `allow_nul`)."""
    raw = read_body(request, max_bytes)
    if not raw.strip():
        if empty is not ...:
            return empty
        raise InputError(400, syntax_code, "The request body is empty; send a JSON object.")
    try:
        # Decoded here, not by json.loads, which would guess UTF-16/32 from the bytes.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(400, syntax_code, "The request body is not UTF-8 text.") from None
    try:
        value = json.loads(text, parse_int=_int_hook, parse_constant=_constant_hook)
    except json.JSONDecodeError as exc:
        raise InputError(
            400,
            syntax_code,
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}.",
        ) from None
    except _NotJson as exc:
        raise InputError(400, syntax_code, f"The request body is not valid JSON: {exc}.") from None
    except _NumberTooLarge:
        raise InputError(
            400, "number_too_large", f"Integers may have at most {MAX_INT_DIGITS} digits."
        ) from None
    except RecursionError:
        raise InputError(
            400, "nesting_too_deep", f"The JSON body is nested more than {max_depth} levels deep."
        ) from None
    except ValueError:  # e.g. a float literal Python cannot represent
        raise InputError(400, syntax_code, "The request body has a number out of range.") from None
    _walk(value, max_depth, allow_nul)
    return value


class IdConverter:
    """`<id:name>` in URLs: a positive 64-bit id in ASCII digits. Anything
    else does not match the route (a JSON 404 under /api and /v1)."""

    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        parsed = parse_id(value)
        if parsed is None:
            raise ValueError(value)
        return parsed

    def to_url(self, value: int) -> str:
        return str(value)
