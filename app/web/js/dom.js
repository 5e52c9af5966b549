// Building the page: every string a user wrote (names, tags, log lines, metric names,
// spec values) goes in as a text node or an attribute value, never as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (hours) return `${hours}h ${minutes}m`;
  if (minutes) return `${minutes}m ${s}s`;
  return `${s}s`;
}

export function fmtNumber(value) {
  if (value === null || value === undefined) return "–";
  if (!isFinite(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(3);
  return Number(value.toPrecision(5)).toString();
}

export function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function jobDuration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return (end - new Date(job.started_at)) / 1000;
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export function progressCell(job) {
  const p = job.progress;
  if (!p || !p.epochs) return h("span", { class: "muted" }, "–");
  const done = job.status === "succeeded" ? p.epochs : p.epoch ?? 0;
  const within = p.steps_per_epoch && p.step !== null && p.step !== undefined
    ? (p.step % p.steps_per_epoch) / p.steps_per_epoch : 0;
  const fraction = Math.min(1, (done + (job.status === "running" ? within : 0)) / p.epochs);
  return h("div", { class: "progress-cell" },
    h("span", {}, `epoch ${done}/${p.epochs}`),
    h("progress", { max: "1", value: String(fraction) }),
    job.status === "running" && p.eta_s ? h("span", { class: "muted" }, `ETA ${fmtDuration(p.eta_s)}`) : null);
}

export function bestText(best) {
  if (!best || best.value === null || best.value === undefined) return "–";
  return `${best.monitor ?? "best"} ${fmtNumber(best.value)} @${best.epoch}`;
}

// `fn` at most once every `ms`: a call sooner than that after the last run schedules one
// run for when the time is up (so the last call is never lost, only delayed). `cancel()`
// drops a scheduled run (a page going hidden); calling again schedules anew.
export function throttled(fn, ms) {
  let last = -Infinity;
  let timer = null;
  const run = () => { timer = null; last = performance.now(); fn(); };
  const call = () => {
    if (timer !== null) return;
    const wait = last + ms - performance.now();
    if (wait <= 0) run();
    else timer = setTimeout(run, wait);
  };
  call.cancel = () => { clearTimeout(timer); timer = null; };
  return call;
}
