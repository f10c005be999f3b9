// Wires the page together: tabs, the API key field, the auth banner.

import { getKey, onAuth, setKey } from "./api.js";
import { startDashboard, refreshDashboard } from "./dashboard.js";
import { setupPlayground } from "./playground.js";

const $ = (id) => document.getElementById(id);

function showTab(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(on));
    $(tab.dataset.tab).hidden = !on;
  }
  if (name === "dashboard") refreshDashboard();
}

function setupTabs() {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => {
      history.replaceState(null, "", `#${tab.dataset.tab}`);
      showTab(tab.dataset.tab);
    });
  }
  showTab(location.hash === "#dashboard" ? "dashboard" : "playground");
}

function setupKey() {
  const input = $("api-key");
  input.value = getKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey(input.value.trim());
    refreshDashboard();
  });
  $("key-clear").addEventListener("click", () => {
    input.value = "";
    setKey("");
    refreshDashboard();
  });
  onAuth((ok, message) => {
    $("auth-banner").hidden = ok;
    // Without a key the headline says it all; with one, say that it was refused.
    $("auth-detail").textContent = ok || !getKey() ? "" : `The saved key was refused: ${message}`;
    document.body.classList.toggle("needs-key", !ok);
  });
}

setupKey();
setupPlayground();
setupTabs();
startDashboard();
