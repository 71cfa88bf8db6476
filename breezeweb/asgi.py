"""ASGI entry point: Daphne serves HTTP and websockets from one process.

HTTP requests under /v1 and /api that carry an API key go through a Django
handler of their own, with the shorter middleware chain API_KEY_MIDDLEWARE
(settings.py); every other request through the full MIDDLEWARE.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "breezeweb.settings")
# Django must be set up before anything imports models (consumers, middleware).
django_asgi_app = get_asgi_application()

from django.conf import settings  # noqa: E402

from asgiref.sync import ThreadSensitiveContext  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402

from accounts.auth import scope_has_bearer_key  # noqa: E402
from accounts.ws_auth import WebsocketAuthStack  # noqa: E402
from breezeweb.server import adjust_daphne  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402
from rag.consumers import IngestWorker  # noqa: E402
from rag.worker import start_serving  # noqa: E402
from runners.registry import preload_local_runners  # noqa: E402

# The ingestion worker and its watchdog start when Daphne serves (not here:
# `migrate`, `runworker` and the tests import this module too).
adjust_daphne(on_start=start_serving)


def _handler_with(middleware: list[str]) -> ASGIHandler:
    """A Django ASGI handler whose chain is `middleware`: Django reads the list
    from settings while it builds a handler, so it is swapped for that moment
    (at import, before any request)."""
    full = settings.MIDDLEWARE
    settings.MIDDLEWARE = middleware
    try:
        return ASGIHandler()
    finally:
        settings.MIDDLEWARE = full


api_key_app = _handler_with(settings.API_KEY_MIDDLEWARE)


def takes_short_chain(scope: dict) -> bool:
    """An API call made with a key: under /v1 or /api (not the HTML docs page)."""
    path = scope.get("path", "")
    return (
        path.startswith(("/v1/", "/api/"))
        and not path.startswith("/api/docs")
        and scope_has_bearer_key(scope)
    )


class SyncThreads:
    """The threads an HTTP request's synchronous code (the ORM) runs in.

    Django gives each request a thread of its own for its thread-sensitive
    calls: a new thread per request, which then opens a new database
    connection, and another thread to join it at the end (about 1 ms of CPU
    per request here). Instead each request borrows a single-thread executor
    from this pool and gives it back when it ends: the thread, and the
    database connection it keeps (CONN_MAX_AGE), serve request after request.
    One request still has its executor to itself, as Django expects; the pool
    holds at most `keep` idle executors (one per request in flight beyond
    that is made, then shut down)."""

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._idle: list[ThreadPoolExecutor] = []
        self._lock = threading.Lock()

    def borrow(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-sync")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(executor)
                return
        executor.shutdown(wait=False)


sync_threads = SyncThreads()


async def http_app(scope, receive, send) -> None:
    handler = api_key_app if takes_short_chain(scope) else django_asgi_app
    executor = sync_threads.borrow()
    try:
        async with ThreadSensitiveContext(executor=executor):
            await handler(scope, receive, send)
    finally:
        sync_threads.give_back(executor)


if settings.PRELOAD_LOCAL_RUNNERS:
    preload_local_runners()

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": WebsocketAuthStack(URLRouter(websocket_urlpatterns)),
        # `manage.py runworker ingest`: document ingestion when REDIS_URL is set.
        "channel": ChannelNameRouter({"ingest": IngestWorker.as_asgi()}),
    }
)
