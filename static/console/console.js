// The operator's console: samples from /console/stats (one a second, the last 15 minutes
// first), drawn on canvas. No library, no build step.
"use strict";

const HISTORY = 900;        // samples kept, as on the server
const SILENT_MS = 3000;     // a node not heard for this long is shown red
const MIN_SPAN = 60;        // the x axis spans at least a minute
const COLORS = ["#2a7ae2", "#e2702a", "#2aa84a", "#c2402a", "#8a4ae2", "#6a6a6a", "#d2a000"];
const samples = [];
const seenNodes = new Map(); // node id → last sample time it was listed in

// Each chart: a title, a unit, and the series it draws from a sample.
const CHARTS = [
  { id: "messages", title: "Messages / s", series: (s) => ({ published: s.published, received: s.received, delivered: s.delivered }) },
  { id: "clients", title: "SSE clients", series: (s) => ({ clients: s.clients, connections: s.connections }) },
  { id: "posts", title: "POST answers / s", series: (s) => s.posts || {} },
  { id: "latency", title: "POST → publish (ms)", series: (s) => ({ p50: s.latency_ms?.p50 ?? null, p99: s.latency_ms?.p99 ?? null }) },
  { id: "drops", title: "Drops / s", series: (s) => s.drops || {} },
  { id: "slow", title: "Slow consumers / s", series: (s) => ({ disconnects: s.slow_disconnects, "write stalls": s.write_stalls }) },
  { id: "scripts", title: "Script outcomes / s", series: (s) => scriptRates(s) },
  { id: "memory", title: "Memory (MiB)", series: (s) => ({ rss: s.rss_bytes == null ? null : s.rss_bytes / 1048576 }) },
  { id: "fds", title: "Open descriptors", series: (s) => ({ descriptors: s.fds }) },
];

function scriptRates(s) {
  const out = {};
  for (const outcomes of Object.values(s.scripts || {})) {
    for (const [outcome, v] of Object.entries(outcomes)) out[outcome] = (out[outcome] || 0) + v.rate;
  }
  return out;
}

