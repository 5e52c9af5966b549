// Submit: paste or upload a spec; it is checked against POST /jobs/validate as you type,
// each problem shown at its JSON path, and the model summary shown before submitting.

import { api } from "./api.js";
import { clear, h } from "./dom.js";
import { summaryTable } from "./job.js";

const CHECK_AFTER_MS = 300;

export async function renderSubmit(root) {
  const editor = h("textarea", { id: "spec-editor", spellcheck: "false", rows: "24",
    placeholder: "Paste a job spec (JSON), or load a file" });
  const file = h("input", { type: "file", accept: ".json,application/json", id: "spec-file" });
  const issues = h("ul", { id: "issues", class: "issues" });
  const summary = h("div", { id: "spec-summary" });
  const state = h("p", { id: "spec-state", class: "muted" }, "");
  const submit = h("button", { type: "button", id: "submit-job", disabled: true }, "Submit");
  const trainPick = h("select", { id: "pick-train" });
  const valPick = h("select", { id: "pick-validation" });

  let datasets = [];
  try { datasets = await api("/datasets"); } catch { /* listed as empty */ }
  for (const [select, none] of [[trainPick, "train dataset…"], [valPick, "validation dataset…"]]) {
    select.append(h("option", { value: "" }, none), datasets.map((d) => h("option", { value: d.id }, `${d.name} (${d.id.slice(-6)}, ${d.rows ?? "?"} rows)`)));
  }
  const setData = (key, select) => select.addEventListener("change", () => {
    if (!select.value) return;
    try {
      const spec = JSON.parse(editor.value || "{}");
      spec.data = { ...(spec.data || {}), [key]: select.value };
      editor.value = JSON.stringify(spec, null, 2);
      check();
    } catch { state.textContent = "fix the JSON first, then pick a dataset"; }
  });
  setData("train", trainPick);
  setData("validation", valPick);

  root.append(h("h1", {}, "Submit a job"),
    h("div", { class: "submit-layout" },
      h("div", {}, h("div", { class: "toolbar" }, file, trainPick, valPick), editor, h("div", { class: "toolbar" }, submit, state)),
      h("div", {}, h("h2", {}, "Problems"), issues, h("h2", {}, "Model"), summary)));

  let timer = null;
  let seq = 0;
  editor.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, CHECK_AFTER_MS); });
  file.addEventListener("change", async () => {
    if (!file.files[0]) return;
    editor.value = await file.files[0].text();
    check();
  });

  async function check() {
    const mine = ++seq;
    clear(issues);
    submit.disabled = true;
    if (!editor.value.trim()) { state.textContent = ""; return; }
    state.textContent = "checking…";
    try {
      // the text as typed: the server's parser names the line and column of bad JSON
      const result = await api("/jobs/validate", { method: "POST", body: editor.value, headers: { "Content-Type": "application/json" } });
      if (mine !== seq) return;
      state.textContent = "valid";
      clear(summary).append(summaryTable(result.summary));
      submit.disabled = false;
    } catch (error) {
      if (mine !== seq) return;
      state.textContent = "not valid";
      const detail = Array.isArray(error.detail) ? error.detail : [{ path: "", message: error.message }];
      for (const issue of detail) {
        issues.append(h("li", { dataset: { path: issue.path || "" } },
          h("code", { class: "path" }, issue.path || "(spec)"), " ", h("span", {}, issue.message)));
      }
    }
  }

  submit.addEventListener("click", async () => {
    submit.disabled = true;
    try {
      const job = await api("/jobs", { method: "POST", body: editor.value, headers: { "Content-Type": "application/json" } });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      state.textContent = error.message;
      submit.disabled = false;
    }
  });
  return () => clearTimeout(timer);
}
