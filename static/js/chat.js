// BreezeWeb chat: one ES module, no inline scripts (strict CSP).
// Talks to /ws/chat/ (docs/websocket.md) and the small JSON endpoints under /api/.
// Answers are Markdown rendered by marked (raw HTML in them shown as text),
// sanitized by DOMPurify to an allow-list (markdown.js), highlighted by
// highlight.js; user messages are shown as plain text, never as HTML.

import { markdownToSafeHtml } from "./markdown.js";
import { linkCitations, sourcesNode } from "./citations.js";
import { renderStep, renderSteps } from "./agent.js";
import { Projects, Sharing, branchNav, costText, initImport, revealMessage, snippetNode, updateGauge } from "./conversations.js";
import hljs from "../vendor/highlight.js-11.12.0/highlight.min.js";
import { LANG, el, gettext, ngettext, tr } from "./dom.js";
import { errorText } from "./errors.js";
import { noticeText } from "./notices.js";

// Text goes through Django's JavaScript catalog (/jsi18n/, loaded before this
// module); without it, English.

const boot = JSON.parse(document.getElementById("boot").textContent);
const $ = (id) => document.getElementById(id);
const els = {
  list: $("conversation-list"), search: $("search"), newChat: $("new-chat"),
  title: $("chat-title"), messages: $("messages"), empty: $("empty-chat"),
  runner: $("runner-select"), caps: $("runner-caps"), rag: $("rag-toggle"), agent: $("agent-toggle"),
  conn: $("conn-status"), banner: $("banner"), bannerText: $("banner-text"),
  bannerRetry: $("banner-retry"), bannerClose: $("banner-close"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  attach: $("attach-image"), imageInput: $("image-input"), attachments: $("attachments"),
  toggleDocs: $("toggle-docs"), documents: $("documents"), dropzone: $("dropzone"),
  pickDocs: $("pick-docs"), docInput: $("doc-input"), uploads: $("upload-list"),
  menu: $("menu-toggle"), sidebar: $("sidebar"), announcer: $("announcer"),
  shortcuts: $("shortcuts"), showShortcuts: $("show-shortcuts"),
};

const state = {
  conversationId: boot.conversation ? boot.conversation.id : null,
  projectId: boot.conversation ? boot.conversation.project_id : null, // the open chat's project
  runners: boot.runners || [],
  images: [],               // data URLs attached to the next message
  pending: new Map(),       // request_id -> live answer (generated or attached to)
  socket: null,
  attempts: 0,              // reconnect attempts since the last open
  reloadOnOpen: false,
};

// ---- small helpers --------------------------------------------------------------

function requestId() {
  return (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`).slice(0, 36);
}

function renderMarkdown(target, text) {
  target.innerHTML = markdownToSafeHtml(text);
  target.querySelectorAll("pre code").forEach((code) => hljs.highlightElement(code));
  target.querySelectorAll("a").forEach((a) => { a.target = "_blank"; a.rel = "noopener noreferrer"; }); // i18n-ignore: link types
}

async function api(path, options = {}) {
  const headers = { "X-CSRFToken": boot.csrf_token, ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { credentials: "same-origin", ...options, headers });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error
      ? errorText(body.error.code, body.error.message)
      : tr(gettext("HTTP error %(status)s"), { status: response.status }));
    error.code = body.error && body.error.code;
    throw error;
  }
  return body;
}

function showBanner(message, retry) {
  els.bannerText.textContent = message;
  els.banner.hidden = false;
  els.bannerRetry.hidden = !retry;
  els.bannerRetry.onclick = retry ? () => { hideBanner(); retry(); } : null;
}

function hideBanner() { els.banner.hidden = true; }

function setConn(stateName, label) {
  els.conn.dataset.state = stateName;
  els.conn.textContent = label;
}

// Numbers in the page's language (digits, separators).
function fmt(n, digits = 0) {
  if (typeof n !== "number" || !isFinite(n)) return "–";
  return new Intl.NumberFormat(LANG, { minimumFractionDigits: digits, maximumFractionDigits: digits }).format(n);
}

// Screen readers hear this once, politely (the live region in chat.html).
function announce(text) {
  els.announcer.textContent = "";
  // A new text node after a tick, so the same words twice are announced twice.
  setTimeout(() => { els.announcer.textContent = text; }, 50);
}

// ---- runners and capabilities -------------------------------------------------------

function selectedRunner() {
  const name = els.runner.value;
  return name === "auto" ? null : state.runners.find((r) => r.name === name) || null;
}

function canSeeImages() {
  const runner = selectedRunner();
  if (runner) return runner.capabilities.includes("vlm");
  return state.runners.some((r) => r.capabilities.includes("vlm"));
}

function updateCaps() {
  const runner = selectedRunner();
  els.caps.textContent = "";
  const caps = runner ? runner.capabilities
    : [...new Set(state.runners.flatMap((r) => r.capabilities))];
  for (const cap of caps) els.caps.append(el("span", `cap cap-${cap}`, cap));
  if (runner && runner.model_id) els.caps.title = tr(gettext("model: %(model)s"), { model: runner.model_id });
  const vision = canSeeImages();
  els.attach.disabled = !vision;
  els.attach.title = vision ? gettext("Attach an image") : gettext("The chosen runner cannot see images");
  if (!vision && state.images.length) { state.images = []; renderAttachments(); }
}

// ---- messages ------------------------------------------------------------------------

function messageNode(m) {
  const node = el("article", `msg msg-${m.role}`);
  node.dataset.id = m.id || "";
  node.dataset.role = m.role;
  const body = el("div", "msg-body");
  node.append(body);
  if (m.role === "user") {
    body.classList.add("plain");
    body.textContent = m.content;           // text, never HTML
    for (const url of m.images || []) {
      const img = el("img", "msg-image");
      img.src = url; img.alt = gettext("attached image");
      node.append(img);
    }
  } else {
    renderMarkdown(body, m.content);
  }
  node.append(el("div", "msg-sources"), el("div", "msg-meta"), el("div", "msg-actions"));
  if (m.steps && m.steps.length) renderSteps(node, m.steps, decide);
  decorate(node, m);
  return node;
}

function decorate(node, m) {
  node.dataset.status = m.status || "complete";
  const sources = node.querySelector(".msg-sources");
  sources.textContent = "";
  if (m.sources && m.sources.length) {
    // Numbers cited in the rendered answer (not in code), linked to their source.
    const cited = m.role === "assistant" ? linkCitations(node, m.sources) : new Set();
    sources.append(sourcesNode(m.sources, cited));
  }
  const meta = node.querySelector(".msg-meta");
  meta.textContent = "";
  if (m.role === "assistant" && m.status !== "streaming") {
    const parts = [];
    if (m.runner) parts.push(m.runner);
    if (m.model) parts.push(m.model);
    if (m.fallback) parts.push(gettext("fallback"));
    const t = m.timings || {};
    if (t.tokens_per_second) parts.push(tr(gettext("%(rate)s tok/s"), { rate: fmt(t.tokens_per_second, 1) }));
    if (t.time_to_first_token_ms != null) parts.push(tr(gettext("TTFT %(ms)s ms"), { ms: fmt(t.time_to_first_token_ms) }));
    if (m.usage && m.usage.completion_tokens != null) {
      const n = m.usage.completion_tokens;
      const answer = tr(ngettext("%(count)s token", "%(count)s tokens", n), { count: fmt(n) });
      // The prompt's tokens first when the runner reported them: "30 + 8 tokens".
      parts.push(m.usage.prompt_tokens != null ? `${fmt(m.usage.prompt_tokens)} + ${answer}` : answer);
    }
    if (m.cost) parts.push(costText(m.cost));
    if (m.status === "stopped") parts.push(gettext("stopped"));
    const details = el("span", "details", parts.join(" · "));
    details.title = gettext("runner · model · throughput · time to first token");
    meta.append(details);
    if (m.status === "failed" || (m.status === "stopped" && m.error)) {
      const text = m.error_code || m.error ? errorText(m.error_code, m.error) : gettext("The answer failed.");
      meta.append(el("span", "msg-error", text));
    }
  }
  const actions = node.querySelector(".msg-actions");
  actions.textContent = "";
  if (m.status === "streaming") return;
  const nav = branchNav(m, switchBranch);
  if (nav) actions.append(nav);
  const copy = el("button", "link-btn", gettext("Copy"));
  copy.type = "button";
  copy.addEventListener("click", () => copyText(m.content, copy));
  actions.append(copy);
  if (m.id && state.conversationId) {
    const fork = el("button", "link-btn fork", gettext("Fork"));
    fork.type = "button";
    fork.title = gettext("A new conversation with this branch up to here");
    fork.addEventListener("click", () => forkAt(m.id));
    actions.append(fork);
  }
  if (m.role === "assistant") {
    const again = el("button", "link-btn regen", gettext("Regenerate"));
    again.type = "button";
    again.addEventListener("click", () => regenerate());
    actions.append(again);
  } else if (m.role === "user" && m.id) {
    const edit = el("button", "link-btn", gettext("Edit"));
    edit.type = "button";
    edit.addEventListener("click", () => startEdit(node, m));
    actions.append(edit);
  }
  node._message = m;
}

// Show another branch: the server remembers it, the page shows it.
async function switchBranch(messageId) {
  if (busyHere()) return;
  try {
    await api(`/api/conversations/${state.conversationId}`, { method: "PATCH", json: { active_message_id: messageId } });
    await openConversation(state.conversationId, false);
  } catch (error) { showBanner(tr(gettext("Could not switch versions: %(error)s"), { error: error.message })); }
}

async function forkAt(messageId) {
  try {
    const fork = await api(`/api/conversations/${state.conversationId}/fork`, { method: "POST", json: { message_id: Number(messageId) } });
    await openConversation(fork.id);
    refreshList();
  } catch (error) { showBanner(tr(gettext("Could not fork: %(error)s"), { error: error.message })); }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el("textarea"); area.value = text; document.body.append(area);
    area.select(); document.execCommand("copy"); area.remove();
  }
  if (!button) return;
  const label = button.textContent;
  button.textContent = gettext("Copied");
  setTimeout(() => { button.textContent = label; }, 1200);
}

function refreshRegenerate() {
  // Only the last answer can be regenerated.
  const nodes = els.messages.querySelectorAll(".msg-assistant");
  nodes.forEach((n, i) => {
    const button = n.querySelector(".regen");
    if (button) button.hidden = i !== nodes.length - 1 || busyHere();
  });
}

function busyHere() {
  // An answer no server process is writing (after a restart) does not keep
  // the composer busy: nothing could stop or finish it.
  return [...state.pending.values()].some((p) => (p.conversationId === state.conversationId || p.conversationId === null) && p.live !== false);
}

function renderConversation(conversation) {
  els.messages.querySelectorAll(".msg").forEach((n) => n.remove());
  const messages = conversation ? conversation.messages : [];
  for (const m of messages) els.messages.append(messageNode(m));
  els.empty.hidden = messages.length > 0;
  els.title.textContent = conversation ? conversation.title : gettext("New chat");
  document.title = `${conversation ? conversation.title + " · " : ""}BreezeWeb`;
  sharing.update();
  updateGauge(messages, state.runners);
  if (conversation) {
    els.runner.value = conversation.pinned_runner || "auto";
    els.rag.checked = !!conversation.rag;
    els.agent.checked = !!conversation.agent;
    updateCaps();
  }
  // Re-attach answers still streaming on this socket.
  for (const p of state.pending.values()) {
    if (p.conversationId !== state.conversationId) continue;
    const node = els.messages.querySelector(`.msg[data-id="${p.assistantId}"]`);
    if (node) { p.node = node; p.body = node.querySelector(".msg-body"); node.dataset.status = "streaming"; scheduleRender(p); }
  }
  // Answers streaming elsewhere (a page before a reload, another tab or
  // device): attach to them and follow them live (docs/websocket.md).
  if (conversation) attachStreaming(conversation);
  refreshRegenerate();
  updateComposer();
  scrollDown(true);
}

function attachStreaming(conversation) {
  // Without a socket yet, the socket's opening reopens the conversation.
  if (!state.socket || state.socket.readyState !== WebSocket.OPEN) return;
  const followed = new Set([...state.pending.values()].map((p) => p.assistantId));
  for (const m of conversation.messages) {
    if (m.role !== "assistant" || m.status !== "streaming" || followed.has(m.id)) continue;
    const node = els.messages.querySelector(`.msg[data-id="${m.id}"]`);
    const p = {
      requestId: requestId(), attach: true, assistantId: m.id, conversationId: conversation.id,
      text: m.content, seq: 0, node, body: node && node.querySelector(".msg-body"),
    };
    if (p.body) p.body.classList.add("streaming-cursor");
    state.pending.set(p.requestId, p);
    send({ type: "attach", request_id: p.requestId, message_id: m.id });
  }
}

function synced(p, f) {
  // The answer so far (or, after `since`, what this page had not seen yet).
  if (!p) return;
  p.text = f.since ? p.text + f.text : f.text;
  p.seq = f.seq;
  p.live = f.live;
  if (f.sources && f.sources.length) p.sources = f.sources;
  if (f.runner) p.routed = { runner: f.runner, model: f.model, fallback: f.fallback };
  updateComposer();
  refreshRegenerate();
  if (p.node) {
    p.node.querySelector(".msg-meta").textContent = f.live
      ? (f.runner ? [f.runner, f.model, ...(f.fallback ? [gettext("fallback")] : [])].join(" · ") : "")
      // No server process is writing it now (a restart): what was saved so far.
      : f.status === "streaming" ? gettext("Still being written (it goes on after a reload): showing the text saved so far.") : "";
  }
  scheduleRender(p);
}

function scrollDown(force) {
  const box = els.messages;
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  if (force || near) box.scrollTop = box.scrollHeight;
}

function scheduleRender(p) {
  if (p.renderQueued || !p.body) return;
  p.renderQueued = true;
  requestAnimationFrame(() => {
    p.renderQueued = false;
    if (!p.body || !state.pending.has(p.requestId)) return; // finished meanwhile
    renderMarkdown(p.body, p.text);
    p.body.classList.add("streaming-cursor");
    scrollDown(false);
  });
}

// ---- conversation list -----------------------------------------------------------------

function listItem(c) {
  // Cloned from the server-rendered <template>, so both lists look the same.
  const li = $("tpl-conversation").content.firstElementChild.cloneNode(true);
  li.dataset.id = c.id;
  li.dataset.project = c.project_id || "";
  li.classList.toggle("active", c.id === state.conversationId);
  li.classList.toggle("pinned", !!c.pinned);
  const a = li.querySelector(".conversation-link");
  a.textContent = c.title;
  a.href = `/c/${c.id}/`;
  li.querySelector('[data-action="rename"]').setAttribute("aria-label", tr(gettext("Rename %(title)s"), { title: c.title }));
  li.querySelector('[data-action="delete"]').setAttribute("aria-label", tr(gettext("Delete %(title)s"), { title: c.title }));
  li.querySelector('[data-action="move"]').setAttribute("aria-label", tr(gettext("Move %(title)s"), { title: c.title }));
  const pin = li.querySelector('[data-action="pin"]');
  pin.setAttribute("aria-pressed", String(!!c.pinned));
  if (c.match) {
    // A search result: the snippet, and the message to open the conversation at.
    li.append(snippetNode(c.match));
    if (c.match.message_id) li.dataset.message = c.match.message_id;
  }
  return li;
}

async function refreshList() {
  const q = els.search.value.trim();
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if (projects.current !== null) params.set("project", projects.current);
  try {
    const body = await api(`/api/conversations${params.size ? `?${params}` : ""}`);
    els.list.textContent = "";
    for (const c of body.conversations) els.list.append(listItem(c));
    if (!body.conversations.length) els.list.append(el("li", "muted empty-list", q ? gettext("No matching conversations.") : gettext("No conversations yet.")));
    markActive();
  } catch (error) {
    showBanner(tr(gettext("Could not load conversations: %(error)s"), { error: error.message }), refreshList);
  }
}

function markActive() {
  els.list.querySelectorAll(".conversation-item").forEach((li) => {
    const active = Number(li.dataset.id) === state.conversationId;
    li.classList.toggle("active", active);
    const link = li.querySelector(".conversation-link");
    if (link && active) link.setAttribute("aria-current", "page"); else if (link) link.removeAttribute("aria-current");
  });
}

async function openConversation(id, push = true, messageId = null, background = false) {
  try {
    const conversation = await api(`/api/conversations/${id}`);
    // A background refresh never takes away an edit in progress, nor shows a
    // conversation the user has left meanwhile.
    if (background && (els.messages.querySelector(".edit-box") || state.conversationId !== id)) {
      return conversation;
    }
    state.conversationId = conversation.id;
    state.projectId = conversation.project_id;
    if (push) history.pushState({ id }, "", `/c/${id}/${messageId ? `#m${messageId}` : ""}`);
    renderConversation(conversation);
    if (messageId && !revealMessage(els.messages, messageId)) {
      // A search hit on another branch: show that branch, then the message.
      await api(`/api/conversations/${id}`, { method: "PATCH", json: { active_message_id: messageId } });
      renderConversation(await api(`/api/conversations/${id}`));
      revealMessage(els.messages, messageId);
    }
    markActive();
    closeSidebar();
    // Opened from the list: the title (a heading) tells where the reader is now.
    if (push) els.title.focus();
    return conversation;
  } catch (error) {
    if (error.code === "not_found") { newChat(); refreshList(); return null; }
    showBanner(tr(gettext("Could not open the conversation: %(error)s"), { error: error.message }), () => openConversation(id, push));
    return null;
  }
}

function newChat(push = true) {
  state.conversationId = null;
  // A new chat starts in the selected project, with its runner and documents.
  state.projectId = projects.current;
  if (push) history.pushState({ id: null }, "", "/");
  renderConversation(null);
  const project = projects.byId(state.projectId);
  els.runner.value = project && project.runner && state.runners.some((r) => r.name === project.runner) ? project.runner : "auto";
  els.rag.checked = project ? project.rag : false;
  els.title.textContent = project ? tr(gettext("%(project)s · New chat"), { project: project.name }) : gettext("New chat");
  updateCaps();
  markActive();
  closeSidebar();
  els.prompt.focus();
  if (push) announce(gettext("New chat started."));
}

function startRename(li) {
  const link = li.querySelector(".conversation-link");
  const input = el("input", "rename-input");
  input.value = link.textContent;
  input.setAttribute("aria-label", gettext("New title"));
  link.replaceWith(input);
  input.focus(); input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== link.textContent) {
      try {
        const body = await api(`/api/conversations/${li.dataset.id}`, { method: "PATCH", json: { title } });
        link.textContent = body.title;
        if (Number(li.dataset.id) === state.conversationId) els.title.textContent = body.title;
      } catch (error) { showBanner(tr(gettext("Could not rename: %(error)s"), { error: error.message })); }
    }
    const hadFocus = document.activeElement === input;
    input.replaceWith(link);
    if (hadFocus) link.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(li) {
  const title = li.querySelector(".conversation-link")?.textContent || gettext("this conversation");
  if (!confirm(tr(gettext("Delete “%(title)s” and all its messages?"), { title }))) return;
  try {
    await api(`/api/conversations/${li.dataset.id}`, { method: "DELETE" });
    // Focus moves to the next conversation (or the search box), not to nowhere.
    const next = (li.nextElementSibling || li.previousElementSibling)?.querySelector(".conversation-link");
    li.remove();
    announce(tr(gettext("Deleted “%(title)s”."), { title }));
    if (Number(li.dataset.id) === state.conversationId) newChat();
    else (next || els.search).focus();
  } catch (error) { showBanner(tr(gettext("Could not delete: %(error)s"), { error: error.message })); }
}

els.list.addEventListener("click", (e) => {
  const li = e.target.closest(".conversation-item");
  if (!li) return;
  const action = e.target.closest("[data-action]")?.dataset.action;
  if (action === "rename") { e.preventDefault(); startRename(li); return; }
  if (action === "delete") { e.preventDefault(); deleteConversation(li); return; }
  if (action === "pin") { e.preventDefault(); togglePin(li); return; }
  if (action === "move") { e.preventDefault(); projects.chooseFor(li, Number(li.dataset.project) || null); return; }
  const link = e.target.closest(".conversation-link");
  if (link && !e.ctrlKey && !e.metaKey && !e.shiftKey) {
    e.preventDefault();
    openConversation(Number(li.dataset.id), true, Number(li.dataset.message) || null);
  }
});
// Drag a conversation onto a project (or "All chats", out of its project).
els.list.addEventListener("dragstart", (e) => {
  const li = e.target.closest(".conversation-item");
  if (li) e.dataTransfer.setData("application/x-conversation", li.dataset.id);
});

async function togglePin(li) {
  const pinned = !li.classList.contains("pinned");
  try {
    await api(`/api/conversations/${li.dataset.id}`, { method: "PATCH", json: { pinned } });
    refreshList();
  } catch (error) { showBanner(tr(gettext("Could not pin: %(error)s"), { error: error.message })); }
}

const sharing = new Sharing({ api, conversationId: () => state.conversationId });
initImport({ api, onDone: () => { refreshList(); projects.load(); }, say: (message) => showBanner(message) });

const projects = new Projects({
  api,
  runners: state.runners,
  onChange: ({ selected }) => { refreshList(); if (selected && state.conversationId === null) newChat(false); },
  onError: (message) => showBanner(message),
});

let searchTimer = null;
els.search.addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(refreshList, 200);
});
els.newChat.addEventListener("click", () => newChat());
window.addEventListener("popstate", () => {
  const match = location.pathname.match(/^\/c\/(\d+)\/$/);
  if (match) openConversation(Number(match[1]), false); else newChat(false);
});

// ---- the websocket ----------------------------------------------------------------------

// Proxies close websockets that stay silent (nginx: 60 s); a ping every 25 s
// keeps an idle chat connected.
const KEEPALIVE_MS = 25000;
setInterval(() => {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ type: "ping", request_id: "keepalive" }));
  }
}, KEEPALIVE_MS);

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws/chat/`);
  state.socket = socket;
  setConn("connecting", state.attempts ? gettext("Reconnecting…") : gettext("Connecting…"));
  socket.addEventListener("open", () => {
    state.attempts = 0;
    setConn("open", gettext("Connected"));
    if (els.banner.dataset.kind === "connection") hideBanner();
    // Resume: reload the conversation; answers still being written are
    // attached to and followed live from where they are (renderConversation).
    const streamingShown = els.messages.querySelector('.msg[data-status="streaming"]');
    if (state.reloadOnOpen || streamingShown) {
      state.reloadOnOpen = false;
      if (state.conversationId) openConversation(state.conversationId, false);
    }
    updateComposer();
  });
  socket.addEventListener("message", (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    handleFrame(frame);
  });
  socket.addEventListener("close", (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (event.code === 4401) { location.href = `/login/?next=${encodeURIComponent(location.pathname)}`; return; }
    if (event.code === 4403) {
      // Refused for its origin: retrying from the same page cannot help.
      setConn("closed", gettext("Refused by the server"));
      els.banner.dataset.kind = "connection";
      showBanner(gettext("The server refused this page's connection (its address is not one the site trusts). Open the site from its own address."), null);
      return;
    }
    if (state.pending.size) {
      // The server goes on writing these answers; once reconnected the page
      // reloads the conversation and follows them until they are done.
      for (const p of state.pending.values()) {
        if (p.node) p.node.querySelector(".msg-meta").textContent = gettext("Connection lost: the answer is still being written; reconnecting…");
      }
      state.pending.clear();
      state.reloadOnOpen = true;
    }
    updateComposer();
    const delay = Math.min(15000, 500 * 2 ** state.attempts) * (0.75 + Math.random() / 2);
    state.attempts += 1;
    setConn("closed", tr(gettext("Offline · retrying in %(seconds)s s"), { seconds: fmt(Math.round(delay / 1000)) }));
    if (state.attempts > 2) {
      els.banner.dataset.kind = "connection";
      showBanner(gettext("The connection to the server was lost; reconnecting…"), () => { clearTimeout(state.retryTimer); connect(); });
    }
    state.retryTimer = setTimeout(connect, delay);
  });
}

function send(frame) {
  if (!state.socket || state.socket.readyState !== WebSocket.OPEN) {
    showBanner(gettext("Not connected to the server yet; try again in a moment."), () => send(frame));
    return false;
  }
  state.socket.send(JSON.stringify(frame));
  return true;
}

function handleFrame(f) {
  if (f.type === "document_status") { documentStatus(f.document || f, true); return; }
  if (f.type === "pong") return;
  const p = state.pending.get(f.request_id);
  switch (f.type) {
    case "accepted": accepted(p, f); break;
    case "routed": if (p) { p.routed = f; if (p.node) p.node.querySelector(".msg-meta").textContent = [f.runner, f.model, ...(f.fallback ? [gettext("fallback")] : [])].join(" · "); } break;
    case "sources": if (p) { p.sources = f.sources; } break;
    case "notice": if (p && p.node) showNotice(p, f); break;
    case "sync": synced(p, f); break;
    case "token": if (p) { p.text += f.text; p.seq = f.seq; scheduleRender(p); } break;
    case "tool_call":
      if (p && f.step_id != null) { if (p.node) { renderStep(p.node, { ...f, status: "running" }, decide); scrollDown(); } }
      else if (p) { p.text += `\n\n\`${tr(gettext("tool call: %(call)s"), { call: `${f.name}(${f.arguments})` })}\`\n`; scheduleRender(p); }
      break;
    case "approval_request": if (p && p.node) approvalRequested(p, f); break;
    case "tool_result": if (p && p.node) { renderStep(p.node, f, decide); scrollDown(); } break;
    case "approval": break;
    case "error": frameError(p, f); break;
    case "done": if (p) finishPending(p, f); break;
    default: break;
  }
}

// An approval card must be seen and heard: scrolled into view whatever the
// position, announced, and the focus on Approve (in the conversation shown).
function approvalRequested(p, f) {
  const block = renderStep(p.node, { ...f, status: "awaiting_approval" }, decide);
  scrollDown(true);
  if (p.conversationId !== state.conversationId) return;
  announce(tr(gettext("Approval needed: run the tool %(tool)s? Approve or Deny."), { tool: f.name }));
  const approve = block.querySelector(".approval-card .approve");
  if (approve) approve.focus();
}

// The answer to an approval card (agent.js), from this socket whichever turn
// it belongs to; the focus goes back to the message box (the card goes away).
function decide(stepId, approved) {
  send({ type: "approve", request_id: requestId(), step_id: stepId, approved });
  els.prompt.focus();
}

function accepted(p, f) {
  if (!p) return;
  const isNew = state.conversationId === null && p.conversationId === null;
  p.conversationId = f.conversation_id;
  p.assistantId = f.assistant_message_id;
  if (isNew) {
    state.conversationId = f.conversation_id;
    history.replaceState({ id: f.conversation_id }, "", `/c/${f.conversation_id}/`);
    sharing.update();
    els.title.textContent = f.title;
    document.title = `${f.title} · BreezeWeb`;
    refreshList();
    if (state.projectId) projects.load(); // its count of conversations
  }
  if (state.conversationId !== f.conversation_id) return;
  if (p.userNode) {
    p.userNode.dataset.id = f.user_message_id;
    decorate(p.userNode, { ...p.userNode._message, id: f.user_message_id, status: "complete" });
  }
  const node = messageNode({ id: f.assistant_message_id, role: "assistant", content: "", status: "streaming" });
  els.messages.append(node);
  els.empty.hidden = true;
  p.node = node;
  p.body = node.querySelector(".msg-body");
  p.body.classList.add("streaming-cursor", "waiting");
  p.body.dataset.waiting = gettext("Thinking…");
  scrollDown(true);
  refreshRegenerate();
}

function showNotice(p, f) {
  const note = el("div", "notice", noticeText(f.code, f.message, f.data));
  note.dataset.code = f.code;
  const existing = p.node.querySelector(`.notice[data-code="${CSS.escape(String(f.code))}"]`);
  if (existing) existing.replaceWith(note); else p.node.insertBefore(note, p.body);
}

function frameError(p, f) {
  if (p && p.attach) {
    // The answer cannot be followed (deleted, or too many followed): the
    // saved text stays on the page.
    state.pending.delete(f.request_id);
    if (p.body) p.body.classList.remove("streaming-cursor");
    updateComposer();
    return;
  }
  let retry = null;
  if (f.retryable && p) {
    // After the turn was saved, retrying means answering it again; before, sending it again.
    retry = p.assistantId ? () => regenerate() : () => resend(p.frame);
  }
  showBanner(errorText(f.code, f.message, f.quota), retry);
  els.banner.dataset.kind = "error";
  if (p && !p.assistantId) {
    // Refused before anything was saved: give the text back to the composer.
    if (p.userNode) p.userNode.remove();
    if (p.frame && p.frame.type === "message" && !els.prompt.value) els.prompt.value = p.frame.text;
    state.pending.delete(f.request_id);
    updateComposer();
    refreshRegenerate();
  } else if (p) {
    p.error = f;
  }
}

function finishPending(p, f) {
  state.pending.delete(p.requestId);
  if (p.node) {
    p.body.classList.remove("streaming-cursor", "waiting");
    const m = {
      id: p.assistantId, role: "assistant", content: p.text, status: f.status || "complete",
      runner: f.runner || p.routed?.runner, model: f.model || p.routed?.model,
      fallback: f.fallback ?? p.routed?.fallback, usage: f.usage, timings: f.timings, cost: f.cost,
      sources: p.sources, error: p.error?.message, error_code: p.error?.code,
    };
    renderMarkdown(p.body, p.text);
    decorate(p.node, m);
    updateGauge([m], state.runners);
    // The finished answer, once (never token by token); failures are the banner's (assertive).
    if (p.conversationId === state.conversationId && m.status !== "failed") {
      const words = p.body.textContent.trim();
      announce(m.status === "stopped"
        ? tr(gettext("Answer stopped: %(text)s"), { text: words })
        : tr(gettext("Answer: %(text)s"), { text: words }));
    }
  }
  updateComposer();
  refreshRegenerate();
  // A regenerated or edited turn made a new branch: reload to show its "n / m"
  // (in the background: a message the user started editing meanwhile stays).
  if (p.frame && p.frame.type !== "message" && p.conversationId === state.conversationId) {
    openConversation(state.conversationId, false, null, true);
  }
}

function resend(frame) {
  const copy = { ...frame, request_id: requestId() };
  if (copy.type === "message") {
    // A message that was never saved is sent again as it was.
    startRequest(copy, true);
  } else {
    startRequest(copy, false);
  }
}

function startRequest(frame, showUser) {
  const p = { requestId: frame.request_id, frame, text: "", conversationId: frame.conversation_id ?? null, node: null, body: null };
  if (showUser) {
    const node = messageNode({ role: "user", content: frame.text, images: frame.images || [], status: "streaming" });
    els.messages.append(node);
    els.empty.hidden = true;
    p.userNode = node;
    node._message = { role: "user", content: frame.text, images: frame.images || [] };
  }
  if (!send(frame)) { if (p.userNode) p.userNode.remove(); return; }
  state.pending.set(frame.request_id, p);
  hideBanner();
  updateComposer();
  refreshRegenerate();
  scrollDown(true);
}

// Agent mode and the user's time zone (for the time tool), sent with every answering frame.
function agentFields() {
  const fields = { agent: els.agent.checked };
  try {
    const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (zone && zone.length <= 64) fields.timezone = zone;
  } catch { /* no Intl time zones: the server's is used */ }
  return fields;
}

function sendMessage() {
  const text = els.prompt.value;
  if (!text.trim() && !state.images.length) return;
  if (busyHere()) return;
  const frame = {
    type: "message",
    request_id: requestId(),
    conversation_id: state.conversationId,
    text,
    runner: els.runner.value,
    rag: els.rag.checked,
    ...agentFields(),
  };
  if (state.conversationId === null && state.projectId) frame.project_id = state.projectId;
  if (state.images.length) frame.images = state.images.slice();
  startRequest(frame, true);
  if (state.pending.has(frame.request_id)) {
    els.prompt.value = "";
    state.images = [];
    renderAttachments();
    autosize();
    // Sent with the button or Enter: the message box is where the next one is written.
    els.prompt.focus();
  }
}

function regenerate() {
  if (!state.conversationId || busyHere()) return;
  // Drop the last answer from view; the server replaces it.
  const answers = els.messages.querySelectorAll(".msg-assistant");
  const last = answers[answers.length - 1];
  const frame = { type: "regenerate", request_id: requestId(), conversation_id: state.conversationId, runner: els.runner.value, rag: els.rag.checked, ...agentFields() };
  if (send(frame)) {
    if (last) last.remove();
    state.pending.set(frame.request_id, { requestId: frame.request_id, frame, text: "", conversationId: state.conversationId });
    hideBanner();
    updateComposer();
  }
}

function startEdit(node, m) {
  if (busyHere()) return;
  const body = node.querySelector(".msg-body");
  const area = el("textarea", "edit-area");
  area.value = m.content;
  const save = el("button", "btn small", gettext("Save & send"));
  const cancel = el("button", "link-btn", gettext("Cancel"));
  save.type = cancel.type = "button";
  const box = el("div", "edit-box");
  box.append(area, save, cancel);
  body.replaceWith(box);
  area.setAttribute("aria-label", gettext("Edit your message"));
  area.focus();
  const editButton = node.querySelector(".msg-actions button:last-child");
  const closeEdit = () => { box.replaceWith(body); editButton?.focus(); };
  cancel.addEventListener("click", closeEdit);
  area.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.preventDefault(); closeEdit(); } });
  save.addEventListener("click", () => {
    const text = area.value;
    if (!text.trim()) return;
    const frame = { type: "edit", request_id: requestId(), conversation_id: state.conversationId, message_id: Number(m.id), text, runner: els.runner.value, rag: els.rag.checked, ...agentFields() };
    if (!send(frame)) return;
    // Everything after the edited message goes, on the server and here.
    let next = node.nextElementSibling;
    while (next) { const after = next.nextElementSibling; if (next.classList.contains("msg")) next.remove(); next = after; }
    body.textContent = text;
    box.replaceWith(body);
    node._message = { ...m, content: text };
    state.pending.set(frame.request_id, { requestId: frame.request_id, frame, text: "", conversationId: state.conversationId, userNode: node });
    updateComposer();
    els.prompt.focus();
  });
}

