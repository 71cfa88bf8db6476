"""Teams in a real browser (headless Debian Chromium through Playwright,
against a real uvicorn process with its own empty SQLite database): the first
run creates the admin account, the chat answers and shows the budget, the
quota message appears when the budget is spent, and the usage page shows
what was used. Answers come from the scripted chat-completions server on
127.0.0.1 through the real Llama Stack runner."""

from __future__ import annotations

import pytest

from tests.support.browser import chromium, watched_page
from tests.support.processes import live_site, manage, remote_runner
from tests.support.screenshots import screenshot_dir
from tests.support.scripted_server import Reply

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHOTS = screenshot_dir()
PASSWORD = "first-admin-passphrase-9"


@pytest.fixture
def fresh_site(tmp_path_factory, scripted_server):
    """A site with no account at all, and one runner: the scripted server."""
    data = tmp_path_factory.mktemp("teams-site")
    setup = remote_runner(
        scripted_server.url, extra_params={"loop_guard": False}, timeout_seconds=10
    )
    with live_site(data, setup) as live:
        yield live


@pytest.fixture
def browser():
    with chromium() as launched:
        yield launched


def _send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def test_first_run_chat_quota_message_and_usage_page(fresh_site, browser, scripted_server):
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light")
    page = watched_page(context)

    # 1. A fresh install: the sign-in page leads to the first-run page.
    page.goto(f"{fresh_site.url}/")
    page.wait_for_url("**/setup/")
    assert page.locator("h1").inner_text() == "Welcome to BreezeWeb"
    page.fill("#id_username", "root")
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.screenshot(path=str(SHOTS / "first-run.png"))
    page.click("button[type=submit]")
    # Signed in, in the chat, with a live socket.
    page.wait_for_selector("#conn-status[data-state=open]", timeout=15_000)
    assert page.locator("a[href='/admin/']").count() == 1  # a staff account
    # Never offered again.
    assert page.request.get(f"{fresh_site.url}/setup/").status == 404

    # 2. A budget of one message a day for the admin: shown, then spent.
    manage(
        fresh_site.env,
        "shell",
        "-c",
        "from accounts.models import Quota; from django.contrib.auth.models import User;"
        "Quota.objects.create(user=User.objects.get(username='root'), metric='messages',"
        " period='day', limit=1)",
    )
    page.reload()
    page.wait_for_selector("#conn-status[data-state=open]", timeout=15_000)
    assert "1 left" in page.locator("#budget").inner_text()
    scripted_server.script(Reply("The first and only answer today."))
    _send(page, "Hello there")
    page.wait_for_selector(".msg-assistant[data-status=complete]", timeout=30_000)
    assert "only answer today" in page.locator(".msg-assistant .msg-body").last.inner_text()

    # 3. The next message is refused with a clear message: what is left, when it resets.
    _send(page, "One more?")
    page.wait_for_selector("#banner:not([hidden])", timeout=15_000)
    text = page.locator("#banner-text").inner_text()
    assert "Quota reached" in text and "0 left" in text and "starts over at" in text
    assert page.locator("#prompt").input_value() == "One more?"  # given back to retype later
    page.screenshot(path=str(SHOTS / "quota-exceeded.png"))
    page.reload()
    page.wait_for_selector("#conn-status[data-state=open]", timeout=15_000)
    assert "0 left" in page.locator("#budget").inner_text()

    # 4. The usage page: today's turn and tokens, by runner, and the budget.
    page.click("a[href='/settings/usage/']")
    page.wait_for_selector("#usage-periods")
    today = page.locator("#usage-periods tr[data-period=today] td")
    assert today.nth(0).inner_text() == "1"  # turns
    assert int(today.nth(3).inner_text()) > 0  # total tokens
    assert page.locator("#usage-by-runner tr[data-runner=scripted]").count() == 1
    assert "1 / 1" in page.locator("#usage-quota").inner_text()
    page.screenshot(path=str(SHOTS / "usage-page.png"))
    assert page.problems == []
    context.close()
