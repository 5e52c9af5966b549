// Metric charts on uPlot. A chart per metric family: `loss` with `val_loss`,
// `accuracy` with `val_accuracy`; `lr`, `loss_step` and the rest each alone. The
// history comes downsampled by the server (first/last/min/max per bucket, so spikes
// stay); a zoom asks the server for that step range at full resolution.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { h } from "./dom.js";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d",
  "#4d7c0f", "#7c2d12", "#1e3a8a"];
export const ZOOM_POINTS = 100000; // the API's max_points ceiling: a zoom of <= 100k steps is exact

export function family(name) {
  return name.startsWith("val_") ? name.slice(4) : name;
}

// Series: name -> {step, epoch, value, time} arrays, appended to as points arrive;
// `changed` names the series that got points since the page last drew them.
export class SeriesStore {
  constructor() { this.series = new Map(); this.changed = new Set(); }

  load(columnar) {
    for (const [name, cols] of Object.entries(columnar)) {
      this.series.set(name, { step: [...cols.step], epoch: [...cols.epoch], value: [...cols.value], time: [...cols.time] });
    }
  }

  // Live points (an SSE metrics event). Returns true when a new series appeared.
  add(points) {
    let added = false;
    for (const p of points) {
      let s = this.series.get(p.name);
      if (!s) { s = { step: [], epoch: [], value: [], time: [] }; this.series.set(p.name, s); added = true; }
      const last = s.step.length ? s.step[s.step.length - 1] : -1;
      if (p.step <= last) continue; // already in the history read
      s.step.push(p.step); s.epoch.push(p.epoch); s.value.push(p.value); s.time.push(p.time);
      this.changed.add(p.name);
    }
    return added;
  }

  families() {
    const out = new Map();
    for (const name of [...this.series.keys()].sort()) {
      const key = family(name);
      if (!out.has(key)) out.set(key, []);
      out.get(key).push(name);
    }
    for (const names of out.values()) names.sort((a, b) => a.startsWith("val_") - b.startsWith("val_"));
    return out;
  }

  count(names) {
    return names.reduce((n, name) => n + (this.series.get(name)?.step.length ?? 0), 0);
  }
}

// TensorBoard's smoothing: an exponential moving average, debiased at the start.
export function smooth(values, weight) {
  if (!weight) return values;
  const out = new Array(values.length);
  let last = 0, n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || !isFinite(v)) { out[i] = v; continue; }
    last = last * weight + (1 - weight) * v;
    n++;
    out[i] = last / (1 - Math.pow(weight, n));
  }
  return out;
}

export function xValues(s, mode, stepsPerEpoch) {
  if (mode === "epoch") return stepsPerEpoch ? s.step.map((x) => x / stepsPerEpoch) : s.epoch;
  if (mode === "time") { const t0 = s.time[0] ?? 0; return s.time.map((t) => t - t0); }
  return s.step;
}

// Align several series on one x axis (uPlot wants one x array per chart).
function table(store, names, view) {
  const parts = [];
  for (const name of names) {
    const s = store.series.get(name);
    if (!s || !s.step.length) continue;
    let xs = xValues(s, view.x, view.stepsPerEpoch);
    let ys = s.value;
    if (view.log) ys = ys.map((v) => (v !== null && v > 0 ? v : null));
    // x must increase: drop repeats (several points of one epoch in epoch mode keep the last)
    const keepX = [], keepY = [];
    for (let i = 0; i < xs.length; i++) {
      if (keepX.length && xs[i] <= keepX[keepX.length - 1]) { keepY[keepY.length - 1] = ys[i]; continue; }
      keepX.push(xs[i]); keepY.push(ys[i]);
    }
    parts.push({ name, xs: keepX, ys: keepY });
  }
  if (!parts.length) return { names: [], data: [[]] };
  const joined = parts.length === 1 ? [parts[0].xs, parts[0].ys] : uPlot.join(parts.map((p) => [p.xs, p.ys]));
  const data = [joined[0]];
  const shown = [];
  parts.forEach((p, i) => {
    const ys = joined[i + 1];
    if (view.smoothing) { data.push(ys); shown.push({ name: p.name, raw: true }); }
    data.push(view.smoothing ? smooth(ys, view.smoothing) : ys);
    shown.push({ name: p.name, raw: false });
  });
  return { names: shown, data };
}

// A y tick's label: the fewest significant digits that still say its value, and the
// very small or large in exponent form (an lr of 0.00015 reads 1.5e-4).
export function tickLabel(v) {
  if (v === null || v === undefined) return "";
  const abs = Math.abs(v);
  const exact = Number(v.toPrecision(12));
  let digits = 1;
  while (digits < 12 && Number(v.toPrecision(digits)) !== exact) digits++;
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return v.toExponential(digits - 1).replace("e+", "e");
  return String(Number(v.toPrecision(digits)));
}

// One chart of a family. `fetchRange(names, fromStep, untilStep)` returns columnar data.
export class MetricChart {
  constructor(container, title, names, store, view, fetchRange) {
    this.title = title;
    this.names = names;
    this.store = store;
    this.view = view;
    this.fetchRange = fetchRange;
    this.zoomStore = null; // the full-resolution range while zoomed in
    this.el = h("figure", { class: "chart", dataset: { metric: title } }, h("figcaption", {}, title));
    container.append(this.el);
    this.build();
  }

