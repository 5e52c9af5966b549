// The jobs table: newest first, refreshed every few seconds, filtered and paged by the API.

import { api, listParameters } from "./api.js";
import { bestText, fmtDuration, fmtTime, h, jobDuration, progressCell, statusBadge, clear } from "./dom.js";

const REFRESH_MS = 3000;
const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

export async function renderJobs(root) {
  const supported = await listParameters();
  const filters = { status: "", project: "", tag: "", name: "" };
  let cursors = [null]; // the cursor of each page seen, for Previous
  const selected = new Set();
  let timer = null;
  let stopped = false; // the view was left: a read in flight must not start the next

  const controls = h("form", { class: "filters", id: "job-filters" });
  const fields = {
    status: h("select", { name: "status" }, STATUSES.map((s) => h("option", { value: s }, s || "any status"))),
  };
  for (const key of ["project", "tag", "name"]) {
    // shown only when the API filters by it (the OpenAPI of GET /jobs lists the parameter)
    if (supported.has(key)) fields[key] = h("input", { name: key, placeholder: key, type: "search" });
  }
  for (const [key, input] of Object.entries(fields)) {
    input.addEventListener("input", () => { filters[key] = input.value; cursors = [null]; load(); });
    controls.append(input);
  }
  const compareButton = h("button", { type: "button", id: "compare", disabled: true,
    onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; } }, "Compare");
  controls.append(compareButton);

  const body = h("tbody");
  const prev = h("button", { type: "button", onclick: () => { cursors.pop(); load(); } }, "← Newer");
  const next = h("button", { type: "button" }, "Older →");
  const hasProject = supported.has("project");
  const table = h("table", { class: "jobs", id: "jobs" },
    h("thead", {}, h("tr", {}, ["", "Status", "Name", hasProject ? "Project" : null, hasProject ? "Tags" : null,
      "Created", "Duration", "Progress", "Best"].filter((x) => x !== null).map((t) => h("th", {}, t)))),
    body);
  root.append(h("h1", {}, "Jobs"), controls, table, h("div", { class: "pager" }, prev, next));

  async function load() {
    clearTimeout(timer);
    const params = new URLSearchParams({ limit: "25" });
    for (const [key, value] of Object.entries(filters)) if (value && fields[key]) params.set(key, value);
    const cursor = cursors[cursors.length - 1];
    if (cursor) params.set("cursor", cursor);
    try {
      const page = await api(`/jobs?${params}`);
      if (stopped) return;
      clear(body);
      if (!page.jobs.length) body.append(h("tr", {}, h("td", { colspan: "9", class: "muted" }, "No jobs yet.")));
      for (const job of page.jobs) body.append(row(job));
      prev.disabled = cursors.length <= 1;
      next.disabled = !page.next_cursor;
      next.onclick = () => { cursors.push(page.next_cursor); load(); };
    } catch (error) {
      clear(body).append(h("tr", {}, h("td", { colspan: "9", class: "error" }, error.message)));
    }
    if (!document.hidden && !stopped) timer = setTimeout(load, REFRESH_MS);
  }

  function row(job) {
    const box = h("input", { type: "checkbox", checked: selected.has(job.id), "aria-label": "select for compare",
      onchange: (e) => {
        if (e.target.checked) selected.add(job.id); else selected.delete(job.id);
        compareButton.disabled = selected.size < 2 || selected.size > 10;
      } });
    return h("tr", { dataset: { job: job.id, status: job.status } },
      h("td", {}, box),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "job-name" }, job.name)),
      hasProject ? h("td", {}, job.project ?? "") : null,
      hasProject ? h("td", {}, (job.tags ?? []).map((t) => h("span", { class: "tag" }, t))) : null,
      h("td", {}, fmtTime(job.created_at)),
      h("td", {}, fmtDuration(jobDuration(job))),
      h("td", {}, progressCell(job)),
      h("td", {}, bestText(job.best)));
  }

  const onVisible = () => { if (!document.hidden) load(); };
  document.addEventListener("visibilitychange", onVisible);
  await load();
  return () => { stopped = true; clearTimeout(timer); document.removeEventListener("visibilitychange", onVisible); };
}
