"""The Channels worker for scale-out: `python manage.py runworker ingest`.

With REDIS_URL set, web processes send `{"type": "ingest.document",
"document_id": N}` to the channel `ingest` instead of using their own thread;
any number of worker processes consume it. The ASGI application routes the
channel here with `ChannelNameRouter({"ingest": IngestWorker.as_asgi()})`.
"""

from __future__ import annotations

from django.db import close_old_connections

from channels.consumer import SyncConsumer

from rag.ingestion import ingest_document


class IngestWorker(SyncConsumer):
    """Runs one ingestion per message (sync: in Channels' worker thread)."""

    def ingest_document(self, message: dict) -> None:
        close_old_connections()
        try:
            ingest_document(int(message["document_id"]))
        finally:
            close_old_connections()
