// Bearman dashboard: a single page over the admin API (/api/v1) with the session cookie.
// Every text that came from the store is inserted with textContent (through el()),
// never as HTML: hostnames, reasons and event texts can contain anything.
"use strict";

const STATES = ["discovered", "registered", "provisioning", "ready", "suspect", "fencing",
  "fenced", "rebuilding", "maintenance", "retired"];
const ROLES = ["compute", "storage", "load_balancer", "control_plane"];
const RANK = { viewer: 0, operator: 1, admin: 2 };
const PAGE_SIZE = 50;
const LIVE_POLL_MS = 3000;

let session = null; // {token, role, csrf, expires_at_ms}
let gridCache = null; // the last GET /fleet/grid, for search
let liveTimer = null;

function $(id) { return document.getElementById(id); }

// el("td", {class: "mono"}, "text", child...): strings become text nodes.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "on") { for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn); }
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function when(ms) {
  if (ms === undefined || ms === null) return "—";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function badge(state) { return el("span", { class: "badge st-" + state, "data-state": state }, state); }

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || ("HTTP " + status));
    this.status = status; this.body = body;
  }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && method !== "HEAD" && session) headers["X-Bearman-Csrf"] = session.csrf;
  const response = await fetch(path.startsWith("/ui/") ? path : "/api/v1" + path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let parsed = null;
  const text = await response.text();
  if (text) { try { parsed = JSON.parse(text); } catch (_) { parsed = null; } }
  if (response.status === 401 && !path.startsWith("/ui/")) { showLogin("Your session ended; log in again."); }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

function may(role) { return session && RANK[session.role] >= RANK[role]; }

function parseHash() {
  const hash = location.hash.replace(/^#\/?/, "") || "overview";
  const [path, query] = hash.split("?");
  return { parts: path.split("/"), params: new URLSearchParams(query || "") };
}

function stopLive() { if (liveTimer) { clearInterval(liveTimer); liveTimer = null; } }

function setPage(title, ...children) {
  const page = $("page");
  page.replaceChildren(el("h1", {}, title), ...children);
  page.setAttribute("data-title", title);
}

function failure(error) {
  setPage("Error", el("p", { class: "error", id: "page-error" }, error.message || String(error)));
}

async function route() {
  stopLive();
  if (!session) return;
  const { parts, params } = parseHash();
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === parts[0] || (parts[0] === "node" && a.dataset.page === "nodes"));
  }
  try {
    if (parts[0] === "nodes") await nodesPage(params);
    else if (parts[0] === "node" && parts[1]) await nodePage(parts[1]);
    else if (parts[0] === "remediations") await remediationsPage(params);
    else if (parts[0] === "events") await eventsPage();
    else await overviewPage();
  } catch (error) { if (!(error instanceof ApiError && error.status === 401)) failure(error); }
  $("page").setAttribute("data-ready", parts[0] || "overview");
}

// ---- Overview ------------------------------------------------------------------------
const OVERVIEW_POLL_MS = 5000;
// The grid (~65 bytes a node) is re-read every this many polls, the rest every poll.
const GRID_EVERY_POLLS = 6;

function countCards(summary) {
  return el("div", { class: "cards", id: "counts" },
    el("div", { class: "card", "data-state": "total" }, el("div", { class: "n" }, summary.total), "total"),
    STATES.map(s => el("div", { class: "card", "data-state": s },
      el("div", { class: "n" }, summary.by_state[s] || 0), badge(s))));
}

function rackGrid(grid) {
  return el("div", { id: "racks" }, grid.racks.map(rack =>
    el("div", { class: "rack", "data-rack": rack.rack },
      el("div", {}, el("b", {}, rack.rack || "(no rack)"), " · ", rack.nodes.length, " nodes"),
      el("div", { class: "cells" }, rack.nodes.map(([uuid, hostname, state]) =>
        el("a", { class: "cell st-" + state, href: "#/node/" + uuid, title: hostname + " · " + state }))))));
}

