// A job: live charts of every series (history downsampled by the server, then the SSE
// stream), status history, log tail, checkpoints, spec, model summary, result, Cancel.

import { api } from "./api.js";
import { MetricChart, SeriesStore, ZOOM_POINTS } from "./charts.js";
import { append, bestText, clear, fmtBytes, fmtDuration, fmtNumber, fmtTime, h, jobDuration, progressCell, statusBadge, throttled } from "./dom.js";

// An open page must cost little (bench/dashboard.py: ten of them beside a training job),
// so every live update is coalesced: the stream's events only mark what changed, and
// timers redraw it at most this often.
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const LOG_LINES = 500;
const DRAW_EVERY_MS = 500; // a chart is never more than this (and a frame) behind its stream
const LOG_EVERY_MS = 1000; // new log lines go in at most this often
const JOB_REFRESH_MS = 5000; // GET /jobs/{id} (progress, ETA, best) at most this often
const CHECKPOINTS_EVERY_MS = 5000; // GET .../checkpoints at most this often while they arrive

export async function renderJob(root, jobId, query = new URLSearchParams()) {
  let job;
  try {
    job = await api(`/jobs/${jobId}`);
  } catch (error) {
    root.append(h("h1", {}, "Job not found"), h("p", { class: "error", id: "not-found" }, error.message));
    return null;
  }
  const base = `/jobs/${jobId}`;
  const store = new SeriesStore();
  const view = { x: "step", log: false, smoothing: 0, best: job.best, stepsPerEpoch: job.progress?.steps_per_epoch };
  let charts = [];
  let pendingSince = null; // when the oldest undrawn SSE batch arrived
  window.__tyLag = { max: 0, batches: 0 };

  // ------------------------------------------------------------------ layout
  const header = h("section", { class: "job-header" });
  const chartBox = h("div", { class: "charts", id: "charts" });
  const toolbar = chartToolbar(view, () => rebuildCharts());
  const statusList = h("ol", { class: "status-history", id: "status-history" });
  const logBox = h("pre", { class: "log", id: "log" });
  const checkpointBody = h("tbody");
  const specBox = h("pre", { class: "json", id: "spec" }, JSON.stringify(job.spec, null, 2));
  const summaryBox = h("div", { id: "summary" }, h("p", { class: "muted" }, "…"));
  const resultBox = h("div", { id: "result" });
  root.append(header,
    h("div", { class: "job-layout" },
      h("div", { class: "main-col" }, toolbar, chartBox,
        h("h2", {}, "Log"), logBox,
        h("h2", {}, "Checkpoints"),
        h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ["Epoch", "Kind", "Step", "Value", "Size", "Download"].map((t) => h("th", {}, t)))), checkpointBody)),
      h("aside", { class: "side-col" },
        h("h2", {}, "Status history"), statusList,
        h("h2", {}, "Result"), resultBox,
        h("h2", {}, "Model"), summaryBox,
        h("h2", {}, "Spec"), specBox)));

  // ------------------------------------------------------------------ header
  function showHeader() {
    const cancel = h("button", { type: "button", id: "cancel", class: "danger", disabled: TERMINAL.has(job.status) || job.cancel_requested,
      onclick: async () => {
        cancel.disabled = true;
        try { job = await api(`${base}/cancel`, { method: "POST" }); showHeader(); } catch (e) { alert(e.message); }
      } }, job.cancel_requested && !TERMINAL.has(job.status) ? "Cancelling…" : "Cancel");
    append(clear(header), [
      h("h1", {}, h("span", { id: "job-name" }, job.name), " ", h("span", { id: "job-status" }, statusBadge(job.status))),
      h("div", { class: "facts" },
        h("span", { class: "muted" }, job.id),
        h("span", {}, `attempt ${job.attempt}/${job.max_restarts + 1}`),
        h("span", {}, `created ${fmtTime(job.created_at)}`),
        h("span", {}, `duration ${fmtDuration(jobDuration(job)) || "–"}`),
        progressCell(job),
        h("span", {}, `best ${bestText(job.best)}`),
        cancel),
      job.error ? h("p", { class: "error", id: "job-error" }, job.error) : null,
      job.stop_reason ? h("p", { class: "muted" }, `stopped: ${job.stop_reason}`) : null]);
    clear(resultBox).append(resultTable(job));
    const bestMoved = JSON.stringify(view.best) !== JSON.stringify(job.best);
    view.best = job.best;
    if (job.progress?.steps_per_epoch) view.stepsPerEpoch = job.progress.steps_per_epoch;
    if (bestMoved) for (const chart of charts) chart.plot.redraw(false);
  }

  async function refreshJob() {
    try {
      const read = await api(`/jobs/${jobId}`);
      const changed = JSON.stringify(read) !== JSON.stringify(job);
      job = read;
      if (changed || !TERMINAL.has(job.status)) showHeader(); // a running job's duration moves on
    } catch { /* the next event tries again */ }
  }
  const refreshJobSoon = throttled(refreshJob, JOB_REFRESH_MS);

  // ------------------------------------------------------------------ charts
  // about two points a pixel (each bucket gives up to four: first, last, min, max);
  // `?points=N` asks for another number (bench/dashboard.py's baseline)
  const maxPoints = () => {
    if (query.get("points")) return Number(query.get("points"));
    const box = chartBox.clientWidth || 800;
    const chartWidth = box / Math.max(1, Math.floor(box / 400)); // the grid's column width
    return Math.min(ZOOM_POINTS, Math.max(400, Math.round(chartWidth * 2)));
  };

  async function fetchRange(names, fromStep, untilStep) {
    const q = new URLSearchParams({ names: names.join(","), from_step: String(fromStep), until_step: String(untilStep),
      max_points: String(ZOOM_POINTS), format: "columnar" });
    return api(`${base}/metrics?${q}`);
  }

  function rebuildCharts() {
    for (const chart of charts) chart.destroy();
    charts = [];
    for (const [title, names] of store.families()) charts.push(new MetricChart(chartBox, title, names, store, view, fetchRange));
    if (!charts.length) chartBox.replaceChildren(h("p", { class: "muted", id: "no-metrics" }, "No metrics yet."));
    else chartBox.querySelector("#no-metrics")?.remove();
    store.changed.clear();
  }

  // Only the charts whose series got points are drawn again, in the next frame.
  const draw = throttled(() => requestAnimationFrame(() => {
    for (const chart of charts) if (chart.names.some((name) => store.changed.has(name))) chart.refresh();
    store.changed.clear();
    if (pendingSince !== null) {
      const lag = performance.now() - pendingSince;
      window.__tyLag.max = Math.max(window.__tyLag.max, lag);
      window.__tyLag.batches++;
      pendingSince = null;
    }
  }), DRAW_EVERY_MS);

  // the downsampled history and the id of the last event it holds
  const response = await api(`${base}/metrics?max_points=${maxPoints()}&format=columnar`, { raw: true });
  const historyId = response.headers.get("X-Last-Event-Id") || "0";
  store.load(await response.json());
  showHeader();
  rebuildCharts();
  // on screen by the next frame (bench/dashboard.py reads this: ms since navigation)
  requestAnimationFrame(() => { document.body.dataset.chartsDrawn = String(performance.now()); });

  // ------------------------------------------------------------------ side panels
  let checkpointsShown = null; // the rows on screen, as JSON: an unchanged read draws nothing
  async function loadCheckpoints() {
    let rows;
    try { rows = await api(`${base}/checkpoints`); } catch { return; /* read on the next event */ }
    const json = JSON.stringify(rows);
    if (json === checkpointsShown) return;
    checkpointsShown = json;
    clear(checkpointBody);
    for (const c of rows) {
      const url = `/api/v1${base}/checkpoints/${c.id}`;
      checkpointBody.append(h("tr", { dataset: { checkpoint: String(c.id) } },
        h("td", {}, String(c.epoch)), h("td", {}, c.kind), h("td", {}, String(c.step)),
        h("td", {}, c.monitor ? `${c.monitor} ${fmtNumber(c.value)}` : ""), h("td", {}, fmtBytes(c.size)),
        h("td", { class: "downloads" },
          h("a", { href: url, download: `${jobId}-${c.kind}-${c.epoch}.safetensors`, class: "button", dataset: { format: "safetensors" } }, "safetensors"),
          h("a", { href: `${url}?format=pt2`, download: `${jobId}-${c.kind}-${c.epoch}.pt2`, class: "button", dataset: { format: "pt2" } }, "pt2"),
          h("a", { href: `${url}?format=onnx`, download: `${jobId}-${c.kind}-${c.epoch}.onnx`, class: "button", dataset: { format: "onnx" } }, "ONNX"))));
    }
    if (!rows.length) checkpointBody.append(h("tr", {}, h("td", { colspan: "6", class: "muted" }, "None yet.")));
  }
  // a checkpoint event (one an epoch) asks for the table; reads of it are coalesced
  const loadCheckpointsSoon = throttled(loadCheckpoints, CHECKPOINTS_EVERY_MS);

  api("/jobs/validate", { method: "POST", json: job.spec })
    .then((r) => clear(summaryBox).append(summaryTable(r.summary)))
    .catch((e) => clear(summaryBox).append(h("p", { class: "muted" }, `summary unavailable: ${e.message}`)));
  loadCheckpointsSoon();

  const log = logTail(logBox);

  // ------------------------------------------------------------------ the stream
  // From the first event for status, logs and checkpoints; metrics only past the history.
  // A hidden page closes its stream and timers; shown again, it resumes after the last
  // event it saw (`after`), so it misses nothing and is sent nothing twice.
  let source = null;
  let lastId = 0; // the id of the last event handled
  let ended = false;

  function connect() {
    const q = new URLSearchParams({ metrics_after: historyId });
    if (lastId) q.set("after", String(lastId));
    source = new EventSource(`/api/v1${base}/events?${q}`);
    // (the browser's own reconnect after a dropped line asks the same URL again: from
    // `after`, not from its Last-Event-ID, so what was handled already is skipped here)
    const on = (kind, handle) => source.addEventListener(kind, (e) => {
      const id = Number(e.lastEventId);
      if (kind !== "end" && id <= lastId) return;
      lastId = Math.max(lastId, id);
      handle(JSON.parse(e.data));
    });
    on("metrics", (data) => {
      if (pendingSince === null) pendingSince = performance.now();
      if (store.add(data.points)) rebuildCharts();
      draw();
      refreshJobSoon();
    });
    on("status", (data) => {
      statusList.append(h("li", {}, statusBadge(data.status),
        data.at ? h("time", { datetime: data.at }, ` ${fmtTime(data.at)}`) : "",
        data.attempt ? ` attempt ${data.attempt}` : "",
        data.worker ? ` on ${data.worker}` : "",
        data.reason ? h("span", { class: "reason" }, ` — ${data.reason}`) : "",
        data.error ? h("span", { class: "reason" }, ` — ${data.error}`) : "",
        data.cancel_requested ? " (cancel requested)" : ""));
      refreshJob();
    });
    on("log", (data) => log.add(data.lines));
    on("checkpoint", () => loadCheckpointsSoon());
    on("end", () => { ended = true; source.close(); source = null; refreshJob(); loadCheckpoints(); });
  }

  function pause() {
    source?.close();
    source = null;
    pendingSince = null; // a hidden page draws nothing: the lag counts from its return
    for (const timer of [draw, log.flush, refreshJobSoon, loadCheckpointsSoon]) timer.cancel();
  }

  function onVisibility() {
    if (document.hidden) { if (source) pause(); return; }
    if (ended || source) return;
    connect();
    draw();
    log.flush();
    refreshJob();
    loadCheckpointsSoon();
  }

  if (!document.hidden) connect();
  document.addEventListener("visibilitychange", onVisibility);
  const onResize = () => charts.forEach((c) => c.resize());
  window.addEventListener("resize", onResize);
  return () => {
    ended = true;
    pause();
    document.removeEventListener("visibilitychange", onVisibility);
    window.removeEventListener("resize", onResize);
    charts.forEach((c) => c.destroy());
  };
}

