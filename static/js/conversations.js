// The conversation list's own parts (docs/conversations.md): search results
// with highlighted snippets, projects (a folder with instructions and defaults
// for new chats), moving chats between projects (drag, or the Move action) and
// pinning. chat.js owns the list itself and calls in here.
// Everything the server sends is shown as text, never as HTML.

import { LANG, el, gettext, ngettext, tr } from "./dom.js";

// A search match: the snippet as text, with <mark> around the ranges that matched.
export function snippetNode(match) {
  const node = el("div", "snippet");
  const text = match.snippet || "";
  let at = 0;
  for (const [start, end] of match.highlights || []) {
    if (start < at || end > text.length) continue;
    node.append(document.createTextNode(text.slice(at, start)), el("mark", "", text.slice(start, end)));
    at = end;
  }
  node.append(document.createTextNode(text.slice(at)));
  return node;
}

// Scroll a message into view and flash it (a search result opened "at the message").
export function revealMessage(container, messageId) {
  const node = container.querySelector(`.msg[data-id="${Number(messageId)}"]`);
  if (!node) return false;
  node.scrollIntoView({ block: "center" });
  node.classList.add("found");
  setTimeout(() => node.classList.remove("found"), 2500);
  return true;
}

// "‹ 2 / 3 ›" under a message that has siblings (other versions at the same
// point of the tree: regenerated answers, edited messages); null without any.
export function branchNav(m, onSwitch) {
  const siblings = m.siblings || [];
  if (siblings.length < 2 || !m.id) return null;
  const at = siblings.indexOf(Number(m.id));
  const nav = el("span", "branch-nav");
  const prev = el("button", "link-btn branch-prev", "‹");
  const next = el("button", "link-btn branch-next", "›");
  prev.type = next.type = "button";
  prev.setAttribute("aria-label", gettext("Previous version"));
  next.setAttribute("aria-label", gettext("Next version"));
  prev.disabled = at <= 0;
  next.disabled = at >= siblings.length - 1;
  prev.addEventListener("click", () => onSwitch(siblings[at - 1]));
  next.addEventListener("click", () => onSwitch(siblings[at + 1]));
  const label = el("span", "branch-count", `${at + 1} / ${siblings.length}`);
  label.setAttribute("aria-label", tr(gettext("Version %(n)s of %(count)s"), { n: at + 1, count: siblings.length }));
  nav.append(prev, label, next);
  return nav;
}

