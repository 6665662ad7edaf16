// The weft dashboard: the stats API (`api/v1/stats`) as a service graph
// and tables, the rollouts API (`api/v1/rollouts`) as a panel. Plain
// script, no framework and no build step; every URL is relative, so the
// page works under the API server's service-proxy path as well as at `/`.
//
// State lives in the URL's fragment (`#view=table&window=5m&slo=99.9&
// edge=shop/checkout>payments.payments:80`), so a view can be linked to.
"use strict";

const REFRESH_MS = 5000;
const FETCH_TIMEOUT_MS = 4000;
// Past this many arrows, only failing and selected ones carry a label
// (the others say it on hover); the graph stays legible at 200 edges.
const LABEL_ALL_UP_TO = 60;
// The height of a label's line in the graph, px.
const LABEL_LINE = 13;

const state = {
  view: "graph",
  window: "60s",
  slo: 99.5,
  selected: null, // {kind: "edge", src, dst} | {kind: "node", id}
  stats: null,
  rollouts: null,
  problem: null,
  // Each table's order.
  sort: { edges: { key: "rps", down: true }, workloads: { key: "rps", down: true } },
};
const WINDOWS = ["60s", "5m", "10m"];

const $ = (id) => document.getElementById(id);

function esc(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

// ---- numbers ---------------------------------------------------------

function fmtRps(v) {
  if (v == null) return "–";
  return v >= 10 ? v.toFixed(0) : v.toFixed(1);
}
function fmtPct(v) {
  if (v == null) return "–";
  const p = v * 100;
  return (p >= 99 && p < 100 ? p.toFixed(2) : p.toFixed(1)) + "%";
}
function fmtMs(v) {
  if (v == null) return "–";
  return (v >= 10 ? v.toFixed(0) : v.toFixed(1)) + " ms";
}

// The health of an edge or a workload against the SLO.
function health(signals, circuit) {
  if (!signals || !signals.requests || signals.successRate == null) return "idle";
  if (signals.successRate * 100 < state.slo) return "failing";
  if (circuit && circuit.open + circuit.halfOpen > 0) return "warn";
  return "ok";
}

// ---- the model: workloads as nodes, callers -> destinations as arrows --

// A destination `name.ns:port` of a namespace the stats know is drawn as
// the workload `ns/name` (the Service's and its pods' `app` label agree in
// the common case); anything else (an address, `example.com:443`) is a
// node of its own.
function dstNode(dst, namespaces) {
  const host = dst.replace(/:\d+$/, "");
  const m = /^([a-z0-9-]+)\.([a-z0-9-]+)(\.svc(\.[a-z0-9.-]+)?)?$/.exec(host);
  return m && namespaces.has(m[2]) ? { id: m[2] + "/" + m[1], ns: m[2], name: m[1], external: false }
           : { id: dst, ns: "", name: dst, external: true };
}

function arrowsOf(stats) {
  if (stats.destinations && stats.destinations.length) return stats.destinations;
  // An older control plane: sum the routes here (p99: the worst route's,
  // an upper bound, marked as such).
  const by = new Map();
  for (const e of stats.edges) {
    const k = e.namespace + "/" + e.src + ">" + e.dst;
    const a = by.get(k) || { ...e, requests: 0, rps: 0, ok: 0, mtls: 0, p99Ms: null, p99Bound: true };
    a.requests += e.requests; a.rps += e.rps;
    a.ok += (e.successRate ?? 0) * e.requests; a.mtls += (e.mtlsShare ?? 0) * e.requests;
    a.p99Ms = Math.max(a.p99Ms ?? 0, e.p99Ms ?? 0);
    a.successRate = a.requests ? a.ok / a.requests : null;
    a.mtlsShare = a.requests ? a.mtls / a.requests : null;
    by.set(k, a);
  }
  return [...by.values()];
}

function model(stats) {
  const nodes = new Map();
  const node = (id, ns, name, external) => {
    if (!nodes.has(id)) nodes.set(id, { id, ns, name, external, workload: null, in: [], out: [] });
    return nodes.get(id);
  };
  const namespaces = new Set([...stats.workloads, ...stats.edges].map((r) => r.namespace));
  for (const w of stats.workloads) node(w.namespace + "/" + w.workload, w.namespace, w.workload, false).workload = w;
  const arrows = arrowsOf(stats).map((a) => {
    const from = node(a.namespace + "/" + a.src, a.namespace, a.src, false);
    const d = dstNode(a.dst, namespaces);
    const to = node(d.id, d.ns, d.name, d.external);
    const arrow = { ...a, from: from.id, to: to.id, health: health(a, a.circuit) };
    from.out.push(arrow); to.in.push(arrow);
    return arrow;
  });
  for (const n of nodes.values()) {
    const circuit = n.in.reduce((c, a) => ({
      open: c.open + (a.circuit?.open ?? 0), halfOpen: c.halfOpen + (a.circuit?.halfOpen ?? 0),
    }), { open: 0, halfOpen: 0 });
    n.health = n.workload ? health(n.workload, circuit) : (n.in.length ? worst(n.in) : "idle");
  }
  return { nodes, arrows };
}

function worst(arrows) {
  const rank = { failing: 3, warn: 2, ok: 1, idle: 0 };
  return arrows.reduce((h, a) => (rank[a.health] > rank[h] ? a.health : h), "idle");
}

// ---- layout: callers left of what they call ----------------------------

function layout(nodes, arrows) {
  // Layers by longest path from the callers nobody calls; arrows that
  // close a cycle (found depth-first) do not push a node right.
  const ids = [...nodes.keys()].sort();
  const back = new Set();
  const seen = new Map(); // id -> 1 on the stack, 2 done
  const visit = (id) => {
    seen.set(id, 1);
    for (const a of nodes.get(id).out) {
      if (seen.get(a.to) === 1) back.add(a);
      else if (!seen.has(a.to)) visit(a.to);
    }
    seen.set(id, 2);
  };
  for (const id of ids) if (!seen.has(id) && !nodes.get(id).in.length) visit(id);
  for (const id of ids) if (!seen.has(id)) visit(id);
  const layer = new Map();
  const depth = (id, guard) => {
    if (layer.has(id)) return layer.get(id);
    if (guard > nodes.size) return 0;
    let d = 0;
    for (const a of nodes.get(id).in) if (!back.has(a) && a.from !== id) d = Math.max(d, depth(a.from, guard + 1) + 1);
    layer.set(id, d);
    return d;
  };
  ids.forEach((id) => depth(id, 0));
  const columns = [];
  for (const id of ids) (columns[layer.get(id)] ||= []).push(id);
  // Order within a column by the mean position of the callers, twice over.
  const pos = new Map();
  columns.forEach((col) => col.forEach((id, i) => pos.set(id, i)));
  for (let sweep = 0; sweep < 2; sweep++) {
    for (const col of columns.slice(1)) {
      const at = (id) => {
        const ins = nodes.get(id).in.filter((a) => !back.has(a));
        return ins.length ? ins.reduce((s, a) => s + pos.get(a.from), 0) / ins.length : pos.get(id);
      };
      col.sort((a, b) => at(a) - at(b) || a.localeCompare(b));
      col.forEach((id, i) => pos.set(id, i));
    }
  }
  // Room between columns for an arrow's label.
  const W = 170, H = 52, GAPX = 190, GAPY = 40;
  const tallest = Math.max(1, ...columns.map((c) => c.length));
  const place = new Map();
  columns.forEach((col, x) => {
    const top = ((tallest - col.length) * (H + GAPY)) / 2;
    col.forEach((id, y) => place.set(id, { x: 20 + x * (W + GAPX), y: 20 + top + y * (H + GAPY), w: W, h: H }));
  });
  return { place, back, width: 40 + columns.length * (W + GAPX) - GAPX, height: 40 + tallest * (H + GAPY) - GAPY };
}

// ---- drawing -----------------------------------------------------------

function arrowKey(a) {
  return a.namespace + "/" + a.src + ">" + a.dst;
}

function isSelected(kind, key) {
  const s = state.selected;
  return !!s && s.kind === kind && s.key === key;
}

function drawGraph(m) {
  const svg = $("graph");
  $("graph-empty").hidden = m.nodes.size > 0;
  // `hidden` is an HTML element's; an <svg> is hidden by its style.
  svg.style.display = m.nodes.size ? "" : "none";
  if (!m.nodes.size) return;
  const L = layout(m.nodes, m.arrows);
  svg.setAttribute("viewBox", `0 0 ${L.width} ${L.height}`);
  svg.style.height = Math.max(300, L.height) + "px";
  const maxRps = Math.max(1, ...m.arrows.map((a) => a.rps));
  const labelAll = m.arrows.length <= LABEL_ALL_UP_TO;
  const parts = [
    // The head takes its arrow's colour (context-stroke) and keeps its size
    // whatever the arrow's width.
    `<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z"/></marker></defs>`,
  ];
  // Arrows under the nodes: their curves first, then their labels placed
  // so that none covers another.
  const curves = m.arrows.map((a, i) => {
    const f = L.place.get(a.from), t = L.place.get(a.to);
    let d, lx, ly;
    if (a.from === a.to || L.back.has(a) || t.x <= f.x) {
      // Back to the left (or to itself): a loop under both nodes.
      const x1 = f.x + f.w / 2, y1 = f.y + f.h, x2 = t.x + t.w / 2, y2 = t.y + t.h;
      const dip = Math.max(y1, y2) + 40 + (i % 3) * 10;
      d = `M${x1},${y1} C${x1},${dip} ${x2},${dip} ${x2},${y2}`;
      lx = (x1 + x2) / 2; ly = dip - 6;
    } else {
      const x1 = f.x + f.w, y1 = f.y + f.h / 2, x2 = t.x, y2 = t.y + t.h / 2;
      const c = (x2 - x1) / 2;
      d = `M${x1},${y1} C${x1 + c},${y1} ${x2 - c},${y2} ${x2},${y2}`;
      lx = (x1 + x2) / 2; ly = (y1 + y2) / 2 - 4;
    }
    const key = arrowKey(a);
    const sel = isSelected("edge", key);
    const label = `${fmtRps(a.rps)} rps · ${fmtPct(a.successRate)} · p99 ${a.p99Bound ? "≤ " : ""}${fmtMs(a.p99Ms)}`;
    return { a, d, key, sel, label, lx, ly, show: labelAll || sel || a.health === "failing" };
  });
  // Top to bottom, a label that would overlap one already placed moves
  // down a line at a time (a character is about 6 px at this size).
  const placed = [];
  for (const c of curves.filter((c) => c.show).sort((x, y) => x.ly - y.ly || x.lx - y.lx)) {
    const w = c.label.length * 6.2;
    while (placed.some((p) => Math.abs(p.x - c.lx) < (p.w + w) / 2 && Math.abs(p.y - c.ly) < LABEL_LINE)) c.ly += LABEL_LINE;
    placed.push({ x: c.lx, y: c.ly, w });
  }
  for (const { a, d, key, sel, label, lx, ly, show } of curves) {
    const width = 1.5 + 3.5 * Math.sqrt(a.rps / maxRps);
    parts.push(
      `<g class="edge ${a.health}${sel ? " selected" : ""}" data-key="${esc(key)}" data-src="${esc(a.from)}" data-dst="${esc(a.dst)}"` +
      ` data-rps="${a.rps}" data-success="${a.successRate ?? ""}" data-p99="${a.p99Ms ?? ""}">` +
      `<title>${esc(a.src)} → ${esc(a.dst)}: ${esc(label)}</title>` +
      `<path d="${d}" stroke-width="${width.toFixed(1)}" marker-end="url(#head)"/>` +
      `<path class="hit" d="${d}"/>` +
      (show ? `<text x="${lx}" y="${ly.toFixed(1)}" text-anchor="middle">${esc(label)}</text>` : "") +
      `</g>`);
  }
  for (const n of m.nodes.values()) {
    const p = L.place.get(n.id);
    const w = n.workload;
    const figures = w ? `${fmtRps(w.rps)} rps in · ${fmtPct(w.successRate)}` : (n.external ? "outside the mesh" : "caller");
    const sel = isSelected("node", n.id);
    parts.push(
      `<g class="node ${n.health}${n.external ? " external" : ""}${sel ? " selected" : ""}" data-id="${esc(n.id)}" transform="translate(${p.x},${p.y})">` +
      `<title>${esc(n.id)}</title>` +
      `<rect width="${p.w}" height="${p.h}" rx="6"/>` +
      `<text class="name" x="10" y="18">${esc(clip(n.name, 22))}</text>` +
      `<text class="ns" x="${p.w - 8}" y="18" text-anchor="end">${esc(clip(n.ns, 10))}</text>` +
      `<text class="figures" x="10" y="38">${esc(figures)}</text></g>`);
  }
  setHtml(svg, parts.join(""));
}

// Replaces `el`'s content only when it changed: a refresh with the same
// figures leaves the page (and what the user points at) alone.
const drawn = new WeakMap();
function setHtml(el, html) {
  if (drawn.get(el) !== html) {
    el.innerHTML = html;
    drawn.set(el, html);
  }
}

function clip(s, n) {
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}

// ---- tables ------------------------------------------------------------

const EDGE_COLUMNS = [
  ["namespace", "Namespace"], ["src", "Caller"], ["dst", "Destination"], ["route", "Route"],
  ["rps", "RPS", true], ["successRate", "Success", true], ["p50Ms", "p50", true], ["p95Ms", "p95", true],
  ["p99Ms", "p99", true], ["mtlsShare", "mTLS", true], ["splitShare", "Split", true],
  ["retriesPerSecond", "Retries/s", true], ["circuit", "Circuit"],
];
const WORKLOAD_COLUMNS = [
  ["namespace", "Namespace"], ["workload", "Workload"], ["rps", "RPS", true], ["successRate", "Success", true],
  ["p50Ms", "p50", true], ["p95Ms", "p95", true], ["p99Ms", "p99", true], ["mtlsShare", "mTLS", true], ["shed", "Shed", true],
];

function cell(key, row) {
  const v = row[key];
  switch (key) {
    case "rps": return fmtRps(v);
    case "retriesPerSecond": return v ? v.toFixed(2) : "0";
    case "successRate": case "mtlsShare": case "splitShare": return fmtPct(v);
    case "p50Ms": case "p95Ms": case "p99Ms": return fmtMs(v);
    case "circuit": return circuitText(v);
    default: return v ?? "–";
  }
}

function circuitText(c) {
  if (!c) return "–";
  const all = c.closed + c.open + c.halfOpen;
  if (!all) return "–";
  if (c.open) return `OPEN ${c.open}/${all}`;
  if (c.halfOpen) return `half-open ${c.halfOpen}/${all}`;
  return "closed";
}

// Sorts by a column: numbers as numbers (a circuit by its open proxies),
// missing values last when largest first.
function sortKey(row, key) {
  const v = row[key];
  if (key === "circuit") return v ? v.open + v.halfOpen / 2 : -1;
  return v ?? -1;
}

function drawTable(table, order, columns, rows, rowKey, rowClass, onClick) {
  const { key, down } = order;
  const indexed = rows.map((r, i) => [r, i]);
  indexed.sort(([a], [b]) => {
    const x = sortKey(a, key), y = sortKey(b, key);
    const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return down ? -c : c;
  });
  setHtml(table.tHead, "<tr>" + columns.map(([k, title, num]) =>
    `<th data-key="${k}" class="${num ? "num" : ""}">${title}${k === key ? (down ? " ▾" : " ▴") : ""}</th>`).join("") + "</tr>");
  setHtml(table.tBodies[0], indexed.map(([r, i]) =>
    `<tr class="${rowClass(r)}" data-i="${i}" data-key="${esc(rowKey(r))}">` + columns.map(([k, , num]) =>
      `<td class="${num ? "num" : ""}">${esc(cell(k, r))}</td>`).join("") + "</tr>").join("") ||
    `<tr><td colspan="${columns.length}" class="empty">No requests in this window.</td></tr>`);
  table.onclick = (ev) => {
    const th = ev.target.closest("th");
    if (th) {
      const k = th.dataset.key;
      order.down = order.key === k ? !order.down : true;
      order.key = k;
      render();
      return;
    }
    const tr = ev.target.closest("tr[data-i]");
    if (tr) onClick(rows[Number(tr.dataset.i)]);
  };
}

// ---- details -------------------------------------------------------------

function drawDetail(m) {
  const box = $("detail");
  const s = state.selected;
  if (!s) { box.hidden = true; return; }
  let html = "";
  if (s.kind === "edge") {
    const a = m.arrows.find((x) => arrowKey(x) === s.key);
    if (!a) { box.hidden = false; setHtml(box, closeButton() + `<p class="empty">${esc(s.key)}: no requests in this window.</p>`); return; }
    const routes = state.stats.edges.filter((e) => e.namespace === a.namespace && e.src === a.src && e.dst === a.dst);
    const server = m.nodes.get(a.to)?.workload;
    html = `<h2>${esc(a.src)} → ${esc(a.dst)} <small>${esc(a.namespace)}</small></h2>` +
      `<dl>` +
      dl("Requests", `${a.requests} (${fmtRps(a.rps)}/s)`) +
      dl("Success", fmtPct(a.successRate)) +
      dl("Latency", `p50 ${fmtMs(a.p50Ms)} · p95 ${fmtMs(a.p95Ms)} · p99 ${fmtMs(a.p99Ms)}`) +
      dl("mTLS", fmtPct(a.mtlsShare) + " of requests") +
      dl("Retries", `${(a.retriesPerSecond ?? 0).toFixed(2)}/s · budget exhausted ${a.retryBudgetExhausted ?? 0}×`) +
      dl("Rate limited", String(a.rateLimited ?? 0)) +
      (a.cacheHits || a.cacheMisses ? dl("Cache", `${a.cacheHits} answered from the cache · ${a.cacheMisses} asked`) : "") +
      dl("Circuit", circuitLong(a.circuit) + (a.circuitRejected ? ` · ${a.circuitRejected} failed fast` : "")) +
      `</dl>` +
      `<h2>Routes</h2><table><thead><tr><th>Route</th><th class="num">RPS</th><th class="num">Success</th><th class="num">p99</th><th class="num">Split</th></tr></thead><tbody>` +
      routes.map((e) => `<tr><td>${esc(e.route)}</td><td class="num">${fmtRps(e.rps)}</td><td class="num">${fmtPct(e.successRate)}</td><td class="num">${fmtMs(e.p99Ms)}</td><td class="num">${e.splitShare == null ? "–" : fmtPct(e.splitShare)}</td></tr>`).join("") +
      `</tbody></table>` + callers(server, a.to);
  } else {
    const n = m.nodes.get(s.key);
    if (!n) { box.hidden = false; setHtml(box, closeButton() + `<p class="empty">${esc(s.key)}: not seen in this window.</p>`); return; }
    const w = n.workload;
    html = `<h2>${esc(n.name)} <small>${esc(n.ns || "outside the mesh")}</small></h2>` +
      (w ? `<dl>` + dl("Requests in", `${w.requests} (${fmtRps(w.rps)}/s)`) + dl("Success", fmtPct(w.successRate)) +
        dl("Latency", `p50 ${fmtMs(w.p50Ms)} · p95 ${fmtMs(w.p95Ms)} · p99 ${fmtMs(w.p99Ms)}`) +
        dl("mTLS", fmtPct(w.mtlsShare)) + dl("Shed", String(w.shed)) + `</dl>`
        : `<p class="empty">No sidecar of this workload counted requests in this window.</p>`) +
      `<h2>Calls</h2><ul>` + n.out.map((a) => `<li>→ ${esc(a.dst)}: ${fmtRps(a.rps)} rps, ${fmtPct(a.successRate)}</li>`).join("") + `</ul>` +
      callers(w, n.id);
  }
  box.hidden = false;
  setHtml(box, closeButton() + html);
}

function callers(w, id) {
  if (!w || !w.callers || !w.callers.length) return "";
  return `<h2>Identities <small>callers as ${esc(id)}'s sidecars saw them</small></h2>` +
    `<table><thead><tr><th>Caller</th><th class="num">RPS</th><th class="num">Success</th><th class="num">mTLS</th></tr></thead><tbody>` +
    w.callers.map((c) => `<tr><td>${esc(c.src)}</td><td class="num">${fmtRps(c.rps)}</td><td class="num">${fmtPct(c.successRate)}</td><td class="num">${fmtPct(c.mtlsShare)}</td></tr>`).join("") +
    `</tbody></table><p class="meta">A SPIFFE id is verified (mesh mTLS); <code>ns/…/sa/…</code> is a plaintext caller's pod address, unverified.</p>`;
}

function circuitLong(c) {
  if (!c) return "–";
  const all = c.closed + c.open + c.halfOpen;
  if (!all) return "no breaker (no TrafficPolicy sets one for it)";
  return `closed on ${c.closed}, open on ${c.open}, half-open on ${c.halfOpen} of ${all} caller proxies`;
}

function dl(term, value) {
  return `<dt>${esc(term)}</dt><dd>${esc(value)}</dd>`;
}

function closeButton() {
  return `<button type="button" class="close" aria-label="Close">×</button>`;
}

// ---- rollouts ------------------------------------------------------------

function drawRollouts() {
  const box = $("rollouts");
  const r = state.rollouts;
  if (!r) return;
  const note = r.note ? `<p class="meta">${esc(r.note)}</p>` : "";
  if (!r.rollouts.length) {
    setHtml(box, note || `<p class="empty">No MTLSPolicy: every namespace is Permissive.</p>`);
    return;
  }
  setHtml(box, note + r.rollouts.map((p) => {
    const phase = p.phase || "Pending";
    return `<div class="rollout" data-ns="${esc(p.namespace)}" data-phase="${esc(phase)}">` +
      `<strong>${esc(p.namespace)}/${esc(p.name)}</strong> <span class="phase ${esc(phase)}">${esc(phase)}</span>` +
      `<div class="meta">${esc(p.mode)}, ${esc(p.strategy)}${p.phaseSince ? " · since " + esc(p.phaseSince) : ""}</div>` +
      (p.blockers.length ? `<ul class="blockers">${p.blockers.map((b) => `<li>${esc(b)}</li>`).join("")}</ul>` : "") +
      (p.conditions.length ? `<details><summary>Conditions</summary><ul>${p.conditions.map((c) =>
        `<li>${esc(c.type)}=${esc(c.status)} <em>${esc(c.reason)}</em>: ${esc(c.message)}</li>`).join("")}</ul></details>` : "") +
      `</div>`;
  }).join(""));
}

// ---- the page ------------------------------------------------------------

function render() {
  for (const b of document.querySelectorAll("#views button")) b.setAttribute("aria-pressed", String(b.dataset.view === state.view));
  $("graph-view").hidden = state.view !== "graph";
  $("table-view").hidden = state.view !== "table";
  $("problem").hidden = !state.problem;
  $("problem").textContent = state.problem || "";
  drawRollouts();
  const stats = state.stats;
  if (!stats) return;
  $("summary").textContent = `${stats.proxies} proxies read` + (stats.unreadable ? `, ${stats.unreadable} unreadable` : "") +
    ` · ${Math.round(stats.windowSeconds)} s window · updated ${new Date().toLocaleTimeString()}`;
  const m = model(stats);
  if (state.view === "graph") drawGraph(m);
  else {
    drawTable($("edges"), state.sort.edges, EDGE_COLUMNS, stats.edges,
      (e) => arrowKey(e) + " " + e.route, (e) => health(e, e.circuit), (e) => select("edge", arrowKey(e)));
    drawTable($("workloads"), state.sort.workloads, WORKLOAD_COLUMNS, stats.workloads,
      (w) => w.namespace + "/" + w.workload, (w) => health(w), (w) => select("node", w.namespace + "/" + w.workload));
  }
  drawDetail(m);
}

function select(kind, key) {
  state.selected = key ? { kind, key } : null;
  writeHash();
  render();
}

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (["graph", "table"].includes(h.get("view"))) state.view = h.get("view");
  if (WINDOWS.includes(h.get("window"))) state.window = h.get("window");
  const slo = Number(h.get("slo"));
  if (slo >= 50 && slo <= 100) state.slo = slo;
  state.selected = h.get("edge") ? { kind: "edge", key: h.get("edge") } : h.get("node") ? { kind: "node", key: h.get("node") } : null;
  $("window").value = state.window;
  $("slo").value = String(state.slo);
}

