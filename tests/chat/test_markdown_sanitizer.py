"""The chat's Markdown sanitizer (static/js/markdown.js) in a real Chromium:
answers keep the markup the chat renders and nothing else (no forms, inputs,
buttons, frames, styles, images, event handlers, javascript: links).

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
        yield page


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
