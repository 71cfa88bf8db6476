"""The Chroma vector store: embedded PersistentClient under DATA_DIR, or an
HttpClient to a Chroma server when CHROMA_URL is set."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

from django.conf import settings

_client = None
_client_lock = threading.Lock()


def get_client():
    """The process-wide Chroma client (created on first use)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                import chromadb
                from chromadb.config import Settings as ChromaSettings

                chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
                if settings.CHROMA_URL:
                    url = urlparse(settings.CHROMA_URL)
                    _client = chromadb.HttpClient(
                        host=url.hostname or "localhost",
                        port=url.port or (443 if url.scheme == "https" else 8000),
                        ssl=url.scheme == "https",
                        settings=chroma_settings,
                    )
                else:
                    settings.CHROMA_PATH.mkdir(parents=True, exist_ok=True)
                    _client = chromadb.PersistentClient(
                        path=str(settings.CHROMA_PATH), settings=chroma_settings
                    )
    return _client


def reset_client() -> None:
    """Forget the cached client (tests that change CHROMA_PATH / CHROMA_URL)."""
    global _client
    with _client_lock:
        _client = None


def check_health() -> dict:
    started = time.perf_counter()
    get_client().heartbeat()
    mode = "server" if settings.CHROMA_URL else "embedded"
    return {
        "ok": True,
        "mode": mode,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
