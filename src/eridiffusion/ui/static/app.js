// eri ui: plain JS, no build step. Polls the JSON routes under /api and draws the charts as inline SVG.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const enc = encodeURIComponent;
const POLL_MS = 1500;
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

const state = { run: null, rows: [], offset: 0, configs: [] };

async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options });
  const type = res.headers.get("content-type") || "";
  const body = type.includes("json") ? await res.json() : await res.text();
  if (!res.ok) {
    const detail = typeof body === "object" ? body.detail : body;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

const post = (path, data) =>
  api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(data ?? {}) });

function fmt(x) {
  if (x === null || x === undefined) return "";
  if (typeof x !== "number") return esc(x);
  return Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toPrecision(4);
}

function size(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fileUrl(path) {
  return `/api/runs/${enc(state.run)}/files/${path.split("/").map(enc).join("/")}`;
}

// ---- start a job -------------------------------------------------------------------------------------------

async function loadConfigs(select) {
  const { configs } = await api("/api/configs");
  state.configs = configs;
  const el = $("#config-select");
  el.innerHTML = configs.map((c) => `<option>${esc(c)}</option>`).join("");
  if (select) el.value = select;
}

function showValidation(text, problems) {
  const out = $("#validate-output");
  out.textContent = text;
  out.classList.toggle("problems", problems);
  out.classList.remove("hidden");
}

async function startJob() {
  const config = $("#config-select").value;
  if (!config) return;
  $("#start").disabled = true;
  showValidation(`validating ${config} ...`, false);
  try {
    const res = await post("/api/jobs", { config });
    showValidation(`queued run ${res.job.run}\n\n${res.plan}`, false);
    location.hash = `run=${enc(res.job.run)}`;
  } catch (err) {
    showValidation(err.message, true);
  } finally {
    $("#start").disabled = false;
    refreshRuns();
  }
}

async function upload(ev) {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const res = await post("/api/configs", { name: file.name, text: await file.text() });
    await loadConfigs(res.config);
    showValidation(`uploaded ${res.config}; press "Validate & start"`, false);
  } catch (err) {
    showValidation(err.message, true);
  }
  ev.target.value = "";
}

// ---- runs table --------------------------------------------------------------------------------------------

async function refreshRuns() {
  let data;
  try { data = await api("/api/runs"); } catch (err) { return; }
  $("#runs tbody").innerHTML = data.runs.map((r) => `
    <tr data-run="${esc(r.name)}" class="${r.name === state.run ? "selected" : ""}">
      <td>${esc(r.name)}</td><td>${esc(r.family)}${r.network ? ` (${esc(r.network)})` : ""}</td>
      <td><span class="badge ${esc(r.status)}">${esc(r.status)}</span></td><td>${r.step}</td>
      <td>${fmt(r.last_loss)}</td><td>${esc(r.started.replace("T", " ").replace("Z", ""))}</td>
    </tr>`).join("");
  $("#jobs").innerHTML = data.jobs.slice(0, 10).map((j) =>
    `<li>${esc(j.run)} (${esc(j.config)}): ${esc(j.state)}${j.returncode !== null ? `, exit ${j.returncode}` : ""}
     ${j.state === "queued" ? `<button class="cancel" data-job="${esc(j.id)}">cancel</button>` : ""}</li>`).join("");
}

// ---- charts ------------------------------------------------------------------------------------------------

