// The dashboard: GET /v1/dashboard every few seconds, drawn into the page.

import { api, money } from "./api.js";
import { barChart, decimalsFor } from "./charts.js";
import { setSizes } from "./playground.js";

const $ = (id) => document.getElementById(id);
let timer = null;
let refreshS = 3;
let last = null;

const pct = (share) => (share === null || share === undefined ? "–" : `${Math.round(share * 100)}%`);

function set(id, text) {
  $(id).textContent = text;
}

function cell(text, cls = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

function renderKpis(d) {
  const t = d.today;
  set("kpi-queue", String(d.queued));
  set("kpi-queue-sub", d.local.length
    ? d.local.map((m) => `${m.model} ${m.queued}`).join(" · ")
    : d.status === "ready" ? "no local model" : `models ${d.status}`);
  set("kpi-rate", d.images_per_s.toFixed(d.images_per_s >= 10 ? 0 : 2));
  set("kpi-share", pct(t.local_image_share));
  set("kpi-share-sub", t.local_request_share === null
    ? "of images today" : `of images · ${pct(t.local_request_share)} of requests`);
  set("kpi-images", String(t.images));
  set("kpi-images-sub", `${t.local_images} local · ${t.cloud_images} cloud`);
  set("kpi-cost", money(t.cost_usd));
  set("kpi-cost-sub", `${t.requests} request${t.requests === 1 ? "" : "s"} today`);
  set("kpi-savings", money(t.savings_usd));
  set("kpi-savings-sub", `all-cloud would be ${money(t.cloud_equivalent_usd)}`);
}

function renderCharts(d) {
  const minutes = d.last_hour.minutes;
  const times = minutes.map((m) => m.t);
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  barChart($("chart-images"), {
    times,
    series: [
      { values: minutes.map((m) => m.local_images), color: color("--local") },
      { values: minutes.map((m) => m.cloud_images), color: color("--cloud") },
    ],
    format: String,
    integer: true,
  });
  barChart($("chart-cost"), {
    times,
    series: [{ values: minutes.map((m) => m.cost_usd), color: color("--spent") }],
    line: { values: minutes.map((m) => m.cloud_equivalent_usd), color: color("--equiv") },
    format: (v, step) => `$${v.toFixed(Math.max(2, decimalsFor(step)))}`,
  });
}

function renderTables(d) {
  $("models").replaceChildren(...(d.local.length ? d.local.map((m) => row(
    cell(m.model), cell(String(m.queued)), cell(String(m.running)),
    cell(m.items_per_s === null ? "–" : `${m.items_per_s.toFixed(1)}/s`),
    cell(`${m.estimated_wait_s.toFixed(1)} s`),
  )) : [row(cell(`no local model (${d.status})`, "muted"))]));
  $("workers").replaceChildren(...(d.workers.length ? d.workers.map((w) => row(
    cell(w.name), cell(w.model), cell(w.device), cell(w.state, `worker ${w.state}`),
    cell(String(w.batches)),
    cell(w.items_per_s === null ? "–" : `${w.items_per_s.toFixed(1)}/s`),
    cell(String(w.restarts)),
  )) : [row(cell(d.local.length ? "none: the models run in the server's process"
    : "no local model", "muted"))]));
  $("clouds").replaceChildren(...d.clouds.map((c) => row(
    cell(c.name),
    cell(c.configured ? "configured" : "not configured", c.configured ? "" : "muted"),
    cell(c.circuit.replace("_", "-"), `circuit ${c.circuit}`),
    cell(c.budget_usd === null ? money(c.spent_today_usd)
      : `${money(c.spent_today_usd)} / ${money(c.budget_usd)}`),
    cell(String(c.requests_today)),
    cell(`${c.kind} · ${c.tier}`, "muted"),
  )));
}

function render(d) {
  last = d;
  renderKpis(d);
  renderCharts(d);
  renderTables(d);
  setSizes(d.playground.sizes, d.playground.default_size);
  const scope = d.key === null ? "every key's usage" : `the usage of key “${d.key}”`;
  set("dash-foot", `Updated ${new Date(d.now).toLocaleTimeString()} · showing ${scope} · `
    + `last hour: ${d.last_hour.requests} requests, ${d.last_hour.errors} failed · models ${d.status}`);
  $("dashboard").dataset.updated = d.now;
}

export async function refreshDashboard() {
  clearTimeout(timer);
  try {
    if (!document.hidden) render(await (await api("/v1/dashboard")).json());
  } catch (err) {
    set("dash-foot", err.status === 401 ? "The dashboard needs an API key." : `Could not refresh: ${err.message}`);
  } finally {
    refreshS = last ? last.refresh_s : refreshS;
    clearTimeout(timer); // a refresh asked for while one was in flight: keep one loop
    timer = setTimeout(refreshDashboard, refreshS * 1000);
  }
}

export function startDashboard() {
  refreshDashboard();
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshDashboard(); });
  window.addEventListener("resize", () => { if (last) renderCharts(last); });
}
