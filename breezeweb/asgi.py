"""ASGI entry point: uvicorn serves HTTP and websockets from one process.

HTTP requests under /v1 and /api that carry an API key go through a Django
handler of their own, with the shorter middleware chain API_KEY_MIDDLEWARE
(settings.py); static files through the full MIDDLEWARE; every other request
through the full MIDDLEWARE but WhiteNoise (`handler_for`).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "breezeweb.settings")
# Django must be set up before anything imports models (consumers, middleware);
# as get_asgi_application() does, but the handlers are built below.
django.setup(set_prefix=False)

from django.conf import settings  # noqa: E402

from asgiref.sync import ThreadSensitiveContext  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402

from accounts.auth import scope_has_bearer_key  # noqa: E402
from accounts.ws_auth import WebsocketAuthStack  # noqa: E402
from breezeweb.middleware import ON_THE_LOOP  # noqa: E402
from breezeweb.server import lifespan, serve_with  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402
from rag.consumers import IngestWorker  # noqa: E402
from rag.worker import start_serving  # noqa: E402
from runners.registry import preload_local_runners  # noqa: E402

# The ingestion worker and its watchdog start when the server serves (its
# lifespan; not here: `migrate`, `runworker` and the tests import this module too).
serve_with(start_serving)


def _handler_with(middleware: list[str]) -> ASGIHandler:
    """A Django ASGI handler whose chain is `middleware`, with Django's own
    classes replaced by their on-the-loop versions (breezeweb/middleware.py).
    Django reads the list from settings while it builds a handler, so it is
    swapped for that moment (at import, before any request)."""
    full = settings.MIDDLEWARE
    settings.MIDDLEWARE = [ON_THE_LOOP.get(path, path) for path in middleware]
    try:
        return ASGIHandler()
    finally:
        settings.MIDDLEWARE = full


static_app = _handler_with(settings.MIDDLEWARE)
api_key_app = _handler_with(settings.API_KEY_MIDDLEWARE)
# WhiteNoise answers only under STATIC_URL, and it is the one middleware of the
# chain that cannot run async: anywhere else Django would hop to a worker thread
# and back around it on every request for nothing. So only static files go
# through the chain that has it.
_STATIC_FILES = "whitenoise.middleware.WhiteNoiseMiddleware"
page_app = _handler_with([m for m in settings.MIDDLEWARE if m != _STATIC_FILES])


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


def handler_for(scope: dict) -> ASGIHandler:
    """The chain a request goes through: the short one for an API call made
    with a key, the full one (with WhiteNoise) for a static file, else the
    full one without WhiteNoise."""
    if takes_short_chain(scope):
        return api_key_app
    if scope.get("path", "").startswith(settings.STATIC_URL):
        return static_app
    return page_app


async def http_app(scope, receive, send) -> None:
    handler = handler_for(scope)
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
        "lifespan": lifespan,
        # `manage.py runworker ingest`: document ingestion when REDIS_URL is set.
        "channel": ChannelNameRouter({"ingest": IngestWorker.as_asgi()}),
    }
)
