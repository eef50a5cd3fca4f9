// The dashboard's learning views: label queued photos with the keyboard, and quality over
// time. Names of images, classes and reasons go on the page with textContent, never HTML.
"use strict";

const KEYS = "123456789abcdefghijklmnopqrstuvwxyz"; // one key a class, in the model's order
const SVG = "http://www.w3.org/2000/svg";
const labelling = { entries: [], index: 0, classes: [], done: [], busy: false };

function node(tag, text, cls) {
  const n = document.createElement(tag);
  if (text !== undefined && text !== null) n.textContent = String(text);
  if (cls) n.className = cls;
  return n;
}

function num(x, digits) {
  return typeof x === "number" ? x.toFixed(digits) : "-";
}

// --- views ------------------------------------------------------------------------------

function showView() {
  const view = (location.hash || "#live").slice(1);
  for (const name of ["live", "label", "quality"]) {
    document.getElementById("view-" + name).hidden = name !== view;
    document.getElementById("tab-" + name).classList.toggle("active", name === view);
  }
  if (view === "label") loadQueue();
  if (view === "quality") loadQuality();
}

// --- labelling --------------------------------------------------------------------------

function token() {
  return document.getElementById("label-token").value || document.getElementById("token").value;
}

function holdout() {
  return document.getElementById("holdout-mode").checked;
}

async function loadQueue() {
  const reply = await fetch("/api/queue");
  const data = await reply.json();
  if (!reply.ok) {
    setStatus("bad", "queue unreadable (" + reply.status + "): " + (data.error || ""));
    return;
  }
  labelling.entries = holdout() ? shuffled(data.entries) : data.entries;
  labelling.classes = data.classes.length ? data.classes : classesOf(data.entries);
  labelling.index = 0;
  document.getElementById("queue-total").textContent = String(data.total);
  renderKeys();
  renderPhoto();
}

// Holdout mode shows the queue in random order: a holdout of only the hardest photos would
// judge models on the cases they find hardest, not on what arrives.
function shuffled(items) {
  const out = items.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

function classesOf(entries) {
  const seen = new Set();
  for (const e of entries) for (const p of e.top) seen.add(p.label);
  return [...seen].sort();
}

function renderKeys() {
  const box = document.getElementById("class-keys");
  box.replaceChildren();
  labelling.classes.slice(0, KEYS.length).forEach((cls, i) => {
    const button = node("button", null, "class-key secondary");
    button.appendChild(node("kbd", KEYS[i]));
    button.appendChild(node("span", " " + cls));
    button.dataset.cls = cls;
    button.addEventListener("click", (e) => { e.currentTarget.blur(); decide(cls); });
    box.appendChild(button);
  });
}

function current() {
  return labelling.entries[labelling.index] || null;
}

function renderPhoto() {
  const entry = current();
  const img = document.getElementById("label-image");
  const guesses = document.getElementById("guesses");
  guesses.replaceChildren();
  document.getElementById("label-position").textContent = entry
    ? labelling.index + 1 + " of " + labelling.entries.length + " shown"
    : "";
  if (!entry) {
    img.removeAttribute("src");
    document.getElementById("label-key").textContent = "the queue is empty";
    document.getElementById("label-model").textContent = "";
    return;
  }
  img.src = "/queue-image?" + new URLSearchParams({ record: entry.record }).toString();
  document.getElementById("label-key").textContent = entry.bucket + "/" + entry.key;
  document.getElementById("label-model").textContent =
    "model " + (entry.model.version || "?") + ", margin " + num(entry.margin, 3) +
    ", queued " + entry.recorded_at;
  for (const p of entry.top) {
    const line = node("div", null, "bar");
    line.appendChild(node("span", p.label, "name"));
    const fill = node("span", null, "fill");
    fill.style.width = Math.max(2, 240 * Number(p.score)) + "px";
    line.appendChild(fill);
    line.appendChild(node("span", num(Number(p.score), 2)));
    guesses.appendChild(line);
  }
}

function setStatus(kind, text) {
  const status = document.getElementById("label-status");
  status.className = kind;
  status.textContent = text;
}

async function post(path, body) {
  const reply = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + token() },
    body: JSON.stringify(body),
  });
  let data = {};
  try { data = await reply.json(); } catch (e) { data = {}; }
  return [reply.status, data];
}

