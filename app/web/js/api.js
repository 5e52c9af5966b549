// The REST API as the page uses it: the session cookie signs each request in; the
// CSRF token (kept in memory only, never in storage) goes with every request that
// changes state.

export const API = "/api/v1";
let csrfToken = null;

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

export async function api(path, { method = "GET", json, body, headers = {}, raw = false } = {}) {
  headers = { ...headers };
  if (method !== "GET" && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(API + path, { method, body, headers, credentials: "same-origin" });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch { /* not JSON */ }
    if (response.status === 401 && path !== "/session") onSignedOut();
    throw new ApiError(response.status, detail);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

let signedOutHandler = () => {};
export function whenSignedOut(handler) { signedOutHandler = handler; }
function onSignedOut() { csrfToken = null; signedOutHandler(); }

export async function currentSession() {
  try {
    const session = await api("/session");
    csrfToken = session.csrf_token;
    return session;
  } catch (error) {
    if (error.status === 401) return null;
    throw error;
  }
}

export async function signIn(token) {
  const session = await api("/session", { method: "POST", json: { token } });
  csrfToken = session.csrf_token;
  return session;
}

export async function signOut() {
  await api("/session", { method: "DELETE" });
  csrfToken = null;
}

export function csrf() { return csrfToken; }

// What the running API offers (filters another release may lack): read from its OpenAPI.
let openapi = null;
export async function listParameters() {
  if (!openapi) openapi = fetch("/openapi.json").then((r) => r.json()).catch(() => ({ paths: {} }));
  const doc = await openapi;
  const op = doc.paths?.[`${API}/jobs`]?.get;
  return new Set((op?.parameters ?? []).map((p) => p.name));
}
