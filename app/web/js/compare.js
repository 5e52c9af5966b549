// Compare 2 to 10 jobs: one metric overlaid, the spec paths whose values differ, the bests.

import { api } from "./api.js";
import { MetricChart, SeriesStore } from "./charts.js";
import { bestText, clear, fmtNumber, h, statusBadge } from "./dom.js";

const MAX_POINTS = 2000;

export async function renderCompare(root, ids) {
  root.append(h("h1", {}, "Compare"));
  if (ids.length < 2 || ids.length > 10) {
    root.append(h("p", { class: "error" }, "Pick 2 to 10 jobs in the jobs table."));
    return null;
  }
  const jobs = await Promise.all(ids.map((id) => api(`/jobs/${id}`).catch((e) => ({ id, name: id, error: e.message, spec: {}, metrics: {} }))));
  const names = [...new Set(jobs.flatMap((j) => Object.keys(j.metrics || {})))].sort();
  const label = (j) => `${j.name} (${j.id.slice(-6)})`;

  const picker = h("select", { id: "compare-metric" }, names.map((n) => h("option", { value: n }, n)));
  picker.value = names.includes("val_loss") ? "val_loss" : names[0] ?? "";
  const chartBox = h("div", { class: "charts" });
  root.append(h("div", { class: "toolbar" }, h("label", {}, "metric ", picker)), chartBox);

  let chart = null;
  async function draw() {
    const metric = picker.value;
    if (!metric) return;
    const store = new SeriesStore();
    const columns = await Promise.all(jobs.map((j) => api(`/jobs/${j.id}/metrics?names=${encodeURIComponent(metric)}&max_points=${MAX_POINTS}&format=columnar`).catch(() => ({}))));
    // one series per job, named after it (a job's own name is only ever shown as text)
    jobs.forEach((j, i) => { if (columns[i][metric]) store.series.set(label(j), columns[i][metric]); });
    chart?.destroy();
    const view = { x: "step", log: false, smoothing: 0, best: null };
    const fetchRange = async (seriesNames, from, until) => {
      const out = {};
      await Promise.all(jobs.map(async (j) => {
        if (!seriesNames.includes(label(j))) return;
        const q = new URLSearchParams({ names: metric, from_step: from, until_step: until, max_points: "100000", format: "columnar" });
        const r = await api(`/jobs/${j.id}/metrics?${q}`);
        if (r[metric]) out[label(j)] = r[metric];
      }));
      return out;
    };
    chart = new MetricChart(chartBox, metric, [...store.series.keys()], store, view, fetchRange);
  }
  picker.addEventListener("change", draw);
  await draw();

  const bestBox = h("div");
  const bestTable = () => clear(bestBox).append(h("table", { id: "compare-best" },
    h("thead", {}, h("tr", {}, ["Job", "Status", "Best", `Latest ${picker.value}`].map((t) => h("th", {}, t)))),
    h("tbody", {}, jobs.map((j) => h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${j.id}` }, label(j))),
      h("td", {}, j.status ? statusBadge(j.status) : j.error), h("td", {}, bestText(j.best)),
      h("td", {}, fmtNumber(j.metrics?.[picker.value])))))));
  picker.addEventListener("change", bestTable);
  bestTable();
  root.append(h("h2", {}, "Best values"), bestBox);

  const diffs = specDifferences(jobs.map((j) => j.spec));
  root.append(h("h2", {}, "Spec differences"),
    diffs.length ? h("table", { id: "spec-diff" },
      h("thead", {}, h("tr", {}, h("th", {}, "Path"), jobs.map((j) => h("th", {}, label(j))))),
      h("tbody", {}, diffs.map(([path, values]) => h("tr", {}, h("td", { class: "path" }, path),
        values.map((v) => h("td", {}, v === undefined ? "(absent)" : JSON.stringify(v)))))))
      : h("p", { class: "muted" }, "The specs are the same."));
  return () => chart?.destroy();
}

// JSON path -> leaf value, e.g. training.optimizer.lr, model.layers[0].out_channels
export function flatten(value, path = "", out = new Map()) {
  if (Array.isArray(value)) {
    if (!value.length) out.set(path, value);
    value.forEach((v, i) => flatten(v, `${path}[${i}]`, out));
  } else if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (!keys.length) out.set(path, value);
    for (const k of keys) flatten(value[k], path ? `${path}.${k}` : k, out);
  } else {
    out.set(path, value);
  }
  return out;
}

export function specDifferences(specs) {
  const flat = specs.map((s) => flatten(s || {}));
  const paths = [...new Set(flat.flatMap((f) => [...f.keys()]))].sort();
  return paths
    .map((p) => [p, flat.map((f) => f.get(p))])
    .filter(([, values]) => new Set(values.map((v) => JSON.stringify(v))).size > 1);
}
