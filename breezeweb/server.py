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
- What a serving process starts on its own (`on_serving`: the ingestion
  worker and its watchdog, which settle documents a dead run left
  `processing`) starts when Daphne's server runs, once its event loop does:
  not at import (management commands such as `migrate`, and the tests,
  import the application without serving it) and not on the first request
  that happens to need it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from breezeweb.log_redaction import redact_daphne_access_log

log = logging.getLogger(__name__)


# Called once per process, on the server's event loop, when Daphne starts
# serving; each must return at once (start threads for slow work).
on_serving: list[Callable[[], None]] = []


def adjust_daphne(*, on_start: Callable[[], None] | None = None) -> None:
    """Idempotent; does nothing when Daphne is not installed. `on_start` is
    added to `on_serving`."""
    redact_daphne_access_log()
    if on_start is not None and on_start not in on_serving:
        on_serving.append(on_start)
    try:
        from daphne.http_protocol import WebRequest
        from daphne.server import Server
    except ImportError:  # pragma: no cover - Daphne is a requirement
        return
    _run_on_serving_when_daphne_runs(Server)
    original = WebRequest.__init__
    if getattr(original, "skips_form_parsing", False):
        return

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parsePOSTFormSubmission", False)
        original(self, *args, **kwargs)

    __init__.skips_form_parsing = True
    WebRequest.__init__ = __init__


def _serving_started() -> None:
    for callback in list(on_serving):
        try:
            callback()
        except Exception:
            log.exception("could not start %s with the server", callback)


def _run_on_serving_when_daphne_runs(server_class) -> None:
    original = server_class.run
    if getattr(original, "runs_on_serving", False):
        return

    def run(self):
        from twisted.internet import reactor

        # Run by the event loop once it runs (Daphne's reactor is asyncio's),
        # so a callback can note the loop the in-memory channel layer uses.
        reactor.callLater(0, _serving_started)
        return original(self)

    run.runs_on_serving = True
    server_class.run = run