function guardList(guards) {
  const g = guards.guards;
  const rows = g ? [
    ["automatic remediation", g.automatic ? "on" : "off"],
    ["fleet fencing", g.fleet_fencing_stopped ? "STOPPED" : "allowed"],
    ["racks paused", g.racks_paused.length ? g.racks_paused.join(", ") : "none"],
    ["silent / monitored", g.silent + " / " + g.monitored],
    ["remediations active", g.remediations_active + " / " + g.remediations_active_max],
    ["evaluated", when(g.evaluated_at_ms)],
  ] : [["guards", "not published yet"]];
  rows.unshift(["controller", guards.controller_running ? "running" : "DOWN"]);
  return el("dl", { class: "kv", id: "guards" }, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

async function overviewPage() {
  const [summary, grid, guards, active] = await Promise.all([
    api("GET", "/summary"), api("GET", "/fleet/grid"),
    api("GET", "/remediation/guards"), api("GET", "/remediations?active=true&limit=50"),
  ]);
  gridCache = grid;
  const legend = el("div", { class: "legend" }, STATES.map(s => el("span", {}, el("i", { class: "cell st-" + s }), s)));
  setPage("Fleet overview",
    countCards(summary),
    el("h2", {}, "Guards"), guardList(guards),
    el("h2", {}, "Remediations in progress"), remediationTable(active, "active-remediations"),
    el("h2", {}, "Racks"), legend, rackGrid(grid));
  // Kept current while it is shown: detection, fencing and recovery as they happen.
  let polls = 0;
  liveTimer = setInterval(async () => {
    polls += 1;
    try {
      const [summary, guards, active] = await Promise.all([
        api("GET", "/summary"), api("GET", "/remediation/guards"),
        api("GET", "/remediations?active=true&limit=50"),
      ]);
      $("counts").replaceWith(countCards(summary));
      $("guards").replaceWith(guardList(guards));
      $("active-remediations").replaceWith(remediationTable(active, "active-remediations"));
      if (polls % GRID_EVERY_POLLS === 0) {
        gridCache = await api("GET", "/fleet/grid");
        $("racks").replaceWith(rackGrid(gridCache));
      }
    } catch (_) { /* shown again on the next poll; a 401 already went to the login */ }
  }, OVERVIEW_POLL_MS);
}

function remediationTable(list, id) {
  if (!list.length) return el("p", { class: "hint", id }, "None.");
  return el("table", { id },
    el("tr", {}, ["id", "node", "kind", "status", "step", "by", "reason", "started"].map(h => el("th", {}, h))),
    list.map(r => el("tr", {},
      el("td", {}, r.id),
      el("td", { class: "mono" }, el("a", { href: "#/node/" + r.node_uuid }, r.node_uuid)),
      el("td", {}, r.kind), el("td", {}, r.status),
      el("td", {}, stepName(r.plan[r.step_index]) || "—"),
      el("td", {}, r.requested_by), el("td", {}, r.reason), el("td", {}, when(r.created_at_ms)))));
}

function stepName(step) {
  if (step === undefined || step === null) return "";
  return typeof step === "string" ? step : Object.keys(step)[0] || JSON.stringify(step);
}

// ---- Node list -----------------------------------------------------------------------
async function nodesPage(params) {
  const filter = { state: params.get("state") || "", rack: params.get("rack") || "",
    role: params.get("role") || "", q: params.get("q") || "", after: params.get("after") || "" };
  const select = (name, options) => el("select", { name, id: "filter-" + name },
    el("option", { value: "" }, "any"),
    options.map(o => el("option", { value: o, selected: o === filter[name] }, o)));
  const form = el("form", { class: "filters", id: "node-filters" },
    el("label", {}, "State", select("state", STATES)),
    el("label", {}, "Rack", el("input", { name: "rack", id: "filter-rack", value: filter.rack, size: 10 })),
    el("label", {}, "Role", select("role", ROLES)),
    el("label", {}, "Search hostname/uuid prefix", el("input", { name: "q", id: "filter-q", value: filter.q, size: 24 })),
    el("button", { type: "submit", class: "act", id: "filter-apply" }, "Apply"));
  form.addEventListener("submit", event => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const key of ["state", "rack", "role", "q"]) { const v = form.elements[key].value.trim(); if (v) next.set(key, v); }
    location.hash = "#/nodes?" + next.toString();
  });
  let rows, nextAfter = null, note = null;
  if (filter.q) {
    // Search runs over the compact grid (uuid, hostname, state per rack): the node list
    // API has no text filter. The role filter does not apply to a search.
    if (!gridCache) gridCache = await api("GET", "/fleet/grid");
    const q = filter.q.toLowerCase();
    const found = [];
    for (const rack of gridCache.racks) {
      if (filter.rack && rack.rack !== filter.rack) continue;
      for (const [uuid, hostname, state] of rack.nodes) {
        if (filter.state && state !== filter.state) continue;
        if (uuid.startsWith(q) || hostname.toLowerCase().startsWith(q)) found.push({ uuid, hostname, state, rack: rack.rack });
      }
    }
    found.sort((a, b) => a.uuid < b.uuid ? -1 : 1);
    const start = filter.after ? found.findIndex(n => n.uuid > filter.after) : 0;
    rows = start < 0 ? [] : found.slice(start, start + PAGE_SIZE);
    if (start >= 0 && start + PAGE_SIZE < found.length) nextAfter = rows[rows.length - 1].uuid;
    note = found.length + " match(es)" + (filter.role ? "; the role filter does not apply to a search" : "");
  } else {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const key of ["state", "rack", "role", "after"]) if (filter[key]) query.set(key, filter[key]);
    rows = await api("GET", "/nodes?" + query.toString());
    if (rows.length === PAGE_SIZE) nextAfter = rows[rows.length - 1].uuid;
  }
  const pageLink = after => {
    const next = new URLSearchParams(params); next.delete("after"); if (after) next.set("after", after);
    return "#/nodes?" + next.toString();
  };
  const pager = el("div", { class: "pager" },
    filter.after ? el("a", { href: pageLink(""), id: "page-first" }, "« first page") : null,
    nextAfter ? el("a", { href: pageLink(nextAfter), id: "page-next" }, "next page »") : null,
    el("span", { class: "hint" }, rows.length + " shown" + (note ? " · " + note : "")));
  const table = el("table", { id: "node-table" },
    el("tr", {}, ["hostname", "uuid", "state", "rack", "role"].map(h => el("th", {}, h))),
    rows.map(n => el("tr", { "data-uuid": n.uuid },
      el("td", {}, el("a", { href: "#/node/" + n.uuid }, n.hostname)),
      el("td", { class: "mono" }, n.uuid), el("td", {}, badge(n.state)),
      el("td", {}, n.rack || ""), el("td", {}, n.role || ""))));
  setPage("Nodes", form, pager, table);
}

// ---- Node page -----------------------------------------------------------------------
async function nodePage(uuid) {
  const [node, power, remediations] = await Promise.all([
    api("GET", "/nodes/" + uuid), api("GET", "/nodes/" + uuid + "/power"),
    api("GET", "/remediations?node=" + uuid + "&limit=20"),
  ]);
  const kv = (id, pairs) => el("dl", { class: "kv", id }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v === undefined || v === null || v === "" ? "—" : v)]));
  const hw = node.hardware || {};
  const net = node.network || {};
  const addresses = Object.entries(net)
    .map(([k, v]) => [k, Array.isArray(v) ? v.join(", ") : v])
    .filter(([, v]) => v !== null && v !== undefined && v !== "" && typeof v !== "object")
    .map(([k, v]) => [k, String(v)]);
  const actions = el("div", { class: "actions", id: "node-actions" });
  if (may("operator")) {
    if (node.state === "maintenance") {
      actions.append(el("button", { class: "act", id: "action-maintenance-off", type: "button",
        on: { click: () => confirmAction("End maintenance", "Take " + node.hostname + " out of maintenance.", "DELETE", "/nodes/" + uuid + "/maintenance", uuid) } }, "End maintenance"));
    } else if (node.state !== "retired") {
      actions.append(el("button", { class: "act", id: "action-maintenance-on", type: "button",
        on: { click: () => confirmAction("Maintenance", "Put " + node.hostname + " in maintenance: automation leaves it alone.", "POST", "/nodes/" + uuid + "/maintenance", uuid) } }, "Maintenance"));
    }
    if (node.state !== "retired") {
      actions.append(el("button", { class: "danger", id: "action-rebuild", type: "button",
        on: { click: () => confirmAction("Rebuild", "Rebuild " + node.hostname + ": it is power-cycled into PXE and reinstalled.", "POST", "/nodes/" + uuid + "/rebuild", uuid) } }, "Rebuild"));
    }
  } else {
    actions.append(el("span", { class: "hint", id: "actions-hidden" }, "Your role (" + session.role + ") can only look."));
  }
  const events = el("div", { id: "node-events" });
  setPage(node.hostname,
    el("p", {}, badge(node.state), " ", el("span", { class: "mono" }, node.uuid)),
    actions,
    el("div", { class: "grid2" },
      el("div", {}, el("h2", {}, "Identity"), kv("identity", [
        ["hostname", node.hostname], ["uuid", node.uuid], ["state", node.state], ["role", node.role],
        ["rack", node.rack], ["flavor", node.flavor], ["serial", node.serial],
        ["vendor / model", (node.vendor || "") + " " + (node.model || "")], ["generation", node.generation],
        ["maintenance", node.maintenance ? node.maintenance.by + " at " + when(node.maintenance.at_ms) + ": " + (node.maintenance.reason || "") : null],
        ["registered", when(node.registered_at_ms)], ["installed", when(node.installed_at_ms)],
        ["last heartbeat", when(node.last_heartbeat_at_ms)]])),
      el("div", {}, el("h2", {}, "Hardware"), kv("hardware", [
        ["cpu", hw.cpu ? (hw.cpu.model || "") + " · " + (hw.cpu.cores || hw.cpu.threads || "?") + " cores" : null],
        ["memory", hw.memory_bytes ? (hw.memory_bytes / 2 ** 30).toFixed(1) + " GiB" : null],
        ["disks", (hw.disks || []).map(d => (d.name || "") + " " + ((d.size_bytes || 0) / 1e9).toFixed(0) + " GB").join(", ")],
        ["nics", (hw.nics || []).map(n => (n.name || "") + " " + (n.mac || "")).join(", ")]])),
      el("div", {}, el("h2", {}, "Addresses"), kv("addresses", addresses.length ? addresses : [["addresses", null]])),
      el("div", {}, el("h2", {}, "BMC"), kv("bmc", [
        // The credentials are a reference (env:VAR, file:KEY), never the secret.
        ["address", node.bmc && node.bmc.address], ["mac", node.bmc && node.bmc.mac],
        ["driver", node.bmc && node.bmc.driver], ["credentials", node.bmc && node.bmc.credentials_ref]])),
      el("div", {}, el("h2", {}, "Power and boot"), kv("power", [
        ["last reading", power.power ? power.power.state + " at " + when(power.power.read_at_ms) : "never polled"],
        ["reading error", power.power && power.power.error],
        ["boot phase", node.boot ? node.boot.phase + " at " + when(node.boot.at_ms) : null]]))),
    el("h2", {}, "Remediations"), remediationTimelines(remediations),
    el("h2", {}, "Events (power history included)"), events);
  await loadEvents(events, "/nodes/" + uuid + "/events", null);
}

function remediationTimelines(list) {
  if (!list.length) return el("p", { class: "hint", id: "node-remediations" }, "None.");
  return el("div", { id: "node-remediations" }, list.map(r => el("div", {},
    el("b", {}, "#" + r.id + " " + r.kind + " · " + r.status), " — ", r.reason,
    el("ol", { class: "timeline" },
      el("li", {}, when(r.created_at_ms) + " requested by " + r.requested_by),
      r.plan.map((step, i) => el("li", {}, (i < r.step_index ? "✓ " : i === r.step_index && r.status === "active" ? "▶ " : "· ") + stepName(step))),
      r.fenced_at_ms ? el("li", {}, when(r.fenced_at_ms) + " power-off verified") : null,
      r.evacuated_at_ms ? el("li", {}, when(r.evacuated_at_ms) + " evacuated") : null,
      r.last_error ? el("li", { class: "error" }, "last error: " + r.last_error) : null,
      r.finished_at_ms ? el("li", {}, when(r.finished_at_ms) + " finished") : null))));
}

function eventRows(list) {
  return list.map(e => el("tr", { "data-id": e.id, "data-action": e.action },
    el("td", {}, e.id), el("td", {}, when(e.at_ms)),
    el("td", { class: "mono" }, e.node_uuid ? el("a", { href: "#/node/" + e.node_uuid, title: e.node_uuid }, e.node_uuid.slice(0, 8) + "…" + e.node_uuid.slice(-4)) : "—"),
    el("td", {}, e.actor), el("td", {}, e.action),
    el("td", {}, e.from_state && e.to_state ? e.from_state + " → " + e.to_state : ""),
    el("td", {}, e.reason)));
}

function eventTable(id) {
  return el("table", { id }, el("tr", {}, ["id", "at", "node", "actor", "action", "state", "reason"].map(h => el("th", {}, h))));
}

// Pages backwards through an event listing with `before`, PAGE_SIZE at a time.
async function loadEvents(container, path, before) {
  const sep = path.includes("?") ? "&" : "?";
  const list = await api("GET", path + sep + "limit=" + PAGE_SIZE + (before ? "&before=" + before : ""));
  let table = container.querySelector("table");
  if (!table) { table = eventTable(container.id + "-table"); container.replaceChildren(table); }
  table.append(...eventRows(list));
  const old = container.querySelector(".older"); if (old) old.remove();
  if (list.length === PAGE_SIZE) {
    const oldest = list[list.length - 1].id;
    container.append(el("button", { type: "button", class: "older", on: { click: () => loadEvents(container, path, oldest) } }, "older events"));
  }
  return list;
}

async function confirmAction(title, text, method, path, uuid) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-reason").value = "";
  $("confirm-error").textContent = "";
  dialog.dataset.method = method; dialog.dataset.path = path; dialog.dataset.uuid = uuid;
  dialog.showModal();
  $("confirm-reason").focus();
}

async function confirmSubmit(event) {
  event.preventDefault();
  const dialog = $("confirm");
  const reason = $("confirm-reason").value.trim();
  if (!reason) { $("confirm-error").textContent = "Give a reason."; return; }
  try {
    await api(dialog.dataset.method, dialog.dataset.path, { reason });
    dialog.close();
    await route();
  } catch (error) { $("confirm-error").textContent = error.message; }
}

// ---- Remediations ----------------------------------------------------------------------
async function remediationsPage(params) {
  const active = params.get("active") === "true";
  const list = await api("GET", "/remediations?limit=100" + (active ? "&active=true" : ""));
  setPage("Remediations",
    el("p", {}, el("a", { href: active ? "#/remediations" : "#/remediations?active=true", id: "toggle-active" },
      active ? "show all (newest 100)" : "show active only"),
      el("span", { class: "hint" }, " · newest 100")),
    remediationTable(list, "remediation-table"));
}

// ---- Events, live ----------------------------------------------------------------------
async function eventsPage() {
  const status = el("span", { id: "live-status" }, "live");
  const container = el("div", { id: "events" });
  setPage("Events", el("p", { class: "hint" }, "Newest first; new events appear every few seconds.", status), container);
  const first = await loadEvents(container, "/events", null);
  let newest = first.length ? first[0].id : 0;
  const poll = async () => {
    try {
      const header = container.querySelector("table tr");
      // Follow the trail forward from the newest row shown, page by page, so a burst
      // between two polls is shown whole; at most 10 pages per poll.
      for (let page = 0; page < 10; page++) {
        const list = await api("GET", "/events?after=" + newest + "&limit=" + PAGE_SIZE);
        if (list.length) { header.after(...eventRows(list)); newest = list[0].id; }
        if (list.length < PAGE_SIZE) break;
      }
      status.textContent = "live · updated " + when(Date.now());
    } catch (error) { status.textContent = "live · " + error.message; }
  };
  liveTimer = setInterval(poll, LIVE_POLL_MS);
}

// ---- Session -----------------------------------------------------------------------------
function showLogin(message) {
  session = null; stopLive();
  $("nav").hidden = true; $("logout").hidden = true; $("who").textContent = "";
  $("page").replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

function showApp() {
  $("login").hidden = true; $("nav").hidden = false; $("logout").hidden = false;
  $("who").textContent = session.token + " (" + session.role + ")";
  document.body.dataset.role = session.role;
  route();
}

async function start() {
  $("login-form").addEventListener("submit", async event => {
    event.preventDefault();
    try {
      session = await api("POST", "/ui/login", { token: $("login-token").value });
      $("login-token").value = "";
      if (!location.hash || location.hash === "#/") location.hash = "#/overview";
      showApp();
    } catch (error) { $("login-error").textContent = error.message; }
  });
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "/ui/logout"); } catch (_) { /* the cookie is cleared either way */ }
    showLogin("Logged out.");
  });
  $("confirm-form").addEventListener("submit", confirmSubmit);
  $("confirm-cancel").addEventListener("click", () => $("confirm").close());
  window.addEventListener("hashchange", route);
  try { session = await api("GET", "/ui/session"); showApp(); }
  catch (_) { showLogin(""); }
}

document.addEventListener("DOMContentLoaded", start);
