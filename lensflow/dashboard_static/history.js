// The history panel: GET /api/history (fixed questions of the predictions archive).
// Every value goes on the page with textContent.
"use strict";

function historyCell(tag, text) {
  const node = document.createElement(tag);
  node.textContent = text === null || text === undefined ? "-" : String(text);
  return node;
}

function renderClassDays(rows) {
  const labels = [...new Set(rows.map((r) => r.label))].sort();
  const days = [...new Set(rows.map((r) => r.date))].sort().reverse();
  const head = document.getElementById("class-days-head");
  head.replaceChildren(historyCell("th", "date"), ...labels.map((l) => historyCell("th", l)));
  const body = document.getElementById("class-days");
  body.replaceChildren();
  for (const day of days) {
    const tr = document.createElement("tr");
    tr.appendChild(historyCell("td", day));
    for (const label of labels) {
      const hit = rows.find((r) => r.date === day && r.label === label);
      tr.appendChild(historyCell("td", hit ? hit.predictions : 0));
    }
    body.appendChild(tr);
  }
}

function renderVersions(rows) {
  const body = document.getElementById("version-history");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    const share = typeof r.low_share === "number" ? (100 * r.low_share).toFixed(1) + " %" : "-";
    for (const v of [r.model_version, r.predictions, share, r.first_seen, r.last_seen]) {
      tr.appendChild(historyCell("td", v));
    }
    body.appendChild(tr);
  }
}

async function refreshHistory() {
  try {
    const reply = await fetch("/api/history");
    const h = await reply.json();
    document.getElementById("archive-where").textContent = h.error
      ? "archive not readable: " + h.error
      : h.archive;
    if (!h.error) {
      renderClassDays(h.per_class_per_day || []);
      renderVersions(h.per_version || []);
    }
  } catch (err) {
    document.getElementById("archive-where").textContent = "archive not readable: " + err;
  }
}

refreshHistory();
setInterval(refreshHistory, 15000);
