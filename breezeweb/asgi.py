"""ASGI entry point: Daphne serves HTTP and websockets from one process."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "breezeweb.settings")
# Django must be set up before anything imports models (consumers, middleware).
django_asgi_app = get_asgi_application()

from django.conf import settings  # noqa: E402

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402

from accounts.ws_auth import WebsocketAuthStack  # noqa: E402
from breezeweb.server import adjust_daphne  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402
from rag.consumers import IngestWorker  # noqa: E402
from runners.registry import preload_local_runners  # noqa: E402

adjust_daphne()

if settings.PRELOAD_LOCAL_RUNNERS:
    preload_local_runners()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": WebsocketAuthStack(URLRouter(websocket_urlpatterns)),
        # `manage.py runworker ingest`: document ingestion when REDIS_URL is set.
        "channel": ChannelNameRouter({"ingest": IngestWorker.as_asgi()}),
    }
)