// The log tail: new lines go in as one text node a flush (at most once a second), the
// oldest nodes go once more than LOG_LINES lines are shown; the box is never rebuilt.
function logTail(box) {
  const pending = [];
  const sizes = []; // lines in each text node of the box, oldest first
  let shown = 0;
  const flush = throttled(() => {
    if (!pending.length) return;
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    const lines = pending.splice(0).slice(-LOG_LINES);
    box.append(document.createTextNode(lines.join("\n") + "\n"));
    sizes.push(lines.length);
    shown += lines.length;
    while (shown - sizes[0] >= LOG_LINES) { shown -= sizes.shift(); box.firstChild.remove(); }
    if (atBottom) box.scrollTop = box.scrollHeight;
  }, LOG_EVERY_MS);
  return { add(lines) { pending.push(...lines); flush(); }, flush };
}

function chartToolbar(view, changed) {
  const x = h("select", { id: "x-axis", onchange: (e) => { view.x = e.target.value; changed(); } },
    ["step", "epoch", "time"].map((v) => h("option", { value: v }, `x: ${v}`)));
  const log = h("input", { type: "checkbox", id: "log-scale", onchange: (e) => { view.log = e.target.checked; changed(); } });
  const smoothValue = h("output", {}, "0");
  const smoothing = h("input", { type: "range", id: "smoothing", min: "0", max: "0.99", step: "0.01", value: "0",
    onchange: (e) => { view.smoothing = Number(e.target.value); smoothValue.textContent = e.target.value; changed(); } });
  return h("div", { class: "toolbar" }, x, h("label", {}, log, " log scale"),
    h("label", {}, "smoothing ", smoothing, " ", smoothValue),
    h("span", { class: "muted" }, "drag to zoom (full resolution), double-click to reset"));
}

