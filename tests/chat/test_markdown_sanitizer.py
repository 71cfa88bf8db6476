"""The chat's Markdown sanitizer (static/js/markdown.js) in a real Chromium:
answers keep the markup the chat renders and nothing else (no forms, inputs,
buttons, frames, styles, images, event handlers, javascript: links).

The page and the modules are served to the browser by Playwright from
static/ itself, under a strict CSP like the site's, so this tests exactly the
files the site ships."""

from __future__ import annotations

import mimetypes
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.processes import ROOT

pytestmark = pytest.mark.browser

STATIC = ROOT / "static"
ORIGIN = "http://breezeweb.test"
PAGE = """<!doctype html><html><head>
<meta http-equiv="Content-Security-Policy" content="default-src 'self'; script-src 'self'">
</head><body><div id="out"></div></body></html>"""


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()

        def serve(route):
            path = route.request.url.removeprefix(ORIGIN)
            if path == "/":
                route.fulfill(status=200, body=PAGE, content_type="text/html")
                return
            file = (STATIC / path.removeprefix("/static/")).resolve()
            if STATIC not in file.parents or not file.is_file():
                route.fulfill(status=404, body="")
                return
            kind = "text/javascript" if file.suffix in (".js", ".mjs") else None
            kind = kind or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            route.fulfill(status=200, body=file.read_bytes(), content_type=kind)

        page.route(f"{ORIGIN}/**", serve)
        page.goto(f"{ORIGIN}/")
        yield page
        browser.close()


def render(page, text: str) -> dict:
    return page.evaluate(
        """async (text) => {
            const m = await import("/static/js/markdown.js");
            const out = document.getElementById("out");
            out.innerHTML = m.markdownToSafeHtml(text);
            const tags = [...new Set([...out.querySelectorAll("*")].map((n) => n.localName))];
            const attrs = [...new Set([...out.querySelectorAll("*")]
                .flatMap((n) => [...n.attributes].map((a) => a.name)))];
            return {html: out.innerHTML, tags, attrs, allowed: [...m.ALLOWED_TAGS]};
        }""",
        text,
    )


MARKDOWN = """# Title

Some **bold**, *em*, ~~gone~~ and `code`, a [link](https://example.com "t").

> quoted

1. one
2. two

- [ ] task
- item

| a | b |
|:--|--:|
| 1 | 2 |

```python
print("hi")
```
"""


def test_the_markup_answers_use_survives(page):
    result = render(page, MARKDOWN)
    expected = {"h1", "p", "strong", "em", "del", "code", "a", "blockquote", "ol", "ul", "li"}
    assert expected | {"table", "thead", "tbody", "tr", "th", "td", "pre"} <= set(result["tags"])
    assert set(result["tags"]) <= set(result["allowed"])
    assert 'class="language-python"' in result["html"]
    assert 'href="https://example.com"' in result["html"]
    assert "input" not in result["tags"]  # GFM task boxes are dropped, their text kept
    assert "task" in result["html"]


@pytest.mark.parametrize(
    ("hostile", "forbidden"),
    [
        ('<form action="https://evil.example"><input name="p"><button>Go</button></form>', None),
        ('<iframe src="https://evil.example"></iframe>', None),
        ("<style>body{display:none}</style>", None),
        ('<img src="x" onerror="alert(1)">', None),
        ('<a href="javascript:alert(1)">x</a>', "javascript:"),
        ("[x](javascript:alert(1))", "javascript:"),
        ("<svg><script>alert(1)</script></svg>", None),
        ('<object data="x"></object><embed src="x"><video src="x"></video>', None),
        ("<textarea>x</textarea><select><option>x</option></select>", None),
        ('<p style="position:fixed" onclick="alert(1)" data-x="1" id="boot">x</p>', None),
        ('<span class="msg error">x</span><code class="hljs evil">y</code>', "class="),
        ('<meta http-equiv="refresh" content="0;url=https://evil.example"><base href="//e">', None),
        ("<details open><summary>x</summary>y</details>", None),
    ],
)
def test_anything_else_is_removed(page, hostile, forbidden):
    result = render(page, hostile)
    assert set(result["tags"]) <= set(result["allowed"]), result
    assert set(result["attrs"]) <= {"href", "title", "class", "align", "start"}, result
    for word in ("<form", "<input", "<button", "<iframe", "<style", "<img", "<script", "<svg"):
        assert word not in result["html"], result
    for attr in ("onerror", "onclick", "style=", "data-x", 'id="boot"'):
        assert attr not in result["html"], result
    if forbidden:
        assert forbidden not in result["html"], result
