"""The rules on untrusted text and ids that every interface applies the same
way (the HTTP APIs through api/inputs.py, the websocket through its frames).

- `check_text(value, param)`: refuse text the database and tokenizers cannot
  hold (lone UTF-16 surrogates, NUL).
- `clean_name(value)`: titles and names with control characters removed.
- `parse_id(raw)`: a database id from a string or a JSON value (1 .. 2**63-1),
  ASCII digits only (`"²".isdigit()` is True, `int("²")` fails), or None.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from chat.errors import ChatError

MAX_ID = 2**63 - 1  # the largest value of a BigAutoField (PostgreSQL bigint)
_ID_DIGITS = re.compile(r"[0-9]{1,19}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# C0 and C1 control characters, DEL, and the Unicode line/paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class InputError(ChatError):
    """Input the API refuses: a `ChatError` built as HTTP `status`, stable
    `code`, human `message`, and the offending `param` (a JSON path) when
    there is one."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(code, message, status=status, param=param)


def json_path(loc: tuple) -> str | None:
    """`("messages", 0, "content")` -> `messages[0].content`; None for the document itself."""
    out = ""
    for step in loc:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out or None


def check_text(
    value: str, param: str | None, *, allow_nul: bool = False, what: str = "Text"
) -> str:
    """`value`, or InputError(400 `invalid_text`) when it holds a lone UTF-16
    surrogate (it cannot be stored or tokenized) or, unless allowed, NUL."""
    if _SURROGATE.search(value):
        where = f" in `{param}`" if param else ""
        raise InputError(
            400,
            "invalid_text",
            f"{what}{where} contains a lone UTF-16 surrogate, which is not valid Unicode text.",
            param,
        )
    if not allow_nul and "\x00" in value:
        where = f" in `{param}`" if param else ""
        raise InputError(400, "invalid_text", f"{what}{where} contains a NUL character.", param)
    return value


def clean_name(value: str) -> str:
    """A title or name for display: NFC, control characters and lone
    surrogates removed, whitespace runs collapsed to one space."""
    value = _SURROGATE.sub("", unicodedata.normalize("NFC", _SURROGATE.sub("", value)))
    return " ".join(_CONTROL.sub(" ", value).split())


def parse_id(raw: Any) -> int | None:
    """A database id (1 .. 2**63-1) from a JSON integer or a string of ASCII
    digits; None for anything else (negative, zero, too large, `"²"`, `"1.0"`)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if 0 < raw <= MAX_ID else None
    if isinstance(raw, str) and _ID_DIGITS.fullmatch(raw):
        value = int(raw)
        return value if 0 < value <= MAX_ID else None
    return None