function who() {
  return document.getElementById("labeller").value.trim();
}

async function decide(cls) {
  const entry = current();
  if (!entry || labelling.busy) return;
  labelling.busy = true;
  const image = entry.bucket + "/" + entry.key;
  const body = { image: image, class: cls, holdout: holdout() };
  if (who()) body.by = who();
  try {
    const [status, data] = await post("/api/label", body);
    if (status === 200) {
      labelling.done.push(image);
      setStatus("good", image + " -> " + data.stored);
      dropCurrent();
    } else if (status === 409) {
      setStatus("bad", "not labelled (409): " + (data.error || ""));
      dropCurrent(); // labelled by someone else, or no longer queued
    } else {
      setStatus("bad", "refused (" + status + "): " + (data.error || ""));
    }
  } finally {
    labelling.busy = false;
  }
  renderUndo();
}

function dropCurrent() {
  labelling.entries.splice(labelling.index, 1);
  const total = document.getElementById("queue-total");
  total.textContent = String(Math.max(0, Number(total.textContent) - 1));
  if (labelling.index >= labelling.entries.length) labelling.index = 0;
  if (!labelling.entries.length) loadQueue();
  else renderPhoto();
}

function skip() {
  if (!labelling.entries.length) return;
  labelling.index = (labelling.index + 1) % labelling.entries.length;
  renderPhoto();
}

async function undoLast() {
  const image = labelling.done[labelling.done.length - 1];
  if (!image || labelling.busy) return;
  labelling.busy = true;
  try {
    const body = who() ? { image: image, by: who() } : { image: image };
    const [status, data] = await post("/api/label/undo", body);
    if (status === 200 || status === 409) labelling.done.pop();
    setStatus(status === 200 ? "good" : "bad",
      status === 200 ? "undone: " + data.undone + " (queued again)"
        : "not undone (" + status + "): " + (data.error || ""));
  } finally {
    labelling.busy = false;
  }
  renderUndo();
  await loadQueue();
}

function renderUndo() {
  const last = labelling.done[labelling.done.length - 1];
  document.getElementById("undo-last").textContent = last ? "last: " + last : "";
}

function onKey(event) {
  if (document.getElementById("view-label").hidden) return;
  const target = event.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "SELECT")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Backspace") {
    event.preventDefault();
    undoLast();
  } else if (event.key === " " || event.key === "ArrowRight") {
    event.preventDefault();
    skip();
  } else {
    const i = KEYS.indexOf(event.key.toLowerCase());
    if (i >= 0 && i < labelling.classes.length) {
      event.preventDefault();
      decide(labelling.classes[i]);
    }
  }
}

function onHoldoutMode() {
  document.getElementById("holdout-mode").blur(); // keys label, not toggle the box again
  const on = holdout();
  document.getElementById("view-label").classList.toggle("holdout", on);
  document.getElementById("mode-line").textContent = on
    ? "HOLDOUT mode: these labels judge every model. Label only what you are sure of."
    : "training labels (labeled/): rounds learn from them";
  if (!document.getElementById("view-label").hidden) loadQueue();
}

// --- quality ----------------------------------------------------------------------------

async function loadQuality() {
  if (typeof refresh === "function") refresh(); // the header's pointer too (dashboard.js)
  const reply = await fetch("/api/quality");
  const data = await reply.json();
  if (!reply.ok) {
    document.getElementById("now-line").textContent = "model store unreadable: " + (data.error || "");
    return;
  }
  renderNow(data);
  renderScores(data.scores, data.serving);
  renderConfusion(data.champion);
  renderRounds(data.rounds);
}

function renderNow(data) {
  const running = data.running
    ? "running now: " + data.running.holder + " (lease until " + data.running.expires_at + ")"
    : "no round running";
  const last = data.last
    ? "last: round " + data.last.round_id + ", " + data.last.decision + " at " + when(data.last.started_at)
    : "no round yet";
  const next = data.next ? "next: " + (data.next.at || "?") + " (" + data.next.by + ")" : "next: not scheduled";
  document.getElementById("now-line").textContent = running + "; " + last + "; " + next;
}

function when(seconds) {
  return typeof seconds === "number" ? new Date(seconds * 1000).toISOString().slice(0, 19) + "Z" : "-";
}

