"""Citations (issue 22): the grounded prompt labels the sources [n] in the
order the turn's sources are sent, and the chat (static/js/citations.js, in a
real Chromium) links each cited [n] in the answer to source n and never shows
a source the answer did not cite as cited."""

from __future__ import annotations

import re

import pytest

from chat.pipeline import NOT_IN_DOCUMENTS, fit_to_budget
from runners.base import ChatMessage, ChatRequest
from tests.support.browser import static_page


class _Runner:
    name = "fake"
    context_tokens = 4096

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def test_the_grounded_prompt_puts_labelled_sources_before_the_question():
    context = (
        "[1] orsa.md: Orsa Point Lighthouse was built by Margaret Ostrow in 1902.\n"
        "[2] varnholm.md: Varnholm Lighthouse was built by Ilse Varga in 1874."
    )
    history = (
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", "Hi! How can I help?"),
        ChatMessage("user", "Who built Orsa Point Lighthouse?"),
    )
    fitted, _ = fit_to_budget(ChatRequest(messages=history, max_tokens=64), _Runner(), context)
    last = fitted.messages[-1].content
    # Most relevant first, each labelled, then the instruction, then the question.
    assert last.index("[1] orsa.md") < last.index("[2] varnholm.md") < last.index("Question:")
    assert last.endswith("Question: Who built Orsa Point Lighthouse?")
    assert "cite the number" in last and NOT_IN_DOCUMENTS in last
    # Earlier turns are untouched (the local runner's KV cache still holds them).
    assert [m.content for m in fitted.messages[1:-1]] == ["Hello", "Hi! How can I help?"]
    assert "[1]" not in fitted.messages[0].content


@pytest.fixture(scope="module")
def page():
    with static_page() as page:
        yield page


SOURCES = [
    {
        "document_id": 1,
        "title": "orsa.md",
        "page": None,
        "snippet": "Built by Ostrow.",
        "score": 0.9,
    },
    {
        "document_id": 2,
        "title": "varnholm.md",
        "page": 2,
        "snippet": "Built by Varga.",
        "score": 0.5,
    },
    {"document_id": 3, "title": "bridge.md", "page": None, "snippet": "A bridge.", "score": 0.4},
]


def show(page, answer: str, sources=SOURCES) -> dict:
    return page.evaluate(
        """async ([answer, sources]) => {
            const md = await import("/static/js/markdown.js");
            const c = await import("/static/js/citations.js");
            const out = document.getElementById("out");
            out.textContent = "";
            const node = document.createElement("article");
            const body = document.createElement("div");
            body.className = "msg-body";
            body.innerHTML = md.markdownToSafeHtml(answer);
            const box = document.createElement("div");
            box.className = "msg-sources";
            node.append(body, box);
            out.append(node);
            // As chat.js does: link first, then list what was cited.
            const cited = c.linkCitations(node, sources);
            box.append(c.sourcesNode(sources, cited));
            // Linking again (the message re-decorated) changes nothing.
            const again = [...c.linkCitations(node, sources)];
            const groups = [...box.querySelectorAll("details")].map((d) => ({
                cls: d.className,
                summary: d.querySelector("summary").textContent,
                items: [...d.querySelectorAll("li")].map((li) => [li.value, li.dataset.source,
                    li.querySelector("strong").textContent]),
            }));
            const links = [...body.querySelectorAll("a.cite")].map((a) => [a.textContent,
                a.dataset.source, a.title]);
            // Clicking a citation opens its source's group and marks the source.
            const first = body.querySelector("a.cite");
            if (first) first.click();
            const marked = [...box.querySelectorAll("li.highlight")].map((li) => li.dataset.source);
            return {groups, links, marked, again, text: body.textContent.trim()};
        }""",
        [answer, sources],
    )


@pytest.mark.browser
def test_cited_numbers_link_to_their_sources_and_uncited_ones_are_apart(page):
    result = show(page, "It was built by Margaret Ostrow [1], in 1902 [1].")
    assert result["links"] == [["[1]", "1", "orsa.md"], ["[1]", "1", "orsa.md"]]
    cited, uncited = result["groups"]
    assert cited["cls"] == "sources cited" and cited["summary"] == "Sources cited (1)"
    assert cited["items"] == [[1, "1", "orsa.md"]]
    assert uncited["cls"] == "sources uncited"
    assert uncited["summary"] == "Also retrieved, not cited (2)"
    # Numbered as in the prompt, so [2] stays 2 even when listed apart.
    assert uncited["items"] == [[2, "2", "varnholm.md"], [3, "3", "bridge.md"]]
    assert result["marked"] == ["1"]
    assert result["again"] == [1]
    assert result["text"] == "It was built by Margaret Ostrow [1], in 1902 [1]."


@pytest.mark.browser
def test_numbers_beyond_the_sources_and_inside_code_are_not_citations(page):
    result = show(page, "See `items[2]` and [7]; the answer is in [2].\n\n```\nx = a[3]\n```")
    assert result["links"] == [["[2]", "2", "varnholm.md"]]
    assert [g["summary"] for g in result["groups"]] == [
        "Sources cited (1)",
        "Also retrieved, not cited (2)",
    ]


@pytest.mark.browser
def test_an_answer_citing_nothing_shows_its_sources_as_retrieved_not_cited(page):
    result = show(page, "The documents do not contain the answer.")
    assert result["links"] == []
    (group,) = result["groups"]
    assert group["summary"] == "Sources retrieved (3)"
    assert not re.search("cited", group["summary"])
