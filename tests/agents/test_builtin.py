"""The built-in tools: the calculator never evaluates code and bounds its
work; the time is the user's; fetch_url reads only allowed hosts within its
limits; search_documents and read_document see only the user's documents,
with their citations."""

from __future__ import annotations

import asyncio
import http.server
import threading

import pytest

from agents import builtin
from agents.calculator import CalculatorError, evaluate
from agents.models import AgentSettings
from agents.tools import ToolContext, ToolFailed
from tests.support.documents import (
    LIGHTHOUSE_PAGES,
    add_and_ingest,
    drop_all_chroma_collections,
    lighthouse_pdf,
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("6 * 7", 42),
        ("2 ** 10", 1024),
        ("(1 + 2) / 4", 0.75),
        ("-3 // 2", -2),
        ("sqrt(16)", 4.0),
        ("round(pi, 2)", 3.14),
        ("max(1, 5, 3)", 5),
        ("7 % 4", 3),
    ],
)
def test_the_calculator_computes(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "(1).__class__",
        "[1, 2]",
        "lambda: 1",
        "9 ** 9 ** 9",
        "2 ** 100000",
        "10 ** 401",
        "1 / 0",
        "sqrt(-1)",
        "'a' * 3",
        "True + 1",
        "x",
        "1 +",
        "1" * 600,
    ],
)
def test_the_calculator_refuses(expression):
    # Refused with a reason, never evaluated as code, never a huge computation.
    with pytest.raises(CalculatorError):
        evaluate(expression)


def run(tool, arguments, context=None):
    return asyncio.run(tool.run(arguments, context or ToolContext(user=None)))


def test_current_time_is_in_the_users_time_zone():
    out = run(builtin.CURRENT_TIME, {}, ToolContext(user=None, timezone="Asia/Tokyo"))
    assert "Asia/Tokyo" in out.text and "UTC+0900" in out.text
    assert "America/New_York" in run(builtin.CURRENT_TIME, {"timezone": "America/New_York"}).text
    with pytest.raises(ToolFailed, match="Unknown time zone"):
        run(builtin.CURRENT_TIME, {"timezone": "Mars/Olympus"})


# ---- fetch_url ------------------------------------------------------------------------------


class _Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/page":
            body = b"<html><script>evil()</script><body><h1>Hello</h1><p>World</p></body></html>"
            self._send(200, "text/html; charset=utf-8", body)
        elif self.path == "/big":
            self._send(200, "text/plain", b"x" * 50_000)
        elif self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("Location", "http://localhost:1/secret")
            self.end_headers()
        elif self.path == "/binary":
            self._send(200, "application/octet-stream", b"\x00\x01")
        elif self.path == "/slow":
            import time

            time.sleep(3)
            self._send(200, "text/plain", b"late")
        else:
            self._send(404, "text/plain", b"no")

    def _send(self, status, kind, body):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the /slow client gives up first: a broken pipe, expected


