// The engine page's live part: every second it fetches GET /dashboard, swaps in the
// table rows the server formatted, and redraws the timeline chart as inline SVG from
// the samples (the server keeps the last minutes, so a new page starts with history).
// Without this script the page still shows the server-rendered tables.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
// Bottom to top in the stacked area; "waiting" is drawn as a line over them.
const STACK = ["busy", "idle", "starting", "unhealthy"];
// The chart always shows the last five minutes: a window that grew with the engine's
// uptime squeezed a new burst into a sliver at its right edge.
const WINDOW_S = 300;
const PAD = {left: 30, right: 8, top: 8, bottom: 20};

let samples = [];        // [t, waiting, busy, idle, starting, unhealthy], oldest first
let columns = {};        // series name -> index in a sample
let intervalS = 1;
let keepS = 600;
let hoverT = null;       // wall-clock time under the pointer, or null

function $(id) { return document.getElementById(id); }

function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

// -- tables -------------------------------------------------------------------------

function cellNode(cell) {
  const td = document.createElement("td");
  if (typeof cell === "string") {
    td.textContent = cell;
  } else {
    td.textContent = cell.text;
    if (cell.cls) td.className = cell.cls;
    if (cell.title) td.title = cell.title;
  }
  return td;
}

function fillTable(name, table) {
  const body = $(name);
  if (!body) return;
  const rows = table.rows.map(row => {
    const tr = document.createElement("tr");
    if (row.cls) tr.className = row.cls;
    tr.append(...row.cells.map(cellNode));
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = document.createElement("td");
    td.colSpan = table.columns.length;
    td.textContent = table.empty;
    tr.append(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function showView(view) {
  $("summary").textContent = view.summary;
  for (const [series, value] of Object.entries(view.counts)) {
    const node = $("now-" + series);
    if (node) node.textContent = value;
  }
  for (const [name, table] of Object.entries(view.tables)) fillTable(name, table);
}

// -- the timeline -------------------------------------------------------------------

function addSamples(timeline) {
  intervalS = timeline.interval_s;
  keepS = timeline.keep_s;
  columns = {};
  timeline.series.forEach((name, index) => { columns[name] = index; });
  samples.push(...timeline.samples);
  const last = samples.length ? samples[samples.length - 1][0] : 0;
  while (samples.length && samples[0][0] < last - keepS) samples.shift();
}

function niceStep(max) {
  for (const step of [1, 2, 5, 10, 20, 50, 100]) if (max / step <= 5) return step;
  return Math.ceil(max / 5);
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
}

function draw() {
  const svg = $("chart");
  const width = Math.max(320, Math.round(svg.getBoundingClientRect().width) || 900);
  const height = Math.max(120, Math.round(svg.getBoundingClientRect().height) || 180);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const nodes = [];

  const [end, windowS] = timeRange();
  const start = end - windowS;
  const shown = samples.filter(s => s[0] + intervalS > start);
  svg.setAttribute("data-points", String(shown.length));
  svg.setAttribute("data-window-s", String(windowS));
  $("window").textContent = hoverText() || `last ${Math.round(windowS / 60)} min, a sample a second`;

  const total = s => STACK.reduce((sum, name) => sum + s[columns[name]], 0);
  const peak = Math.max(2, ...shown.map(s => Math.max(total(s), s[columns.waiting])));
  const step = niceStep(peak + 1);
  const top = Math.ceil((peak + 1) / step) * step;  // headroom: the top is never flush
  const x = t => PAD.left + Math.max(0, Math.min(1, (t - start) / windowS)) * plotW;
  const y = v => PAD.top + plotH - (v / top) * plotH;

  for (let v = 0; v <= top; v += step) {
    nodes.push(el("line", {class: v ? "grid" : "axis", x1: PAD.left, x2: width - PAD.right, y1: y(v), y2: y(v)}));
    const label = el("text", {x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end"});
    label.textContent = String(v);
    nodes.push(label);
  }
  const tickS = windowS <= 60 ? 15 : windowS <= 180 ? 30 : windowS <= 300 ? 60 : 120;
  for (let ago = 0; ago <= windowS; ago += tickS) {
    const tx = x(end - ago);
    if (ago) nodes.push(el("line", {class: "grid", x1: tx, x2: tx, y1: PAD.top, y2: PAD.top + plotH}));
    const anchor = ago === 0 ? "end" : ago === windowS ? "start" : "middle";
    const label = el("text", {x: tx, y: height - 5, "text-anchor": anchor});
    label.textContent = ago === 0 ? "now" : ago % 60 ? `\u2212${ago} s` : `\u2212${ago / 60} min`;
    nodes.push(label);
  }

  if (shown.length) {
    // Each sample holds its value until the next one (a step chart: counts jump).
    const next = i => (i + 1 < shown.length ? shown[i + 1][0] : end);
    const base = shown.map(() => 0);
    for (const name of STACK) {
      const col = columns[name];
      const upper = shown.map((s, i) => base[i] + s[col]);
      if (upper.some((u, i) => u > base[i])) {
        const forward = shown.map((s, i) => `${x(s[0])},${y(upper[i])} ${x(next(i))},${y(upper[i])}`);
        const back = shown.map((s, i) => `${x(next(i))},${y(base[i])} ${x(s[0])},${y(base[i])}`).reverse();
        nodes.push(el("path", {class: "s-" + name, d: `M${forward.join(" L")} L${back.join(" L")} Z`}));
      }
      upper.forEach((u, i) => { base[i] = u; });
    }
    const waiting = shown.map((s, i) => `${x(s[0])},${y(s[columns.waiting])} ${x(next(i))},${y(s[columns.waiting])}`);
    nodes.push(el("polyline", {class: "s-waiting", points: waiting.join(" ")}));
  } else {
    const note = el("text", {class: "empty-note", x: PAD.left + plotW / 2, y: PAD.top + plotH / 2, "text-anchor": "middle"});
    note.textContent = "no samples yet";
    nodes.push(note);
  }
  if (hoverT !== null) {
    const hx = x(hoverT);
    nodes.push(el("line", {class: "axis", x1: hx, x2: hx, y1: PAD.top, y2: PAD.top + plotH}));
  }
  svg.replaceChildren(...nodes);
}

function hoverText() {
  if (hoverT === null || !samples.length) return "";
  let found = samples[0];
  for (const s of samples) if (s[0] <= hoverT) found = s;
  const parts = ["waiting", ...STACK].map(name => `${found[columns[name]]} ${name}`);
  return `at ${clock(found[0])}: ${parts.join(", ")}`;
}

// The chart's right edge (the end of the newest sample) and its width in seconds:
// WINDOW_S, whatever the history's length (or what the server keeps, if less).
function timeRange() {
  const windowS = Math.min(keepS, WINDOW_S);
  if (!samples.length) return [0, windowS];
  return [samples[samples.length - 1][0] + intervalS, windowS];
}

function pointerAt(event) {
  const svg = $("chart");
  const box = svg.getBoundingClientRect();
  if (!samples.length) return;
  const [end, windowS] = timeRange();
  const frac = (event.clientX - box.left - PAD.left) / (box.width - PAD.left - PAD.right);
  hoverT = frac < 0 || frac > 1 ? null : end - windowS + frac * windowS;
  draw();
}

// -- polling ------------------------------------------------------------------------

async function refresh() {
  const since = samples.length ? samples[samples.length - 1][0] : null;
  try {
    const response = await fetch(since === null ? "dashboard" : `dashboard?since=${since}`,
                                 {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    showView(data.view);
    addSamples(data.timeline);
    draw();
    $("link-state").textContent = "";
  } catch (error) {
    $("link-state").textContent = `engine unreachable (${error.message}); retrying`;
  }
  setTimeout(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const svg = $("chart");
  svg.addEventListener("mousemove", pointerAt);
  svg.addEventListener("mouseleave", () => { hoverT = null; draw(); });
  window.addEventListener("resize", draw);
  refresh();
});
