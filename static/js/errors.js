// What an error means, in the page's language. The server's messages are
// English (a websocket has no page language); its `code` is stable. The codes
// are defined once, in Python (chat.errors.WEBSOCKET_CODES, the table of
// docs/websocket.md); this map gives each a translated message, and
// tests/test_i18n.py checks that it has exactly those codes. A code it does not
// know (an HTTP API code, a newer server) shows the server's own message.
// `%(detail)s` is the server's message, where it names what only the server
// knows (which field, which image, the guardian rule's own words).

import { LANG, gettext, tr } from "./dom.js";

export const ERROR_TEXT = {
  bad_json: gettext("The server could not read the request: %(detail)s"),
  bad_frame: gettext("The server could not read the request: %(detail)s"),
  frame_too_large: gettext("The message is too large to send."),
  unknown_type: gettext("The server could not read the request: %(detail)s"),
  missing_field: gettext("The request was incomplete: %(detail)s"),
  bad_field: gettext("The request was incomplete: %(detail)s"),
  invalid_input: gettext("The message could not be answered as it is (it may be too long for the model, or hold characters that cannot be read)."),
  text_too_long: gettext("The message is too long."),
  too_many_images: gettext("Too many images in one message."),
  bad_image: gettext("An image could not be used: %(detail)s"),
  duplicate_request_id: gettext("That request is already running."),
  conversation_busy: gettext("This conversation is still answering; wait for it or stop it."),
  not_running: gettext("No answer is being generated."),
  not_found: gettext("That no longer exists, or is not yours."),
  not_editable: gettext("Only your own messages can be edited."),
  nothing_to_regenerate: gettext("This conversation has no message to answer."),
  unknown_runner: gettext("That runner is not available to you."),
  rate_limited: gettext("Too many answers or messages at once; wait a moment and try again."),
  quota_exceeded: gettext("Quota reached: %(used)s of %(limit)s used, %(remaining)s left. It starts over at %(when)s."),
  guardian_blocked: gettext("Blocked by a content rule: %(detail)s"),
  credential_ended: gettext("You were signed out (or your key was revoked). Sign in again."),
  internal_error: gettext("Something went wrong on the server."),
  not_loaded: gettext("The model is still loading; try again in a moment."),
  unavailable: gettext("No runner can answer right now; try again later."),
  timeout: gettext("The runner took too long to answer."),
  auth: gettext("The runner refused the server's credentials; tell an administrator."),
  runtime: gettext("The runner failed while answering."),
  no_runner: gettext("No runner can answer this request (for example, none reads images)."),
  // Saved on an answer, never sent as a frame (chat/services.py).
  interrupted: gettext("The server stopped before this answer was finished; the saved text is kept."),
};

// The message to show for an error `code` with the server's `message` (and,
// for a quota, the frame's `quota`).
export function errorText(code, message, quota) {
  const format = Object.hasOwn(ERROR_TEXT, code) ? ERROR_TEXT[code] : null;
  if (!format) return message || gettext("Something went wrong.");
  if (code === "quota_exceeded") {
    if (!quota) return message || format;
    const when = quota.resets_at ? new Date(quota.resets_at).toLocaleString(LANG) : "—";
    const number = new Intl.NumberFormat(LANG);
    return tr(format, {
      used: number.format(quota.used), limit: number.format(quota.limit),
      remaining: number.format(quota.remaining), when,
    });
  }
  return tr(format, { detail: message || "" });
}