@pytest.fixture(scope="module")
def pages():
    server = _Server(("127.0.0.1", 0), _Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fetch(url, **settings):
    conf = AgentSettings(
        fetch_enabled=True, fetch_allowed_hosts="127.0.0.1", fetch_timeout_seconds=1, **settings
    )
    return run(builtin.FETCH_URL, {"url": url}, ToolContext(user=None, settings=conf))


def test_fetch_url_is_off_by_default_and_needs_hosts():
    assert "fetch_url" not in {t.name for t in builtin.tools(AgentSettings())}
    assert "fetch_url" not in {t.name for t in builtin.tools(AgentSettings(fetch_enabled=True))}
    on = AgentSettings(fetch_enabled=True, fetch_allowed_hosts="example.com")
    assert "fetch_url" in {t.name for t in builtin.tools(on)}


def test_fetch_url_reads_text_from_allowed_hosts_only(pages):
    out = fetch(f"{pages}/page")
    assert "Hello" in out.text and "World" in out.text and "evil" not in out.text
    with pytest.raises(ToolFailed, match="not on the list"):
        fetch(pages.replace("127.0.0.1", "localhost") + "/page")
    with pytest.raises(ToolFailed, match="not on the list"):
        fetch(f"{pages}/elsewhere")  # a redirect to another host
    with pytest.raises(ToolFailed, match="http"):
        fetch("file:///etc/passwd")
    with pytest.raises(ToolFailed, match="not text"):
        fetch(f"{pages}/binary")
    with pytest.raises(ToolFailed, match="HTTP 404"):
        fetch(f"{pages}/missing")


def test_fetch_url_limits_size_and_time(pages):
    out = fetch(f"{pages}/big", fetch_max_bytes=2048)
    assert out.text.count("x") == 2048 and "(cut)" in out.text
    with pytest.raises(ToolFailed, match="did not load"):
        fetch(f"{pages}/slow")


def test_wildcard_hosts():
    assert builtin.host_allowed("docs.example.com", ["*.example.com"])
    assert not builtin.host_allowed("example.com", ["*.example.com"])
    assert not builtin.host_allowed("evil-example.com", ["*.example.com"])
    assert builtin.host_allowed("Example.COM.", ["example.com"])


# ---- documents ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_search_and_read_see_only_the_users_documents(user, other_user):
    drop_all_chroma_collections()
    document = add_and_ingest(user, "aldermoor.pdf", lighthouse_pdf())
    mine = ToolContext(user=user)

    out = run(builtin.SEARCH, {"query": "Who built the Aldermoor lighthouse?"}, mine)
    assert out.text.startswith("[1] aldermoor.pdf")
    assert f"document {document.pk}, page 1" in out.text
    assert out.sources[0]["document_id"] == document.pk and out.sources[0]["page"] == 1
    # Numbering continues after the sources already cited in the turn.
    mine.sources.append({"document_id": 0})
    assert run(builtin.SEARCH, {"query": "lighthouse"}, mine).text.startswith("[2]")

    page = run(builtin.READ, {"document_id": document.pk, "page": 3}, mine)
    assert "kite festival" in page.text and "page 3 of 3" in page.text
    assert LIGHTHOUSE_PAGES[0][0][:20] not in page.text
    with pytest.raises(ToolFailed, match="no page 9"):
        run(builtin.READ, {"document_id": document.pk, "page": 9}, mine)

    theirs = ToolContext(user=other_user)
    assert "No passage" in run(builtin.SEARCH, {"query": "Aldermoor lighthouse"}, theirs).text
    with pytest.raises(ToolFailed, match="not found"):
        run(builtin.READ, {"document_id": document.pk}, theirs)
    with pytest.raises(ToolFailed, match="`document_id`: Input should be a valid integer"):
        run(builtin.READ, {"document_id": "1"}, mine)


@pytest.mark.django_db(transaction=True)
def test_read_document_by_section(user, other_user):
    from tests.support.documents import MARKDOWN_NOTE

    drop_all_chroma_collections()
    document = add_and_ingest(user, "notes.md", MARKDOWN_NOTE.encode())
    mine = ToolContext(user=user)

    def read(**arguments):
        return run(builtin.READ, {"document_id": document.pk, **arguments}, mine).text

    birds = read(section="birds")  # a heading, in any case
    assert "red-throated loon" in birds and "Sea kale" not in birds
    assert "section 'Field notes > Birds'" in birds
    assert read(section="Field Notes >  Plants").count("Sea kale") == 1  # a heading path
    assert "Sea kale" in read(section="pla")  # the start of a heading
    both = read(section="Field notes")  # a heading holds its subsections
    assert "## Field notes > Birds" in both and "## Field notes > Plants" in both
    assert both.index("loon") < both.index("Sea kale")
    assert "loon" in read(section="Birds", page=None)

    with pytest.raises(ToolFailed) as missing:
        read(section="Mammals")
    assert "no section 'Mammals'" in str(missing.value)
    assert "Its sections: 'Field notes > Birds'; 'Field notes > Plants'" in str(missing.value)
    with pytest.raises(ToolFailed, match=r"^`section`: .*should not be empty"):
        read(section="  ")
    with pytest.raises(ToolFailed, match="not found"):
        run(builtin.READ, {"document_id": document.pk, "section": "Birds"}, ToolContext(other_user))
    # A document without headings says so, and how to read it instead.
    pdf = add_and_ingest(user, "aldermoor.pdf", lighthouse_pdf())
    with pytest.raises(ToolFailed, match=r"has no sections .*read it by page"):
        run(builtin.READ, {"document_id": pdf.pk, "section": "Intro"}, mine)
    assert "section" in builtin.READ.parameters["properties"]


def test_sections_match_whole_headings_before_prefixes():
    sections = [
        "Guide > Install",
        "Guide > Installation > Linux",
        "Guide > Usage",
        "Reference > Install",
    ]
    match = builtin.matching_sections
    # Whole headings at any level first (both "Install"s), never "Installation".
    assert match("install", sections) == ["Guide > Install", "Reference > Install"]
    assert match("guide > install", sections) == ["Guide > Install"]
    assert match("INSTALLATION", sections) == ["Guide > Installation > Linux"]
    assert match("Guide>Instal", sections) == ["Guide > Install", "Guide > Installation > Linux"]
    assert match("linux", sections) == ["Guide > Installation > Linux"]
    assert match("Usage > Linux", sections) == []
    assert match(" > ", sections) == []


def test_the_local_runner_keeps_agents_off():
    from django.core.exceptions import ValidationError

    from runners.models import RunnerConfig

    config = RunnerConfig(name="local", kind="executorch", enable_agents=True)
    with pytest.raises(ValidationError) as refused:
        config.clean()
    assert "cannot call tools" in str(refused.value.message_dict["enable_agents"])
    RunnerConfig(name="local", kind="executorch").clean()  # agents off: fine
