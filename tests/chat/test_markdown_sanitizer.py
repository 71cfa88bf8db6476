"""The chat's Markdown renderer and sanitizer (static/js/markdown.js) in a
real Chromium: answers keep the Markdown markup the chat renders; raw HTML in
an answer is shown as the characters written (never parsed, so the page logs
nothing either); and the sanitizer behind it, on HTML handed to it directly,
keeps nothing else (no forms, inputs, buttons, frames, styles, images, event
handlers, javascript: links).

The page and the modules are served to the browser by Playwright from
static/ itself, under a strict CSP like the site's, so this tests exactly the
files the site ships."""

from __future__ import annotations

import pytest

from tests.support.browser import static_page

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page():
    with static_page() as page:
        page.problems = []
        page.on("console", lambda m: page.problems.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
        page.on(
            "request",
            lambda r: page.problems.append(f"request {r.url}") if "/static/" not in r.url else None,
        )
        yield page


def render(page, text: str, function: str = "markdownToSafeHtml") -> dict:
    """`text` through markdown.js's `function`, shown in `#out`: its HTML, text,
    tags, attribute names and values, and what the page reported meanwhile."""
    page.problems.clear()
    result = page.evaluate(
        """async ([text, fn]) => {
            const m = await import("/static/js/markdown.js");
            const out = document.getElementById("out");
            out.innerHTML = m[fn](text);
            const nodes = [...out.querySelectorAll("*")];
            const tags = [...new Set(nodes.map((n) => n.localName))];
            const attrs = [...new Set(nodes.flatMap((n) => [...n.attributes].map((a) => a.name)))];
            const values = nodes.flatMap((n) => [...n.attributes].map((a) => a.value));
            return {html: out.innerHTML, text: out.textContent, tags, attrs, values,
                    allowed: [...m.ALLOWED_TAGS]};
        }""",
        [text, function],
    )
    result["problems"] = list(page.problems)
    return result


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
    assert result["problems"] == []


def test_html_in_code_keeps_rendering_as_code(page):
    result = render(page, 'Use `<img onerror="x">` or:\n\n```html\n<b onclick="y">hi</b>\n```')
    assert result["tags"] == ["p", "code", "pre"], result
    codes = page.eval_on_selector_all("#out code", "(codes) => codes.map((c) => c.textContent)")
    assert codes == ['<img onerror="x">', '<b onclick="y">hi</b>\n']
    assert result["problems"] == []


def test_a_bare_br_stays_a_line_break(page):
    # Answers break lines in table cells with <br>: marked's own <br>, not the text.
    result = render(page, "| a | b |\n|---|---|\n| 1<br>2 | 3 <br/> 4 |")
    assert page.locator("#out td br").count() == 2
    assert "<" not in result["text"] and result["problems"] == []


RAW_HTML = [
    '<form action="https://evil.example"><input name="p"><button>Go</button></form>',
    '<iframe src="https://evil.example"></iframe>',
    "<style>body{display:none}</style>",
    '<img src="x" onerror="alert(1)">',
    "<img src=x onerror=alert(1)>",
    "Nice answer. <img src=x onerror=alert(1)> Really.",
    '<a href="javascript:alert(1)">x</a>',
    "<svg><script>alert(1)</script></svg>",
    '<object data="x"></object><embed src="x"><video src="x"></video>',
    "<textarea>x</textarea><select><option>x</option></select>",
    '<p style="position:fixed" onclick="alert(1)" data-x="1" id="boot">x</p>',
    '<span class="msg error">x</span><code class="hljs evil">y</code>',
    '<meta http-equiv="refresh" content="0;url=https://evil.example"><base href="//e">',
    "<details open><summary>x</summary>y</details>",
    "<!-- a comment --> and <br data-x=1>",
    # After a real <code> tag marked would emit what follows unescaped (a
    # "raw block"); a tag here is text, so that never starts.
    "x <code>y <img src=x onerror=alert(1) title='a'> z",
]


@pytest.mark.parametrize("hostile", RAW_HTML)
def test_raw_html_is_shown_as_text(page, hostile):
    result = render(page, hostile)
    assert result["text"].strip() == hostile, result
    assert set(result["tags"]) <= {"p"}, result
    assert result["attrs"] == [], result
    assert result["problems"] == [], result  # nothing parsed, so no CSP report either


def test_an_html_block_is_a_paragraph_of_its_lines(page):
    result = render(page, '<div onclick="x">\n*not emphasis*\n</div>\n\nAfter **it**.')
    assert result["tags"] == ["p", "br", "strong"], result
    lines = page.eval_on_selector("#out p", "(p) => p.innerText")
    assert lines.splitlines() == ['<div onclick="x">', "*not emphasis*", "</div>"]


@pytest.mark.parametrize(
    ("markdown", "forbidden"),
    [
        ("[x](javascript:alert(1))", "javascript:"),
        ("<javascript:alert(1)>", "javascript:"),
        ("[x](data:text/html,<script>alert(1)</script>)", "data:"),
        ("![a picture](https://evil.example/pixel.png)", "evil.example"),
        ('```" onmouseover="alert(1)\nx\n```', "alert"),
    ],
)
def test_markdown_that_would_make_forbidden_markup_loses_it(page, markdown, forbidden):
    result = render(page, markdown)
    assert set(result["tags"]) <= set(result["allowed"]), result
    assert "img" not in result["tags"] and "onmouseover" not in result["attrs"], result
    assert not [v for v in result["values"] if forbidden in v], result
    assert result["problems"] == [], result


# The sanitizer alone, on HTML handed to it directly: the defense in depth
# behind the renderer (which hands it only marked's own markup).
@pytest.mark.parametrize(
    ("hostile", "forbidden"),
    [
        ('<form action="https://evil.example"><input name="p"><button>Go</button></form>', None),
        ('<iframe src="https://evil.example"></iframe>', None),
        ("<style>body{display:none}</style>", None),
        ('<img src="x" onerror="alert(1)">', None),
        ('<a href="javascript:alert(1)">x</a>', "javascript:"),
        ("<svg><script>alert(1)</script></svg>", None),
        ('<object data="x"></object><embed src="x"><video src="x"></video>', None),
        ("<textarea>x</textarea><select><option>x</option></select>", None),
        ('<p style="position:fixed" onclick="alert(1)" data-x="1" id="boot">x</p>', None),
        ('<span class="msg error">x</span><code class="hljs evil">y</code>', "class="),
        ('<meta http-equiv="refresh" content="0;url=https://evil.example"><base href="//e">', None),
        ("<details open><summary>x</summary>y</details>", None),
    ],
)
def test_the_sanitizer_removes_anything_else(page, hostile, forbidden):
    result = render(page, hostile, "sanitizeHtml")
    assert set(result["tags"]) <= set(result["allowed"]), result
    assert set(result["attrs"]) <= {"href", "title", "class", "align", "start"}, result
    for word in ("<form", "<input", "<button", "<iframe", "<style", "<img", "<script", "<svg"):
        assert word not in result["html"], result
    for attr in ("onerror", "onclick", "style=", "data-x", 'id="boot"'):
        assert attr not in result["html"], result
    if forbidden:
        assert forbidden not in result["html"], result