function stopAll() {
  for (const p of state.pending.values()) {
    if (p.conversationId === state.conversationId || p.conversationId === null) send({ type: "stop", request_id: p.requestId });
  }
}

function updateComposer() {
  const busy = busyHere();
  // The button about to hide must not take the keyboard focus with it.
  const lost = (busy && document.activeElement === els.send) || (!busy && document.activeElement === els.stop);
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  if (lost) els.prompt.focus();
  els.send.disabled = !state.socket || state.socket.readyState !== WebSocket.OPEN;
}

els.composer.addEventListener("submit", (e) => { e.preventDefault(); sendMessage(); });
els.stop.addEventListener("click", stopAll);
els.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendMessage(); }
});
function autosize() {
  els.prompt.style.height = "auto";
  els.prompt.style.height = `${Math.min(els.prompt.scrollHeight, 240)}px`;
}
els.prompt.addEventListener("input", autosize);
els.runner.addEventListener("change", updateCaps);
els.bannerClose.addEventListener("click", hideBanner);
els.menu.addEventListener("click", () => {
  const open = !els.sidebar.classList.contains("open");
  els.sidebar.classList.toggle("open", open);
  els.menu.setAttribute("aria-expanded", String(open));
});
function closeSidebar() { els.sidebar.classList.remove("open"); els.menu.setAttribute("aria-expanded", "false"); }
// On a phone the list overlays the chat: a tap on the chat closes it.
document.querySelector(".chat-main").addEventListener("click", (e) => {
  if (els.sidebar.classList.contains("open") && !e.target.closest("#menu-toggle")) closeSidebar();
});

