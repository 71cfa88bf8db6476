"""The chat shows a `notice` in the page's language by its code, made from
its data (static/js/notices.js, docs/i18n.md): a real turn in Chinese whose
old turns were left out to fit a small context, in headless Debian Chromium
against a real uvicorn process answering through the scripted chat-completions
server; and the module itself with the real Chinese catalog, unknown codes and
unreadable data included. Also a failed import's reason by its code
(static/js/conversations.js). tests/test_i18n.py checks both maps have every code."""

from __future__ import annotations

import polib
import pytest

from tests.support.browser import chromium, sign_in, static_page, watched_page
from tests.support.processes import ROOT, create_user, live_site, remote_runner
from tests.support.scripted_server import Reply

pytestmark = pytest.mark.browser

CATALOG = ROOT / "locale" / "zh_Hant" / "LC_MESSAGES" / "djangojs.po"
PASSWORD = "mei-password-123"


def _chinese() -> dict[str, str]:
    return {
        e.msgid: e.msgstr or e.msgstr_plural.get(0, "")
        for e in polib.pofile(str(CATALOG))
        if e.msgstr or e.msgstr_plural
    }


def test_notices_read_in_chinese_by_code_with_their_data():
    with static_page() as page:
        shown = page.evaluate(
            """async (catalog) => {
                window.gettext = (s) => catalog[s] || s;
                window.ngettext = (s, p, n) => catalog[s] || (n === 1 ? s : p);
                document.documentElement.lang = "zh-hant";
                const { noticeText } = await import("/static/js/notices.js");
                return [
                    noticeText("queued", "Waiting ...: position 2 in the queue.", { position: 2 }),
                    noticeText("trimmed", "The 3 oldest message(s) ...", { dropped: 3 }),
                    noticeText("step_limit", "The agent stopped ...", { max_steps: 1200 }),
                    noticeText("fallback", "remote failed.", { failed: "remote", code: "timeout" }),
                    noticeText("trimmed", "The server's own words.", {}),
                    noticeText("brand_new", "A notice from a newer server.", { n: 1 }),
                ];
            }""",
            _chinese(),
        )
    assert shown[0] == "正在等候本機模型\uff1a排在佇列第 2 位。"
    assert shown[1] == "為了放進模型的上下文\uff0c已略去最早的 3 則訊息。"
    assert shown[2].startswith("代理模式在 1,200 輪工具呼叫後停止")
    assert shown[3] == "執行器 remote 無法回答\uff0c正在改用下一個。"
    assert shown[4] == "The server's own words."  # data it cannot read: the server's text
    assert shown[5] == "A notice from a newer server."  # a code it does not know


@pytest.mark.slow
def test_a_chinese_page_shows_a_real_trimmed_notice_translated(
    tmp_path, upstream, compiled_translations
):
    setup = create_user("mei", PASSWORD) + remote_runner(
        upstream.url, "tiny", priority=10, context_tokens=400, max_tokens=64
    )
    upstream.script(Reply(text="Noted."), Reply(text="Short answer."))
    with (
        live_site(
            tmp_path / "site",
            setup,
            SECRET_KEY="notices-browser-secret-0123456789-abcdefghijklmn",
            PRELOAD_LOCAL_RUNNERS="false",
        ) as site,
        chromium() as browser,
    ):
        context = browser.new_context(viewport={"width": 1280, "height": 820}, locale="zh-TW")
        page = watched_page(context)
        sign_in(page, site.url, "mei", PASSWORD)
        assert page.locator("html").get_attribute("lang") == "zh-hant"
        # ~190 tokens each: either fits the 400-token context alone, not both.
        page.fill("#prompt", "word " * 150)
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg-assistant[data-status=complete]", timeout=60_000)
        page.fill("#prompt", "more " * 150)
        page.keyboard.press("Enter")
        notice = page.locator(".msg-assistant .notice[data-code=trimmed]")
        notice.wait_for(timeout=60_000)
        text = notice.inner_text()
        assert text.startswith("為了放進模型的上下文\uff0c已略去最早的 ")
        assert text.endswith(" 則訊息。")
        assert "oldest" not in text
        assert page.problems == []


def test_an_import_failure_reads_in_chinese_by_its_code():
    """static/js/conversations.js: a failed import job's `error_code` shows
    the translated reason; a job without a known code shows the server's."""
    with static_page() as page:
        shown = page.evaluate(
            """async (catalog) => {
                window.gettext = (s) => catalog[s] || s;
                const { importErrorText } = await import("/static/js/conversations.js");
                return [
                    importErrorText({ error_code: "stale", error: "The import stopped ..." }),
                    importErrorText({ error_code: "", error: "An older job's words." }),
                ];
            }""",
            _chinese(),
        )
    assert shown[0] == "伺服器重新啟動\uff0c匯入因此中斷\uff1b請重新匯入檔案。"
    assert shown[1] == "An older job's words."