function format(v) {
  if (v == null || Number.isNaN(v)) return "—";
  if (Math.abs(v) >= 100) return Math.round(v).toLocaleString("en");
  return (Math.round(v * 10) / 10).toString();
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

function buildCharts() {
  const root = document.getElementById("charts");
  for (const chart of CHARTS) {
    const card = el("div", { class: "card chart", id: `chart-${chart.id}` });
    card.append(el("h2", {}, chart.title));
    const now = el("div", { class: "now", id: `now-${chart.id}` }, "—");
    const canvas = el("canvas", { width: 360, height: 120 });
    const legend = el("div", { class: "legend" });
    card.append(now, canvas, legend);
    root.append(card);
    chart.canvas = canvas;
    chart.now = now;
    chart.legend = legend;
  }
}

function draw(chart) {
  const names = new Set();
  for (const s of samples) for (const name of Object.keys(chart.series(s))) names.add(name);
  const series = [...names].sort();
  const ctx = chart.canvas.getContext("2d");
  const { width, height } = chart.canvas;
  ctx.clearRect(0, 0, width, height);
  let max = 0;
  for (const s of samples) for (const v of Object.values(chart.series(s))) if (v != null && v > max) max = v;
  max = max > 0 ? max * 1.1 : 1;
  ctx.strokeStyle = "#ddd";
  ctx.beginPath();
  ctx.moveTo(0, height - 0.5);
  ctx.lineTo(width, height - 0.5);
  ctx.stroke();
  // The x axis spans what was sampled, at least a minute, at most the 15 minutes kept.
  const span = Math.max(samples.length, MIN_SPAN);
  const step = width / Math.max(span - 1, 1);
  const offset = span - samples.length;
  series.forEach((name, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let open = false;
    samples.forEach((s, j) => {
      const v = chart.series(s)[name];
      if (v == null) { open = false; return; }
      const x = (offset + j) * step;
      const y = height - (v / max) * (height - 4) - 1;
      if (open) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      open = true;
    });
    ctx.stroke();
  });
  const last = samples.length ? chart.series(samples[samples.length - 1]) : {};
  chart.now.textContent = series.map((name) => `${name} ${format(last[name])}`).join(" · ") || "—";
  chart.legend.replaceChildren(...series.map((name, i) => {
    const item = el("span", {}, name);
    item.style.borderColor = COLORS[i % COLORS.length];
    return item;
  }));
}

function ago(ms) {
  return ms < 1000 ? "now" : `${Math.round(ms / 1000)} s ago`;
}

function tables(s) {
  const now = Date.now();
  for (const node of s.nodes || []) seenNodes.set(node.node, { ...node, seen: now });
  const rows = [...seenNodes.values()].sort((a, b) => (b.this - a.this) || a.node.localeCompare(b.node));
  document.querySelector("#nodes tbody").replaceChildren(...rows.map((node) => {
    const silent = node.this ? false : now - node.seen + node.heard_ms_ago > SILENT_MS;
    const tr = el("tr", { class: silent ? "silent" : "alive", "data-node": node.node });
    const up = node.uptime_secs == null ? "" : ` · up ${Math.floor(node.uptime_secs / 60)} min`;
    const id = el("td", { title: node.node }, node.node.slice(0, 8) + (node.this ? " (this)" : ""));
    tr.append(id,
      el("td", {}, node.listen || "—"), el("td", {}, (node.version || "—") + up),
      el("td", {}, format(node.clients)), el("td", {}, format(node.rooms)),
      el("td", {}, silent ? `silent ${ago(now - node.seen + node.heard_ms_ago)}` : ago(node.heard_ms_ago)));
    return tr;
  }));
  // With `event.failover`, both brokers; otherwise the one this node's sockets reach.
  const connected = s.push_connected && s.sub_connected;
  const brokers = s.brokers || [{ address: "this node's broker", state: connected ? "connected" : "silent" }];
  document.querySelector("#brokers tbody").replaceChildren(...brokers.map((b) => {
    const tr = el("tr", { class: b.state === "silent" ? "silent" : "alive" });
    tr.append(el("td", {}, b.address), el("td", {}, b.state + (b.term ? ` (term ${b.term})` : "")));
    return tr;
  }));
  document.querySelector("#rooms tbody").replaceChildren(...(s.top_rooms || []).map((r) => {
    const tr = el("tr");
    tr.append(el("td", {}, r.room), el("td", {}, format(r.clients)), el("td", { class: "rate" }, format(r.messages_per_s)));
    return tr;
  }));
  document.querySelector("#scripts tbody").replaceChildren(...Object.entries(s.scripts || {}).map(([name, o]) => {
    const tr = el("tr");
    tr.append(el("td", {}, name), el("td", {}, format(o.Passed?.rate)), el("td", {}, format(o.Refused?.rate)),
      el("td", {}, format(o.Dropped?.rate)),
      el("td", {}, format(o.Errored?.rate)), el("td", {}, format(o.Errored?.total)));
    return tr;
  }));
  const chain = s.chain || [];
  document.querySelector("#chain tbody").replaceChildren(...chain.map((script, i) => {
    const tr = el("tr", { class: script.error ? "silent" : "" });
    tr.append(el("td", {}, String(i + 1)), el("td", {}, script.name), el("td", {}, script.file),
      el("td", {}, new Date(script.loaded_ms).toLocaleTimeString()));
    return tr;
  }));
  document.getElementById("chain-errors").replaceChildren(...chain.filter((script) => script.error).map((script) =>
    el("li", { class: "error" }, `${new Date(script.error_ms).toLocaleTimeString()} ${script.error}`)));
  const reloads = s.reloads || {};
  document.getElementById("reloads").textContent = `reloads: ${format(reloads.ok)} ok, ${format(reloads.failed)} failed`;
  document.getElementById("about").textContent =
    `temma ${s.version} · up ${Math.floor(s.uptime_secs / 60)} min · ${s.push_connected && s.sub_connected ? "broker connected" : "broker NOT connected"}`;
}

function render() {
  for (const chart of CHARTS) draw(chart);
  if (samples.length) tables(samples[samples.length - 1]);
}

function add(sample) {
  samples.push(sample);
  while (samples.length > HISTORY) samples.shift();
}

function connect() {
  const status = document.getElementById("status");
  const source = new EventSource("/console/stats");
  source.addEventListener("history", (event) => {
    samples.length = 0;
    for (const sample of JSON.parse(event.data)) add(sample);
    render();
  });
  source.addEventListener("stats", (event) => {
    add(JSON.parse(event.data));
    status.textContent = "live";
    status.className = "status live";
    render();
  });
  source.onerror = async () => {
    status.textContent = "reconnecting…";
    status.className = "status down";
    // A session that ended (logout elsewhere, restart) sends back to the login page.
    const check = await fetch("/console/session").catch(() => null);
    if (check && check.status === 401) location.reload();
  };
}

document.getElementById("try").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = document.getElementById("try-result");
  out.textContent = "…";
  const response = await fetch("/console/try", {
    method: "POST", body: document.getElementById("try-message").value,
    headers: { "content-type": "application/json" }, credentials: "same-origin",
  }).catch((e) => ({ ok: false, json: async () => ({ error: e.message }) }));
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    out.textContent = answer.error || "refused";
    return;
  }
  const lines = answer.steps.map((step) => `${step.script}: ${step.outcome}` +
    (step.changed ? " (changed)" : "") + (step.reason ? ` ${step.status}: ${step.reason}` : "") +
    (step.error ? ` ${step.error} → ${step.on_error}` : ""));
  lines.push(answer.published ? `published: ${JSON.stringify(answer.published)}` : "not published");
  out.textContent = lines.join("\n");
});

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/console/logout", { method: "POST", credentials: "same-origin" });
  location.reload();
});

buildCharts();
connect();