function svgText(x, y, text, anchor) {
  const t = document.createElementNS(SVG, "text");
  t.setAttribute("x", x);
  t.setAttribute("y", y);
  t.setAttribute("font-size", "11");
  t.setAttribute("text-anchor", anchor || "middle");
  t.textContent = text;
  return t;
}

function renderScores(scores, serving) {
  const svg = document.getElementById("score-chart");
  svg.replaceChildren();
  const points = scores.filter((s) => typeof s.macro_f1 === "number");
  for (const y of [0, 0.5, 1]) svg.appendChild(svgText(24, 184 - 170 * y + 4, y.toFixed(1), "end"));
  if (!points.length) return;
  const x = (i) => 40 + (540 * i) / Math.max(1, points.length - 1);
  const y = (v) => 184 - 170 * v;
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.map((p, i) => x(i).toFixed(1) + "," + y(p.macro_f1).toFixed(1)).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2563eb");
  line.setAttribute("stroke-width", "2");
  svg.appendChild(line);
  points.forEach((p, i) => {
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", x(i).toFixed(1));
    dot.setAttribute("cy", y(p.macro_f1).toFixed(1));
    dot.setAttribute("r", p.version === serving ? "6" : "3");
    dot.setAttribute("fill", p.version === serving ? "#1e8e3e" : "#2563eb");
    dot.setAttribute("class", "score-point");
    dot.dataset.version = p.version;
    svg.appendChild(dot);
    svg.appendChild(svgText(x(i), 198, p.version));
  });
}

function renderConfusion(champion) {
  const table = document.getElementById("confusion");
  table.replaceChildren();
  const caption = document.getElementById("confusion-line");
  if (!champion) {
    caption.textContent = "no round has scored the serving model on a holdout yet";
    return;
  }
  caption.textContent = "serving " + champion.version + " on round " + champion.round_id +
    "'s holdout (" + champion.holdout + " photos): rows are the truth, columns the prediction";
  const labels = champion.labels;
  const head = document.createElement("tr");
  head.appendChild(node("th", "truth \\ predicted"));
  for (const l of labels) head.appendChild(node("th", l));
  table.appendChild(head);
  const max = Math.max(1, ...champion.confusion.flat());
  champion.confusion.forEach((row, i) => {
    const tr = document.createElement("tr");
    tr.appendChild(node("th", labels[i]));
    row.forEach((n, j) => {
      const td = node("td", n, i === j ? "diag" : "");
      td.style.background = "rgba(" + (i === j ? "30,142,62" : "192,57,43") + "," + (n ? 0.12 + 0.6 * n / max : 0) + ")";
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
}

function figures(m) {
  if (!m || typeof m.macro_f1 !== "number") return m && m.problem ? m.problem : "-";
  return m.version + ": F1 " + num(m.macro_f1, 3) + ", acc " + num(m.accuracy, 3);
}

function perClass(m) {
  if (!m || !m.per_class_f1) return "-";
  return Object.entries(m.per_class_f1).map(([c, f]) => c + " " + num(f, 2)).join(", ");
}

function renderRounds(rounds) {
  const body = document.getElementById("rounds");
  body.replaceChildren();
  for (const r of rounds.slice().reverse()) {
    const tr = document.createElement("tr");
    const cells = [when(r.started_at), r.decision, figures(r.champion), figures(r.challenger),
      perClass(r.challenger), r.holdout_size, r.labels_used, r.reason];
    for (const c of cells) tr.appendChild(node("td", c === undefined || c === null ? "-" : c));
    tr.dataset.round = r.round_id;
    body.appendChild(tr);
  }
}

window.addEventListener("hashchange", showView);
document.addEventListener("keydown", onKey);
document.getElementById("holdout-mode").addEventListener("change", onHoldoutMode);
// A clicked button gives its focus back, so that Space skips rather than clicks it again.
for (const [id, act] of [["label-skip", skip], ["label-undo", undoLast], ["label-reload", loadQueue]]) {
  document.getElementById(id).addEventListener("click", (e) => { e.currentTarget.blur(); act(); });
}
document.getElementById("quality-reload").addEventListener("click", loadQuality);
onHoldoutMode();
showView();