export class Projects {
  // api(path, options): chat.js's fetch helper; onChange(): the list must be reloaded.
  constructor({ api, runners, onChange, onError }) {
    this.api = api;
    this.runners = runners;
    this.onChange = onChange;
    this.onError = onError;
    this.projects = [];
    this.current = null;            // the selected project's id; null: all chats
    this.list = document.getElementById("project-list");
    this.dialog = document.getElementById("project-dialog");
    this.form = document.getElementById("project-form");
    document.getElementById("new-project").addEventListener("click", () => this.edit(null));
    this.list.addEventListener("click", (e) => this.clicked(e));
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.save(); });
    document.getElementById("project-cancel").addEventListener("click", () => this.dialog.close());
    document.getElementById("project-delete").addEventListener("click", () => this.remove());
    const runner = this.form.elements.runner;
    for (const r of runners) runner.append(new Option(`${r.name} · ${r.kind}`, r.name));
    for (const type of ["dragover", "dragenter"]) {
      this.list.addEventListener(type, (e) => {
        const target = e.target.closest("[data-project]");
        if (target && e.dataTransfer.types.includes("application/x-conversation")) {
          e.preventDefault();
          target.classList.add("drop");
        }
      });
    }
    this.list.addEventListener("dragleave", (e) => e.target.closest("[data-project]")?.classList.remove("drop"));
    this.list.addEventListener("drop", (e) => {
      const target = e.target.closest("[data-project]");
      const id = Number(e.dataTransfer.getData("application/x-conversation"));
      if (!target || !id) return;
      e.preventDefault();
      target.classList.remove("drop");
      this.move(id, target.dataset.project ? Number(target.dataset.project) : null);
    });
  }

  byId(id) { return this.projects.find((p) => p.id === id) || null; }

  async load() {
    try {
      this.projects = (await this.api("/api/projects")).projects;
    } catch (error) {
      this.onError(tr(gettext("Could not load projects: %(error)s"), { error: error.message }));
    }
    if (this.current !== null && !this.byId(this.current)) this.current = null;
    this.render();
  }

  render() {
    this.list.textContent = "";
    const all = this.item(null, gettext("All chats"));
    this.list.append(all);
    for (const p of this.projects) this.list.append(this.item(p, p.name));
  }

  item(project, label) {
    const li = el("li", "project-item");
    li.dataset.project = project ? project.id : "";
    li.classList.toggle("active", (project ? project.id : null) === this.current);
    const open = el("button", "project-link link-btn", label);
    open.type = "button";
    open.dataset.action = "open";
    open.setAttribute("aria-pressed", String(li.classList.contains("active")));
    li.append(open);
    if (project) {
      const count = el("span", "muted project-count", String(project.conversation_count));
      const settings = el("button", "icon-btn", "⚙");
      settings.type = "button";
      settings.dataset.action = "settings";
      settings.title = gettext("Project settings");
      settings.setAttribute("aria-label", tr(gettext("Settings of %(project)s"), { project: project.name }));
      li.append(count, settings);
    }
    return li;
  }

  clicked(e) {
    const li = e.target.closest("[data-project]");
    if (!li) return;
    const id = li.dataset.project ? Number(li.dataset.project) : null;
    const action = e.target.closest("[data-action]")?.dataset.action;
    if (action === "settings") { this.edit(this.byId(id)); return; }
    if (action === "open") { this.current = id; this.render(); this.onChange({ selected: true }); }
  }

  edit(project) {
    const f = this.form.elements;
    this.editing = project;
    f.name.value = project ? project.name : "";
    f.instructions.value = project ? project.instructions : "";
    f.runner.value = project && project.runner ? project.runner : "auto";
    f.rag.checked = project ? project.rag : false;
    f.temperature.value = project && project.temperature != null ? project.temperature : "";
    f.max_tokens.value = project && project.max_tokens != null ? project.max_tokens : "";
    document.getElementById("project-delete").hidden = !project;
    document.getElementById("project-dialog-title").textContent = project ? gettext("Project settings") : gettext("New project");
    document.getElementById("project-error").textContent = "";
    this.dialog.showModal();
    f.name.focus();
  }

  async save() {
    const f = this.form.elements;
    const body = {
      name: f.name.value,
      instructions: f.instructions.value,
      runner: f.runner.value === "auto" ? null : f.runner.value,
      rag: f.rag.checked,
      temperature: f.temperature.value === "" ? null : Number(f.temperature.value),
      max_tokens: f.max_tokens.value === "" ? null : Number(f.max_tokens.value),
    };
    const editing = this.editing;
    try {
      const saved = await this.api(editing ? `/api/projects/${editing.id}` : "/api/projects", { method: editing ? "PATCH" : "POST", json: body });
      this.dialog.close();
      if (!editing) this.current = saved.id;
      await this.load();
      this.onChange({ selected: !editing });
    } catch (error) {
      document.getElementById("project-error").textContent = error.message;
    }
  }

  async remove() {
    const project = this.editing;
    if (!project || !confirm(`${gettext("Delete the project")} “${project.name}”? ${gettext("Its conversations are kept.")}`)) return;
    try {
      await this.api(`/api/projects/${project.id}`, { method: "DELETE" });
      this.dialog.close();
      if (this.current === project.id) this.current = null;
      await this.load();
      this.onChange({ selected: true });
    } catch (error) {
      document.getElementById("project-error").textContent = error.message;
    }
  }

  async move(conversationId, projectId) {
    try {
      await this.api(`/api/conversations/${conversationId}`, { method: "PATCH", json: { project_id: projectId } });
      await this.load();
      this.onChange({ selected: false });
    } catch (error) {
      this.onError(tr(gettext("Could not move the conversation: %(error)s"), { error: error.message }));
    }
  }

  // The Move action of a conversation: a select of the projects, in place of its link.
  chooseFor(li, currentProjectId) {
    const select = el("select", "move-select");
    select.setAttribute("aria-label", gettext("Move to project"));
    select.append(new Option(gettext("No project"), ""));
    for (const p of this.projects) select.append(new Option(p.name, String(p.id)));
    select.value = currentProjectId ? String(currentProjectId) : "";
    const link = li.querySelector(".conversation-link");
    link.replaceWith(select);
    select.focus();
    let done = false;
    const finish = (apply) => {
      if (done) return;
      done = true;
      select.replaceWith(link);
      const chosen = select.value ? Number(select.value) : null;
      if (apply && chosen !== (currentProjectId || null)) this.move(Number(li.dataset.id), chosen);
    };
    select.addEventListener("change", () => finish(true));
    select.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.preventDefault(); finish(false); } });
    select.addEventListener("blur", () => finish(false));
  }
}