// ---- images ---------------------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addImages(files) {
  if (!canSeeImages()) { showBanner(gettext("The chosen runner cannot see images; pick a runner with vlm.")); return; }
  for (const file of files) {
    if (!file.type.startsWith("image/")) { showBanner(tr(gettext("%(name)s is not an image."), { name: file.name })); continue; }
    if (file.size > boot.image_max_bytes) {
      showBanner(tr(gettext("%(name)s is %(size)s MB; images can be at most %(max)s MB."), {
        name: file.name, size: fmt(file.size / 1048576, 1), max: fmt(boot.image_max_bytes / 1048576, 1),
      }));
      continue;
    }
    if (state.images.length >= 4) { showBanner(tr(gettext("At most %(count)s images per message."), { count: fmt(4) })); break; }
    state.images.push(await readAsDataURL(file));
  }
  renderAttachments();
}

function renderAttachments() {
  els.attachments.textContent = "";
  els.attachments.hidden = !state.images.length;
  state.images.forEach((url, index) => {
    const wrap = el("div", "thumb");
    const img = el("img"); img.src = url; img.alt = tr(gettext("attachment %(number)s"), { number: fmt(index + 1) });
    const remove = el("button", "icon-btn", "✕"); remove.type = "button";
    remove.setAttribute("aria-label", tr(gettext("Remove image %(number)s"), { number: fmt(index + 1) }));
    remove.addEventListener("click", () => { state.images.splice(index, 1); renderAttachments(); });
    wrap.append(img, remove);
    els.attachments.append(wrap);
  });
}

