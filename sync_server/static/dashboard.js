// The PocketRec dashboard's only script: polls GET /v1/admin/dashboard (the endpoint and
// the interval come from <body data-endpoint data-interval-ms>) and rebuilds the rounds and
// models tables, the privacy budget and the SVG chart in place. No library, no build step,
// no innerHTML: every value goes into the page as text (the Content-Security-Policy allows
// this file and nothing inline). Markup must match templates/dashboard.html.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const body = document.body;
  const endpoint = body.dataset.endpoint;
  const intervalMs = Number(body.dataset.intervalMs) || 2000;

  function num(value, digits = 4) {
    if (value === null || value === undefined) return "–";
    return String(Number(Number(value).toPrecision(digits)));
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function metric(model, source, name) {
    const values = model.metrics[source];
    return values && name in values ? values[name] : null;
  }

  function renderPrivacy(privacy) {
    document.getElementById("epsilon").textContent = num(privacy.epsilon);
    document.getElementById("delta").textContent = num(privacy.delta);
    document.getElementById("accountant").textContent = privacy.accountant || "–";
    document.getElementById("mechanism").textContent = privacy.mechanism || "–";
    const budget = document.getElementById("budget");
    budget.dataset.budget = privacy.budget === null ? "" : String(privacy.budget);
    budget.dataset.budgetLeft = privacy.budget_left === null ? "" : String(privacy.budget_left);
    budget.textContent = privacy.budget === null
      ? "no budget set" : `${num(privacy.budget_left)} of ${num(privacy.budget)}`;
  }

  function renderFleet(fleet) {
    document.getElementById("registered").textContent = String(fleet.registered);
    document.getElementById("seen").textContent = String(fleet.seen_last_day);
    const parts = Object.entries(fleet.by_version).map(([v, n]) => `${v}: ${n}`);
    document.getElementById("by-version").textContent = parts.length ? parts.join(", ") : "–";
  }

  function renderRounds(rounds) {
    const rows = rounds.map((r) => {
      const tr = el("tr", {"data-round-id": r.round_id, "data-state": r.state});
      const versions = `v${r.model_version}` +
        (r.published_version === null ? "" : ` → v${r.published_version}`);
      tr.append(
        el("td", {class: "round-id"}, r.round_id),
        el("td", {class: "state"}, r.state),
        el("td", {class: "strategy"}, r.strategy),
        el("td", {class: "scheme"}, r.upload_scheme),
        el("td", {class: "versions"}, versions),
        el("td", {class: "progress"}, r.progress + (r.reason ? ` — ${r.reason}` : "")),
        el("td", {class: "sampling-rate"}, num(r.sampling_rate)),
        el("td", {class: "epsilon"}, num(r.epsilon)),
        el("td", {class: "delta"}, num(r.delta)),
      );
      return tr;
    });
    document.querySelector("#rounds tbody").replaceChildren(...rows);
  }

  function renderModels(models) {
    const rows = models.slice().reverse().map((m) => {
      const tr = el("tr", {"data-version": String(m.version), "data-status": m.status});
      tr.append(
        el("td", {class: "version"}, `v${m.version}`),
        el("td", {class: "status"}, m.status),
        el("td", {class: "rollout"}, `${m.rollout_percent}%`),
        el("td", {class: "created"}, `${m.created_at.slice(0, 19).replace("T", " ")} UTC`),
        el("td", {class: "epsilon"}, num(m.epsilon)),
        el("td", {class: "delta"}, num(m.delta)),
        el("td", {class: "hr10"}, num(metric(m, "offline", "hr@10"))),
        el("td", {class: "online-hr10"}, num(metric(m, "online", "hr@10"))),
      );
      return tr;
    });
    document.querySelector("#models tbody").replaceChildren(...rows);
  }

  // The top of an axis: a round number a little above the largest value (1 when none).
  function niceCeil(value) {
    if (!(value > 0)) return 1;
    const target = value * 1.1;
    const scale = 10 ** Math.floor(Math.log10(target));
    const step = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].find((m) => m * scale >= target);
    return Number((step * scale).toPrecision(3));
  }

  // The chart: versions along x; HR@10 (offline and online) on the left axis from 0, epsilon
  // on the right axis from 0. Every drawn value is a <circle class="point SERIES"
  // data-version data-value> with a <title>.
  function renderChart(series) {
    const chart = document.getElementById("chart");
    const [width, height] = [640, 240];
    const pad = {left: 52, right: 52, top: 16, bottom: 32};
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const lines = [
      {key: "hr@10", cls: "hr", axis: "left", label: "offline HR@10"},
      {key: "online_hr@10", cls: "online", axis: "left", label: "online HR@10"},
      {key: "epsilon", cls: "epsilon", axis: "right", label: "ε"},
    ];
    const values = (key) => series.map((s) => s[key]).filter((v) => v !== null);
    const hrMax = niceCeil(Math.max(0, ...values("hr@10"), ...values("online_hr@10")));
    const epsMax = niceCeil(Math.max(0, ...values("epsilon")));
    const x = (i) => pad.left + (series.length < 2 ? plotW / 2 : (i * plotW) / (series.length - 1));
    const y = (value, max) => pad.top + plotH - (value / max) * plotH;

    const nodes = [
      svg("line", {class: "axis", x1: pad.left, y1: pad.top, x2: pad.left, y2: pad.top + plotH}),
      svg("line", {class: "axis", x1: pad.left, y1: pad.top + plotH,
                   x2: pad.left + plotW, y2: pad.top + plotH}),
      svg("line", {class: "axis", x1: pad.left + plotW, y1: pad.top,
                   x2: pad.left + plotW, y2: pad.top + plotH}),
      svg("text", {class: "tick", x: pad.left - 6, y: pad.top + 4, "text-anchor": "end"},
          num(hrMax, 3)),
      svg("text", {class: "tick", x: pad.left - 6, y: pad.top + plotH, "text-anchor": "end"}, "0"),
      svg("text", {class: "tick", x: pad.left + plotW + 6, y: pad.top + 4}, num(epsMax, 3)),
      svg("text", {class: "tick", x: pad.left + plotW + 6, y: pad.top + plotH}, "0"),
    ];
    const every = Math.max(1, Math.ceil(series.length / 12));
    series.forEach((s, i) => {
      if (i % every === 0 || i === series.length - 1) {
        nodes.push(svg("text", {class: "tick", x: x(i), y: height - 10, "text-anchor": "middle"},
                       `v${s.version}`));
      }
    });
    let drawn = 0;
    for (const line of lines) {
      const max = line.axis === "right" ? epsMax : hrMax;
      const points = [];
      series.forEach((s, i) => {
        if (s[line.key] !== null) points.push([x(i), y(s[line.key], max), s.version, s[line.key]]);
      });
      if (points.length > 1) {
        nodes.push(svg("polyline", {class: `series ${line.cls}`, fill: "none",
                                    points: points.map((p) => `${p[0]},${p[1]}`).join(" ")}));
      }
      for (const [px, py, version, value] of points) {
        const dot = svg("circle", {class: `point ${line.cls}`, cx: px, cy: py, r: 4,
                                   "data-version": String(version), "data-value": String(value)});
        dot.append(svg("title", {}, `v${version} ${line.label} ${num(value)}`));
        nodes.push(dot);
        drawn += 1;
      }
    }
    if (drawn === 0) {
      nodes.push(svg("text", {class: "empty", x: width / 2, y: height / 2,
                              "text-anchor": "middle"}, "no metrics or epsilon yet"));
    }
    chart.dataset.points = String(drawn);
    chart.replaceChildren(...nodes);
  }

  function render(data) {
    renderPrivacy(data.privacy);
    renderFleet(data.fleet);
    renderRounds(data.rounds);
    renderModels(data.models);
    renderChart(data.series);
    const updated = document.getElementById("updated-at");
    updated.textContent = data.generated_at;
    updated.setAttribute("datetime", data.generated_at);
  }

  function setStatus(message, ok) {
    const status = document.getElementById("poll-status");
    status.textContent = message;
    status.dataset.ok = String(ok);
  }

  async function poll() {
    try {
      if (!document.hidden) {
        const response = await fetch(endpoint, {
          headers: {Accept: "application/json"}, cache: "no-store", credentials: "same-origin",
        });
        if (!response.ok) throw new Error(`the server answered ${response.status}`);
        render(await response.json());
        setStatus("", true);
      }
    } catch (error) {
      setStatus(`update failed: ${error.message}; retrying`, false);
    } finally {
      setTimeout(poll, intervalMs);  // after the answer: polls never pile up
    }
  }

  poll();
})();