// The Share dialog: create a read-only link to the open conversation, list its
// links and revoke them.
export class Sharing {
  constructor({ api, conversationId }) {
    this.api = api;
    this.conversationId = conversationId; // () => the open conversation's id, or null
    this.dialog = document.getElementById("share-dialog");
    this.form = document.getElementById("share-form");
    this.list = document.getElementById("share-list");
    this.error = document.getElementById("share-error");
    this.button = document.getElementById("share-open");
    this.button.addEventListener("click", () => this.open());
    document.getElementById("share-close").addEventListener("click", () => this.dialog.close());
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.create(); });
  }

  update() { this.button.hidden = !this.conversationId(); }

  async open() {
    const base = `/api/conversations/${this.conversationId()}/export`;
    document.getElementById("export-md").href = `${base}?format=md`;
    document.getElementById("export-json").href = `${base}?format=json`;
    document.getElementById("share-new").hidden = true;
    this.error.textContent = "";
    this.dialog.showModal();
    await this.load();
  }

  async load() {
    try {
      const body = await this.api(`/api/conversations/${this.conversationId()}/shares`);
      this.list.textContent = "";
      if (!body.shares.length) this.list.append(el("li", "muted", gettext("None yet.")));
      for (const share of body.shares) this.list.append(this.item(share));
    } catch (error) { this.error.textContent = error.message; }
  }

  item(share) {
    const li = el("li");
    li.dataset.active = String(share.active);
    const state = share.revoked ? gettext("revoked") : share.active ? gettext("active") : gettext("expired");
    const until = share.expires_at ? ` · ${tr(gettext("until %(when)s"), { when: new Date(share.expires_at).toLocaleString(LANG) })}` : "";
    li.append(el("code", "", `${share.prefix}…`), el("span", "", `${state}${until} · ${tr(ngettext("%(count)s view", "%(count)s views", share.views), { count: share.views })}`));
    if (!share.revoked) {
      const revoke = el("button", "link-btn danger", gettext("Revoke"));
      revoke.type = "button";
      revoke.addEventListener("click", async () => {
        try { await this.api(`/api/shares/${share.id}`, { method: "DELETE" }); await this.load(); }
        catch (error) { this.error.textContent = error.message; }
      });
      li.append(revoke);
    }
    return li;
  }

  async create() {
    const days = this.form.elements.expires_in_days.value;
    try {
      const share = await this.api(`/api/conversations/${this.conversationId()}/shares`, {
        method: "POST", json: { expires_in_days: days ? Number(days) : null },
      });
      const input = document.getElementById("share-url");
      input.value = new URL(share.url, location.origin).href;
      document.getElementById("share-new").hidden = false;
      input.select();
      await this.load();
    } catch (error) { this.error.textContent = error.message; }
  }
}

// Longer than the server's chat.transfer.STALE_AFTER_SECONDS (300 s).
const IMPORT_STALL_MS = 6 * 60 * 1000;