function writeHash() {
  const h = new URLSearchParams({ view: state.view, window: state.window, slo: String(state.slo) });
  if (state.selected) h.set(state.selected.kind, state.selected.key);
  history.replaceState(null, "", "#" + h.toString());
}

async function getJson(path) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  try {
    const rsp = await fetch(path, { signal: ctl.signal, cache: "no-store", headers: { accept: "application/json" } });
    const text = await rsp.text();
    if (!rsp.ok) throw new Error(`${path}: ${rsp.status} ${text.slice(0, 200)}`);
    return JSON.parse(text);
  } catch (e) {
    throw new Error(e.name === "AbortError" ? `${path}: no answer in ${FETCH_TIMEOUT_MS / 1000} s` : e.message);
  } finally {
    clearTimeout(timer);
  }
}

let timer = null;
// Answers to an older refresh (the window changed meanwhile) are dropped.
let asked = 0;
async function refresh() {
  clearTimeout(timer);
  const mine = ++asked;
  try {
    const [stats, rollouts] = await Promise.allSettled([
      getJson("api/v1/stats?window=" + encodeURIComponent(state.window)),
      getJson("api/v1/rollouts"),
    ]);
    if (mine !== asked) return;
    const problems = [];
    if (stats.status === "fulfilled") state.stats = stats.value; else problems.push(stats.reason.message);
    if (rollouts.status === "fulfilled") state.rollouts = rollouts.value; else problems.push(rollouts.reason.message);
    // Figures kept from the last good answer are said to be stale.
    state.problem = problems.length ? "Could not refresh (showing the last figures): " + problems.join("; ") : null;
    render();
    document.body.dataset.loaded = String(Date.now());
  } catch (e) {
    state.problem = "The page failed to draw: " + e.message;
    $("problem").hidden = false;
    $("problem").textContent = state.problem;
  } finally {
    if (mine === asked) timer = setTimeout(refresh, REFRESH_MS);
  }
}

function start() {
  readHash();
  for (const b of document.querySelectorAll("#views button")) {
    b.addEventListener("click", () => { state.view = b.dataset.view; writeHash(); render(); });
  }
  $("window").addEventListener("change", (ev) => { state.window = ev.target.value; writeHash(); refresh(); });
  $("slo").addEventListener("change", (ev) => {
    const v = Number(ev.target.value);
    if (v >= 50 && v <= 100) { state.slo = v; writeHash(); render(); }
  });
  $("graph").addEventListener("click", (ev) => {
    const edge = ev.target.closest(".edge");
    const node = ev.target.closest(".node");
    if (edge) select("edge", edge.dataset.key);
    else if (node) select("node", node.dataset.id);
  });
  $("detail").addEventListener("click", (ev) => { if (ev.target.closest(".close")) select(null, null); });
  window.addEventListener("hashchange", () => {
    const was = state.window;
    readHash();
    if (state.window !== was) refresh(); else render();
  });
  refresh();
}

start();
