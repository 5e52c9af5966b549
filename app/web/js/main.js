// The page's router: #/jobs, #/jobs/<id>, #/compare?ids=a,b, #/submit, #/datasets.
// Each view is `render(root, params) -> cleanup`; the cleanup closes its streams and timers.

import { currentSession, signIn, signOut, whenSignedOut } from "./api.js";
import { clear, h } from "./dom.js";
import { renderJobs } from "./jobs.js";
import { renderJob } from "./job.js";
import { renderCompare } from "./compare.js";
import { renderSubmit } from "./submit.js";
import { renderDatasets } from "./datasets.js";

const root = document.getElementById("view");
let session = null;
let cleanup = null;

const routes = [
  [/^#\/jobs\/([0-9a-f]+)$/, (m, q) => renderJob(root, m[1], q)],
  [/^#\/compare$/, (m, q) => renderCompare(root, (q.get("ids") || "").split(",").filter(Boolean))],
  [/^#\/submit$/, () => renderSubmit(root)],
  [/^#\/datasets$/, () => renderDatasets(root)],
  [/^#\/jobs$/, () => renderJobs(root)],
];

let routed = 0; // which call of route() is the newest: an older one's view is not shown

async function route() {
  const mine = ++routed;
  if (cleanup) { cleanup(); cleanup = null; }
  clear(root);
  if (!session) { renderSignIn(); return; }
  const [path, query] = (location.hash || "#/jobs").split("?");
  for (const [pattern, render] of routes) {
    const match = path.match(pattern);
    if (match) {
      document.body.dataset.view = pattern.source;
      const done = (await render(match, new URLSearchParams(query || ""))) || null;
      // navigated away while this view was loading: stop it now (its timers, its stream)
      if (mine !== routed) done?.();
      else cleanup = done;
      return;
    }
  }
  location.hash = "#/jobs";
}

function renderSignIn() {
  document.getElementById("nav").hidden = true;
  const input = h("input", { type: "password", name: "token", id: "token", autocomplete: "off",
    placeholder: "ty_…", required: true });
  const error = h("p", { class: "error", role: "alert" });
  const form = h("form", { id: "sign-in", class: "card narrow" },
    h("h1", {}, "Sign in"),
    h("label", { for: "token" }, "API token"),
    input,
    h("p", { class: "muted" }, "`torchyard serve` prints it; the page keeps a session cookie, never the token."),
    h("button", { type: "submit" }, "Sign in"),
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      session = await signIn(input.value.trim());
      input.value = "";
      showUser();
      route();
    } catch (err) {
      error.textContent = err.message;
    }
  });
  root.append(form);
  input.focus();
}

function showUser() {
  document.getElementById("nav").hidden = false;
  document.getElementById("who").textContent = session.user;
}

document.getElementById("sign-out").addEventListener("click", async () => {
  try { await signOut(); } finally { session = null; route(); }
});

whenSignedOut(() => {
  if (session) { session = null; route(); }
});

window.addEventListener("hashchange", route);
session = await currentSession();
if (session) showUser();
route();