function drawChart(svg, series, marks) {
  const W = 480, H = 220, L = 52, R = 8, T = 8, B = 24;
  const pts = series.flatMap((s) => s.points);
  svg.dataset.points = String(pts.length);
  if (!pts.length) { svg.innerHTML = `<text x="${W / 2 - 30}" y="${H / 2}">no data yet</text>`; return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= Math.abs(y0) * 0.1 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  let out = `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#999"/>`;
  out += `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#999"/>`;
  out += `<text x="2" y="${T + 8}">${fmt(y1)}</text><text x="2" y="${H - B}">${fmt(y0)}</text>`;
  out += `<text x="${L}" y="${H - 6}">step ${x0}</text><text x="${W - R - 60}" y="${H - 6}">step ${x1}</text>`;
  for (const m of marks) {
    const x = sx(m.step).toFixed(1);
    out += `<line x1="${x}" y1="${T}" x2="${x}" y2="${H - B}" stroke="#bbb" stroke-dasharray="4 3"/>`;
    out += `<text x="${(+x + 3).toFixed(1)}" y="${T + 10}">${esc(m.label)}</text>`;
  }
  series.forEach((s, i) => {
    const c = COLOURS[i % COLOURS.length];
    const d = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    out += `<polyline class="series" fill="none" stroke="${c}" stroke-width="1.5" points="${d}"/>`;
  });
  svg.innerHTML = out;
  const legend = svg.parentElement.querySelector(".legend");
  legend.innerHTML = series.length > 1
    ? series.map((s, i) => `<span style="color:${COLOURS[i % COLOURS.length]}">${esc(s.name)}</span>`).join(" ") : "";
}

function chartSeries(rows, pick) {
  const byName = new Map();
  for (const r of rows) {
    for (const [name, value] of pick(r)) {
      if (typeof value !== "number" || !isFinite(value)) continue;
      if (!byName.has(name)) byName.set(name, []);
      byName.get(name).push([r.step, value]);
    }
  }
  return [...byName].map(([name, points]) => ({ name, points }));
}

function drawCharts() {
  const rows = state.rows;
  const marks = [];
  rows.forEach((r, i) => {
    if (r.stage && (i === 0 || rows[i - 1].stage !== r.stage)) marks.push({ step: r.step, label: r.stage });
  });
  const loss = chartSeries(rows, (r) => {
    const key = "loss" in r ? "loss" : "rec_loss" in r ? "rec_loss" : null;
    // validation rows (val/loss, every validation.every steps) share the chart: the gap is the overfit
    return [key, "val/loss"].filter((k) => k && k in r).map((k) => [r.stage ? `${r.stage} ${k}` : k, r[k]]);
  });
  const lr = chartSeries(rows, (r) =>
    Object.entries(r).filter(([k]) => k === "lr" || k.startsWith("lr/")).map(([k, v]) => [r.stage ? `${r.stage} ${k}` : k, v]));
  drawChart($("#loss-chart"), loss, marks);
  drawChart($("#lr-chart"), lr, marks);
}

// ---- one run -----------------------------------------------------------------------------------------------

function renderDetail(d) {
  $("#detail").classList.remove("hidden");
  $("#run-name").textContent = d.name;
  const status = d.status;
  const badge = $("#run-status");
  badge.textContent = status;
  badge.className = `badge ${status}`;
  $("#run-step").textContent = `step ${d.step}${d.last_loss !== null ? `, loss ${fmt(d.last_loss)}` : ""}`;
  $("#stop").disabled = !["running", "queued", "starting"].includes(status);
  $("#resume").disabled = !(status === "interrupted" || status === "failed");
  $("#run-error").textContent = d.error;
  $("#run-error").classList.toggle("hidden", !d.error);
  $("#stages tbody").innerHTML = d.stages.map((s) => {
    const sm = s.summary || {};
    const finals = Object.entries(sm).filter(([k]) => k.startsWith("final_")).map(([k, v]) => `${esc(k.slice(6))} ${fmt(v)}`).join(", ");
    const ev = s.eval ? ["colour_accuracy", "shape_accuracy", "both_accuracy"].filter((k) => k in s.eval)
      .map((k) => `${k.split("_")[0]} ${(100 * s.eval[k]).toFixed(1)}%`).join(", ") : "";
    return `<tr><td>${s.index}</td><td>${esc(s.name)}</td><td>${sm.steps ?? ""}</td><td>${sm.seconds ?? ""}</td><td>${finals}</td><td>${ev}</td></tr>`;
  }).join("") || `<tr><td colspan="6">single-stage run</td></tr>`;
  const shown = $("#samples").dataset.shown || "";
  const key = d.samples.map((s) => s.path).join("|");
  if (shown !== key) {
    $("#samples").dataset.shown = key;
    $("#samples").innerHTML = d.samples.map((s) =>
      `<figure><img class="sample" src="${fileUrl(s.path)}" data-label="step ${s.step}" alt="samples at step ${s.step}"><figcaption>step ${s.step}</figcaption></figure>`).join("") || "none yet";
  }
  const evals = d.stages.filter((s) => s.eval_grid).map((s) => ({ label: `${s.name} eval`, path: s.eval_grid, scores: s.eval }));
  if (d.eval) evals.push({ label: "eval", path: null, scores: d.eval });
  $("#eval").innerHTML = evals.map((e) => {
    const sc = e.scores ? Object.entries(e.scores).filter(([k, v]) => k.endsWith("accuracy") && typeof v === "number")
      .map(([k, v]) => `${esc(k)} ${(100 * v).toFixed(1)}%`).join(", ") : "";
    return `<figure>${e.path ? `<img class="sample" src="${fileUrl(e.path)}" data-label="${esc(e.label)}" alt="${esc(e.label)}">` : ""}<figcaption>${esc(e.label)}: ${sc}</figcaption></figure>`;
  }).join("") || "none";
  $("#downloads").innerHTML = d.downloads.map((f) =>
    `<li><a href="${fileUrl(f.path)}" download>${esc(f.path)}${f.folder ? " (zip)" : ""}</a> ${size(f.size)}</li>`).join("") || "<li>nothing yet</li>";
  $("#checkpoints tbody").innerHTML = d.checkpoints.map((c) =>
    `<tr><td>${c.step}</td><td>${size(c.size)}</td><td>${c.files.map(esc).join(", ")}</td></tr>`).join("");
  $("#config").textContent = d.config;
}

async function refreshRun() {
  const name = state.run;
  if (!name) return;
  try {
    const [d, m, log] = await Promise.all([
      api(`/api/runs/${enc(name)}`),
      api(`/api/runs/${enc(name)}/metrics?offset=${state.offset}`),
      api(`/api/runs/${enc(name)}/log?lines=200`),
    ]);
    if (name !== state.run) return;
    if (m.restart) state.rows = [];
    state.rows.push(...m.rows);
    state.offset = m.offset;
    renderDetail(d);
    drawCharts();
    const pre = $("#log");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  } catch (err) {
    $("#run-error").textContent = err.message;
    $("#run-error").classList.remove("hidden");
  }
}

function selectFromHash() {
  const m = /run=([^&]+)/.exec(location.hash);
  const name = m ? decodeURIComponent(m[1]) : null;
  if (name === state.run) return;
  Object.assign(state, { run: name, rows: [], offset: 0 });
  $("#samples").dataset.shown = "";
  if (name) refreshRun(); else $("#detail").classList.add("hidden");
  refreshRuns();
}

async function runAction(action) {
  try {
    const res = await post(`/api/runs/${enc(state.run)}/${action}`);
    if (res.plan) showValidation(`resuming ${state.run}\n\n${res.plan}`, false);
  } catch (err) {
    showValidation(err.message, true);
  }
  refreshRun();
  refreshRuns();
}

// ---- wiring ------------------------------------------------------------------------------------------------

$("#start").addEventListener("click", startJob);
$("#upload").addEventListener("change", upload);
$("#stop").addEventListener("click", () => runAction("stop"));
$("#resume").addEventListener("click", () => runAction("resume"));
$("#runs tbody").addEventListener("click", (ev) => {
  const row = ev.target.closest("tr[data-run]");
  if (row) location.hash = `run=${enc(row.dataset.run)}`;
});
document.addEventListener("click", (ev) => {
  const img = ev.target.closest("img.sample");
  if (!img) return;
  $("#lightbox img").src = img.src;
  $("#lightbox p").textContent = img.dataset.label;
  $("#lightbox").classList.remove("hidden");
});
$("#jobs").addEventListener("click", async (ev) => {
  const button = ev.target.closest("button.cancel");
  if (!button) return;
  try { await post(`/api/jobs/${enc(button.dataset.job)}/stop`); } catch (err) { showValidation(err.message, true); }
  refreshRuns();
});
$("#lightbox").addEventListener("click", () => $("#lightbox").classList.add("hidden"));
window.addEventListener("hashchange", selectFromHash);

loadConfigs();
selectFromHash();
refreshRuns();
setInterval(() => { refreshRuns(); refreshRun(); }, POLL_MS);
