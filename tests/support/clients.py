"""Clients for the app in the test process: HTTP through ASGI (`call`) and the
chat websocket with a logged-in session (`session_headers`, `connect`)."""

from __future__ import annotations

import json

from django.conf import settings
from django.test import Client

import httpx
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

WS_PATH = "/ws/chat/"


async def call(
    method: str,
    path: str,
    *,
    key: str | None = None,
    body=None,
    content: bytes | None = None,
    headers: dict | None = None,
    cookies: dict | None = None,
) -> httpx.Response:
    """One HTTP request to the ASGI app; `key` as a bearer key, `body` as JSON."""
    from breezeweb.asgi import application

    all_headers = dict(headers or {})
    if key:
        all_headers["Authorization"] = f"Bearer {key}"
    if body is not None:
        content = json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost", cookies=cookies
    ) as client:
        return await client.request(method, path, content=content, headers=all_headers)


def client_of(user) -> Client:
    """A test client logged in as `user`."""
    client = Client()
    client.force_login(user)
    return client


def logged_in(user) -> tuple[Client, list[tuple[bytes, bytes]]]:
    """A test client logged in as `user`, and websocket headers for its session."""
    client = client_of(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    headers = [
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()),
        (b"origin", b"http://localhost"),
        (b"host", b"localhost"),
    ]
    return client, headers


def session_headers(user) -> list[tuple[bytes, bytes]]:
    return logged_in(user)[1]


async def connect(user=None, headers=None) -> WebsocketCommunicator:
    """The chat websocket, connected (as `user`, or with `headers`)."""
    from breezeweb.asgi import application

    if headers is None:
        headers = await sync_to_async(session_headers)(user)
    communicator = WebsocketCommunicator(application, WS_PATH, headers=headers)
    connected, code = await communicator.connect(timeout=5)
    assert connected, f"handshake refused with {code}"
    return communicator
