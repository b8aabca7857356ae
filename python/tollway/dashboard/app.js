// tollway's operator dashboard: plain JavaScript, no build step, no outside assets.
// The admin key lives in sessionStorage (this tab only) and goes out as a bearer header,
// never in a URL. Every figure comes from the gateway's own API, relative to this page
// (so the page works under any prefix the gateway is mounted at).
"use strict";

const KEY = "tollway.admin";
const $ = (sel) => document.querySelector(sel);
let lastSeq = 0;
let timer = null;

function key() { return sessionStorage.getItem(KEY); }

async function api(path, options = {}) {
  const headers = { "authorization": `Bearer ${key()}`, ...(options.headers || {}) };
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, { ...options, headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  const text = await r.text();
  const body = text && r.headers.get("content-type")?.includes("json") ? JSON.parse(text) : text;
  if (!r.ok) {
    const e = new Error(body?.error?.message || `${r.status}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

function usd(nano) { return (nano / 1e9).toFixed(6); }

function cell(row, value, num = false) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (num) td.className = "num";
  return td;
}

function fill(table, rows, render) {
  const body = $(`${table} tbody`);
  body.replaceChildren();
  for (const item of rows) render(body.insertRow(), item);
}

// ---- Prometheus text: counters and histogram quantiles -----------------------------------
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function quantile(buckets, q) {
  // buckets: [[le, cumulative count]] ascending; linear inside a bucket, as Prometheus does.
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!total) return null;
  const rank = q * total;
  let prevLe = 0, prevCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (!isFinite(le)) return prevLe;
      return prevLe + (le - prevLe) * ((rank - prevCount) / Math.max(count - prevCount, 1e-9));
    }
    prevLe = le; prevCount = count;
  }
  return prevLe;
}

function latencyByProvider(samples) {
  const byProvider = {};
  for (const s of samples) {
    if (s.name !== "tollway_request_duration_seconds_bucket") continue;
    const p = s.labels.provider || "";
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    const buckets = (byProvider[p] ||= new Map());
    buckets.set(le, (buckets.get(le) || 0) + s.value);
  }
  const out = {};
  for (const [p, map] of Object.entries(byProvider)) {
    const buckets = [...map.entries()].sort((a, b) => a[0] - b[0]);
    out[p] = { p50: quantile(buckets, 0.5), p95: quantile(buckets, 0.95) };
  }
  return out;
}

// ---- the chart -----------------------------------------------------------------------------
function drawSpend(rows) {
  const svg = $("#spend-chart");
  const NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const days = [...new Set(rows.map((r) => r.day))].sort();
  const tenants = [...new Set(rows.map((r) => r.tenant))].sort();
  const value = {};
  for (const r of rows) value[`${r.tenant}|${r.day}`] = r.cost_nanousd;
  const max = Math.max(1, ...Object.values(value));
  const W = 900, H = 200, pad = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 20}`);
  const groupW = (W - pad) / Math.max(days.length, 1);
  const barW = Math.max(2, (groupW - 8) / Math.max(tenants.length, 1));
  const hues = tenants.map((_, i) => `hsl(${(i * 67) % 360} 55% 50%)`);
  days.forEach((day, d) => {
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", pad + d * groupW);
    label.setAttribute("y", H + 15);
    label.textContent = day;
    svg.append(label);
    tenants.forEach((tenant, t) => {
      const v = value[`${tenant}|${day}`] || 0;
      const h = (v / max) * (H - 10);
      const rect = document.createElementNS(NS, "rect");
      rect.setAttribute("x", pad + d * groupW + t * barW);
      rect.setAttribute("y", H - h);
      rect.setAttribute("width", barW - 1);
      rect.setAttribute("height", h);
      rect.setAttribute("fill", hues[t]);
      rect.dataset.tenant = tenant;
      rect.dataset.day = day;
      rect.dataset.nanousd = String(v);
      const title = document.createElementNS(NS, "title");
      title.textContent = `${tenant} ${day}: ${usd(v)} USD`;
      rect.append(title);
      svg.append(rect);
    });
  });
}

// ---- sections ------------------------------------------------------------------------------
async function loadUsage() {
  const usage = await api("usage?days=7");
  const perTenantDay = {};
  for (const r of usage.rows) {
    const k = `${r.tenant}|${r.day}`;
    const agg = (perTenantDay[k] ||= { tenant: r.tenant, day: r.day, requests: 0, cost_nanousd: 0 });
    agg.requests += r.requests;
    agg.cost_nanousd += r.cost_nanousd;
  }
  const rows = Object.values(perTenantDay).sort((a, b) =>
    a.tenant.localeCompare(b.tenant) || a.day.localeCompare(b.day));
  drawSpend(rows);
  fill("#spend-table", rows, (tr, r) => {
    tr.dataset.tenant = r.tenant; tr.dataset.day = r.day;
    cell(tr, r.tenant); cell(tr, r.day); cell(tr, r.requests, true);
    cell(tr, usd(r.cost_nanousd), true).dataset.nanousd = String(r.cost_nanousd);
  });
  fill("#models", usage.by_model, (tr, g) => {
    cell(tr, g.key); cell(tr, g.requests, true); cell(tr, g.failed, true);
    cell(tr, g.rejected, true); cell(tr, usd(g.cost_nanousd), true);
  });
  return usage;
}

async function loadProviders(usage, samples) {
  const providers = await api("providers");
  const latency = latencyByProvider(samples);
  const byProvider = Object.fromEntries(usage.by_provider.map((g) => [g.key, g]));
  fill("#providers", providers.data, (tr, p) => {
    const g = byProvider[p.name] || { requests: 0, failed: 0 };
    const l = latency[p.name] || {};
    cell(tr, p.name);
    cell(tr, p.breaker.state).className = `state-${p.breaker.state}`;
    cell(tr, g.requests, true); cell(tr, g.failed, true);
    cell(tr, l.p50 == null ? "" : l.p50.toFixed(3), true);
    cell(tr, l.p95 == null ? "" : l.p95.toFixed(3), true);
  });
}

function loadRefusals(samples) {
  const rows = samples.filter((s) => s.name === "tollway_rejections_total")
    .map((s) => ({ reason: s.labels.reason, count: s.value })).sort((a, b) => b.count - a.count);
  fill("#refusals", rows, (tr, r) => { cell(tr, r.reason); cell(tr, r.count, true); });
}

async function loadShadow() {
  const report = await api("shadow?days=7");
  fill("#shadow", report.data, (tr, r) => {
    cell(tr, r.route); cell(tr, r.candidate_model ?? r.candidate);
    cell(tr, r.samples ?? r.compared ?? "", true);
    const a = r.agreement_rate ?? r.agreement;
    cell(tr, typeof a === "number" ? a.toFixed(3) : "", true);
  });
  const decisions = ((report.learning || {}).decisions || []).slice(-20).reverse();
  fill("#learned", decisions, (tr, d) => {
    cell(tr, d.route); cell(tr, d.task); cell(tr, d.action);
    cell(tr, d.previous || "primary"); cell(tr, d.model || "primary");
    cell(tr, d.samples, true); cell(tr, d.agreement_rate.toFixed(3), true);
  });
}

async function loadTenants() {
  const tenants = (await api("admin/tenants")).data;
  fill("#tenants", tenants, (tr, t) => {
    tr.dataset.tenant = t.id;
    cell(tr, t.id); cell(tr, t.source); cell(tr, t.tier);
    cell(tr, t.limits.per_minute, true); cell(tr, t.daily_usd ?? "(tier)", true);
    cell(tr, t.disabled ? "yes" : "no");
    const td = tr.insertCell();
    if (t.source === "admin") {
      const b = document.createElement("button");
      b.textContent = t.disabled ? "Enable" : "Disable";
      b.addEventListener("click", () => act(() => api(`admin/tenants/${encodeURIComponent(t.id)}`,
        { method: "PATCH", body: { disabled: !t.disabled } })));
      td.append(b);
    }
  });
  const budgets = await Promise.all(tenants.map((t) =>
    api(`budget?tenant=${encodeURIComponent(t.id)}`).catch(() => null)));
  fill("#budgets", budgets.filter(Boolean), (tr, b) => {
    tr.dataset.tenant = b.tenant;
    cell(tr, b.tenant); cell(tr, b.tier); cell(tr, b.daily_usd, true);
    cell(tr, b.spent_usd, true); cell(tr, b.remaining_usd, true);
  });
}

async function loadKeys() {
  const keys = (await api("admin/keys")).data;
  fill("#keys", keys, (tr, k) => {
    tr.dataset.key = k.id;
    cell(tr, k.id); cell(tr, k.tenant); cell(tr, k.prefix); cell(tr, k.name);
    cell(tr, k.daily_usd ?? "(tenant's)", true); cell(tr, k.state);
    cell(tr, k.last_used_at ? new Date(k.last_used_at * 1000).toISOString() : "");
    const td = tr.insertCell();
    if (k.state === "active") {
      const b = document.createElement("button");
      b.textContent = "Revoke";
      b.className = "revoke";
      b.addEventListener("click", () => act(() => api(`admin/keys/${k.id}`, { method: "DELETE" })));
      td.append(b);
    }
  });
}

async function loadFlags() {
  const flags = (await api("admin/flags")).data;
  fill("#flags", flags, (tr, f) => {
    tr.dataset.flag = f.name;
    cell(tr, f.name); cell(tr, f.route); cell(tr, f.candidates.join(", "));
    const input = document.createElement("input");
    input.type = "number"; input.min = "0"; input.max = "100"; input.step = "any";
    input.value = String(f.percent); input.className = "percent";
    tr.insertCell().append(input);
    cell(tr, f.enabled ? "yes" : "no");
    const b = document.createElement("button");
    b.textContent = "Save";
    b.addEventListener("click", () => act(() => api(`admin/flags/${encodeURIComponent(f.name)}`,
      { method: "PUT", body: { route: f.route, candidates: f.candidates, tenants: f.tenants,
        enabled: f.enabled, percent: Number(input.value) } })));
    tr.insertCell().append(b);
  });
}

async function tail() {
  const recent = await api(`admin/events?after=${lastSeq}`);
  const list = $("#tail");
  for (const e of recent.data) {
    const li = document.createElement("li");
    li.dataset.seq = String(e.seq);
    const { seq, type, occurred_at, tenant, ...rest } = e;
    li.textContent = `${new Date(occurred_at * 1000).toISOString()} #${seq} ${type} ${tenant} ` +
      JSON.stringify(rest);
    list.prepend(li);
    lastSeq = Math.max(lastSeq, seq);
  }
  while (list.children.length > 200) list.lastChild.remove();
}

async function refresh() {
  try {
    const metricsText = await (await fetch("metrics")).text();
    const samples = parseMetrics(metricsText);
    const usage = await loadUsage();
    await Promise.all([loadProviders(usage, samples), loadShadow(), loadTenants(), loadKeys(),
      loadFlags(), tail()]);
    loadRefusals(samples);
    $("#error").textContent = "";
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
  } catch (e) {
    if (e.status === 401 || e.status === 403) return signOut("the admin key was refused");
    $("#error").textContent = e.message;
  }
}

async function act(change) {
  try {
    const answer = await change();
    await refresh();
    return answer;
  } catch (e) {
    $("#error").textContent = e.message;
    return null;
  }
}

function show(signedIn) {
  $("#signin").hidden = signedIn;
  $("#board").hidden = !signedIn;
  $("#signout").hidden = !signedIn;
}

function signOut(why = "") {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  show(false);
  $("#signin-error").textContent = why;
}

async function signIn(candidate) {
  sessionStorage.setItem(KEY, candidate);
  try {
    await api("admin/tenants");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    $("#signin-error").textContent = e.status === 429 ? e.message : "the admin key was refused";
    return;
  }
  $("#signin-error").textContent = "";
  show(true);
  await refresh();
  timer = setInterval(refresh, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("#admin-key");
    const value = input.value;
    input.value = "";
    signIn(value);
  });
  $("#signout").addEventListener("click", () => signOut());
  $("#key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { tenant: $("#key-tenant").value };
    if ($("#key-name").value) body.name = $("#key-name").value;
    if ($("#key-daily").value) body.daily_usd = Number($("#key-daily").value);
    const made = await act(() => api("admin/keys", { method: "POST", body }));
    if (made) {
      const p = $("#new-key");
      p.textContent = `New key (shown once, store it now): ${made.key}`;
      p.dataset.key = made.key;
      p.hidden = false;
    }
  });
  $("#tenant-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const id = $("#tenant-id").value;
    const body = { tier: $("#tenant-tier").value || "standard" };
    if ($("#tenant-per-minute").value) body.limits = { per_minute: Number($("#tenant-per-minute").value) };
    if ($("#tenant-daily").value) body.daily_usd = Number($("#tenant-daily").value);
    const exists = [...document.querySelectorAll("#tenants tbody tr")].some((tr) => tr.dataset.tenant === id);
    await act(() => exists
      ? api(`admin/tenants/${encodeURIComponent(id)}`, { method: "PATCH", body })
      : api("admin/tenants", { method: "POST", body: { id, ...body } }));
  });
  if (key()) signIn(key());
});