els.attach.addEventListener("click", () => els.imageInput.click());
els.imageInput.addEventListener("change", () => { addImages([...els.imageInput.files]); els.imageInput.value = ""; });
els.prompt.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) { e.preventDefault(); addImages(files); }
});

// ---- documents ------------------------------------------------------------------------------

const uploads = new Map(); // document id -> list item
const lastStatus = new Map(); // document id -> newest status seen (frames can beat the upload's response)
let uploading = 0;
const STAGE = { queued: 0, processing: 1, ready: 2, failed: 2 };

function newer(a, b) {
  if (!a) return b;
  if (!b) return a;
  const stage = (STAGE[b.status] ?? 0) - (STAGE[a.status] ?? 0);
  if (stage !== 0) return stage > 0 ? b : a;
  return (b.progress ?? 0) >= (a.progress ?? 0) ? b : a;
}

els.toggleDocs.addEventListener("click", () => {
  els.documents.hidden = !els.documents.hidden;
  els.toggleDocs.setAttribute("aria-expanded", String(!els.documents.hidden));
  // The panel opens above the message box: take the keyboard to its file picker.
  if (!els.documents.hidden) els.pickDocs.focus();
});
els.pickDocs.addEventListener("click", () => els.docInput.click());
els.docInput.addEventListener("change", () => { [...els.docInput.files].forEach(upload); els.docInput.value = ""; });
for (const type of ["dragenter", "dragover"]) {
  els.dropzone.addEventListener(type, (e) => { e.preventDefault(); els.dropzone.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  els.dropzone.addEventListener(type, () => els.dropzone.classList.remove("over"));
}
els.dropzone.addEventListener("drop", (e) => { e.preventDefault(); [...e.dataTransfer.files].forEach(upload); });
// Dropping a file anywhere else must not navigate away from the chat.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer?.files?.length) { els.documents.hidden = false; [...e.dataTransfer.files].forEach(upload); }
});

