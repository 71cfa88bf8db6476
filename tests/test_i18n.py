"""Two languages (docs/i18n.md): every user-facing string in the templates and
the scripts goes through Django's translation machinery, the English and
Traditional Chinese catalogs hold the same messages, all translated, and the
pages speak the language the browser (or the switcher) asks for."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

from django.utils import translation

import polib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.processes import ROOT

TEMPLATES = ROOT / "templates"
SCRIPTS = [ROOT / "static" / "js", ROOT / "static" / "admin"]
LOCALES = ("en", "zh_Hant")
DOMAINS = ("django", "djangojs")

# Words that are the same in every language: the product's name, a unit, the
# names of file formats.
SAME_IN_EVERY_LANGUAGE = {"BreezeWeb", "ms", "Markdown", "JSON"}
# Attributes people read or hear.
READ_ATTRIBUTES = {"title", "placeholder", "aria-label", "aria-description", "alt"}
# Elements whose text is code or key names, not prose.
VERBATIM_ELEMENTS = {"script", "style", "code", "pre", "kbd"}
WORD = re.compile(r"[A-Za-z]{2,}")
# A Python string marked for translation, as its one literal argument.
PYTHON_MARKED = re.compile(r"""\b(?:_|gettext|gettext_lazy)\(\s*"((?:[^"\\]|\\.)*)"\s*[,)]""")


# ---- the template scanner ----------------------------------------------------------------


def _without_template_markup(source: str) -> str:
    """The HTML a template writes, minus what Django translates or fills in:
    comments, {% blocktranslate %} blocks, {% translate %} and other tags, and
    {{ variables }} (their text comes from data or from marked Python)."""
    source = re.sub(r"\{#.*?#\}", " ", source)  # one line only, as in Django
    source = re.sub(r"\{%\s*comment\s*%\}.*?\{%\s*endcomment\s*%\}", " ", source, flags=re.S)
    # A page's body classes are class names, not text.
    source = re.sub(
        r"\{%\s*block\s+body_?class\s*%\}.*?\{%\s*endblock\s*%\}", " ", source, flags=re.S
    )
    source = re.sub(
        r"\{%\s*blocktrans(?:late)?\b.*?\{%\s*endblocktrans(?:late)?\s*%\}", " ", source, flags=re.S
    )
    source = re.sub(r"\{%.*?%\}", " ", source, flags=re.S)
    return re.sub(r"\{\{.*?\}\}", " ", source, flags=re.S)


def _has_words(text: str) -> bool:
    return bool(set(WORD.findall(text)) - SAME_IN_EVERY_LANGUAGE)


class _TextFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self.verbatim = 0

    def handle_starttag(self, tag, attrs):
        if tag in VERBATIM_ELEMENTS:
            self.verbatim += 1
        attributes = dict(attrs)
        for name, value in attrs:
            readable = name in READ_ATTRIBUTES or (
                name == "value" and attributes.get("type") in {"submit", "button", "reset"}
            )
            if readable and value and _has_words(value):
                self.found.append(f'<{tag} {name}="{value.strip()}">')

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag in VERBATIM_ELEMENTS:
            self.verbatim -= 1

    def handle_endtag(self, tag):
        if tag in VERBATIM_ELEMENTS and self.verbatim:
            self.verbatim -= 1

    def handle_data(self, data):
        text = " ".join(data.split())
        if not self.verbatim and _has_words(text):
            self.found.append(text)


def unmarked_template_text(source: str) -> list[str]:
    """Text nodes and read attributes of a template that no translation tag covers."""
    finder = _TextFinder()
    finder.feed(_without_template_markup(source))
    finder.close()
    return finder.found


# ---- the script scanner ------------------------------------------------------------------

TRANSLATING_CALLS = {"gettext", "ngettext", "pgettext", "npgettext", "gettext_noop"}
# (call, argument index) whose string arguments are code: selectors, class names, events.
CODE_ARGUMENTS = {
    ("querySelector", 0),
    ("querySelectorAll", 0),
    ("closest", 0),
    ("matches", 0),
    ("el", 1),  # chat.js's el(tag, class, text)
}
# A capitalised word ("Copy", "Connected") or words with a space: read by people,
# unless an i18n-ignore comment on the line says otherwise.
PROSE = re.compile(r"[A-Z][a-z]+(?:[ -][a-z]+)*[.…!?:]?|.*[A-Za-z]{2,}.* .*|.* .*[A-Za-z]{2,}.*")
COMPARISON = re.compile(r"(===|!==|==|!=)\s*$")


