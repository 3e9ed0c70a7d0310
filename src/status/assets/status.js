// wharf status page: polls /status (JSON, docs/status.md) every second and updates the
// server-rendered page in place: the numbers, and one uPlot chart of bytes in/out per second
// per service. Formatting matches src/status/page.rs, so numbers keep their form.
// window.wharfStatus exposes the update count and the charts (the browser test reads them).
(function () {
  "use strict";
  var POLL_MS = 1000;
  var state = { updates: 0, charts: {}, error: null };
  window.wharfStatus = state;

  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var value = Math.max(0, n), unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
    return unit === 0 ? value.toFixed(0) + " B" : value.toFixed(1) + " " + units[unit];
  }
  function byteRate(r) { return r === null || r === undefined ? "-" : bytes(r) + "/s"; }
  function secs(s) {
    if (s === null || s === undefined) return "-";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " \u00b5s";
    if (s < 1) return (s * 1e3).toFixed(1) + " ms";
    return s.toFixed(2) + " s";
  }
  function uptime(seconds) {
    var s = Math.floor(Math.max(0, seconds));
    var d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    s = s % 60;
    if (d === 0 && h === 0 && m === 0) return s + "s";
    if (d === 0 && h === 0) return m + "m " + s + "s";
    if (d === 0) return h + "h " + m + "m " + s + "s";
    return d + "d " + h + "h " + m + "m";
  }
  function byKey(counts) {
    var keys = Object.keys(counts || {}).sort().filter(function (k) { return counts[k] > 0; });
    if (keys.length === 0) return "0";
    return keys.map(function (k) { return k + " " + counts[k]; }).join(", ");
  }
  function configText(doc) {
    var health = doc.config.healthy ? "healthy" : "last reload not applied";
    var r = doc.config.last_reload;
    if (!r) return health + "; no reload since the start";
    return health + "; last reload (" + r.trigger + ", " + uptime(doc.now_unix - r.at_unix) +
      " ago): " + r.result + " \u2013 " + r.detail;
  }
  function drainText(doc) {
    if (!doc.drain) return "-";
    return "draining for " + doc.drain.elapsed_seconds.toFixed(0) + " s of a " +
      doc.drain.grace_seconds.toFixed(0) + " s grace";
  }
  function columns(s) {
    var r = s.requests;
    return [
      ["Plugin", "plugin", s.plugin],
      ["Listen", "listen", s.listen.join(" ")],
      ["Active", "active", String(s.connections.active)],
      ["Accepted", "accepted", String(s.connections.accepted)],
      ["Rejected", "rejected", byKey(s.connections.rejected)],
      ["In", "in", byteRate(s.rates.received_bytes_per_second)],
      ["Out", "out", byteRate(s.rates.sent_bytes_per_second)],
      ["Requests", "requests", !r ? "-" : r.total === 0 ? "0" : r.total + " (" + byKey(r.by_outcome) + ")"],
      ["p50", "p50", r ? secs(r.p50_seconds) : "-"],
      ["p99", "p99", r ? secs(r.p99_seconds) : "-"]
    ];
  }

  function field(root, name) { return root.querySelector('[data-field="' + name + '"]'); }
  function setText(el, text) { if (el && el.textContent !== text) el.textContent = text; }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Rebuilds the rows and chart frames when the set of services changed (a reload).
  function ensureLayout(doc) {
    var tbody = field(document, "services");
    var names = doc.services.map(function (s) { return s.name; });
    var have = Array.prototype.map.call(tbody.querySelectorAll("tr[data-service]"),
      function (tr) { return tr.getAttribute("data-service"); });
    if (have.join("\n") === names.join("\n")) return;
    var charts = field(document, "charts");
    Object.keys(state.charts).forEach(function (n) { state.charts[n].destroy(); });
    state.charts = {};
    tbody.textContent = "";
    charts.textContent = "";
    doc.services.forEach(function (s) {
      var tr = el("tr", { "data-service": s.name });
      tr.appendChild(el("th", { scope: "row" }, s.name));
      columns(s).forEach(function (c) {
        tr.appendChild(el("td", { "data-label": c[0], "data-field": c[1] }));
      });
      tbody.appendChild(tr);
      var fig = el("figure", { "class": "chart", "data-chart": s.name });
      fig.appendChild(el("figcaption", {}, s.name + ": bytes per second in and out, last 5 minutes"));
      fig.appendChild(el("div", { "class": "plot", role: "img" }));
      charts.appendChild(fig);
    });
  }

  function chartFor(name, fig) {
    if (state.charts[name]) return state.charts[name];
    var plot = fig.querySelector(".plot");
    var opts = {
      width: Math.max(200, plot.clientWidth),
      height: 150,
      legend: { live: false },
      cursor: { show: false },
      scales: { x: { time: true } },
      axes: [{}, { size: 86, values: function (u, ticks) { return ticks.map(byteRate); } }],
      series: [
        {},
        { label: "in", stroke: "#1f6fb2", width: 2, value: function (u, v) { return byteRate(v); } },
        { label: "out", stroke: "#c2571a", width: 2, value: function (u, v) { return byteRate(v); } }
      ]
    };
    state.charts[name] = new uPlot(opts, [[], [], []], plot);
    return state.charts[name];
  }

  function render(doc) {
    setText(field(document, "wharf_version"), doc.wharf_version);
    var st = field(document, "state");
    setText(st, doc.state);
    st.className = "state state-" + doc.state;
    setText(field(document, "uptime"), uptime(doc.uptime_seconds));
    setText(field(document, "backend"), doc.backend.name + " (" + doc.backend.why + ")");
    setText(field(document, "workers"), String(doc.workers));
    setText(field(document, "config"), configText(doc));
    setText(field(document, "drain"), drainText(doc));
    ensureLayout(doc);
    doc.services.forEach(function (s) {
      var tr = document.querySelector('tr[data-service="' + CSS.escape(s.name) + '"]');
      columns(s).forEach(function (c) { setText(field(tr, c[1]), c[2]); });
      var fig = document.querySelector('figure[data-chart="' + CSS.escape(s.name) + '"]');
      var chart = chartFor(s.name, fig);
      chart.setData([doc.history.unix, s.history.received_bytes_per_second,
        s.history.sent_bytes_per_second]);
      fig.querySelector(".plot").setAttribute("aria-label", s.name + ": in " +
        byteRate(s.rates.received_bytes_per_second) + " and out " +
        byteRate(s.rates.sent_bytes_per_second) + " now");
    });
  }

  function resize() {
    Object.keys(state.charts).forEach(function (n) {
      var u = state.charts[n];
      var w = Math.max(200, u.root.parentNode.clientWidth);
      if (u.width !== w) u.setSize({ width: w, height: 150 });
    });
  }
  window.addEventListener("resize", resize);

  function poll() {
    fetch("/status", { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("/status answered " + r.status);
        return r.json();
      })
      .then(function (doc) {
        render(doc);
        state.updates++;
        state.error = null;
        setText(field(document, "live"), "Live: updated every second, last at " +
          new Date(doc.now_unix * 1000).toLocaleTimeString() + ".");
      })
      .catch(function (e) {
        state.error = String(e);
        setText(field(document, "live"), "Not updating (" + e.message + "); retrying every second.");
      })
      .then(function () { setTimeout(poll, POLL_MS); });
  }
  poll();
})();
