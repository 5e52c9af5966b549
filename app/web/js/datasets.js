// Datasets: upload with a progress bar; the list with fields, shapes, dtypes, rows, size.

import { api, API, csrf } from "./api.js";
import { clear, fmtBytes, fmtTime, h } from "./dom.js";

export async function renderDatasets(root) {
  const file = h("input", { type: "file", id: "dataset-file", accept: ".npz,.npy,.csv,.parquet" });
  const bar = h("progress", { id: "upload-progress", max: "1", value: "0", hidden: true });
  const state = h("span", { id: "upload-state", class: "muted" });
  const body = h("tbody");
  root.append(h("h1", {}, "Datasets"),
    h("div", { class: "toolbar" }, file, bar, state),
    h("table", { id: "datasets" }, h("thead", {}, h("tr", {}, ["Name", "Id", "Format", "Rows", "Size", "Fields", "Uploaded", ""].map((t) => h("th", {}, t)))), body));

  async function load() {
    clear(body);
    for (const d of await api("/datasets")) {
      const fields = h("ul", { class: "fields" }, Object.entries(d.fields).map(([name, f]) =>
        h("li", {}, h("code", {}, name), ` ${f.dtype} (${f.shape.join(", ")})`, f.num_classes ? ` ${f.num_classes} classes` : "")));
      const remove = h("button", { type: "button", class: "danger", onclick: async () => {
        if (!confirm(`Delete ${d.name}?`)) return;
        try { await api(`/datasets/${d.id}`, { method: "DELETE" }); load(); } catch (e) { state.textContent = e.message; }
      } }, "Delete");
      body.append(h("tr", { dataset: { dataset: d.id } }, h("td", {}, d.name), h("td", { class: "muted" }, d.id),
        h("td", {}, d.format), h("td", {}, d.rows ?? "?"), h("td", {}, fmtBytes(d.size)), h("td", {}, fields),
        h("td", {}, fmtTime(d.created_at)), h("td", {}, remove)));
    }
  }

  // XMLHttpRequest, not fetch: it reports upload progress. The file's raw bytes, its
  // name in the query: nothing for the server to parse (a form would work too).
  file.addEventListener("change", () => {
    const chosen = file.files[0];
    if (!chosen) return;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${API}/datasets?name=${encodeURIComponent(chosen.name)}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-CSRF-Token", csrf());
    bar.hidden = false;
    bar.value = 0;
    state.textContent = `uploading ${chosen.name}…`;
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
    xhr.onload = () => {
      bar.value = 1;
      if (xhr.status === 201) { state.textContent = `uploaded ${chosen.name}`; load(); }
      else {
        let detail = xhr.statusText;
        try { const d = JSON.parse(xhr.responseText).detail; detail = Array.isArray(d) ? d.map((i) => `${i.path}: ${i.message}`).join("; ") : d; } catch { /* keep */ }
        state.textContent = `upload failed: ${detail}`;
      }
      file.value = "";
    };
    xhr.onerror = () => { state.textContent = "upload failed: the connection dropped"; };
    xhr.send(chosen);
  });
  await load();
  return null;
}
