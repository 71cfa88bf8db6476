"""Agent mode in a real browser (Debian Chromium through Playwright) against a
real uvicorn process whose Llama Stack runner answers from the scripted
server: steps appear live, an approval card is approved and another denied,
and the steps are still there after a reload."""

from __future__ import annotations

import pytest

from tests.chat.test_browser import PASSWORD, _login
from tests.support.browser import chromium as launch_chromium
from tests.support.browser import watched_page
from tests.support.processes import create_user, live_site, remote_runner
from tests.support.screenshots import screenshot_dir
from tests.support.scripted_server import Reply, ScriptedToolCall

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def agent_site(tmp_path_factory, _scripted_server_session):
    data = tmp_path_factory.mktemp("agent-site")
    setup = create_user("alice", PASSWORD) + remote_runner(
        _scripted_server_session.url,
        enable_agents=True,
        timeout_seconds=20,
        extra_params={"loop_guard": False},
    )
    setup += "from agents.models import ToolPolicy;"
    setup += "ToolPolicy.objects.create(tool='current_time', policy='ask')"
    with live_site(data, setup, PRELOAD_LOCAL_RUNNERS="false") as live:
        yield live


@pytest.fixture(scope="module")
def chromium():
    with launch_chromium() as browser:
        yield browser


EXPLANATION = (
    "The answer is **42**. The calculator multiplied 6 by 7: six groups of seven make "
    "forty-two. You can check it by adding seven six times: 7, 14, 21, 28, 35, 42. The "
    "product is the same whichever order you multiply the two numbers in, because "
    "multiplication is commutative."
)


def time_call(call_id: str) -> Reply:
    return Reply(
        text="", tool_calls=(ScriptedToolCall("current_time", '{"timezone": "UTC"}', call_id),)
    )


def test_steps_live_approvals_and_reload(agent_site, chromium, scripted_server):
    page = watched_page(chromium.new_context(viewport={"width": 1280, "height": 820}))
    _login(page, agent_site)
    page.check("#agent-toggle")

    # 1. A step appears while the answer is still streaming.
    scripted_server.script(
        Reply(
            text="Computing. ",
            tool_calls=(ScriptedToolCall("calculator", '{"expression": "6 * 7"}', "c1"),),
        )
    )
    # Some 50 words at 20 a second: the step shows while the answer streams.
    scripted_server.script(Reply(text=EXPLANATION, token_delay=0.05))
    page.fill("#prompt", "What is 6 * 7?")
    page.keyboard.press("Enter")
    page.wait_for_selector(
        ".msg-assistant[data-status=streaming] .step[data-status=ok]", timeout=30_000
    )
    step = page.locator(".step").first
    assert "calculator" in step.locator(".step-name").inner_text()
    step.locator("summary").click()  # collapsible: open it
    assert "6 * 7 = 42" in step.locator(".step-result").inner_text()
    page.wait_for_selector(".msg-assistant[data-status=complete]", timeout=60_000)
    page.screenshot(path=str(screenshot_dir() / "agent-steps.png"))

    # 2. An ask tool: the approval card, approved.
    scripted_server.script(time_call("t1"))
    scripted_server.script(Reply(text="It is now known."))
    page.fill("#prompt", "What time is it?")
    page.keyboard.press("Enter")
    card = page.locator(".approval-card")
    card.wait_for(timeout=30_000)
    page.screenshot(path=str(screenshot_dir() / "agent-approval.png"))
    assert (
        "UTC" in page.locator(".step[data-status=awaiting_approval] .step-arguments").inner_text()
    )
    # Announced, and the focus on Approve: answered from the keyboard.
    page.wait_for_function(
        "() => document.getElementById('announcer').textContent.includes('current_time')"
    )
    assert page.evaluate("document.activeElement.className") == "btn small approve"
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.msg-assistant')].pop()"
        ".querySelector('.step[data-status=ok] .step-name')?.textContent === 'current_time'",
        timeout=30_000,
    )
    page.wait_for_selector(".msg-assistant:last-child[data-status=complete]", timeout=30_000)
    assert page.locator(".approval-card").count() == 0

    # 3. Another, denied after a reload: the pause survives it, the card is
    # drawn again from the saved step, and the model is told and answers anyway.
    scripted_server.script(time_call("t2"))
    scripted_server.script(Reply(text="I was not allowed to look."))
    page.fill("#prompt", "And now?")
    page.keyboard.press("Enter")
    page.locator(".approval-card").wait_for(timeout=30_000)
    page.reload()
    page.wait_for_selector("#conn-status[data-state=open]", timeout=15_000)
    page.locator(".approval-card .deny").click(timeout=30_000)
    page.wait_for_selector(".msg-assistant:last-child .step[data-status=denied]", timeout=30_000)
    page.wait_for_selector(".msg-assistant:last-child[data-status=complete]", timeout=30_000)
    assert "not allowed" in page.locator(".msg-assistant").last.locator(".msg-body").inner_text()

    # 4. After a reload the steps are still there, and agent mode is still on.
    page.reload()
    page.wait_for_selector("#conn-status[data-state=open]", timeout=15_000)
    statuses = page.locator(".step").evaluate_all("(nodes) => nodes.map((n) => n.dataset.status)")
    assert statuses == ["ok", "ok", "denied"]
    assert page.is_checked("#agent-toggle")
    assert page.problems == []
