// What a `notice` frame says, in the page's language. The server's messages
// are English (a websocket has no page language); its `code` is stable and
// its `data` carries the numbers. The codes are defined once, in Python
// (runners.base.NoticeCode, listed in docs/websocket.md); this map gives each a
// translated message made from its data, and tests/test_i18n.py checks that it
// has exactly those codes. A code it does not know (a newer server), or data
// it cannot read, shows the server's own message.

import { LANG, gettext, ngettext, tr } from "./dom.js";

// A number of the notice's data in the page's language; anything else is not
// data this map can read (the caller falls back to the server's message).
function number(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) throw new TypeError("not a number"); // i18n-ignore: never shown
  return new Intl.NumberFormat(LANG).format(value);
}

export const NOTICE_TEXT = {
  queued: (d) => tr(gettext("Waiting for the local model: position %(position)s in the queue."), { position: number(d.position) }),
  trimmed: (d) => tr(ngettext(
    "%(count)s oldest message was left out to fit the model's context.",
    "%(count)s oldest messages were left out to fit the model's context.",
    d.dropped,
  ), { count: number(d.dropped) }),
  loop: () => gettext("The answer started repeating itself, so it was stopped there."),
  fallback: (d) => {
    if (typeof d.failed !== "string") throw new TypeError("no runner"); // i18n-ignore: never shown
    return tr(gettext("The runner %(runner)s could not answer; trying the next one."), { runner: d.failed });
  },
  step_limit: (d) => tr(ngettext(
    "The agent stopped after %(count)s round of tool calls (the administrator's limit); the answer so far is kept.",
    "The agent stopped after %(count)s rounds of tool calls (the administrator's limit); the answer so far is kept.",
    d.max_steps,
  ), { count: number(d.max_steps) }),
  time_limit: (d) => tr(gettext("The agent reached its time limit of %(seconds)s s; the answer so far is kept."), { seconds: number(d.seconds) }),
};

// The message to show for a notice `code` with the server's `message` and the frame's `data`.
export function noticeText(code, message, data) {
  const format = Object.hasOwn(NOTICE_TEXT, code) ? NOTICE_TEXT[code] : null;
  if (!format) return message || "";
  try {
    return format(data && typeof data === "object" ? data : {});
  } catch {
    return message || "";
  }
}
