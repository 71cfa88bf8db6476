// Fills the runner list's "Health" column: one request per row to the admin's
// JSON health endpoint, so a slow runner never holds up the page.
"use strict";

// Text through Django's JavaScript catalog (change_list.html loads it).
const gettext = window.gettext || ((s) => s);
const interpolate = window.interpolate
  || ((format, values) => format.replace(/%\((\w+)\)s/g, (_, name) => String(values[name])));

function showHealth(cell, data) {
  const ms = data.latency_ms === null ? ""
    : ` (${interpolate(gettext("%(ms)s ms"), { ms: new Intl.NumberFormat(document.documentElement.lang || undefined).format(Math.round(data.latency_ms)) }, true)})`;
  cell.textContent = (data.ok ? gettext("healthy") : gettext("unhealthy")) + ms;
  cell.title = data.detail;
  cell.classList.add(data.ok ? "runner-health-ok" : "runner-health-bad");
  if (!data.ok) {
    const detail = document.createElement("small");
    detail.className = "runner-health-detail";
    detail.textContent = data.detail;
    cell.append(document.createElement("br"), detail);
  }
}

async function checkRow(cell) {
  try {
    const response = await fetch(cell.dataset.healthUrl, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (!response.ok) {
      throw new Error(`HTTP ${response.status}`);
    }
    showHealth(cell, await response.json());
  } catch (error) {
    cell.textContent = interpolate(gettext("health unknown (%(error)s)"), { error: error.message }, true);
    cell.classList.add("runner-health-bad");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".runner-health[data-health-url]").forEach(checkRow);
});