function uploadItem(name) {
  const li = el("li", "upload");
  const label = el("span", "upload-name", name);
  const bar = el("progress"); bar.max = 1; bar.value = 0;
  const status = el("span", "upload-status muted", gettext("uploading"));
  li.append(label, bar, status);
  els.uploads.prepend(li);
  return { li, bar, status };
}

function upload(file) {
  const item = uploadItem(file.name);
  if (file.size > boot.upload_max_bytes) {
    item.status.textContent = tr(gettext("too large (max %(max)s MB)"), { max: fmt(boot.upload_max_bytes / 1048576) });
    item.li.classList.add("failed");
    return;
  }
  const form = new FormData();
  form.append("file", file);
  const xhr = new XMLHttpRequest();
  uploading += 1;
  xhr.addEventListener("loadend", () => { uploading -= 1; });
  xhr.open("POST", "/api/documents");
  xhr.setRequestHeader("X-CSRFToken", boot.csrf_token);
  xhr.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) { item.bar.value = e.loaded / e.total; item.status.textContent = tr(gettext("uploading %(percent)s%"), { percent: fmt(100 * e.loaded / e.total) }); }
  });
  xhr.addEventListener("load", () => {
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    if (xhr.status >= 200 && xhr.status < 300 && body.documents && body.documents.length) {
      const doc = body.documents[0];
      uploads.set(doc.id, item);
      item.bar.value = 0;
      documentStatus(newer(lastStatus.get(doc.id), doc));
    } else {
      item.li.classList.add("failed");
      item.status.textContent = (body.error && body.error.message) || tr(gettext("upload failed (HTTP %(status)s)"), { status: xhr.status });
    }
  });
  xhr.addEventListener("error", () => { item.li.classList.add("failed"); item.status.textContent = gettext("upload failed: network error"); });
  xhr.send(form);
}

