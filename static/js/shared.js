// A shared conversation (/s/<token>/): read-only, rendered as the chat renders
// it. User messages are text; answers are Markdown through the same renderer
// and sanitizer (markdown.js: raw HTML in an answer is shown as text) and
// highlighter, with their sources.

import { markdownToSafeHtml } from "./markdown.js";
import { linkCitations, sourcesNode } from "./citations.js";
import hljs from "../vendor/highlight.js-11.12.0/highlight.min.js";
import { el } from "./dom.js";

const boot = JSON.parse(document.getElementById("boot").textContent);
const box = document.getElementById("messages");

for (const m of boot.messages || []) {
  const node = el("article", `msg msg-${m.role}`);
  node.dataset.role = m.role;
  const body = el("div", "msg-body");
  node.append(body);
  if (m.role === "user") {
    body.classList.add("plain");
    body.textContent = m.content;
  } else {
    body.innerHTML = markdownToSafeHtml(m.content);
    body.querySelectorAll("pre code").forEach((code) => hljs.highlightElement(code));
    body.querySelectorAll("a").forEach((a) => { a.target = "_blank"; a.rel = "noopener noreferrer"; }); // i18n-ignore: a link relation, not text
    if (m.sources && m.sources.length) {
      const sources = el("div", "msg-sources");
      sources.append(sourcesNode(m.sources, linkCitations(node, m.sources)));
      node.append(sources);
    }
    if (m.runner) node.append(el("div", "msg-meta", [m.runner, m.model].filter(Boolean).join(" · ")));
  }
  if (box) box.append(node);
}
