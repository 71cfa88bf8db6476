// Citations in answers (issue 22). The grounded prompt numbers the sources
// [1], [2], ... in the order of the turn's sources; an answer cites them by
// number. Cited numbers become links to their source; sources the answer did
// not cite are listed apart, never as cited. No innerHTML: text nodes only.

import { LANG, el, gettext, tr } from "./dom.js";

const CITATION = /\[(\d{1,3})\]/g;

// The source numbers `text` mentions as [n], among 1..count (plain text: for
// a rendered answer, linkCitations' result also leaves out code).
export function citedNumbers(text, count) {
  const cited = new Set();
  for (const match of (text || "").matchAll(CITATION)) {
    const n = Number(match[1]);
    if (n >= 1 && n <= count) cited.add(n);
  }
  return cited;
}

// Turn "[n]" in the rendered answer of `node` (not in code or links) into
// links to source n; returns the numbers the answer cites (linked ones).
export function linkCitations(node, sources) {
  const body = node.querySelector(".msg-body");
  const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT, {
    acceptNode: (t) => (t.parentElement.closest("pre, code, a")
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT),
  });
  const texts = [];
  while (walker.nextNode()) texts.push(walker.currentNode);
  for (const text of texts) {
    const parts = text.nodeValue.split(/(\[\d{1,3}\])/);
    if (parts.length < 2) continue;
    const fragment = document.createDocumentFragment();
    for (const part of parts) {
      const n = /^\[\d{1,3}\]$/.test(part) ? Number(part.slice(1, -1)) : 0;
      if (n >= 1 && n <= sources.length) {
        const link = el("a", "cite", `[${n}]`);
        link.href = "#";
        link.dataset.source = String(n);
        link.title = sources[n - 1].title || tr(gettext("Document %(id)s"), { id: sources[n - 1].document_id });
        link.addEventListener("click", (event) => { event.preventDefault(); showSource(node, n); });
        fragment.append(link);
      } else if (part) {
        fragment.append(document.createTextNode(part));
      }
    }
    text.replaceWith(fragment);
  }
  return new Set([...body.querySelectorAll("a.cite")].map((a) => Number(a.dataset.source)));
}

export function showSource(node, n) {
  const item = node.querySelector(`.msg-sources li[data-source="${n}"]`);
  if (!item) return;
  const box = item.closest("details");
  if (box) box.open = true;
  item.scrollIntoView({ block: "nearest" });
  item.classList.add("highlight");
  setTimeout(() => item.classList.remove("highlight"), 1500);
}

function sourceItem(s, n) {
  const item = el("li");
  item.value = n;
  item.dataset.source = String(n);
  item.append(el("strong", null, s.title || tr(gettext("Document %(id)s"), { id: s.document_id })));
  if (s.page != null) item.append(el("span", "muted", ` · ${tr(gettext("p. %(page)s"), { page: s.page })}`));
  if (typeof s.score === "number") {
    const score = new Intl.NumberFormat(LANG, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    item.append(el("span", "muted", ` · ${score.format(s.score)}`));
  }
  item.append(el("blockquote", null, s.snippet || ""));
  return item;
}

// The sources of an answer: those it cites first (numbered as in the prompt),
// the others apart as "not cited"; all as "retrieved" when it cites none.
export function sourcesNode(sources, cited = new Set()) {
  const wrap = el("div", "sources-wrap");
  const numbered = sources.map((s, i) => [s, i + 1]);
  const groups = cited.size
    ? [["sources cited", tr(gettext("Sources cited (%(count)s)"), { count: cited.size }), // i18n-ignore: class names
      numbered.filter(([, n]) => cited.has(n))],
    ["sources uncited", tr(gettext("Also retrieved, not cited (%(count)s)"), { count: sources.length - cited.size }), // i18n-ignore: class names
      numbered.filter(([, n]) => !cited.has(n))]]
    : [["sources", tr(gettext("Sources retrieved (%(count)s)"), { count: sources.length }), numbered]];
  for (const [cls, label, items] of groups) {
    if (!items.length) continue;
    const box = el("details", cls);
    box.append(el("summary", null, label));
    const list = el("ol");
    for (const [s, n] of items) list.append(sourceItem(s, n));
    box.append(list);
    wrap.append(box);
  }
  return wrap;
}