function documentStatus(doc, live = false) {
  if (!doc || doc.id == null) return;
  // Live frames arrive in order, so they are taken as they come (a run that
  // died and was queued again goes back to "queued"); only the upload's HTTP
  // response, which can arrive after them, must not move a document backwards.
  if (!live) doc = newer(lastStatus.get(doc.id), doc);
  lastStatus.set(doc.id, doc);
  let item = uploads.get(doc.id);
  if (!item) {
    // Probably one of ours whose upload response has not arrived yet: it will
    // pick this status up then. Otherwise (another tab) show it.
    if (uploading) return;
    item = uploadItem(doc.title || tr(gettext("Document %(id)s"), { id: doc.id }));
    uploads.set(doc.id, item);
  }
  const progress = typeof doc.progress === "number" ? doc.progress : 0;
  item.bar.value = doc.status === "ready" ? 1 : progress;
  item.li.dataset.status = doc.status;
  item.li.classList.toggle("failed", doc.status === "failed");
  const chunks = doc.chunk_count ?? 0;
  const labels = {
    queued: gettext("queued"),
    processing: tr(gettext("indexing %(percent)s%"), { percent: fmt(progress * 100) }),
    ready: tr(ngettext("ready · %(count)s chunk", "ready · %(count)s chunks", chunks), { count: fmt(chunks) }),
    failed: tr(gettext("failed: %(error)s"), { error: doc.error || gettext("unknown error") }),
  };
  item.status.textContent = labels[doc.status] || doc.status;
}

