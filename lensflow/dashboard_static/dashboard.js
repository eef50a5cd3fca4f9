// The lensflow dashboard. Everything that comes from events (keys, labels, reasons) is
// put on the page with textContent, never as HTML.
"use strict";

const MAX_CARDS = 60;
let shown = null; // the pointer version this page shows: the flip's `expect`
let total = 0;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(el("td", c));
  return tr;
}

function fmt(x, digits) {
  return typeof x === "number" ? x.toFixed(digits) : "-";
}

function addPrediction(p) {
  const card = el("div", null, "pred");
  card.dataset.key = p.key;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = "";
  img.src = "/thumb?" + new URLSearchParams({ bucket: p.bucket, key: p.key }).toString();
  card.appendChild(img);
  card.appendChild(el("div", (p.label || "?") + "  " + fmt(p.score, 2), "label"));
  card.appendChild(el("div", p.key, "meta key"));
  card.appendChild(el("div", "model " + (p.model_version || "-"), "meta"));
  const feed = document.getElementById("feed");
  feed.insertBefore(card, feed.firstChild);
  while (feed.children.length > MAX_CARDS) feed.removeChild(feed.lastChild);
  total += 1;
  document.getElementById("total").textContent = String(total);
}

function renderCounts(counts) {
  const box = document.getElementById("counts");
  box.replaceChildren();
  const max = Math.max(1, ...Object.values(counts));
  for (const [name, n] of Object.entries(counts)) {
    const line = el("div", null, "bar");
    line.appendChild(el("span", name, "name"));
    const fill = el("span", null, "fill");
    fill.style.width = Math.max(2, (260 * n) / max) + "px";
    line.appendChild(fill);
    line.appendChild(el("span", n));
    box.appendChild(line);
  }
}

function renderChart(series) {
  const svg = document.getElementById("chart");
  svg.replaceChildren();
  if (!series.length) return;
  const lines = [["throughput", "#2563eb"], ["lag", "#d97706"], ["replicas", "#1e8e3e"]];
  for (const [field, colour] of lines) {
    const values = series.map((p) => (typeof p[field] === "number" ? p[field] : 0));
    const max = Math.max(1, ...values);
    const pts = values.map((v, i) =>
      ((600 * i) / Math.max(1, values.length - 1)).toFixed(1) + "," + (86 - (80 * v) / max).toFixed(1));
    const path = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    path.setAttribute("points", pts.join(" "));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", colour);
    path.setAttribute("stroke-width", "2");
    svg.appendChild(path);
  }
}

function renderState(s) {
  const pointer = s.pointer;
  shown = pointer ? pointer.version : null;
  document.getElementById("pointer-version").textContent = shown || "none";
  document.getElementById("throughput").textContent = fmt(s.throughput, 1);
  document.getElementById("lag").textContent = s.lag === null || s.lag === undefined ? "-" : String(s.lag);
  document.getElementById("replicas").textContent =
    s.replicas === null || s.replicas === undefined ? "-" : String(s.replicas);
  const banner = document.getElementById("banner");
  if (s.no_model) {
    banner.textContent = "No model yet: uploads wait (503, retried) or are dead-lettered as replayable. " +
      "Seed one with `lensflow up --seed-model`, or `lensflow models publish FILE --labels FILE --promote`.";
    banner.style.display = "block";
  } else if (s.store_error) {
    banner.textContent = "Model store unreachable: " + s.store_error;
    banner.style.display = "block";
  } else {
    banner.style.display = "none";
  }
  document.getElementById("pointer-line").textContent = pointer
    ? "serving " + pointer.version + " (sha256 " + String(pointer.sha256).slice(0, 12) + "), " +
      pointer.action + " by " + pointer.flipped_by + " at " + pointer.flipped_at +
      (pointer.pinned ? ", pinned" : "") + (pointer.reason ? ": " + pointer.reason : "")
    : "no pointer yet";
  renderCounts(s.counts || {});
  renderChart(s.series || []);

  const versions = document.getElementById("versions");
  versions.replaceChildren();
  const select = document.getElementById("flip-version");
  const chosen = select.value;
  select.replaceChildren();
  for (const v of (s.versions || []).slice().reverse()) {
    const m = v.metrics || {};
    const tr = row([v.version, v.sha256, fmt(m.accuracy, 3), fmt(m.macro_f1, 3), v.created || "-"]);
    if (v.version === shown) tr.className = "current";
    versions.appendChild(tr);
    const option = el("option", v.version);
    option.value = v.version;
    select.appendChild(option);
  }
  if (chosen) select.value = chosen;

  const history = document.getElementById("history");
  history.replaceChildren();
  for (const h of (s.history || []).slice().reverse()) {
    history.appendChild(row([h.sequence, h.flipped_at, h.action, (h.from || "-") + " -> " + h.version,
      h.flipped_by, h.reason || "-"]));
  }
  const dead = document.getElementById("dead-letters");
  dead.replaceChildren();
  if (s.dead_letters && s.dead_letters.length) {
    for (const d of s.dead_letters) dead.appendChild(row([d.count, d.code || "-", d.reason, d.newest || "-"]));
  } else {
    dead.appendChild(row(["0", "", s.dead_letters ? "none" : "not read yet", ""]));
  }
  const flips = document.getElementById("flip");
  flips.title = s.flips_enabled ? "" : "off: the server has no LENSFLOW_DASHBOARD_TOKEN";
}

async function change(action) {
  const status = document.getElementById("flip-status");
  const body = { expect: shown };
  if (action === "flip") body.version = document.getElementById("flip-version").value;
  status.className = "";
  status.textContent = action + "...";
  const reply = await fetch("/api/" + action, {
    method: "POST",
    headers: { "Content-Type": "application/json",
               "Authorization": "Bearer " + document.getElementById("token").value },
    body: JSON.stringify(body),
  });
  let data = {};
  try { data = await reply.json(); } catch (e) { data = {}; }
  if (reply.ok) {
    status.className = "good";
    status.textContent = "now serving " + data.version;
    refresh();
  } else {
    status.className = "bad";
    status.textContent = "refused (" + reply.status + "): " + (data.error || reply.statusText);
  }
}

async function refresh() {
  const reply = await fetch("/api/state");
  if (reply.ok) renderState(await reply.json());
}

function connect() {
  const source = new EventSource("/events");
  const status = document.getElementById("connection");
  source.onopen = () => { status.textContent = "live"; };
  source.onerror = () => { status.textContent = "reconnecting"; };
  source.addEventListener("prediction", (e) => addPrediction(JSON.parse(e.data)));
  source.addEventListener("state", (e) => renderState(JSON.parse(e.data)));
}

document.getElementById("flip").addEventListener("click", () => change("flip"));
document.getElementById("rollback").addEventListener("click", () => change("rollback"));
refresh();
connect();
