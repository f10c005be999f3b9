// The playground: text-to-image and a question about a dropped picture.

import { api, ApiError, money } from "./api.js";

const $ = (id) => document.getElementById(id);
const FALLBACK_SIZES = ["256x256", "512x512", "768x768", "1024x1024"];
let imageUrl = null; // the picture to ask about, as a data: URL

function showError(el, err) {
  el.textContent = err ? err.message : "";
  el.hidden = !err;
}

/** The sizes the server accepts (from /v1/dashboard); keeps the user's choice. */
export function setSizes(sizes, preferred) {
  const select = $("size");
  const current = select.value || preferred;
  if ([...select.options].map((o) => o.value).join() === sizes.join()) return;
  select.replaceChildren(...sizes.map((s) => new Option(s, s)));
  select.value = sizes.includes(current) ? current : sizes.includes(preferred) ? preferred : sizes[0];
}

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number.parseInt(v, 10);
}

function resultCard(prompt, n, size) {
  const [w, h] = size.split("x").map(Number);
  const card = document.createElement("article");
  card.className = "result pending";
  const tiles = document.createElement("div");
  tiles.className = "tiles";
  for (let i = 0; i < n; i++) {
    const tile = document.createElement("div");
    tile.className = "tile loading";
    tile.style.aspectRatio = `${w} / ${h}`;
    tiles.append(tile);
  }
  const caption = document.createElement("p");
  caption.className = "prompt";
  caption.textContent = prompt;
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = `${size} · generating…`;
  card.append(tiles, caption, meta);
  $("gallery").prepend(card);
  $("gallery-empty").hidden = true;
  return { card, tiles, meta };
}

function chip(text, cls = "") {
  const span = document.createElement("span");
  span.className = `chip ${cls}`;
  span.textContent = text;
  return span;
}

async function generate(e) {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  const size = $("size").value;
  const n = intOrNull("n") || 1;
  const body = { prompt, size, n, response_format: "b64_json" };
  const steps = intOrNull("steps");
  const seed = intOrNull("seed");
  if (steps !== null) body.steps = steps;
  if (seed !== null) body.seed = seed;
  showError($("gen-error"), null);
  const view = resultCard(prompt, n, size);
  const started = performance.now();
  try {
    const res = await api("/v1/images/generations", { method: "POST", body });
    const json = await res.json();
    const ms = Math.round(performance.now() - started);
    const route = res.headers.get("x-spillway-route") || "?";
    const cost = Number(res.headers.get("x-spillway-cost-usd") || 0);
    const queue = res.headers.get("x-spillway-queue-ms") || "0";
    view.tiles.replaceChildren(...json.data.map((d, i) => {
      const figure = document.createElement("figure");
      figure.className = "tile";
      const img = document.createElement("img");
      img.src = d.b64_json ? `data:image/png;base64,${d.b64_json}` : d.url;
      img.alt = `${prompt} (seed ${d.seed ?? "?"})`;
      img.dataset.seed = d.seed ?? "";
      img.className = "generated";
      const cap = document.createElement("figcaption");
      cap.textContent = `seed ${d.seed ?? "?"}`;
      figure.append(img, cap);
      figure.style.animationDelay = `${i * 60}ms`;
      return figure;
    }));
    view.meta.replaceChildren(
      chip(route, route === "local" ? "local" : "cloud"),
      chip(`${json.data.length} × ${size}`), chip(money(cost)),
      chip(`queue ${queue} ms`), chip(`${ms} ms`));
    view.card.classList.remove("pending");
    view.card.dataset.route = route;
  } catch (err) {
    view.card.remove();
    if (!$("gallery").children.length) $("gallery-empty").hidden = false;
    showError($("gen-error"), err);
  }
}

function useFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError($("ask-error"), new Error("That is not an image file."));
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    const preview = $("vlm-preview");
    preview.src = imageUrl;
    preview.hidden = false;
    $("drop-text").textContent = file.name;
    $("drop").classList.add("has-image");
    showError($("ask-error"), null);
  };
  reader.readAsDataURL(file);
}

/** Server-sent events from a fetch() body: yields each `data:` payload. */
async function* sse(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:")) yield line.slice(5).trim();
      }
    }
  }
}

async function ask(e) {
  e.preventDefault();
  const errorEl = $("ask-error");
  showError(errorEl, null);
  if (!imageUrl) {
    showError(errorEl, new Error("Drop an image (or choose one) first."));
    return;
  }
  const question = $("question").value.trim() || "What is in this picture?";
  const body = {
    model: "local-vlm", stream: true, max_tokens: 200,
    stream_options: { include_usage: true },
    messages: [{ role: "user", content: [
      { type: "text", text: question },
      { type: "image_url", image_url: { url: imageUrl } },
    ] }],
  };
  const out = $("answer-text");
  const meta = $("answer-meta");
  out.textContent = "";
  meta.textContent = "thinking…";
  $("answer").hidden = false;
  $("answer").classList.add("streaming");
  $("ask").disabled = true;
  const started = performance.now();
  try {
    const res = await api("/v1/chat/completions", { method: "POST", body });
    const route = res.headers.get("x-spillway-route") || "?";
    let tokens = null;
    for await (const data of sse(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code);
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) out.textContent += delta;
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
    }
    const ms = Math.round(performance.now() - started);
    meta.replaceChildren(chip(route, route === "local" ? "local" : "cloud"),
      chip(tokens === null ? "answered" : `${tokens} tokens`), chip(`${ms} ms`));
    $("answer").dataset.done = "true";
  } catch (err) {
    $("answer").hidden = !out.textContent;
    meta.textContent = "";
    showError(errorEl, err);
  } finally {
    $("answer").classList.remove("streaming");
    $("ask").disabled = false;
  }
}

export function setupPlayground() {
  setSizes(FALLBACK_SIZES, "512x512");
  $("gen-form").addEventListener("submit", generate);
  $("ask-form").addEventListener("submit", ask);
  $("vlm-file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    useFile(e.dataTransfer.files[0]);
  });
}