  build() {
    if (this.plot) this.plot.destroy();
    const { names, data } = table(this.zoomStore ?? this.store, this.names, this.view);
    this.shown = names;
    const chart = this;
    const series = [{ label: this.view.x }];
    names.forEach((s) => {
      const color = COLORS[this.names.indexOf(s.name) % COLORS.length];
      // dots only while a series is short (an epoch-level metric early in a run)
      const few = (u, si) => u.data[si].length < 60;
      series.push({ label: s.raw ? `${s.name} (raw)` : s.name, stroke: color, width: s.raw ? 1 : 1.5,
        alpha: s.raw ? 0.3 : 1, spanGaps: true, points: { show: few, size: 5, fill: color } });
    });
    const width = Math.max(320, this.el.clientWidth || 600);
    this.plot = new uPlot({
      width, height: 240, series,
      scales: { x: { time: false }, y: { distr: this.view.log ? 3 : 1 } },
      axes: [{ label: { step: "step", epoch: "epoch", time: "seconds" }[this.view.x] },
        { values: (u, splits) => splits.map(tickLabel),
          size: (u, values) => Math.max(40, 16 + 8 * Math.max(0, ...(values ?? []).map((v) => String(v).length))) }],
      cursor: { drag: { x: true, y: false, setScale: true } },
      legend: { live: true },
      hooks: {
        setSelect: [(u) => {
          if (u.select.width < 2) return;
          const lo = u.posToVal(u.select.left, "x");
          const hi = u.posToVal(u.select.left + u.select.width, "x");
          chart.zoomTo(lo, hi);
        }],
        draw: [(u) => chart.drawBest(u)],
      },
    }, data, this.el);
    this.plot.over.addEventListener("dblclick", () => { if (this.zoomStore) { this.zoomStore = null; this.build(); } });
    this.el.dataset.points = String(this.store.count(this.names));
    this.el.dataset.zoomed = this.zoomStore ? "true" : "false";
  }

  // New live points arrived: redraw with the same zoom.
  refresh() {
    this.el.dataset.points = String(this.store.count(this.names));
    if (this.zoomStore) return; // a zoomed view holds its range; a double click returns to live
    const { names, data } = table(this.store, this.names, this.view);
    if (names.length !== this.shown.length) { this.build(); return; }
    this.plot.setData(data);
  }

  // The steps of an x range: found in the series' own x values (step, epoch or time).
  stepRange(lo, hi) {
    let from = Infinity, until = -Infinity;
    for (const name of this.names) {
      const s = this.store.series.get(name);
      if (!s) continue;
      const xs = xValues(s, this.view.x, this.view.stepsPerEpoch);
      for (let i = 0; i < xs.length; i++) {
        if (xs[i] >= lo && xs[i] <= hi) {
          from = Math.min(from, s.step[Math.max(0, i - 1)]);
          until = Math.max(until, s.step[Math.min(s.step.length - 1, i + 1)]);
        }
      }
    }
    return isFinite(from) ? [from, until] : null;
  }

  async zoomTo(lo, hi) {
    const range = this.stepRange(lo, hi);
    if (!range) return;
    const started = performance.now();
    const columnar = await this.fetchRange(this.names, range[0], range[1]);
    const zoomed = new SeriesStore();
    zoomed.load(columnar);
    this.zoomStore = zoomed;
    const { data } = table(zoomed, this.names, this.view);
    this.plot.setData(data, false);
    this.plot.setScale("x", { min: lo, max: hi });
    await new Promise((resolve) => requestAnimationFrame(resolve)); // drawn
    this.el.dataset.zoomed = "true";
    this.el.dataset.zoomPoints = String(zoomed.count(this.names));
    [this.el.dataset.zoomFrom, this.el.dataset.zoomUntil] = range.map(String);
    this.el.dataset.zoomMs = String(Math.round(performance.now() - started));
  }

  // The best epoch, as a dashed line (the x of the monitor's point at that epoch).
  drawBest(u) {
    const best = this.view.best;
    if (!best || best.epoch === null || best.epoch === undefined) return;
    const source = this.zoomStore ?? this.store;
    const s = source.series.get(best.monitor) ?? this.store.series.get(best.monitor);
    if (!s) return;
    const i = s.epoch.lastIndexOf(best.epoch);
    if (i < 0) return;
    const x = xValues(s, this.view.x, this.view.stepsPerEpoch)[i];
    const px = u.valToPos(x, "x", true);
    if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) return;
    const ctx = u.ctx;
    ctx.save();
    ctx.strokeStyle = "#16a34a";
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(px, u.bbox.top);
    ctx.lineTo(px, u.bbox.top + u.bbox.height);
    ctx.stroke();
    ctx.fillStyle = "#16a34a";
    ctx.font = `${12 * devicePixelRatio}px sans-serif`;
    ctx.fillText(`best (epoch ${best.epoch})`, px + 4, u.bbox.top + 14 * devicePixelRatio);
    ctx.restore();
    this.el.dataset.bestEpoch = String(best.epoch);
  }

  resize() {
    this.plot.setSize({ width: Math.max(320, this.el.clientWidth || 600), height: 240 });
  }

  destroy() { this.plot.destroy(); this.el.remove(); }
}