// ---- keyboard shortcuts ---------------------------------------------------------------------
// Alt+Shift+letter (Option+Shift on a Mac, matched by the physical key): free in
// Chromium, Firefox and Safari and left alone by NVDA, JAWS and VoiceOver, whose
// own keys use Insert, Caps Lock or Ctrl+Option. "?" only outside text fields.

function focusPrompt() {
  closeSidebar();
  els.prompt.focus();
}

function focusSearch() {
  if (getComputedStyle(els.menu).display !== "none") {
    els.sidebar.classList.add("open");
    els.menu.setAttribute("aria-expanded", "true");
  }
  els.search.focus();
  els.search.select();
}

function stopShortcut() {
  if (busyHere()) { stopAll(); announce(gettext("Stopping the answer.")); }
}

function copyLastAnswer() {
  const answers = [...els.messages.querySelectorAll(".msg-assistant")].filter((n) => n._message);
  const last = answers[answers.length - 1];
  if (!last) { announce(gettext("There is no answer to copy yet.")); return; }
  copyText(last._message.content, last.querySelector(".msg-actions button"));
  announce(gettext("Copied the last answer."));
}

let shortcutsOpener = null;
function showShortcuts() {
  if (els.shortcuts.open) return;
  shortcutsOpener = document.activeElement;
  els.shortcuts.showModal();
  $("shortcuts-close").focus();
}
els.shortcuts.addEventListener("close", () => {
  // Back to where the reader was (the button, the message box, ...).
  if (shortcutsOpener && document.contains(shortcutsOpener)) shortcutsOpener.focus();
  shortcutsOpener = null;
});
els.showShortcuts.addEventListener("click", showShortcuts);

