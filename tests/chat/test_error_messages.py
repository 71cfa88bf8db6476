"""The chat shows a server error in the page's language by its `code`
(static/js/errors.js, docs/i18n.md), run in Chromium with the real Chinese
catalog standing in for /jsi18n/. tests/test_i18n.py checks the map has every
websocket code."""

from __future__ import annotations

import polib
import pytest

from tests.support.browser import static_page
from tests.support.processes import ROOT

pytestmark = pytest.mark.browser

CATALOG = ROOT / "locale" / "zh_Hant" / "LC_MESSAGES" / "djangojs.po"


def test_errors_read_in_chinese_by_code_and_unknown_codes_keep_the_servers_text():
    chinese = {e.msgid: e.msgstr for e in polib.pofile(str(CATALOG)) if e.msgstr}
    with static_page() as page:
        shown = page.evaluate(
            """async (catalog) => {
                window.gettext = (s) => catalog[s] || s;
                document.documentElement.lang = "zh-hant";
                const { errorText } = await import("/static/js/errors.js");
                const quota = {
                    used: 1200, limit: 1000, remaining: 0, resets_at: "2026-12-02T00:00:00Z",
                };
                return [
                    errorText("timeout", "Runner timed out after 60 s."),
                    errorText("guardian_blocked", "No passwords, please."),
                    errorText("quota_exceeded", "Quota reached: ...", quota),
                    errorText("bad_title", "A title cannot be empty."),
                    errorText("no_such_code", ""),
                ];
            }""",
            chinese,
        )
    assert shown[0] == "執行器回應逾時。"
    assert shown[1] == "已被內容規則阻擋\uff1aNo passwords, please."  # the rule's own words
    assert shown[2].startswith("已達額度上限\uff1a已使用 1,200\uff0f1,000\uff0c剩餘 0。將於 2026")
    assert shown[3] == "A title cannot be empty."  # not a websocket code: the server's text
    assert shown[4] == "發生錯誤。"
