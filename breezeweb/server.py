"""What BreezeWeb changes in the Daphne server it runs under (applied once,
from asgi.py, before the first request).

- Twisted, under Daphne, parses every multipart POST body itself before the
  application sees it (into `request.args`, which Daphne never reads), and
  answers a body it cannot parse, such as one without a boundary, with a bare
  `400` and no body. So an upload was parsed twice, and a malformed one never
  reached the API's JSON errors. BreezeWeb turns that parsing off; Django
  parses uploads once, streaming them to disk, and answers bad ones in JSON.
- Daphne's access log writes request lines straight to stdout, not through
  `logging`: API keys in them are masked (breezeweb.log_redaction).
"""

from __future__ import annotations

from breezeweb.log_redaction import redact_daphne_access_log


def adjust_daphne() -> None:
    """Idempotent; does nothing when Daphne is not installed."""
    redact_daphne_access_log()
    try:
        from daphne.http_protocol import WebRequest
    except ImportError:  # pragma: no cover - Daphne is a requirement
        return
    original = WebRequest.__init__
    if getattr(original, "skips_form_parsing", False):
        return

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parsePOSTFormSubmission", False)
        original(self, *args, **kwargs)

    __init__.skips_form_parsing = True
    WebRequest.__init__ = __init__
