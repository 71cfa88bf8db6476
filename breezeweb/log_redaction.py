"""API keys never reach a log.

A key belongs in the `Authorization` header, and the API refuses one in a
query string (api.middleware), but the refused request's line is still
logged with its query string, by Django (`django.request`) and by uvicorn's
access log (`uvicorn.access`, whose request line is an argument of the
record). `RedactKeysFilter`, attached to every handler in settings.LOGGING
(uvicorn's loggers write through those handlers too), masks anything shaped
like a key in a record's message and arguments.

Light on purpose: settings use its filter before Django is set up.
"""

from __future__ import annotations

import logging
import re

# Anything shaped like one of our API keys: `bw_` + token_urlsafe characters.
KEY_PATTERN = re.compile(r"bw_[A-Za-z0-9_\-]{6,}")
REDACTED = "bw_[redacted]"


def redact(text: str) -> str:
    """`text` with anything shaped like an API key masked."""
    return KEY_PATTERN.sub(REDACTED, text) if "bw_" in text else text


def _redact_value(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes) and b"bw_" in value:
        return redact(value.decode("utf-8", "replace"))
    return value


class RedactKeysFilter(logging.Filter):
    """Masks API keys in a record's message and arguments (tuple or dict)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_value(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_value(v) for k, v in record.args.items()}
        return True
