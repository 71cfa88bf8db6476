"""Hardening of the HTTP APIs (issue 12): bad input is a clear JSON 4xx under
/api and /v1 for every status Django itself produces too; ids and bodies are
read in one place with limits checked before any expensive work; control
characters leave titles and file names; origins are compared exactly; keys
stay out of URLs and logs; the production settings pass `check --deploy`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client, override_settings

import httpx
import pytest
from asgiref.sync import sync_to_async

from accounts.models import ApiKey
from chat.models import Conversation, Message
from rag import worker
from rag.models import Document
from runners.router import circuits
from tests.support import documents as docs
from tests.support.clients import call
from tests.support.processes import ROOT

db = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh(settings, fresh_process_state):
    settings.RAG_INGEST_WORKER = "thread"
    from django.core.cache import cache

    cache.clear()


def api_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error of an /api response: BreezeWeb's shape, JSON, never HTML."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert "type" not in error
    if code is not None:
        assert error["code"] == code, error
    return error


def openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    if code is not None:
        assert error["code"] == code, error
    return error


def session_cookies(user) -> dict:
    client = Client()
    client.force_login(user)
    client.get("/")  # sets the CSRF cookie
    return {
        "sessionid": client.cookies["sessionid"].value,
        "csrftoken": client.cookies["csrftoken"].value,
    }


def chat_body(text="Hello?", **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


# ---- Django's own statuses are JSON under /api and /v1 ------------------------------------


@db
@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/documents/-1", 404, "unknown_url"),
        ("GET", "/api/conversations/-5", 404, "unknown_url"),
        ("GET", "/api/conversations/99999999999999999999999", 404, "unknown_url"),
        ("GET", "/api/conversations/9223372036854775808", 404, "unknown_url"),
        ("GET", "/api/conversations/%C2%B2", 404, "unknown_url"),  # "²": isdigit, not int
        ("GET", "/api/documents/%D9%A3", 404, "unknown_url"),  # Arabic-Indic 3
        ("GET", "/api/no-such-thing", 404, "unknown_url"),
        ("PUT", "/api/conversations", 405, "method_not_allowed"),
        ("POST", "/api/runners", 405, "method_not_allowed"),
        # A call with a key skips the browser's middleware (CSRF among it).
        ("DELETE", "/api/schema", 405, "method_not_allowed"),
    ],
)
async def test_django_statuses_are_json_in_the_api_shape(api_key, method, path, status, code):
    response = await call(method, path, key=api_key)
    error = api_error(response, status, code)
    if status == 405:
        assert response.headers.get("Allow")
        assert response.headers["Allow"] in error["message"]


@db
async def test_under_v1_they_are_openai_shaped(api_key):
    openai_error(await call("GET", "/v1/nothing", key=api_key), 404, "unknown_url")
    response = await call("DELETE", "/v1/chat/completions", key=api_key)
    openai_error(response, 405, "method_not_allowed")


@db
async def test_a_body_over_the_limit_is_a_json_413_before_it_is_read(api_key):
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024):
        big = b'{"query": "' + b"x" * 4000 + b'"}'
        api_error(await call("POST", "/api/search", key=api_key, content=big), 413)
        response = await call("POST", "/v1/chat/completions", key=api_key, content=big)
        openai_error(response, 413, "request_too_large")
    # The search body has its own, smaller limit.
    huge = json.dumps({"query": "x" * 100_000}).encode()
    api_error(await call("POST", "/api/search", key=api_key, content=huge), 413)


@db
async def test_multipart_without_a_boundary_is_a_json_400(api_key, user):
    headers = {"Content-Type": "multipart/form-data"}
    response = await call("POST", "/api/documents", key=api_key, content=b"--x--", headers=headers)
    api_error(response, 400)
    cookies = await sync_to_async(session_cookies)(user)
    headers["X-CSRFToken"] = cookies["csrftoken"]
    response = await call(
        "POST", "/api/documents", content=b"--x--", headers=headers, cookies=cookies
    )
    api_error(response, 400)


@db
async def test_csrf_refusals_are_json(user):
    cookies = await sync_to_async(session_cookies)(user)
    response = await call("POST", "/api/search", body={"query": "x"}, cookies=cookies)
    api_error(response, 403, "csrf_failed")
    response = await call("POST", "/v1/chat/completions", body=chat_body(), cookies=cookies)
    openai_error(response, 403, "csrf_failed")
    # Django's own CSRF check (a plain view), as JSON too.
    api_error(await call("DELETE", "/api/schema", cookies=cookies), 403, "csrf_failed")


def test_only_calls_made_with_a_key_take_the_short_middleware_chain():
    from breezeweb.asgi import takes_short_chain

    def scope(path: str, authorization: bytes | None) -> dict:
        headers = [(b"authorization", authorization)] if authorization is not None else []
        return {"type": "http", "path": path, "headers": headers}

    assert takes_short_chain(scope("/v1/chat/completions", b"Bearer bw_abc"))
    assert takes_short_chain(scope("/api/conversations", b"bearer bw_abc"))
    for path, authorization in [
        ("/v1/models", None),  # a browser's session
        ("/v1/models", b"Bearer "),  # no key at all: the session decides
        ("/v1/models", b"Basic dXNlcjpwYXNz"),
        ("/api/docs", b"Bearer bw_abc"),  # an HTML page: the full chain's headers
        ("/c/1/", b"Bearer bw_abc"),
        ("/admin/", b"Bearer bw_abc"),
    ]:
        assert not takes_short_chain(scope(path, authorization)), (path, authorization)


@db
async def test_a_call_with_a_key_keeps_the_security_headers_and_sets_no_cookie(api_key, user):
    response = await call("GET", "/v1/models", key=api_key)
    assert response.status_code == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "set-cookie" not in response.headers
    assert "X-Frame-Options" not in response.headers  # the page headers are the browser's
    cookies = await sync_to_async(session_cookies)(user)
    browser = await call("GET", "/v1/models", cookies=cookies)
    assert browser.status_code == 200 and browser.headers["X-Frame-Options"] == "DENY"


# ---- bodies: numbers, nesting, text -----------------------------------------------------------


@db
async def test_hostile_json_bodies_are_400s_and_touch_nothing(api_key, user):
    conversation = await Conversation.objects.acreate(owner=user, title="Mine")
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_small = b"[" * 20_000 + b"]" * 20_000  # within /api's 64 KB body limit
    deep_object = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    huge_int = b'{"model": "auto", "max_tokens": 1' + b"0" * 5000 + b"}"
    cases = [
        ("/v1/chat/completions", deep, "nesting_too_deep"),
        ("/v1/chat/completions", deep_object, "nesting_too_deep"),
        ("/v1/chat/completions", huge_int, "number_too_large"),
        (
            "/v1/chat/completions",
            json.dumps(chat_body(breezeweb={"conversation_id": 2**70})).encode(),
            "number_too_large",
        ),
        ("/v1/chat/completions", json.dumps(chat_body("a\ud800b")).encode(), "invalid_text"),
        ("/v1/chat/completions", json.dumps(chat_body("a\x00b")).encode(), "invalid_text"),
        ("/v1/chat/completions", b'{"model": "auto", "temperature": NaN}', "invalid_json"),
        ("/v1/chat/completions", b'{"model": "auto", "temperature": 1e999}', "number_too_large"),
        ("/api/search", deep_small, "nesting_too_deep"),
        ("/api/search", b'{"query": "x", "k": 1' + b"0" * 5000 + b"}", "number_too_large"),
        ("/api/search", json.dumps({"query": "\udfff"}).encode(), "invalid_text"),
        ("/api/search", json.dumps({"query": "x", "collections": [2**64]}).encode(), None),
        ("/api/search", json.dumps({"query": "x", "collections": [-1]}).encode(), None),
    ]
    for path, content, code in cases:
        response = await call("POST", path, key=api_key, content=content)
        check = openai_error if path.startswith("/v1") else api_error
        check(response, 400, code)
    for content in (deep_small, json.dumps({"title": "a\ud800"}).encode()):
        response = await call(
            "PATCH", f"/api/conversations/{conversation.pk}", key=api_key, content=content
        )
        api_error(response, 400)
    await conversation.arefresh_from_db()
    assert conversation.title == "Mine"
    assert await Message.objects.acount() == 0
    assert circuits.paused() == {}


@db
async def test_a_five_megabyte_message_is_refused_at_once(api_key):
    body = json.dumps(chat_body("word " * 1_000_000)).encode()
    started = time.perf_counter()
    response = await call("POST", "/v1/chat/completions", key=api_key, content=body)
    elapsed = time.perf_counter() - started
    error = openai_error(response, 400, "string_above_max_length")
    assert error["param"] == "messages[0].content"
    assert elapsed < 1.5, elapsed  # no guardian, no tokenizer


@db
async def test_unicode_digits_are_not_ids(api_key):
    for raw in ("²", "١٢", "1.0", "-1", "99999999999999999999"):
        response = await call("GET", "/api/documents", key=api_key, headers={})
        assert response.status_code == 200
        response = await call(
            "GET", f"/api/documents?collection={httpx.QueryParams({'c': raw})['c']}", key=api_key
        )
        api_error(response, 400, "bad_collection")


@db
async def test_control_characters_are_stripped_from_titles(api_key, user):
    conversation = await Conversation.objects.acreate(owner=user, title="Old")
    response = await call(
        "PATCH",
        f"/api/conversations/{conversation.pk}",
        key=api_key,
        body={"title": "Bad\x00 title\x07\u2028with\x85 controls"},
    )
    assert response.status_code == 200, response.text
    await conversation.arefresh_from_db()
    assert conversation.title == "Bad title with controls"
    listed = await call("GET", "/api/conversations?q=Bad%00", key=api_key)
    assert listed.status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_thousand_character_file_name_is_shortened_not_refused(user):
    _, raw = ApiKey.issue(user, "tests")
    client = Client(headers={"Authorization": f"Bearer {raw}"})
    name = "\x01ü" + "a" * 995 + ".txt"
    upload = SimpleUploadedFile(name, b"Plain text about lighthouses.\n" * 5, "text/plain")
    try:
        response = client.post("/api/documents", {"file": upload})
        assert response.status_code == 201, response.content
        (doc,) = response.json()["documents"]
        assert len(doc["title"]) == 200 and doc["title"].endswith(".txt")
        assert doc["title"].startswith("üaaa")
        assert Document.objects.get(pk=doc["id"]).title == doc["title"]
    finally:
        worker.wait_until_idle(timeout=60)
        docs.drop_all_chroma_collections()


# ---- origins ------------------------------------------------------------------------------------


@db
@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost", True),
        ("http://localhost:9999", False),
        ("https://localhost", False),
        ("http://localhost.evil.example", False),
        ("null", False),
        ("https://chat.example.com", True),
        ("https://chat.example.com:8443", False),
        ("http://chat.example.com", False),
    ],
)
async def test_origins_are_compared_exactly(user, origin, allowed):
    cookies = await sync_to_async(session_cookies)(user)
    headers = {"X-CSRFToken": cookies["csrftoken"], "Origin": origin}
    with override_settings(CSRF_TRUSTED_ORIGINS=["https://chat.example.com"]):
        response = await call(
            "POST", "/api/search", body={"query": ""}, headers=headers, cookies=cookies
        )
    if allowed:
        api_error(response, 400, "bad_query")  # past CSRF: the body itself is refused
    else:
        api_error(response, 403, "csrf_failed")


# ---- keys in URLs and logs ---------------------------------------------------------------


@db
@pytest.mark.parametrize(
    "query",
    ["api_key={key}", "key=anything", "access_token={key}", "q={key}", "token=%62w_1234567890"],
)
async def test_a_key_in_the_query_string_is_refused(api_key, query):
    path = "/api/conversations?" + query.format(key=api_key)
    error = api_error(await call("GET", path), 400, "api_key_in_query")
    assert "Authorization" in error["message"] and api_key not in error["message"]
    response = await call("GET", "/v1/models?" + query.format(key=api_key))
    openai_error(response, 400, "api_key_in_query")


def test_keys_are_masked_in_log_records_and_the_servers_access_log():
    from breezeweb.log_redaction import RedactKeysFilter

    key = "bw_" + "A1b2_C3-d4" * 4
    # uvicorn's access log line, through the handlers settings.LOGGING gives it
    # (pytest adds capturing handlers of its own beside them).
    configured = settings.LOGGING["loggers"]["uvicorn.access"]
    assert configured["handlers"] and configured["propagate"] is False
    access = logging.getLogger("uvicorn.access")
    redacting = [
        h for h in access.handlers if any(isinstance(f, RedactKeysFilter) for f in h.filters)
    ]
    assert redacting and not access.propagate
    record = access.makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/v1/models?api_key={key}", "1.1", 400),
        None,
    )
    for handler in redacting:
        for check in handler.filters:
            check.filter(record)
    assert key not in record.getMessage() and "bw_[redacted]" in record.getMessage()

    record = logging.LogRecord(
        "django.request", logging.WARNING, __file__, 1, "HTTP %(path)s", None, None
    )
    record.args = {"path": f"/v1/models?api_key={key}"}
    RedactKeysFilter().filter(record)
    assert key not in record.getMessage()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, f"got {key}", (key,), None)
    RedactKeysFilter().filter(record)
    assert key not in record.msg and key not in record.args


def test_every_configured_log_handler_redacts_keys():
    handlers = settings.LOGGING["handlers"]
    assert handlers and all("redact_keys" in h.get("filters", ()) for h in handlers.values())


# ---- check --deploy ---------------------------------------------------------------------------


def _readme_production_env() -> dict[str, str]:
    """The variables README's "Deploying to production" block sets."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Deploying to production", 1)[1].split("```sh", 1)[1]
    block = block.split("```", 1)[0]
    env = {}
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            name, value = line.split("=", 1)
            env[name] = value
    return env


def test_check_deploy_passes_with_the_readme_production_settings(tmp_path):
    env = _readme_production_env()
    assert {"DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "SECURE_SSL_REDIRECT"} <= set(env)
    env["SECRET_KEY"] = "k7Qz-" + os.urandom(32).hex()  # "..." in the README
    full_env = {
        **os.environ,
        **env,
        "DATA_DIR": str(tmp_path),
        "BREEZEWEB_ENV_FILE": "/nonexistent",
        "DJANGO_SETTINGS_MODULE": "breezeweb.settings",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout
