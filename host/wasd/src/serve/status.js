// The sidecar's status page: polls /v1/status once a second and draws it. Everything
// a provider or a client wrote (names, endpoints, reasons) is set as text, never as
// markup.
"use strict";

const POLL_MS = 1000;
// Last index seen per query, to mark the rows whose endpoints changed.
const seen = new Map();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function pill(text, kind) {
  return el("span", { class: "pill " + kind }, text);
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return Math.round(ms) + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  const m = s / 60;
  if (m < 60) return m.toFixed(1) + " min";
  return (m / 60).toFixed(1) + " h";
}

function rows(table, items, columns, row) {
  const body = document.querySelector(table + " tbody");
  const drawn = items.map(row);
  if (drawn.length === 0) {
    drawn.push(el("tr", {}, el("td", { class: "empty", colspan: columns }, "none")));
  }
  body.replaceChildren(...drawn);
}

function providers(status) {
  rows("#providers", status.providers, 5, (p, i) => {
    const state = p.state === "serving"
      ? pill("serving", "ok")
      : pill("quarantined for " + duration(p.quarantined_for_ms), "bad");
    const faults = p.faults === 0 ? "0" : p.faults + " (" + p.faults_in_a_row + " in a row)";
    return el("tr", {}, el("td", { class: "muted" }, i + 1), el("td", {}, el("code", {}, p.name)),
      el("td", {}, state), el("td", {}, faults), el("td", {}, p.instances));
  });
  const reload = status.reload;
  const box = document.getElementById("reload");
  const lines = [el("div", { class: "muted" },
    "configuration generation " + reload.generation + ", " + reload.reloads + " reloads" +
    (reload.draining ? ", " + reload.draining + " old chains draining" : ""))];
  for (const e of reload.errors) {
    lines.push(el("div", { class: "reason" },
      "last reload kept the previous " + e.provider + " (" + e.source + "): " + e.reason));
  }
  box.replaceChildren(...lines);
}

function services(status) {
  rows("#services", status.services, 7, (s) => {
    const endpoints = el("ul", { class: "endpoints" });
    for (const e of s.endpoints) {
      const metadata = Object.entries(e.metadata).map(([k, v]) => k + "=" + v).join(", ");
      endpoints.append(el("li", { class: "mono", title: metadata || null }, e.endpoint));
    }
    if (s.endpoints.length === 0) endpoints.append(el("li", { class: "muted" }, "no endpoints"));
    const state = el("td", {}, s.state === "fresh" ? pill("fresh", "ok") : pill("stale for " + duration(s.stale_for_ms), "warn"));
    for (const f of s.failures) {
      state.append(el("div", { class: "reason" }, "provider '" + f.provider + "': " + f.error));
    }
    const next = s.long_poll ? "on change (watching " + s.long_poll + ")" : duration(s.refresh_in_ms);
    const row = el("tr", { "data-query": s.query }, el("td", {}, el("code", {}, s.query)), el("td", {}, endpoints),
      el("td", {}, s.provider === null ? "–" : el("code", {}, s.provider)), state,
      el("td", {}, duration(s.age_ms)), el("td", {}, next), el("td", { class: "muted" }, s.index));
    const before = seen.get(s.query);
    if (before !== undefined && before !== s.index) row.classList.add("changed");
    seen.set(s.query, s.index);
    return row;
  });
}

function instances(status) {
  rows("#instances", status.instances, 6, (r) => {
    const kind = r.state === "registered" ? "ok" : r.state === "retrying" ? "bad" : "warn";
    const state = el("td", {}, pill(r.state, kind));
    if (r.error) state.append(el("div", { class: "reason" }, r.error + " (attempt " + r.attempts + ", next in " + duration(r.retry_in_ms) + ")"));
    return el("tr", {}, el("td", {}, el("code", {}, r.service)), el("td", {}, el("code", {}, r.id)),
      el("td", {}, el("code", {}, r.provider)), state, el("td", { class: "mono" }, r.lease ?? "–"),
      el("td", {}, duration(r.expires_in_ms) + " of " + duration(r.ttl_ms)));
  });
}

function connection(ok, detail) {
  const node = document.getElementById("connection");
  node.className = "pill " + (ok ? "ok" : "bad");
  node.textContent = ok ? "live" : "unreachable: " + detail;
}

async function poll() {
  try {
    const response = await fetch("/v1/status", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const status = await response.json();
    providers(status);
    services(status);
    instances(status);
    document.getElementById("meta").textContent =
      "version " + status.version + " · " + status.blocked_watches + " blocked watches · " +
      (status.xds ? status.xds.streams + " xDS streams following " + status.xds.followed + " services · " : "") +
      "updated " +
      new Date().toLocaleTimeString();
    connection(true);
  } catch (e) {
    connection(false, e.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// A lookup resolves through the sidecar, which caches the query: it then stays in the
// services table like any other.
document.getElementById("lookup").addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = document.getElementById("query").value.trim();
  const out = document.getElementById("lookup-result");
  if (!query) return;
  try {
    const response = await fetch("/v1/resolve?query=" + encodeURIComponent(query), { cache: "no-store" });
    const body = await response.json();
    out.className = response.ok ? "muted" : "reason";
    out.textContent = response.ok
      ? query + ": " + body.endpoints.length + " endpoints from " + body.provider
      : query + ": " + body.error;
  } catch (e) {
    out.className = "reason";
    out.textContent = query + ": " + e.message;
  }
});

poll();
