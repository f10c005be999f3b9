// The one way the page talks to the server: the key from localStorage, the OpenAI error
// shape turned into an Error, and a signal to the page when the server wants a key.

const STORE = "spillway.key";
const authListeners = [];

export function getKey() {
  return localStorage.getItem(STORE) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(STORE, key);
  else localStorage.removeItem(STORE);
}

/** fn(ok, message): ok=false after a 401, true after any authorised answer. */
export function onAuth(fn) {
  authListeners.push(fn);
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(res.status, message, code);
}

/** fetch() with the key; resolves to the Response when ok, else throws ApiError. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method, headers, signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `Could not reach the server (${err.message}).`, "network");
  }
  if (res.status === 401) {
    const err = await errorOf(res);
    authListeners.forEach((fn) => fn(false, err.message));
    throw err;
  }
  authListeners.forEach((fn) => fn(true, ""));
  if (!res.ok) throw await errorOf(res);
  return res;
}

export function money(usd) {
  if (usd === null || usd === undefined) return "–";
  const abs = Math.abs(usd);
  // Local images cost fractions of a cent: show two significant digits of those.
  const text = abs === 0 || abs >= 0.01 ? abs.toFixed(2)
    : abs >= 0.0001 ? abs.toFixed(4) : abs.toPrecision(2);
  return `${usd < 0 ? "-" : ""}$${text}`;
}