// Why an import failed, by the job's `error_code` (chat.transfer.IMPORT_ERRORS,
// which tests/test_i18n.py checks against this map); a job without a code
// (an older one) or with a code this map does not know shows the server's `error`.
export const IMPORT_ERROR_TEXT = {
  stale: gettext("The import stopped when the server restarted; import the file again."),
  not_json: gettext("The file is not JSON text."),
  unknown_format: gettext("The file is neither a BreezeWeb export nor ChatGPT's conversations.json."),
  not_a_list: gettext("The file's list of conversations is not a list."),
  internal: gettext("The import failed; the server logged why."),
};

export function importErrorText(job) {
  return Object.hasOwn(IMPORT_ERROR_TEXT, job.error_code) ? IMPORT_ERROR_TEXT[job.error_code] : job.error;
}

// Import a BreezeWeb export or ChatGPT's conversations.json: the server works
// through it in the background; the banner shows its progress, then its report.
export function initImport({ api, onDone, say }) {
  const input = document.getElementById("import-input");
  document.getElementById("import-open").addEventListener("click", () => input.click());
  input.addEventListener("change", async () => {
    const file = input.files[0];
    input.value = "";
    if (!file) return;
    try {
      let job = await api("/api/imports", { method: "POST", body: file, headers: { "Content-Type": "application/json" } });
      // Polled until done or failed (the server settles an import a restart
      // stopped as failed); a job whose progress does not move for longer than
      // the server waits before settling it is given up on here too.
      let progress = -1, moved = Date.now();
      while (job.status === "queued" || job.status === "running") {
        if (job.done !== progress) { progress = job.done; moved = Date.now(); }
        if (Date.now() - moved > IMPORT_STALL_MS) { say(gettext("The import is not progressing; reload the page later to see if it finished.")); return; }
        say(tr(gettext("Importing %(name)s: %(done)s / %(total)s"), { name: file.name, done: job.done, total: job.total || "?" }));
        await new Promise((resolve) => setTimeout(resolve, 700));
        job = await api(`/api/imports/${job.id}`);
      }
      if (job.status === "failed") { say(tr(gettext("Import failed: %(error)s"), { error: importErrorText(job) })); return; }
      const imported = job.report.imported.length;
      const skipped = job.report.skipped.length;
      const partly = job.report.imported.filter((c) => c.skipped_messages.length).length;
      say(partly
        ? tr(gettext("Imported %(imported)s (%(partly)s with messages left out), skipped %(skipped)s."), { imported, partly, skipped })
        : tr(gettext("Imported %(imported)s, skipped %(skipped)s."), { imported, skipped }));
      onDone();
    } catch (error) { say(tr(gettext("Import failed: %(error)s"), { error: error.message })); }
  });
}

// How full the runner's context is after the last answer: its prompt and answer
// tokens against the context budget of the runner that answered.
export function updateGauge(messages, runners) {
  const gauge = document.getElementById("context-gauge");
  if (!gauge) return;
  const last = [...(messages || [])].reverse().find((m) => m.role === "assistant" && m.usage && m.usage.prompt_tokens != null);
  const runner = last && runners.find((r) => r.name === last.runner);
  if (!last || !runner || !runner.context_tokens) { gauge.hidden = true; return; }
  const used = (last.usage.prompt_tokens || 0) + (last.usage.completion_tokens || 0);
  const meter = gauge.querySelector("meter");
  meter.max = runner.context_tokens;
  meter.value = Math.min(used, runner.context_tokens);
  meter.low = runner.context_tokens * 0.7;
  meter.high = runner.context_tokens * 0.9;
  meter.optimum = 0;
  const label = tr(gettext("Context: %(used)s / %(limit)s tokens"), { used: used.toLocaleString(LANG), limit: runner.context_tokens.toLocaleString(LANG) });
  gauge.querySelector(".gauge-label").textContent = label;
  meter.setAttribute("aria-label", label);
  gauge.hidden = false;
}

// "≈ 0.0012 USD" for an answer of a priced runner.
export function costText(cost) {
  if (!cost || typeof cost.amount !== "number") return "";
  const digits = cost.amount >= 1 ? 2 : 4;
  return `≈ ${cost.amount.toFixed(digits)} ${cost.currency}`;
}
