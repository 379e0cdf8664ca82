// Sidewall dashboard: fetches /api/graph, /api/fleet, /api/policies and /api/alerts, renders them, and
// refreshes every 2 s. Read-only. The DOM is built with textContent and attributes only, never
// innerHTML: identities, paths and denial reasons come from sidecars.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const VIEW = { width: 720, height: 440 };
  const NODE_RADIUS = 26;

  // ---- small DOM helpers ------------------------------------------------------------------

  function build(make, tag, attrs, children) {
    const node = make(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.setAttribute("class", value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children || []) {
      if (child !== null && child !== undefined) {
        node.append(typeof child === "string" ? document.createTextNode(child) : child);
      }
    }
    return node;
  }
  const el = (tag, attrs, ...children) => build((t) => document.createElement(t), tag, attrs, children);
  const svg = (tag, attrs, ...children) => build((t) => document.createElementNS(SVG_NS, t), tag, attrs, children);

  async function getJson(path) {
    const response = await fetch(path, { cache: "no-store" });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  // ---- formatting -------------------------------------------------------------------------

  const shortName = (identity) => String(identity).split("/").pop() || String(identity);
  // `spiffe://td/ns/demo/svc/api` → `ns/demo/svc/api` (the trust domain is shown in full on hover).
  const withoutTrustDomain = (pattern) => String(pattern).replace(/^spiffe:\/\/[^/]+\//, "");

  function span(seconds) {
    const s = Math.abs(Math.round(seconds));
    if (s < 90) return `${s} s`;
    if (s < 90 * 60) return `${Math.round(s / 60)} min`;
    if (s < 48 * 3600) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} d`;
  }
  const nowSeconds = () => Date.now() / 1000;
  function relative(unix) {
    if (unix === null || unix === undefined) return null;
    const delta = unix - nowSeconds();
    return delta >= 0 ? `in ${span(delta)}` : `${span(delta)} ago`;
  }
  const isoTime = (unix) => new Date(unix * 1000).toISOString().replace(".000Z", "Z");

  function outcome(edge) {
    if (edge.deny > 0) return "denied";
    if (edge.audit > 0) return "audit";
    return "allowed";
  }
  function edgeLabel(edge) {
    const parts = [];
    if (edge.deny > 0) parts.push(`${edge.deny} denied`);
    if (edge.audit > 0) parts.push(`${edge.audit} audit`);
    if (edge.allow > 0 || parts.length === 0) parts.push(`${edge.allow} allowed`);
    return `:${edge.port} · ${parts.join(" · ")}`;
  }

  // ---- the service graph ------------------------------------------------------------------

  // The centre of the circle the nodes sit on (set by `layout`); labels point away from it.
  let centre = { x: VIEW.width / 2, y: VIEW.height / 2 };

  // Nodes go round a circle starting at the top (two sit side by side), and the circle is
  // shifted so that the drawing, not the circle, is centred: a triangle would sit high.
  function layout(nodes) {
    const radius = Math.min(VIEW.width, VIEW.height) / 2 - 60;
    const n = nodes.length;
    const start = n === 2 ? Math.PI : -Math.PI / 2;
    const points = nodes.map((_, i) => {
      const angle = start + (2 * Math.PI * i) / Math.max(n, 1);
      const r = n === 1 ? 0 : radius;
      return { x: r * Math.cos(angle), y: r * Math.sin(angle) };
    });
    const ys = points.map((p) => p.y);
    const middle = points.length ? (Math.min(...ys) + Math.max(...ys)) / 2 : 0;
    centre = { x: VIEW.width / 2, y: VIEW.height / 2 - middle };
    const positions = new Map();
    nodes.forEach((node, i) => {
      positions.set(node.identity, { x: centre.x + points[i].x, y: centre.y + points[i].y });
    });
    return positions;
  }

  // The unit vector from the centre of the graph towards p (straight up at the centre).
  function outward(p) {
    const dx = p.x - centre.x;
    const dy = p.y - centre.y;
    const length = Math.hypot(dx, dy);
    return length < 1 ? { x: 0, y: -1 } : { x: dx / length, y: dy / length };
  }

  // Text beside point p on the side `dir` points to, so that it never sits on a line.
  function beside(p, dir, gap) {
    const anchor = dir.x > 0.35 ? "start" : dir.x < -0.35 ? "end" : "middle";
    const x = p.x + dir.x * gap;
    let y = p.y + dir.y * gap + 4;
    if (anchor === "middle") y += dir.y > 0 ? 8 : -4;
    return { x, y, anchor };
  }

  function arrowMarkers() {
    return svg("defs", {}, ...["allowed", "denied", "audit"].map((kind) =>
      svg("marker", {
        id: `arrow-${kind}`, viewBox: "0 0 10 10", refX: 9, refY: 5,
        markerWidth: 10, markerHeight: 10, markerUnits: "userSpaceOnUse", orient: "auto",
      }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: `arrow-${kind}` }))));
  }

  // A curved path from a to b bulging towards `side` (a unit normal of the chord) by `bend`
  // of its length, shortened so that it starts and ends at the nodes' rims.
  function curve(a, b, side, bend) {
    const length = Math.hypot(b.x - a.x, b.y - a.y) || 1;
    const control = {
      x: (a.x + b.x) / 2 + side.x * length * bend,
      y: (a.y + b.y) / 2 + side.y * length * bend,
    };
    const toward = (p, q, distance) => {
      const l = Math.hypot(q.x - p.x, q.y - p.y) || 1;
      return { x: p.x + ((q.x - p.x) / l) * distance, y: p.y + ((q.y - p.y) / l) * distance };
    };
    const start = toward(a, control, NODE_RADIUS + 2);
    const end = toward(b, control, NODE_RADIUS + 3);
    const middle = {
      x: 0.25 * start.x + 0.5 * control.x + 0.25 * end.x,
      y: 0.25 * start.y + 0.5 * control.y + 0.25 * end.y,
    };
    const f = (v) => v.toFixed(1);
    return {
      d: `M${f(start.x)},${f(start.y)} Q${f(control.x)},${f(control.y)} ${f(end.x)},${f(end.y)}`,
      label: beside(middle, side, 7),
    };
  }

  // Which way the edge from a to b bulges: outwards when it has no reverse edge; when it
  // does, each direction takes its own side, so the two never overlap.
  function bulge(a, b, hasReverse) {
    const length = Math.hypot(b.x - a.x, b.y - a.y) || 1;
    const normal = { x: -(b.y - a.y) / length, y: (b.x - a.x) / length };
    if (hasReverse) return normal;
    const out = outward({ x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 });
    return normal.x * out.x + normal.y * out.y >= 0 ? normal : { x: -normal.x, y: -normal.y };
  }

  function loop(p) {
    const top = p.y - NODE_RADIUS;
    return {
      d: `M${p.x - 12},${top + 2} C${p.x - 50},${top - 70} ${p.x + 50},${top - 70} ${p.x + 12},${top + 2}`,
      label: { x: p.x, y: top - 60, anchor: "middle" },
    };
  }

  // The name and endpoint of a node, outside its circle on the side away from the centre,
  // where no edge arrives.
  function nodeLabels(node, dir) {
    const at = beside({ x: 0, y: 0 }, dir, NODE_RADIUS + 8);
    const detail = node.endpoint || (node.connected ? "connected" : "not registered");
    // Above the node the name goes on top of the detail; elsewhere below it.
    const [nameY, detailY] = at.anchor === "middle" && dir.y < 0
      ? [at.y - 14, at.y]
      : at.anchor === "middle" ? [at.y, at.y + 14] : [at.y - 6, at.y + 8];
    return [
      svg("text", { class: "node-name", x: at.x.toFixed(1), y: nameY.toFixed(1), "text-anchor": at.anchor, text: node.name }),
      svg("text", { class: "node-detail", x: at.x.toFixed(1), y: detailY.toFixed(1), "text-anchor": at.anchor, text: detail }),
    ];
  }

  function renderGraph(graph) {
    const root = document.getElementById("graph");
    const positions = layout(graph.nodes);
    const children = [arrowMarkers()];
    if (graph.nodes.length === 0) {
      children.push(svg("text", { class: "empty", x: VIEW.width / 2, y: VIEW.height / 2, text: "No workloads yet: sidecars appear here once they register." }));
    }
    const pairs = new Map();
    const directed = new Set(graph.edges.map((e) => `${e.from}\n${e.to}`));
    const edgeLayer = svg("g", { id: "edges" });
    for (const edge of graph.edges) {
      const a = positions.get(edge.from);
      const b = positions.get(edge.to);
      if (!a || !b) continue;
      const pair = `${edge.from}\n${edge.to}`;
      const index = pairs.get(pair) || 0;
      pairs.set(pair, index + 1);
      const kind = outcome(edge);
      const shape = edge.from === edge.to
        ? loop(a)
        : curve(a, b, bulge(a, b, directed.has(`${edge.to}\n${edge.from}`)), 0.14 + 0.12 * index);
      const details = `${shortName(edge.from)} → ${shortName(edge.to)} port ${edge.port}/${edge.protocol}: ` +
        `${edge.allow} allowed, ${edge.deny} denied, ${edge.audit} audit` +
        (edge.last_denial ? `; last denial: ${edge.last_denial}` : "");
      edgeLayer.append(svg("g", {
        class: `edge ${kind}`, "data-from": edge.from, "data-to": edge.to, "data-port": edge.port,
        "data-protocol": edge.protocol, "data-allow": edge.allow, "data-deny": edge.deny, "data-audit": edge.audit,
      },
      svg("title", { text: details }),
      svg("path", { d: shape.d, "marker-end": `url(#arrow-${kind})` }),
      svg("text", {
        class: "edge-label", x: shape.label.x.toFixed(1), y: shape.label.y.toFixed(1),
        "text-anchor": shape.label.anchor, text: edgeLabel(edge),
      })));
    }
    const nodeLayer = svg("g", { id: "nodes" });
    for (const node of graph.nodes) {
      const p = positions.get(node.identity);
      nodeLayer.append(svg("g", {
        class: `node${node.connected ? " connected" : ""}`, "data-identity": node.identity,
        "data-name": node.name, "data-connected": node.connected, transform: `translate(${p.x.toFixed(1)},${p.y.toFixed(1)})`,
      },
      svg("title", { text: `${node.identity}\n${node.endpoint ? `endpoint ${node.endpoint}` : "no endpoint registered"}\n${node.connected ? "sidecar connected" : "no sidecar connected"}` }),
      svg("circle", { r: NODE_RADIUS }),
      svg("text", { class: "node-initial", y: 6, text: node.name.charAt(0).toUpperCase() }),
      ...nodeLabels(node, outward(p))));
    }
    children.push(edgeLayer, nodeLayer);
    root.replaceChildren(...children);
  }

  function renderFlows(graph) {
    const body = document.querySelector("#flows tbody");
    const rows = graph.edges.map((edge) => {
      const kind = outcome(edge);
      return el("tr", { class: `flow ${kind}`, "data-from": edge.from, "data-to": edge.to, "data-port": edge.port },
        el("td", { title: edge.from }, el("span", { class: "name", text: shortName(edge.from) })),
        el("td", { title: edge.to }, el("span", { class: "name", text: shortName(edge.to) })),
        el("td", { class: "mono", text: `${edge.port}/${edge.protocol}` }),
        el("td", {}, el("span", { class: `badge ${kind}`, text: kind })),
        el("td", { class: "num allow", text: edge.allow }),
        el("td", { class: "num deny", text: edge.deny }),
        el("td", { class: "num audit-count", text: edge.audit }),
        el("td", { class: "mono", text: edge.last_denial || "—" }));
    });
    if (rows.length === 0) {
      rows.push(el("tr", { class: "empty" }, el("td", { colspan: 8, text: "No flows observed yet. Sidecars report them every few seconds." })));
    }
    body.replaceChildren(...rows);
    // Flows the control plane did not keep (a reporter's or a pair's quota, or evicted as the
    // oldest): the table cannot show them, so say how many.
    const dropped = Object.entries(graph.flows_dropped || {});
    const note = document.querySelector("#flows-dropped");
    const total = dropped.reduce((sum, [, count]) => sum + count, 0);
    note.hidden = total === 0;
    note.textContent = total === 0 ? "" :
      `${total} reported flows were not kept (${dropped.map(([reason, count]) => `${reason}: ${count}`).join(", ")}); they are not shown here.`;
  }

  // ---- the alerts -------------------------------------------------------------------------

  function renderAlerts(data) {
    const rows = [...data.alerts].reverse().map((alert) => el("tr", {
      class: `alert ${alert.signal}`, "data-signal": alert.signal, "data-from": alert.peer, "data-to": alert.target,
    },
    el("td", { title: isoTime(alert.at), text: relative(alert.at) }),
    el("td", {}, el("span", { class: "badge denied", text: alert.signal.replace("_", " ") })),
    el("td", { title: alert.peer }, el("span", { class: "name", text: shortName(alert.peer) })),
    el("td", { title: alert.target }, el("span", { class: "name", text: shortName(alert.target) })),
    el("td", { class: "mono", text: alert.detail })));
    if (rows.length === 0) {
      rows.push(el("tr", { class: "empty" }, el("td", { colspan: 5, text: "No alert: nothing suspicious in what the sidecars reported." })));
    }
    document.querySelector("#alerts tbody").replaceChildren(...rows);
  }

  // ---- the fleet --------------------------------------------------------------------------

  function snapshotCell(proxy) {
    const counters = el("span", { class: "mono muted", text: ` ${proxy.applied ?? "—"} / ${proxy.sent ?? "—"}` });
    let badge;
    if (proxy.last_rejection && !(proxy.applied !== null && proxy.sent !== null && proxy.applied >= proxy.sent)) {
      badge = el("span", { class: "badge rejected", title: proxy.last_rejection, text: "rejected" });
    } else if (proxy.applied === null || proxy.applied === undefined) {
      badge = el("span", { class: "badge unknown", text: "none applied" });
    } else if (proxy.sent === null || proxy.applied >= proxy.sent) {
      badge = el("span", { class: "badge in-sync", text: "in sync" });
    } else {
      badge = el("span", { class: "badge behind", text: "behind" });
    }
    const cell = el("td", {}, badge, counters);
    if (proxy.last_rejection) cell.append(el("span", { class: "identity", text: `last rejection: ${proxy.last_rejection}` }));
    return cell;
  }

  function certificateCell(expires) {
    if (expires === null || expires === undefined) return el("td", { class: "muted", text: "not reported" });
    const left = expires - nowSeconds();
    const kind = left <= 0 ? "expired" : left < 2 * 3600 ? "expiring" : "";
    const text = left <= 0 ? `expired ${relative(expires)}` : relative(expires);
    return el("td", { title: isoTime(expires), "data-expires-at": expires },
      kind ? el("span", { class: `badge ${kind}`, text }) : text);
  }

  function renderFleet(fleet) {
    const proxies = [...fleet.proxies].sort((a, b) =>
      a.identity.localeCompare(b.identity) || a.instance.localeCompare(b.instance));
    const rows = proxies.map((proxy) => el("tr", {
      class: `proxy${proxy.connected ? " connected" : ""}`, "data-identity": proxy.identity,
      "data-instance": proxy.instance, "data-connected": proxy.connected,
      "data-applied": proxy.applied ?? "", "data-sent": proxy.sent ?? "",
    },
    el("td", {}, el("span", { class: "name", text: shortName(proxy.identity) || "(unknown)" }), el("span", { class: "identity", text: proxy.identity })),
    el("td", { class: "mono", text: proxy.instance }),
    el("td", { class: "mono", text: proxy.endpoint || "—" }),
    el("td", { title: `since ${isoTime(proxy.since)}` },
      el("span", { class: `badge ${proxy.connected ? "connected" : "disconnected"}`, text: proxy.connected ? "connected" : "disconnected" }),
      el("span", { class: "identity", text: `since ${relative(proxy.since)}` })),
    snapshotCell(proxy),
    el("td", { title: proxy.last_ack_at ? isoTime(proxy.last_ack_at) : "", text: relative(proxy.last_ack_at) || "never" }),
    certificateCell(proxy.certificate_expires_at)));
    if (rows.length === 0) {
      rows.push(el("tr", { class: "empty" }, el("td", { colspan: 7, text: "No sidecar has connected yet." })));
    }
    document.querySelector("#fleet tbody").replaceChildren(...rows);
    const connected = proxies.filter((p) => p.connected).length;
    const summary = [`${proxies.length} sidecar${proxies.length === 1 ? "" : "s"}, ${connected} connected`,
      `policy version ${fleet.policy_version}`];
    if (fleet.source_error) summary.push(`policy directory: ${fleet.source_error}`);
    document.getElementById("fleet-summary").textContent = summary.join(" · ");
  }

  // ---- the policies -----------------------------------------------------------------------

  const list = (value) => (Array.isArray(value) ? value : value === undefined || value === null ? [] : [value]);

  function ruleItem(rule) {
    const parts = [];
    parts.push(`from ${list(rule.from).map(withoutTrustDomain).join(", ")}`);
    parts.push(rule.ports ? `ports ${list(rule.ports).join(", ")}` : "all ports");
    if (rule.http) {
      const http = [];
      http.push(rule.http.methods ? list(rule.http.methods).join(",") : "any method");
      http.push(rule.http.paths ? list(rule.http.paths).join(", ") : "any path");
      if (rule.http.hosts) http.push(`hosts ${list(rule.http.hosts).join(", ")}`);
      parts.push(`HTTP ${http.join(" ")}`);
    }
    return el("li", { title: list(rule.from).join(", ") },
      el("span", { class: `rule-action ${rule.action}`, text: rule.action }), ` ${parts.join(" · ")}`);
  }

  function renderPolicies(data) {
    const version = document.getElementById("policy-version");
    version.textContent = data.version > 0 ? `version ${data.version} · applied by ${data.applied_by}` : "no version applied";
    const items = data.policies.map((policy) => el("article", {
      class: `policy ${policy.mode}`, "data-name": policy.name, "data-mode": policy.mode, "data-target": policy.target,
    },
    el("div", { class: "policy-head" },
      el("span", { class: "name", text: policy.name }),
      el("span", { class: `badge ${policy.mode}`, text: policy.mode })),
    el("div", { class: "policy-target", title: policy.target, text: `target ${policy.target}` }),
    el("ol", { class: "rules" }, ...policy.rules.map(ruleItem))));
    if (items.length === 0) {
      items.push(el("p", { class: "empty-note", text: "No policy applied: every connection is denied by default." }));
    }
    document.getElementById("policies").replaceChildren(...items);
  }

  // ---- the refresh loop -------------------------------------------------------------------

  function setStatus(state, text) {
    const status = document.getElementById("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  async function refresh() {
    try {
      const [graph, fleet, policies, alerts] = await Promise.all([
        getJson("/api/graph"), getJson("/api/fleet"), getJson("/api/policies"), getJson("/api/alerts")]);
      renderAlerts(alerts);
      renderGraph(graph);
      renderFlows(graph);
      renderFleet(fleet);
      renderPolicies(policies);
      const denied = graph.edges.filter((e) => e.deny > 0).length;
      setStatus("ok", `${graph.nodes.length} workloads · ${graph.edges.length} flows (${denied} with denials) · updated ${new Date().toLocaleTimeString()}`);
      document.body.dataset.loaded = "true";
    } catch (error) {
      setStatus("error", `cannot reach the control plane (${error.message}); retrying every ${REFRESH_MS / 1000} s`);
    }
  }

  // Render once straight away, then every REFRESH_MS after each refresh completes (so slow
  // answers never pile up).
  async function run() {
    await refresh();
    setTimeout(run, REFRESH_MS);
  }
  run();
})();
