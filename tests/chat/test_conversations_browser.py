"""Search, projects, branches, pins and forks in a real browser: headless
Debian Chromium (Playwright) against a real uvicorn process (strict CSP on),
answering through a Llama Stack runner config that points at the scripted
chat-completions server on 127.0.0.1 (so answers are known and fast).
Saves conversation-search.png and conversation-branches.png (see
tests/support/screenshots.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.browser import chromium, sign_in, watched_page
from tests.support.processes import create_user, live_site, remote_runner
from tests.support.screenshots import screenshot_dir
from tests.support.scripted_server import Reply

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHOTS = screenshot_dir()
PASSWORD = "alice-password-123"
INSTRUCTIONS = "Speak like a pirate of the harbour."


@pytest.fixture(scope="module")
def site(tmp_path_factory, upstream):
    """uvicorn on a free port with its own SQLite database, one user and one
    runner (`remote`, the scripted server)."""
    data = tmp_path_factory.mktemp("conversations-site")
    setup = create_user("alice", PASSWORD) + remote_runner(upstream.url, "remote", priority=10)
    setup += (  # a price, so an answer shows its cost
        "from chat.models import RunnerPrice;RunnerPrice.objects.create("
        "runner=RunnerConfig.objects.get(name='remote'), currency='EUR', "
        "prompt_per_million=2.5, completion_per_million=10)\n"
    )
    with live_site(
        data,
        setup,
        SECRET_KEY="conversations-browser-secret-0123456789-abcdefghij",
        PRELOAD_LOCAL_RUNNERS="false",
    ) as live:
        yield live.url


@pytest.fixture(scope="module")
def page(site):
    with chromium() as browser:
        page = watched_page(browser.new_context(viewport={"width": 1280, "height": 820}))
        sign_in(page, site, "alice", PASSWORD)
        yield page


def _send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def _answers_done(page, count: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('.msg-assistant[data-status=complete]').length >= n",
        arg=count,
        timeout=60_000,
    )


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name))


def test_projects_branches_search_pins_and_forks(page, upstream):
    # A project with instructions and a runner; new chats start in it.
    page.click("#new-project")
    page.fill("#project-form [name=name]", "Harbour")
    page.fill("#project-form [name=instructions]", INSTRUCTIONS)
    page.select_option("#project-form [name=runner]", "remote")
    page.click("#project-form button[type=submit]")
    page.wait_for_selector(".project-item.active:has-text('Harbour')")
    assert page.input_value("#runner-select") == "remote"

    upstream.script(
        Reply(text="Arr, the treasure lies under the palm.", usage=(30, 8)),
        Reply(text="Ahoy again."),
    )
    _send(page, "Where is the treasure?")
    _answers_done(page, 1)
    # The context gauge: the answer's prompt + answer tokens of the runner's budget.
    page.wait_for_selector("#context-gauge:not([hidden])")
    assert "38 / 2,048" in page.inner_text("#context-gauge")
    meta = page.locator(".msg-assistant .msg-meta").last.inner_text()
    # The cost from the live `done` frame, without a reload: 30 x 2.5 + 8 x 10 per million.
    assert "30 + 8 tokens" in meta and "≈ 0.0002 EUR" in meta
    system = [m for m in upstream.chat_requests()[-1].json["messages"] if m["role"] == "system"]
    assert INSTRUCTIONS in system[0]["content"]
    page.wait_for_selector(".conversation-item:has-text('Where is the treasure?')")

    # Regenerate: both answers stay, and the arrows move between them.
    page.locator(".msg-assistant .regen").last.click()
    page.wait_for_selector(".branch-count:text('2 / 2')", timeout=60_000)
    assert "Ahoy again." in page.locator(".msg-assistant .msg-body").last.inner_text()
    _shot(page, "conversation-branches.png")
    page.click(".branch-prev")
    page.wait_for_selector(".branch-count:text('1 / 2')")
    assert "under the palm" in page.locator(".msg-assistant .msg-body").last.inner_text()

    # Pin it, then move it out of the project with its Move action.
    item = page.locator(".conversation-item").first
    item.locator("[data-action=pin]").click()
    page.wait_for_selector(".conversation-item.pinned")
    item.locator("[data-action=move]").click()
    page.select_option(".move-select", "")
    page.wait_for_selector("#conversation-list .empty-list")  # Harbour is empty now
    page.click(".project-item[data-project=''] .project-link")
    page.wait_for_selector(".conversation-item.pinned:has-text('Where is the treasure?')")

    # Search what was said: the snippet highlights the word and opens the message.
    page.click("#new-chat")
    page.fill("#search", "palm")
    hit = page.locator(".conversation-item .snippet mark")
    hit.first.wait_for()
    assert hit.first.inner_text().lower() == "palm"
    _shot(page, "conversation-search.png")
    page.locator(".conversation-item .conversation-link").first.click()
    page.wait_for_selector(".msg.found")
    assert "under the palm" in page.locator(".msg.found").inner_text()

    # Fork from the question: a new conversation with just that message.
    page.fill("#search", "")
    page.locator(".msg-user .fork").first.click()
    page.wait_for_function(
        "() => document.querySelectorAll('.msg').length === 1"
        " && document.querySelectorAll('.conversation-item').length === 2"
    )
    assert page.locator(".msg-user .msg-body").inner_text() == "Where is the treasure?"
    assert page.problems == []


HOSTILE = "<img src=x onerror=alert(1)>"


def _shows_hostile_html_as_text(page) -> None:
    """The answer's Markdown is rendered, its raw HTML shown as the characters
    written: no <img>, no dialog, and no console report (nothing was parsed,
    so the CSP had no inline handler to refuse)."""
    page.wait_for_selector(".msg-assistant strong:text('bold')")
    body = page.locator(".msg-assistant .msg-body").last
    assert body.inner_text().strip() == f"Use bold moves. {HOSTILE}"
    assert page.locator(".msg img").count() == 0
    assert page.problems == []


def test_share_link_and_export_from_the_share_dialog(page, site, upstream):
    upstream.script(Reply(text=f"Use **bold** moves. {HOSTILE}"))
    page.click("#new-chat")
    chat_alerts: list[str] = []

    def on_dialog(dialog) -> None:
        chat_alerts.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    _send(page, "Any chess advice?")
    _answers_done(page, 1)
    _shows_hostile_html_as_text(page)  # as it streamed in
    page.reload()
    page.wait_for_selector("#conn-status[data-state=open]", timeout=30_000)
    _shows_hostile_html_as_text(page)  # as saved
    page.remove_listener("dialog", on_dialog)
    assert chat_alerts == []
    page.click("#share-open")
    page.click("#share-create")
    page.wait_for_function("() => document.getElementById('share-url').value.includes('/s/')")
    link = page.input_value("#share-url")

    # Another browser context: no session at all.
    visitor = page.context.browser.new_context()
    shared = watched_page(visitor)
    alerts: list[str] = []
    shared.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
    shared.goto(link)
    # (Checked before the revoked link's expected 404 below.)
    _shows_hostile_html_as_text(shared)
    assert shared.locator(".msg-user").inner_text() == "Any chess advice?"
    assert alerts == []
    _shot(shared, "conversation-shared.png")

    page.click("#share-list button:text('Revoke')")
    page.wait_for_selector("#share-list li[data-active=false]")
    response = shared.goto(link)
    assert response.status == 404
    assert shared.locator(".msg").count() == 0
    visitor.close()

    # Export from the same dialog: the Markdown download holds the answer and its runner.
    with page.expect_download() as download:
        page.click("#export-md")
    text = Path(download.value.path()).read_text()
    assert text.startswith("# Any chess advice?") and "Use **bold** moves." in text
    assert "## Assistant (remote · scripted-model" in text
    page.click("#share-close")


def test_an_import_reports_when_it_is_done(page):
    """The page polls the import job until it ends, then reports it (and
    stops polling: the banner's text is the report, not the progress)."""
    export = {
        "format": "breezeweb.conversations",
        "version": 1,
        "conversations": [
            {
                "title": "Imported lighthouse chat",
                "messages": [
                    {"id": 1, "parent": None, "role": "user", "content": "Who keeps the light?"},
                    {"id": 2, "parent": 1, "role": "assistant", "content": "The keeper."},
                ],
            },
            {"title": "Broken", "messages": "not a list"},
        ],
    }
    page.set_input_files(
        "#import-input",
        files=[
            {
                "name": "conversations.json",
                "mimeType": "application/json",
                "buffer": json.dumps(export).encode(),
            }
        ],
    )
    page.wait_for_function(
        "() => document.getElementById('banner-text').textContent.startsWith('Imported')",
        timeout=30_000,
    )
    assert page.inner_text("#banner-text") == "Imported 1, skipped 1."
    page.wait_for_selector(".conversation-item:has-text('Imported lighthouse chat')")
