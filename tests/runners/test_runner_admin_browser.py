"""The runner admin in a real browser: headless Debian Chromium (Playwright)
against a real uvicorn process (strict CSP on), with Llama Stack runners
pointing at a scripted HTTP server on 127.0.0.1 and at a dead port.

This is the production path of the admin actions (a sync admin view calling
the async router on the server's event loop), which the Django test client does
not exercise. Saves (see tests/support/screenshots.py) admin-runners.png and
admin-runner-dashboard.png."""

from __future__ import annotations

import pytest

from tests.support.browser import chromium, sign_in, watched_page
from tests.support.processes import create_user, live_site, remote_runner
from tests.support.screenshots import screenshot_dir
from tests.support.scripted_server import Reply, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]


SHOTS = screenshot_dir()
PASSWORD = "admin-password-123"
API_KEY = "sk-browser-admin-0f1e2d3c4b5a6978"


@pytest.fixture(scope="module")
def site(tmp_path_factory, upstream):
    """uvicorn on a free port with its own SQLite database, an admin, and two
    runners: `remote` (the scripted server, with an API key) and `dead`."""
    data = tmp_path_factory.mktemp("admin-site")
    setup = create_user("admin", PASSWORD, admin=True)
    setup += remote_runner(upstream.url, "remote", priority=10, enable_vision=True)
    setup += f"c = RunnerConfig.objects.get(name='remote');c.api_key = '{API_KEY}';c.save()\n"
    setup += remote_runner(f"http://127.0.0.1:{free_port()}", "dead", model_id="m", priority=1)
    with live_site(data, setup, METRICS_TOKEN="") as web:
        yield web.url
    assert API_KEY not in web.final_log


@pytest.fixture(scope="module")
def page(site):
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1600, "height": 800})
        page = watched_page(context, console=("error", "warning"))
        sign_in(page, site, "admin", PASSWORD, admin=True)
        yield page


def test_the_list_fills_in_live_health_per_row_under_a_strict_csp(site, page, upstream):
    page.goto(f"{site}/admin/runners/runnerconfig/")
    remote = page.locator("tr", has=page.locator("a", has_text="remote")).locator(".runner-health")
    dead = page.locator("tr", has=page.locator("a", has_text="dead")).locator(".runner-health")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.runner-health')]"
        ".every(c => c.classList.contains('runner-health-ok')"
        " || c.classList.contains('runner-health-bad'))",
        timeout=20_000,
    )
    assert remote.inner_text().startswith("healthy (")
    assert dead.inner_text().startswith("unhealthy (")
    assert "Could not reach the Llama Stack server" in dead.locator("small").inner_text()
    assert API_KEY not in page.content()
    assert page.problems == []
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "admin-runners.png"), full_page=True)


def test_the_test_prompt_action_streams_through_the_router_on_daphne(site, page, upstream):
    upstream.script(Reply(text="Hello from the browser test.", usage=(11, 6)))
    page.goto(f"{site}/admin/runners/runnerconfig/")
    row = page.locator("tr", has=page.locator("a", has_text="remote"))
    row.locator("input.action-select").check()
    page.select_option("select[name=action]", "send_test_prompt")
    page.click("button[name=index]")
    page.fill("textarea[name=prompt]", "Say hello")
    page.click("input[type=submit][value=Send]")
    page.wait_for_selector(".runner-trial")
    trial = page.locator(".runner-trial").inner_text()
    assert "Hello from the browser test." in trial
    assert "11 prompt + 6 completion tokens" in trial
    assert upstream.chat_requests()[-1].authorization == f"Bearer {API_KEY}"
    assert API_KEY not in page.content()
    # Again on the same server loop: the cached runner and its HTTP pool are reused.
    upstream.script(Reply(text="Second answer."))
    page.click("input[type=submit][value='Send again']")
    page.wait_for_selector("text=Second answer.")
    assert page.problems == []


def test_the_dashboard_shows_the_test_prompts_run(site, page):
    page.goto(f"{site}/admin/")
    page.click("#runner-dashboard-link a")
    page.wait_for_selector("#runner-stats-1")
    row = page.locator("#runner-stats-1 tr[data-runner=remote]").inner_text().split("\t")
    assert row[0] == "remote" and int(row[1]) >= 2 and row[5] == "0%"
    assert page.problems == []
    page.screenshot(path=str(SHOTS / "admin-runner-dashboard.png"), full_page=True)
