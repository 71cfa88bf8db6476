"""breezeweb.asgi.SyncThreads: an HTTP request's synchronous code runs on a
thread (and database connection) that served earlier requests, and requests
in flight at once never share one."""

from __future__ import annotations

import asyncio
import threading

from django.core.signals import request_started
from django.db import connection

import pytest

from breezeweb.asgi import sync_threads
from tests.support.clients import call

db = pytest.mark.django_db(transaction=True)


class Seen:
    """The thread and database connection each request started on."""

    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold
        self.starts: list[tuple[int, int]] = []

    def __call__(self, **kwargs) -> None:
        connection.ensure_connection()
        self.starts.append((threading.get_ident(), id(connection.connection)))
        if self.hold:
            threading.Event().wait(self.hold)  # a slow ORM call, on this request's thread


def watching(seen: Seen):
    request_started.connect(seen, dispatch_uid="test-asgi-threads")
    return seen


@pytest.fixture(autouse=True)
def _disconnect():
    yield
    request_started.disconnect(dispatch_uid="test-asgi-threads")


@db
async def test_one_request_after_another_reuses_the_thread_and_its_connection():
    seen = watching(Seen())
    for _ in range(4):
        assert (await call("GET", "/healthz")).status_code == 200
    threads = {thread for thread, _ in seen.starts}
    connections = {conn for _, conn in seen.starts}
    assert len(seen.starts) == 4
    assert len(threads) == 1 and len(connections) == 1, seen.starts


@db
async def test_requests_in_flight_at_once_each_have_a_thread_of_their_own():
    seen = watching(Seen(hold=0.3))
    responses = await asyncio.gather(*(call("GET", "/healthz") for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert len({thread for thread, _ in seen.starts}) == 3
    assert len(sync_threads._idle) >= 3  # given back, for the next requests