function resultTable(job) {
  const rows = Object.entries(job.metrics || {}).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, fmtNumber(v))));
  const facts = [];
  if (job.result?.epochs_run !== undefined) facts.push(`${job.result.epochs_run} epochs, ${job.result.steps} steps`);
  if (job.stopped_early) facts.push("stopped early");
  return h("div", {}, facts.length ? h("p", {}, facts.join(", ")) : null,
    rows.length ? h("table", { class: "kv" }, rows) : h("p", { class: "muted" }, "No metrics yet."));
}

export function summaryTable(summary) {
  const inputs = Object.entries(summary.input_shapes || {});
  return h("div", { class: "summary" },
    h("p", {}, `${Number(summary.total_params).toLocaleString()} parameters (${Number(summary.trainable_params).toLocaleString()} trainable)`),
    h("table", { class: "layers" },
      h("thead", {}, h("tr", {}, ["Node", "Type", "Inputs", "Output shape", "Params"].map((t) => h("th", {}, t)))),
      h("tbody", {},
        inputs.map(([name, shape]) => h("tr", {}, h("td", {}, name), h("td", {}, "input"), h("td", {}), h("td", {}, shapeText(shape.slice(1))), h("td", {}, "0"))),
        (summary.rows || []).map((r) => h("tr", {},
          h("td", {}, r.name), h("td", {}, r.shared_with ? `${r.type} (shares ${r.shared_with})` : r.type),
          h("td", {}, (r.inputs || []).join(", ")), h("td", {}, shapeText(r.output_shape)),
          h("td", {}, Number(r.params).toLocaleString()))))));
}

function shapeText(shape) {
  return `(${shape.map((d) => (d === null ? "N" : d)).join(", ")})`;
}

