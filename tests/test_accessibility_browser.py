"""Everyone can use it (docs/accessibility.md, docs/i18n.md), checked in headless
Debian Chromium (Playwright) against a real uvicorn process answering from the
real local model:

- every page passes an axe-core audit (vendored, injected by the test, never
  served to pages) with no moderate, serious or critical violation, in the
  light and the dark theme, and logs no console error or failed request;
- the chat is usable from the keyboard alone: Tab reaches every action with a
  visible focus ring, and the shortcuts and their help dialog work;
- the chat speaks Traditional Chinese to a zh-TW browser, answer included;
- the app is installable: manifest, icons, a service worker that caches the
  app shell and nothing else.

Saves chat-zh-hant.png and installed-app.png (tests/support/screenshots.py)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.support.browser import chromium, watched_page
from tests.support.processes import ROOT, create_user, live_site, manage, site_env
from tests.support.screenshots import screenshot_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]

AXE = ROOT / "static" / "vendor" / "axe-core-4.14.1" / "axe.min.js"
SHOTS = screenshot_dir()
PASSWORD = "carol-password-123"
# axe's impact levels this suite refuses (it allows only "minor").
REFUSED_IMPACTS = {"moderate", "serious", "critical"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """uvicorn with its own database, the bootstrap runners (the local model), a
    staff user `carol` (chat and admin pages) and compiled translations."""
    data = tmp_path_factory.mktemp("a11y-site")
    manage(site_env(data), "compile_translations")
    with live_site(data, create_user("carol", PASSWORD, admin=True), local_model=True) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def _login(page, site, then="#conn-status[data-state=open]") -> None:
    page.goto(f"{site.url}/login/")
    page.fill("#id_username", "carol")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector(then, timeout=20_000)


def _ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg-assistant')].pop();"
        " return m && m.dataset.status !== 'streaming'"
        " && m.querySelector('.msg-actions button'); }",
        timeout=180_000,
    )


def _axe(page) -> list[str]:
    """axe-core's violations of the page at moderate impact or worse. The engine
    is evaluated through the devtools protocol (the pages' CSP allows no
    injected script), so no page ever serves it."""
    page.evaluate(AXE.read_text())
    result = page.evaluate(
        "async () => { const r = await axe.run(document, {resultTypes: ['violations']});"
        " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.slice(0, 3).map(n => n.target.join(' ') + ': ' + n.failureSummary)})); }"
    )
    return [
        f"{v['impact']} {v['id']} ({v['help']}): {v['nodes']}"
        for v in result
        if v["impact"] in REFUSED_IMPACTS
    ]


@pytest.fixture(scope="module")
def answered(site, browser):
    """One conversation with a real answer, for the pages that show it."""
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    _login(page, site)
    _ask(page, "Name three colours of the rainbow.")
    url = page.url
    context.close()
    assert "/c/" in url
    return url


@pytest.fixture(scope="module")
def links(site, answered):
    """Addresses the audited pages need, made on the site: the answered chat, a
    share link of it (seen logged out), an unused invite, and a chat whose
    answer has two versions (the version arrows)."""
    conversation = int(answered.rstrip("/").rsplit("/", 1)[1])
    made = manage(
        site.env,
        "shell",
        "-c",
        "import json;from django.contrib.auth.models import User;"
        "from accounts.selfservice import make_invite;from chat.sharing import create_share;"
        "from chat.models import Conversation, Message;"
        "carol = User.objects.get(username='carol');"
        f"share = create_share(carol, {conversation})['url'];"
        "c = Conversation.objects.create(owner=carol, title='Two versions');"
        "q = Message.objects.create(conversation=c, role='user', content='Say hello.');"
        "Message.objects.create(conversation=c, role='assistant', content='Hello.');"
        "Message.objects.create(conversation=c, role='assistant', content='Hi!', parent=q);"
        "print(json.dumps({'share': share, 'invite': f'/invite/{make_invite(carol)[1]}/',"
        " 'branched': f'/c/{c.pk}/'}))",
    )
    paths = json.loads(made.strip().splitlines()[-1])
    return {"chat": answered, **{key: f"{site.url}{path}" for key, path in paths.items()}}


def _open_test_prompt(page, site, links):
    page.goto(f"{site.url}/admin/runners/runnerconfig/")
    page.locator("input.action-select").first.check()
    page.select_option("select[name=action]", "send_test_prompt")
    page.click("button[name=index]")
    page.wait_for_selector("textarea[name=prompt]")


def _open_runner_change_form(page, site, links):
    page.goto(f"{site.url}/admin/runners/runnerconfig/")
    page.locator("th.field-name a").first.click()


def _chat_with(opener: str):
    """The answered chat with `opener` clicked (a dialog or panel open)."""

    def open_(page, site, links):
        page.goto(links["chat"])
        page.wait_for_selector(".msg-assistant .msg-actions button")
        page.click(opener)

    return open_


# (name, path or callable, selector that shows the page is ready). A path is
# a site path or a key of `links`; names in LOGGED_OUT are seen signed out.
PAGES = [
    ("login", "/login/", "#id_username"),
    ("chat", "chat", ".msg-assistant .msg-actions button"),
    ("chat-share-dialog", _chat_with("#share-open"), "#share-dialog[open]"),
    ("chat-project-dialog", _chat_with("#new-project"), "#project-dialog[open]"),
    ("chat-shortcuts-dialog", _chat_with("#show-shortcuts"), "#shortcuts[open]"),
    ("chat-documents-panel", _chat_with("#toggle-docs"), "#documents:not([hidden])"),
    ("new-chat", "/", "#conn-status[data-state=open]"),
    ("shared", "share", "#shared-title"),
    ("invite", "invite", "form input[type=password]"),
    ("api-keys", "/settings/api-keys/", "#create-title"),
    ("usage", "/settings/usage/", "#usage-periods"),
    ("password", "/settings/password/", "form input[type=password]"),
    ("sessions", "/settings/sessions/", "#session-list"),
    ("api-docs", "/api/docs", "#endpoints"),
    ("admin-index", "/admin/", "#runner-dashboard-link"),
    ("admin-runners-app", "/admin/runners/", "#runner-dashboard-link"),
    ("admin-runner-list", "/admin/runners/runnerconfig/", ".runner-health"),
    ("admin-runner-change", _open_runner_change_form, "#runnerconfig_form"),
    ("admin-runner-dashboard", "/admin/runners/dashboard/", "#runner-stats-1"),
    ("admin-test-prompt", _open_test_prompt, "textarea[name=prompt]"),
    ("admin-usage", "/admin/usage/", "#usage-totals"),
]
LOGGED_OUT = {"login", "shared", "invite"}


@pytest.mark.parametrize(("name", "target", "ready"), PAGES, ids=[p[0] for p in PAGES])
def test_every_page_passes_axe_and_logs_no_error(site, browser, request, name, target, ready):
    """Each page audited in the light scheme, then switched to dark in place
    (the themes are CSS `prefers-color-scheme` only) and audited again."""
    links = {} if name == "login" else request.getfixturevalue("links")
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light")
    page = watched_page(context)
    if name not in LOGGED_OUT:
        _login(page, site)
    if callable(target):
        target(page, site, links)
    else:
        page.goto(links.get(target) or f"{site.url}{target}")
    page.wait_for_selector(ready, timeout=30_000)
    if name == "admin-runner-list":  # health cells filled in by health.js
        page.wait_for_function(
            "() => [...document.querySelectorAll('.runner-health')]"
            ".every(c => c.className.includes('runner-health-'))",
            timeout=30_000,
        )
    page.wait_for_load_state("networkidle")
    found = {}
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert page.evaluate(f"matchMedia('(prefers-color-scheme: {scheme})').matches")
        found[scheme] = _axe(page)
    assert found == {"light": [], "dark": []}
    assert page.problems == []
    context.close()


def test_the_first_run_page_passes_axe(browser, tmp_path):
    """/setup/, shown only while no account exists: a site of its own."""
    with live_site(tmp_path / "first-run") as empty:
        for scheme in ("light", "dark"):
            context = browser.new_context(
                viewport={"width": 1280, "height": 820}, color_scheme=scheme
            )
            page = watched_page(context)
            page.goto(f"{empty.url}/setup/")
            page.wait_for_selector("#id_password2")
            assert _axe(page) == [], scheme
            assert page.problems == []
            context.close()


def test_the_chinese_chat_passes_axe(site, browser, answered):
    context = browser.new_context(viewport={"width": 1280, "height": 820}, locale="zh-TW")
    page = watched_page(context)
    _login(page, site)
    page.goto(answered)
    page.wait_for_selector(".msg-assistant .msg-actions button")
    assert page.locator("html").get_attribute("lang") == "zh-hant"
    assert _axe(page) == []
    assert page.problems == []
    context.close()


# ---- keyboard ------------------------------------------------------------------------------

FOCUS_PROBE = """() => {
  const el = document.activeElement;
  const style = getComputedStyle(el);
  const ring = style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0;
  const text = (el.getAttribute('aria-label') || el.textContent || '').trim().slice(0, 40);
  return {id: el.id, cls: el.className, text, tag: el.tagName.toLowerCase(), ring,
          visible: !!(el.offsetWidth || el.offsetHeight)};
}"""


def test_tab_reaches_every_chat_action_with_a_visible_focus_ring(site, browser, links):
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = watched_page(context)
    _login(page, site)
    page.goto(links["branched"])  # an answer with two versions: the arrows too
    page.wait_for_selector(".msg-assistant .msg-actions .branch-prev")
    # Send is disabled (and so not a Tab stop) until the reloaded page's socket is open.
    page.wait_for_selector("#conn-status[data-state=open]")
    seen = []  # from the message box (focused on load) round to it again
    for _ in range(150):
        page.keyboard.press("Tab")
        probe = page.evaluate(FOCUS_PROBE)
        if probe["tag"] == "body":
            continue  # past the last stop: the browser's own controls
        if seen and probe == seen[0]:
            break  # came round
        seen.append(probe)
    by_id = {p["id"] for p in seen if p["id"]}
    texts = {p["text"] for p in seen}
    expected_ids = {
        "new-chat", "search", "show-shortcuts", "runner-select", "rag-toggle",
        "toggle-docs", "prompt", "send", "language-select-chat", "new-project",
        "share-open", "agent-toggle", "export-all", "import-open",
    }  # fmt: skip
    assert expected_ids <= by_id, expected_ids - by_id
    assert {"Copy", "Regenerate", "Edit", "Fork", "Pin"} <= texts
    assert {"API keys", "Admin", "Sign out", "Switch"} <= texts
    assert any(p["cls"] == "conversation-link" for p in seen)
    for action in ("Move ", "Rename ", "Delete "):
        assert any(p["text"].startswith(action) for p in seen), action
    # The version arrows: the earlier version's (the later one is disabled).
    assert "Previous version" in texts
    assert any(p["cls"] == "skip-link" for p in seen)
    # Every stop shows where the focus is.
    assert [p for p in seen if not (p["ring"] and p["visible"])] == []

    # The skip link jumps to the message box.
    page.focus(".skip-link")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "prompt"
    # The documents panel opens from the keyboard, the focus on its file picker.
    page.focus("#toggle-docs")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "pick-docs"
    assert page.problems == []
    context.close()


def test_the_shortcuts_and_their_dialog(site, browser, answered):
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = watched_page(context)
    _login(page, site)
    page.goto(answered)
    page.wait_for_selector(".msg-assistant .msg-actions button")
    # What Copy copies: the answer's Markdown source.
    answer = page.evaluate(
        "[...document.querySelectorAll('.msg-assistant')].pop()._message.content"
    )
    focused = "document.activeElement.id"

    # ? opens the help dialog with the focus inside; Escape closes it and the
    # focus goes back where it was.
    page.focus("#search")
    page.keyboard.press("Escape")
    page.locator("#chat-title").focus()
    page.keyboard.press("Shift+Slash")
    page.wait_for_selector("#shortcuts[open]")
    assert page.evaluate(focused) == "shortcuts-close"
    assert "Alt + Shift + N" in page.locator("#shortcuts").inner_text()
    page.keyboard.press("Escape")
    page.wait_for_selector("#shortcuts:not([open])", state="attached")
    assert page.evaluate(focused) == "chat-title"
    # Ctrl+/ too, even while typing.
    page.focus("#prompt")
    page.keyboard.press("Control+Slash")
    page.wait_for_selector("#shortcuts[open]")
    page.keyboard.press("Enter")  # the Close button
    page.wait_for_selector("#shortcuts:not([open])", state="attached")
    assert page.evaluate(focused) == "prompt"
    # "?" typed in the message box is just a question mark.
    page.keyboard.type("why?")
    assert page.locator("#shortcuts[open]").count() == 0
    assert page.input_value("#prompt") == "why?"
    page.fill("#prompt", "")

    page.keyboard.press("Alt+Shift+KeyF")
    assert page.evaluate(focused) == "search"
    page.keyboard.press("Alt+Shift+KeyM")
    assert page.evaluate(focused) == "prompt"
    page.keyboard.press("Alt+Shift+KeyC")
    page.wait_for_function(
        "() => document.getElementById('announcer').textContent.includes('Copied')"
    )
    assert page.evaluate("navigator.clipboard.readText()") == answer

    # Stop: a long answer, stopped from the keyboard while it streams.
    page.fill("#prompt", "Write a long story about a lighthouse keeper and the sea.")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg-assistant[data-status=streaming]", timeout=60_000)
    assert page.evaluate(focused) == "prompt"  # focus stays in the message box after send
    page.keyboard.press("Alt+Shift+KeyS")
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg-assistant')].pop();"
        " return m && m.dataset.status === 'stopped'; }",
        timeout=60_000,
    )
    assert page.evaluate(focused) == "prompt"
    # The finished (here: stopped) answer is announced once, politely.
    page.wait_for_function(
        "() => document.getElementById('announcer').textContent.startsWith('Answer stopped')"
    )
    live = page.evaluate(
        "() => [...document.querySelectorAll('[aria-live]')]"
        ".map(e => e.id + ':' + e.getAttribute('aria-live'))"
    )
    assert "messages:polite" not in live  # tokens are not read out one by one
    assert page.get_attribute("#banner", "role") == "alert"  # errors: assertive

    # New chat: empty conversation, focus in the message box.
    page.keyboard.press("Alt+Shift+KeyN")
    page.wait_for_function("() => location.pathname === '/'")
    assert page.evaluate(focused) == "prompt"
    assert page.locator(".msg").count() == 0
    assert page.problems == []
    context.close()


def test_reduced_motion_is_respected(site, browser):
    context = browser.new_context(viewport={"width": 400, "height": 800}, reduced_motion="reduce")
    page = watched_page(context)
    _login(page, site)
    durations = page.evaluate(
        "() => [getComputedStyle(document.getElementById('sidebar')).transitionDuration]"
    )
    assert durations == ["0s"]
    context.close()


# ---- Traditional Chinese -------------------------------------------------------------------


def test_the_chat_in_traditional_chinese_with_a_real_answer(site, browser):
    context = browser.new_context(
        viewport={"width": 1280, "height": 820}, locale="zh-TW", color_scheme="light"
    )
    page = watched_page(context)
    page.goto(f"{site.url}/login/")
    assert page.locator("label[for=id_username]").inner_text() == "使用者名稱"
    _login(page, site)
    assert page.locator("#empty-chat h2").inner_text() == "有什麼可以幫你的\uff1f"
    assert page.get_attribute("#prompt", "placeholder") == "傳訊息給 BreezeWeb"
    assert page.locator("#conn-status").inner_text() == "已連線"
    _ask(page, "What is the capital of Taiwan?")
    last = page.locator(".msg-assistant").last
    assert last.locator(".msg-actions button").first.inner_text() == "複製"
    assert "重新產生" in last.locator(".msg-actions").inner_text()
    meta = last.locator(".msg-meta").inner_text()
    assert "每秒" in meta and "首個 token" in meta and "tok/s" not in meta
    assert len(last.locator(".msg-body").inner_text().strip()) > 0
    page.wait_for_function(
        "() => document.getElementById('announcer').textContent.startsWith('回答\uff1a')"
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "chat-zh-hant.png"))

    # The switcher takes the page back to English, whatever the browser says.
    page.select_option("#language-select-chat", "en")
    page.click(".sidebar-settings .language-form button")
    page.wait_for_selector("#conn-status[data-state=open]")
    assert page.locator("#new-chat").inner_text() == "+ New chat"
    assert page.locator(".msg-assistant .msg-actions button").first.inner_text() == "Copy"
    assert page.problems == []
    context.close()


# ---- installable ---------------------------------------------------------------------------


def test_the_app_is_installable_and_caches_only_its_shell(site, browser, answered):
    context = browser.new_context(viewport={"width": 412, "height": 860}, is_mobile=True)
    page = watched_page(context)
    _login(page, site)
    manifest_url = page.get_attribute("link[rel=manifest]", "href")
    with urllib.request.urlopen(f"{site.url}{manifest_url}") as response:
        assert response.headers["Content-Type"].startswith("application/manifest+json")
        manifest = json.load(response)
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/"
    assert {"192x192", "512x512"} <= {i["sizes"] for i in manifest["icons"]}
    assert any(i.get("purpose") == "maskable" for i in manifest["icons"])
    for icon in manifest["icons"]:
        with urllib.request.urlopen(f"{site.url}{icon['src']}") as response:
            assert response.status == 200 and response.headers["Content-Type"] == icon["type"]

    # The worker takes control of the root scope and fills its cache.
    page.wait_for_function(
        "async () => { const r = await navigator.serviceWorker.getRegistration('/');"
        " return !!(r && r.active && r.active.state === 'activated'); }",
        timeout=30_000,
    )
    page.goto(answered)
    page.wait_for_selector(".msg-assistant .msg-actions button")
    assert page.evaluate("!!navigator.serviceWorker.controller")
    cached = page.evaluate(
        "async () => { const out = {}; for (const k of await caches.keys()) {"
        " out[k] = (await (await caches.open(k)).keys()).map(r => new URL(r.url).pathname); }"
        " return out; }"
    )
    (name,) = cached
    assert name.startswith("breezeweb-shell-")
    paths = cached[name]
    assert "/static/js/chat.js" in paths and "/static/css/app.css" in paths
    # The shell only: no page, answer, document, API response or test-only file.
    assert all(p.startswith("/static/") for p in paths), paths
    assert not any("axe-core" in p for p in paths)
    # The shell answers from the cache; pages still come from the network.
    served = page.evaluate(
        "async () => { const r = await fetch('/static/css/app.css'); return r.ok; }"
    )
    assert served
    # As the installed app opens: its start URL, shell from the worker's cache.
    page.goto(f"{site.url}{manifest['start_url']}")
    page.wait_for_selector("#conn-status[data-state=open]")
    assert page.evaluate("!!navigator.serviceWorker.controller")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "installed-app.png"))
    assert page.problems == []
    context.close()
