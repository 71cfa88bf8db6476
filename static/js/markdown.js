// Markdown answers -> HTML holding only the markup the chat renders.
// An answer is model output that documents (RAG) can steer: treat it as hostile.
// 1. marked turns the Markdown into HTML, but raw HTML in the text (block or
//    inline: `<img onerror=…>`, `<div>`, comments) is not passed through: it is
//    escaped and shown as the characters written, like HTML in a code span.
//    (The one exception is a bare `<br>`, which answers use for line breaks in
//    table cells: it becomes marked's own `<br>`.) So the HTML handed to the
//    sanitizer is only marked's own markup; a hostile tag never reaches a parser
//    (Chromium checks an inline handler's CSP even in DOMPurify's inert
//    document, which logged a refused `onerror` on every page showing one).
// 2. DOMPurify, as defense in depth, keeps an allow-list of tags and attributes
//    (no forms, inputs, buttons, frames, styles, images, media, event handlers
//    or data attributes) and only http(s)/mailto/#fragment links.

import { Marked } from "../vendor/marked-18.2.1/marked.esm.js";
import DOMPurify from "../vendor/dompurify-3.4.18/purify.es.mjs";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
const BARE_BR = /^<br\s*\/?>$/i;

// Its own instance: the global `marked` (and its defaults) stays untouched.
const markdown = new Marked({
  gfm: true,
  breaks: true,
  tokenizer: {
    // An inline tag as marked finds it, but without the lexer state a real tag
    // sets (`<a>` turning links off, `<pre>`/`<code>`/`<script>` making the text
    // after it raw, i.e. unescaped): here the tag is only text.
    tag(src) {
      const match = this.rules.inline.tag.exec(src);
      if (!match) return undefined;
      return { type: "html", raw: match[0], text: match[0], block: false, inLink: false, inRawBlock: false };
    },
  },
  renderer: {
    html({ text, block }) {
      if (!block) return BARE_BR.test(text) ? "<br>" : escapeHtml(text);
      // An HTML block (a line opening with a tag, up to a blank line): a paragraph of its text.
      return `<p>${escapeHtml(text.trim()).replace(/\n/g, "<br>")}</p>\n`;
    },
  },
});

export const ALLOWED_TAGS = Object.freeze([
  "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6",
  "strong", "em", "del", "s", "code", "pre", "blockquote", "sup", "sub",
  "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
]);
export const ALLOWED_ATTR = Object.freeze(["href", "title", "class", "align", "start"]);

const CONFIG = {
  ALLOWED_TAGS: [...ALLOWED_TAGS],
  ALLOWED_ATTR: [...ALLOWED_ATTR],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
  KEEP_CONTENT: true,
};

const purifier = DOMPurify();
// `class` only as marked writes it: a code block's language (for highlighting).
purifier.addHook("uponSanitizeAttribute", (node, data) => {
  if (data.attrName === "class") {
    data.keepAttr = node.nodeName === "CODE" && /^language-[\w+#.-]{1,40}$/.test(data.attrValue);
  } else if (data.attrName === "align") {
    data.keepAttr = /^(left|right|center)$/.test(data.attrValue);
  }
});

// The second step alone (exported for its tests): HTML -> the allow-listed HTML.
export function sanitizeHtml(html) {
  return purifier.sanitize(html, CONFIG);
}

export function markdownToSafeHtml(text) {
  return sanitizeHtml(markdown.parse(text || ""));
}