def _js_literals(source: str):
    """(line, text, enclosing call, argument index, preceding code) for each string
    and template literal of a script; ${...} parts of templates are dropped (their
    own literals are reported on their own)."""
    found = []
    stack: list[list] = []  # [bracket, call name, argument index]
    n = len(source)
    last_significant = ""

    def line_of(pos):
        return source.count("\n", 0, pos) + 1

    def read_template(pos):
        """From after the opening backtick: (text without ${...}, index after)."""
        text = []
        while pos < n and source[pos] != "`":
            if source[pos] == "\\":
                text.append(source[pos : pos + 2])
                pos += 2
            elif source.startswith("${", pos):
                depth, pos = 1, pos + 2
                start = pos
                while pos < n and depth:
                    if source[pos] in "'\"`":
                        pos = skip_literal(pos)
                        continue
                    depth += {"{": 1, "}": -1}.get(source[pos], 0)
                    pos += 1
                scan(start, pos - 1)
            else:
                text.append(source[pos])
                pos += 1
        return "".join(text), pos + 1

    def skip_literal(pos):
        quote = source[pos]
        if quote == "`":
            return read_template(pos + 1)[1]
        pos += 1
        while pos < n and source[pos] != quote:
            pos += 2 if source[pos] == "\\" else 1
        return pos + 1

    def record(start, text):
        frame = stack[-1] if stack else None
        call, index = (frame[1], frame[2]) if frame and frame[0] == "(" else (None, None)
        found.append((line_of(start), text, call, index, source[max(0, start - 8) : start]))

    def scan(pos, end):
        nonlocal last_significant
        while pos < end:
            ch = source[pos]
            if source.startswith("//", pos):
                pos = source.find("\n", pos)
                pos = end if pos < 0 else pos
            elif source.startswith("/*", pos):
                pos = source.find("*/", pos) + 2
            elif ch == "/" and (last_significant in "(,=:[!&|?{};+" or last_significant == ""):
                pos += 1  # a regular expression literal
                in_class = False
                while pos < end and (source[pos] != "/" or in_class):
                    if source[pos] == "\\":
                        pos += 1
                    elif source[pos] == "[":
                        in_class = True
                    elif source[pos] == "]":
                        in_class = False
                    pos += 1
                pos += 1
                last_significant = "/"
            elif ch in "'\"":
                start, pos = pos, skip_literal(pos)
                record(start, source[start + 1 : pos - 1])
                last_significant = ch
            elif ch == "`":
                text, after = read_template(pos + 1)
                record(pos, text)
                pos, last_significant = after, "`"
            else:
                if ch in "([{":
                    name = re.search(r"([\w$]+)\s*(?:\?\.)?$", source[max(0, pos - 40) : pos])
                    stack.append([ch, name.group(1) if name and ch == "(" else None, 0])
                elif ch in ")]}" and stack:
                    stack.pop()
                elif ch == "," and stack:
                    stack[-1][2] += 1
                if not ch.isspace():
                    last_significant = ch
                pos += 1

    scan(0, n)
    return found


def unmarked_script_text(source: str) -> list[str]:
    lines = source.splitlines()
    unmarked = []
    for line, text, call, index, before in _js_literals(source):
        if call in TRANSLATING_CALLS or (call, index) in CODE_ARGUMENTS:
            continue
        if "i18n-ignore" in lines[line - 1] or COMPARISON.search(before) or text == "use strict":
            continue
        if _has_words(text) and PROSE.fullmatch(text.strip()):
            unmarked.append(f"line {line}: {text!r}")
    return unmarked


def _scripts() -> list[Path]:
    return sorted(p for folder in SCRIPTS for p in folder.rglob("*.js"))