const SHORTCUTS = { KeyN: () => newChat(), KeyM: focusPrompt, KeyS: stopShortcut, KeyC: copyLastAnswer, KeyF: focusSearch };

function inTextField(target) {
  return !!target.closest?.("input, textarea, select, [contenteditable='true']");
}

document.addEventListener("keydown", (e) => {
  if (e.defaultPrevented || e.isComposing || els.shortcuts.open) return;
  if (e.altKey && e.shiftKey && !e.ctrlKey && !e.metaKey && SHORTCUTS[e.code]) {
    e.preventDefault();
    SHORTCUTS[e.code]();
    return;
  }
  const help = (e.key === "/" && (e.ctrlKey || e.metaKey) && !e.altKey)
    || (e.key === "?" && !e.ctrlKey && !e.metaKey && !e.altKey && !inTextField(e.target));
  if (help) { e.preventDefault(); showShortcuts(); return; }
  if (e.key === "Escape" && busyHere()) { stopShortcut(); return; }
  if (e.key === "Escape" && els.sidebar.classList.contains("open")) { closeSidebar(); els.menu.focus(); }
});

// ---- start ----------------------------------------------------------------------------------

updateCaps();
if (boot.conversation) renderConversation(boot.conversation);
if (boot.conversation && location.hash.startsWith("#m")) revealMessage(els.messages, Number(location.hash.slice(2)));
projects.load();
connect();
els.prompt.focus();
