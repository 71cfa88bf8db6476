// Agent steps in the chat (docs/agents.md): each tool call of an answer is a
// collapsible block (tool, arguments, result or error, duration), updated live
// from the tool_call / approval_request / tool_result frames and drawn again
// from the saved steps when a conversation is opened. A step that waits for
// approval carries an approval card whose buttons send the `approve` frame.
// Text only (textContent), never HTML from a tool.

import { el, gettext } from "./dom.js";

const STATUS = {
  running: () => gettext("running…"),
  awaiting_approval: () => gettext("waiting for your approval"),
  ok: () => gettext("done"),
  error: () => gettext("error"),
  denied: () => gettext("denied"),
  cancelled: () => gettext("cancelled"),
};

// The steps block of an answer's node, made on first use (above the answer text).
export function stepsOf(node) {
  let box = node.querySelector(".msg-steps");
  if (!box) {
    box = el("div", "msg-steps");
    box.setAttribute("aria-label", gettext("Tool calls"));
    node.insertBefore(box, node.querySelector(".msg-body"));
  }
  return box;
}

function pretty(json) {
  try { return JSON.stringify(JSON.parse(json), null, 2); } catch { return json || ""; }
}

// Draw or update one step. `decide(stepId, approved)` answers an approval card.
export function renderStep(node, step, decide) {
  const box = stepsOf(node);
  const key = step.step_id != null ? String(step.step_id) : `${step.round}:${step.id}`;
  let block = box.querySelector(`.step[data-key="${CSS.escape(key)}"]`);
  if (!block) {
    block = el("details", "step");
    block.dataset.key = key;
    box.append(block);
  }
  const status = step.status || "running";
  block.dataset.status = status;
  block.textContent = "";
  const summary = el("summary", "step-summary");
  summary.append(el("span", "step-name", step.name), el("span", "step-status", (STATUS[status] || (() => status))()));
  if (step.duration_ms != null) summary.append(el("span", "step-duration", `${Math.round(step.duration_ms)} ms`));
  block.append(summary);
  block.append(el("div", "step-label", gettext("Arguments")), el("pre", "step-arguments", pretty(step.arguments)));
  if (step.result) block.append(el("div", "step-label", gettext("Result")), el("pre", "step-result", step.result));
  if (step.error) block.append(el("div", "step-error", step.error));
  if (status === "awaiting_approval" && step.step_id != null) {
    block.open = true;
    const card = el("div", "approval-card");
    card.setAttribute("role", "group");
    const question = el("p", "approval-question", gettext("Run this tool with these arguments?"));
    question.id = `approval-question-${step.step_id}`;
    card.setAttribute("aria-labelledby", question.id);
    card.append(question);
    const approve = el("button", "btn small approve", gettext("Approve"));
    const deny = el("button", "btn small deny", gettext("Deny"));
    approve.type = deny.type = "button";
    const answer = (approved) => {
      approve.disabled = deny.disabled = true;
      decide(step.step_id, approved);
    };
    approve.addEventListener("click", () => answer(true));
    deny.addEventListener("click", () => answer(false));
    card.append(approve, deny);
    block.append(card);
  }
  return block;
}

// Every saved step of a message (on reload).
export function renderSteps(node, steps, decide) {
  for (const step of steps || []) renderStep(node, step, decide);
}