@pytest.mark.parametrize(
    "template", sorted(TEMPLATES.rglob("*.html")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_template_string_is_marked_for_translation(template):
    assert unmarked_template_text(template.read_text()) == []


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_string_is_marked_for_translation(script):
    assert unmarked_script_text(script.read_text()) == []


def test_the_scanners_find_unmarked_text():
    template = """{% load i18n %}<p>{% translate "Fine" %}</p><h2>Forgotten heading</h2>
    <button title="Left out" aria-label="{% translate 'ok' %}">{{ name }}</button>
    {% blocktranslate %}Also <b>fine</b> {{ x }}{% endblocktranslate %}<code>print()</code>
    <input type="submit" value="Go on">{# a one-line comment #}
    {# Django's comments end at the line's end,
    so this one shows #}"""
    assert unmarked_template_text(template) == [
        "Forgotten heading",
        '<button title="Left out">',
        '<input value="Go on">',
        "{# Django's comments end at the line's end, so this one shows #}",
    ]
    script = """const a = gettext("Fine"); el("span", "some class", "Forgotten");
    node.title = `Left out ${count} times`; if (e.key === "Enter") x(/"re/g, "Copy");
    tr(ngettext("%(n)s one", "%(n)s many", n), { n }); q.querySelector(".msg .body");
    label = "Not this"; // i18n-ignore: a test"""
    assert unmarked_script_text(script) == [
        "line 1: 'Forgotten'",
        "line 2: 'Left out  times'",
        "line 2: 'Copy'",
    ]


# ---- the catalogs ------------------------------------------------------------------------


def _catalog(locale: str, domain: str) -> polib.POFile:
    return polib.pofile(str(ROOT / "locale" / locale / "LC_MESSAGES" / f"{domain}.po"))


def _key(entry: polib.POEntry) -> tuple:
    return (entry.msgctxt, entry.msgid, entry.msgid_plural)


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_catalogs_hold_the_same_messages_all_translated(domain):
    catalogs = {locale: _catalog(locale, domain) for locale in LOCALES}
    keys = {locale: {_key(e) for e in po if not e.obsolete} for locale, po in catalogs.items()}
    assert len(keys["en"]) == len(keys["zh_Hant"]) > 0
    assert keys["en"] == keys["zh_Hant"]
    for locale, po in catalogs.items():
        assert po.untranslated_entries() == [], f"{locale}/{domain}: untranslated"
        assert po.fuzzy_entries() == [], f"{locale}/{domain}: fuzzy"
        assert po.percent_translated() == 100


@pytest.mark.parametrize("domain", DOMAINS)
def test_translations_keep_their_placeholders(domain):
    placeholder = re.compile(r"%\(\w+\)[sd]|<[^>]+>")
    for entry in _catalog("zh_Hant", domain):
        source = entry.msgid_plural or entry.msgid
        target = entry.msgstr_plural[0] if entry.msgid_plural else entry.msgstr
        same = sorted(placeholder.findall(source)) == sorted(placeholder.findall(target))
        assert same, entry.msgid


def test_every_marked_string_is_in_the_catalogs():
    """The catalogs are up to date with the code: each string the templates and
    scripts mark (as xgettext extracts them) has an entry."""
    marked_js = set()
    for script in _scripts():
        for _, text, call, index, _ in _js_literals(script.read_text()):
            first_arg = index == 0 or (call == "ngettext" and index == 1)
            if call in {"gettext", "ngettext"} and first_arg:
                marked_js.add(text.replace("\\'", "'").replace('\\"', '"'))
    catalog = {e.msgid for e in _catalog("zh_Hant", "djangojs")} | {
        e.msgid_plural for e in _catalog("zh_Hant", "djangojs") if e.msgid_plural
    }
    assert marked_js - catalog == set(), "run makemessages -d djangojs (docs/i18n.md)"
    marked_templates = set()
    for template in TEMPLATES.rglob("*.html"):
        for match in re.finditer(r"""\{%\s*translate\s+(["'])(.*?)\1""", template.read_text()):
            marked_templates.add(match.group(2))
    assert marked_templates - {e.msgid for e in _catalog("zh_Hant", "django")} == set()
    # Python: gettext("…") / gettext_lazy("…") / _("…") with one literal (the admin's
    # column and action names, the default chat titles, error messages).
    marked_python = set()
    skipped = {".venv", "tests", "bench", "staticfiles", "data", "migrations"}
    for module in ROOT.rglob("*.py"):
        if skipped & set(module.relative_to(ROOT).parts):
            continue
        for match in PYTHON_MARKED.finditer(module.read_text()):
            marked_python.add(match.group(1))
    assert marked_python, "the Python scan found nothing"
    assert marked_python - {e.msgid for e in _catalog("zh_Hant", "django")} == set()


def test_every_websocket_error_code_has_a_translated_message():
    """The chat shows an error in the page's language by its code
    (static/js/errors.js); the codes are the websocket's one table."""
    from chat.errors import WEBSOCKET_CODES

    source = (ROOT / "static" / "js" / "errors.js").read_text()
    table = source.split("export const ERROR_TEXT = {", 1)[1].split("\n};", 1)[0]
    messages = dict(re.findall(r"""^\s+(\w+): gettext\("((?:[^"\\]|\\.)*)"\)""", table, re.M))
    assert WEBSOCKET_CODES - set(messages) == set(), "add them to static/js/errors.js"
    # Other keys are codes saved on an answer by the chat service, not typos.
    services = (ROOT / "chat" / "services.py").read_text()
    extra = set(messages) - WEBSOCKET_CODES
    assert {code for code in extra if f'error_code="{code}"' not in services} == set()
    chinese = {e.msgid: e.msgstr for e in _catalog("zh_Hant", "djangojs")}
    assert [code for code, msgid in messages.items() if not chinese.get(msgid)] == []


def test_every_notice_code_has_a_translated_message():
    """The chat shows a notice in the page's language by its code
    (static/js/notices.js): one entry per code of runners.base.NoticeCode,
    each message translated, and every notice the server makes takes its
    code from there."""
    from runners.base import NoticeCode

    codes = {code.value for code in NoticeCode}
    source = (ROOT / "static" / "js" / "notices.js").read_text()
    table = source.split("export const NOTICE_TEXT = {", 1)[1].split("\n};", 1)[0]
    entries = re.split(r"^  (\w+): ", table, flags=re.M)[1:]
    messages = dict(zip(entries[::2], entries[1::2], strict=True))
    assert set(messages) == codes, "static/js/notices.js: one entry per NoticeCode"
    chinese = {e.msgid: e.msgstr or e.msgstr_plural.get(0) for e in _catalog("zh_Hant", "djangojs")}
    for code, body in messages.items():
        msgids = re.findall(r'(?:gettext|ngettext)\(\s*"((?:[^"\\]|\\.)*)"', body)
        assert msgids, f"{code}: no gettext/ngettext message"
        assert all(chinese.get(m) for m in msgids), f"{code}: not translated"
    # The emitters: every Notice(...) outside the tests names a NoticeCode.
    made = []
    for module in ROOT.rglob("*.py"):
        parts = set(module.relative_to(ROOT).parts)
        if parts & {".venv", "tests", "bench", "staticfiles", "data"}:
            continue
        made += re.findall(r"\bNotice\(\s*(?:code=)?([^,)\s]+)", module.read_text())
    assert made and [m for m in made if not m.startswith("NoticeCode.")] == []


def test_every_import_error_code_has_a_translated_message():
    """The page shows why an import failed by the job's `error_code`
    (static/js/conversations.js); the codes are chat.transfer.IMPORT_ERRORS."""
    from chat.transfer import IMPORT_ERRORS

    source = (ROOT / "static" / "js" / "conversations.js").read_text()
    table = source.split("export const IMPORT_ERROR_TEXT = {", 1)[1].split("\n};", 1)[0]
    messages = dict(re.findall(r"""^\s+(\w+): gettext\("((?:[^"\\]|\\.)*)"\)""", table, re.M))
    assert set(messages) == set(IMPORT_ERRORS), "static/js/conversations.js: IMPORT_ERROR_TEXT"
    chinese = {e.msgid: e.msgstr for e in _catalog("zh_Hant", "djangojs")}
    assert [code for code, msgid in messages.items() if not chinese.get(msgid)] == []


def test_templates_show_dates_in_the_languages_formats():
    """What people read is formatted with the language's formats (`*_FORMAT`);
    a fixed format (`Y-m-d`) only in a `<time datetime>`, for machines."""
    fixed = []
    for template in TEMPLATES.rglob("*.html"):
        source = re.sub(r"""datetime=(["'])\{\{.*?\}\}\1""", " ", template.read_text())
        for match in re.finditer(r"""\|date:(["'])(.*?)\1""", source):
            if not match.group(2).endswith("_FORMAT"):
                fixed.append(f"{template.relative_to(TEMPLATES)}: {match.group(0)}")
    assert fixed == []


# ---- the pages ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_login_page_follows_accept_language(client, user, compiled_translations):
    # (`user`: with no account at all, /login/ leads to the first-run page.)
    zh = client.get("/login/", HTTP_ACCEPT_LANGUAGE="zh-TW,zh;q=0.9,en;q=0.5").content.decode()
    assert '<html lang="zh-hant"' in zh and "使用者名稱" in zh and "Username" not in zh
    en = client.get("/login/", HTTP_ACCEPT_LANGUAGE="en-US,en;q=0.9").content.decode()
    assert '<html lang="en"' in en and "Username" in en


@pytest.mark.django_db
def test_the_switcher_overrides_the_browser(client, user, compiled_translations):
    response = client.post("/i18n/setlang/", {"language": "zh-hant", "next": "/login/"})
    assert response.status_code == 302 and response["Location"] == "/login/"
    page = client.get("/login/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "登入" in page and '<option value="zh-hant" lang="zh-hant" selected>' in page


@pytest.mark.django_db
def test_the_settings_pages_have_the_switcher_and_local_dates(client, user, compiled_translations):
    client.force_login(user)  # (records the session, as a sign-in does)
    client.post("/i18n/setlang/", {"language": "zh-hant", "next": "/settings/sessions/"})
    for path in ("/settings/sessions/", "/settings/usage/", "/settings/password/"):
        page = client.get(path).content.decode()
        assert 'id="language-select-settings"' in page, path
        assert '<option value="zh-hant" lang="zh-hant" selected>' in page, path
    # The session's start, in the Chinese date format.
    sessions = client.get("/settings/sessions/").content.decode()
    assert re.search(r"<time datetime=\"[^\"]+\">\d{4}年\d{1,2}月\d{1,2}日", sessions), sessions


@pytest.mark.django_db
def test_the_admin_and_new_chats_in_chinese(client, admin_user, compiled_translations):
    from chat import services
    from runners.models import RunnerConfig

    RunnerConfig.objects.create(name="idle", kind="llamastack", enabled=False)
    client.force_login(admin_user)
    page = client.get("/admin/runners/runnerconfig/", HTTP_ACCEPT_LANGUAGE="zh-Hant")
    text = page.content.decode()
    assert "BreezeWeb 管理" in text and "健康狀態" in text and "斷路器" in text
    assert "檢查所選執行器的健康狀態" in text  # an action's name
    with translation.override("zh-hant"):
        assert services.create_conversation(admin_user)["title"] == "新對話"
    with translation.override("en"):
        assert services.create_conversation(admin_user)["title"] == "New chat"


@pytest.mark.django_db
def test_the_javascript_catalog_serves_the_scripts_strings(client, compiled_translations):
    def escaped(text):  # the catalog is JSON with ASCII escapes
        return json.dumps(text)

    body = client.get("/jsi18n/", HTTP_ACCEPT_LANGUAGE="zh-Hant").content.decode()
    assert f"{escaped('Regenerate')}: {escaped('重新產生')}" in body
    assert escaped("思考中…") in body
    english = client.get("/jsi18n/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert escaped("重新產生") not in english


@pytest.mark.django_db
def test_the_chat_page_in_chinese(client, user, compiled_translations):
    client.force_login(user)
    page = client.get("/", HTTP_ACCEPT_LANGUAGE="zh-Hant").content.decode()
    assert "有什麼可以幫你的" in page and "搜尋對話" in page and "鍵盤快速鍵" in page
    # The catalog loads before the chat module, so window.gettext exists when it runs.
    assert page.index('src="/jsi18n/"') < page.index('src="/static/js/chat.js"')


@pytest.mark.django_db
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    language=st.text(max_size=40),
    next_url=st.one_of(
        st.text(max_size=200), st.sampled_from(["//evil.example/", "https://evil.example/x"])
    ),
    method=st.sampled_from(["post", "get"]),
)
def test_the_switcher_and_the_app_files_take_any_input_without_failing(
    client, language, next_url, method
):
    """Whatever is posted to the switcher: a redirect (never off the site) or a
    refusal, never a server error; the app files answer GETs only."""
    response = getattr(client, method)("/i18n/setlang/", {"language": language, "next": next_url})
    assert response.status_code in {204, 302, 400, 403, 405}
    if response.status_code == 302:
        assert not response["Location"].startswith(("//", "http:", "https:"))
    for path in ("/sw.js", "/manifest.webmanifest", "/favicon.ico", "/jsi18n/"):
        status = client.post(path, {"language": language}).status_code
        assert status in {403, 405} if path != "/jsi18n/" else status < 500
