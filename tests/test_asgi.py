"""How breezeweb.asgi serves HTTP: a request's synchronous code runs on a
thread (and database connection) that served earlier requests, requests in
flight at once never share one, and Django's middleware runs on the event
loop (breezeweb/middleware.py) except what touches the database: a sign-in
(CSRF check, session saved, messages) works as before."""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core.signals import request_started
from django.db import connection

import pytest

from breezeweb import asgi
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


class CountingExecutor(ThreadPoolExecutor):
    submitted = 0

    def submit(self, *args, **kwargs):
        CountingExecutor.submitted += 1
        return super().submit(*args, **kwargs)


def hops_of(monkeypatch) -> type[CountingExecutor]:
    """Every request borrows a counting executor: its thread hops are counted."""
    CountingExecutor.submitted = 0
    monkeypatch.setattr(
        sync_threads, "borrow", lambda: CountingExecutor(max_workers=1, thread_name_prefix="t")
    )
    return CountingExecutor


def test_static_files_alone_go_through_whitenoise():
    """settings.MIDDLEWARE names Django's classes (its deploy checks read the
    names); WhiteNoise, which cannot run async, serves only STATIC_URL."""
    assert "django.middleware.security.SecurityMiddleware" in settings.MIDDLEWARE
    assert "whitenoise.middleware.WhiteNoiseMiddleware" in settings.MIDDLEWARE
    assert asgi.handler_for({"path": "/static/js/chat.js", "headers": []}) is asgi.static_app
    assert asgi.handler_for({"path": "/", "headers": []}) is asgi.page_app


@db
async def test_a_page_request_makes_no_thread_hop_per_middleware(monkeypatch):
    """/healthz: Django's request_started and request_finished signals and
    the CSRF check (process_view) hop to the thread; there were 16 more, two
    per middleware."""
    counting = hops_of(monkeypatch)
    assert (await call("GET", "/healthz")).status_code == 200
    assert counting.submitted <= 3


@db
async def test_signing_in_checks_csrf_saves_the_session_and_shows_the_chat(user, monkeypatch):
    """The session is saved (in the thread: it is a database write), the CSRF
    token is checked, and the next page knows the user."""
    page = await call("GET", "/login/")
    assert page.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    cookies = dict(page.cookies)
    form = f"username=alice&password=alice-password-123&csrfmiddlewaretoken={token}"
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://localhost"}
    refused = await call("POST", "/login/", content=form.encode(), headers=headers)
    assert refused.status_code == 403  # no CSRF cookie: refused
    signed_in = await call(
        "POST", "/login/", content=form.encode(), headers=headers, cookies=cookies
    )
    assert signed_in.status_code == 302, signed_in.text[:300]
    session = signed_in.cookies[settings.SESSION_COOKIE_NAME]
    chat = await call("GET", "/", cookies={**cookies, settings.SESSION_COOKIE_NAME: session})
    assert chat.status_code == 200 and "alice" in chat.text
