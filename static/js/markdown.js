// Markdown answers -> HTML holding only the markup the chat renders.
// marked turns the text into HTML; DOMPurify then keeps an allow-list of tags
// and attributes (no forms, inputs, buttons, frames, styles, images, media,
// event handlers or data attributes) and only http(s)/mailto/#fragment links.
// An answer is model output that documents (RAG) can steer: treat it as hostile.

import { marked } from "../vendor/marked-18.2.1/marked.esm.js";
import DOMPurify from "../vendor/dompurify-3.4.18/purify.es.mjs";

marked.setOptions({ gfm: true, breaks: true });

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

export function markdownToSafeHtml(text) {
  return purifier.sanitize(marked.parse(text || ""), CONFIG);
}
