// The trainbus dashboard: one page, four views (jobs, a job, submit, compare), no build step.
// Data comes from the REST API with the token as a bearer header and from WebSockets that
// offer the token as the `trainbus.bearer.<token>` subprotocol (never in a URL).

const TOKEN_KEY = "trainbus.token";
const SERIES_POINTS = 2000;
const LIVE_TYPES = [
  "train_batch_end", "fit_epoch_end", "lr_changed", "early_stop", "model_save",
  "checkpoint_saved", "job_queued", "job_started", "job_paused", "job_resumed", "job_stopping",
  "job_completed", "job_stopped", "job_failed", "job_interrupted", "subscriber_error",
];
const LOG_TYPES = LIVE_TYPES.filter((type) => type !== "train_batch_end");
const STATES = ["queued", "running", "paused", "completed", "stopped", "failed", "interrupted"];
const ENDED = new Set(["completed", "stopped", "failed", "interrupted"]);

// -- small helpers -------------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "text") element.textContent = value;
    else if (name === "class") element.className = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      element.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return element;
}

function formatNumber(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  const magnitude = Math.abs(value);
  return magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)
    ? value.toExponential(3) : String(Number(value.toPrecision(4)));
}

function formatAge(seconds) {
  const age = Math.max(0, Date.now() / 1000 - seconds);
  if (age < 60) return `${Math.round(age)} s ago`;
  if (age < 3600) return `${Math.round(age / 60)} min ago`;
  if (age < 86400) return `${(age / 3600).toFixed(1)} h ago`;
  return `${(age / 86400).toFixed(1)} d ago`;
}

function debounce(fn, ms) {
  let timer = null;
  const wrapped = () => {
    if (timer === null) timer = setTimeout(() => { timer = null; fn(); }, ms);
  };
  wrapped.cancel = () => { clearTimeout(timer); timer = null; };
  return wrapped;
}

function stateBadge(state) {
  return h("span", { class: `state state-${state}`, "data-state": state, text: state });
}

// -- the API -------------------------------------------------------------------------------

const token = () => sessionStorage.getItem(TOKEN_KEY);

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail !== undefined ? body.detail : `HTTP ${status}`;
    super(typeof detail === "string" ? detail : (body.message || `HTTP ${status}`));
    this.status = status;
    this.detail = detail;
  }
}

async function api(path, { method = "GET", json, text, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (text !== undefined) { headers["Content-Type"] = "text/plain"; body = text; }
  const response = await fetch(path, { method, headers, body });
  if (response.status === 401) {
    signOut("The server refused the token: sign in again.");
    throw new ApiError(401, { detail: "wrong token" });
  }
  if (!response.ok) {
    let parsed = null;
    try { parsed = await response.json(); } catch { parsed = { detail: response.statusText }; }
    throw new ApiError(response.status, parsed);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// A WebSocket that reconnects, resuming from what `path()` says (it reads the last seq seen).
function openStream(path, onEvents) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let socket = null;
  let closed = false;
  let delay = 250;
  const connect = () => {
    socket = new WebSocket(`${scheme}//${location.host}${path()}`,
      ["trainbus", `trainbus.bearer.${token()}`]);
    socket.addEventListener("open", () => { delay = 250; });
    socket.addEventListener("message", (message) => {
      const parsed = JSON.parse(message.data);
      onEvents(Array.isArray(parsed) ? parsed : [parsed]);
    });
    socket.addEventListener("close", (event) => {
      if (closed || event.code === 4404) return;
      setTimeout(() => { if (!closed) connect(); }, delay);
      delay = Math.min(delay * 2, 5000);
    });
  };
  connect();
  return () => { closed = true; socket.close(); };
}

// -- charts --------------------------------------------------------------------------------

const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const seriesColor = (index) => cssVar(`--series-${(index % 6) + 1}`);

// Vertical dashed lines with a label (LR changes, pauses, stops) drawn over the plot.
function markerPlugin(getMarkers) {
  return {
    hooks: {
      draw: [(plot) => {
        const markers = getMarkers();
        if (!markers.length) return;
        const { ctx, bbox } = plot;
        const ratio = window.devicePixelRatio || 1;
        ctx.save();
        ctx.strokeStyle = ctx.fillStyle = cssVar("--marker");
        ctx.setLineDash([4 * ratio, 4 * ratio]);
        ctx.font = `${11 * ratio}px system-ui, sans-serif`;
        markers.forEach((marker, index) => {
          const x = plot.valToPos(marker.x, "x", true);
          if (!Number.isFinite(x) || x < bbox.left || x > bbox.left + bbox.width) return;
          ctx.beginPath();
          ctx.moveTo(x, bbox.top);
          ctx.lineTo(x, bbox.top + bbox.height);
          ctx.stroke();
          ctx.fillText(marker.label, x + 3 * ratio, bbox.top + (12 + (index % 3) * 12) * ratio);
        });
        ctx.restore();
      }],
    },
  };
}

class Chart {
  constructor(container, { labels, xLabel = "step", time = false, markers = () => [], yValues, dotted }) {
    this.yValues = yValues;
    this.dotted = dotted || (() => false); // label -> draw its points (sparse epoch metrics)
    this.container = container;
    this.labels = labels;
    this.xLabel = xLabel;
    this.time = time;
    this.markers = markers;
    this.plot = null;
    this.resize = new ResizeObserver(() => {
      if (this.plot) this.plot.setSize(this.size());
    });
    this.resize.observe(container);
  }

  size() {
    return { width: Math.max(this.container.clientWidth - 4, 280), height: 230 };
  }

  build(data) {
    const text = cssVar("--fg");
    const grid = cssVar("--line");
    const axis = { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    const options = {
      ...this.size(),
      scales: { x: { time: this.time } },
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [
        { label: this.xLabel },
        ...this.labels.map((label, index) => ({
          // uPlot draws the points where they are sparse (epoch metrics), lines elsewhere
          label, stroke: seriesColor(index), width: 1.5, spanGaps: true,
          ...(this.dotted(label) ? { points: { show: true, size: 6 } } : {}),
        })),
      ],
      axes: [{ ...axis, label: this.xLabel }, { ...axis, size: 64, values: this.yValues }],
      plugins: [markerPlugin(this.markers)],
    };
    this.container.replaceChildren();
    this.plot = new uPlot(options, data, this.container);
  }

  // data: [x, ...ys]; labels may change (compare view), which rebuilds the plot
  update(data, labels = this.labels) {
    const points = data[0].length;
    this.container.dataset.points = String(points);
    this.container.dataset.lastX = points ? String(data[0][points - 1]) : "";
    if (!points) {
      if (this.plot) { this.plot.destroy(); this.plot = null; }
      this.container.replaceChildren(h("p", { class: "empty", text: "No data yet" }));
      return;
    }
    if (!this.plot || labels.join("\n") !== this.labels.join("\n")) {
      this.labels = labels;
      if (this.plot) this.plot.destroy();
      this.build(data);
    } else {
      this.plot.setData(data);
    }
    this.container.dataset.ready = "1";
  }

  destroy() {
    this.resize.disconnect();
    if (this.plot) this.plot.destroy();
  }
}

function chartCard(id, title, chartLabel) {
  const body = h("div", { id, class: "chart", role: "img", "aria-label": chartLabel });
  return [h("section", { class: "card", "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title`, text: title }), body), body];
}

// Merge tables [[x...], [y...], ...] that each have sorted x into one aligned table.
function joinTables(tables) {
  const usable = tables.filter((table) => table[0].length);
  if (!usable.length) return [[], ...tables.flatMap((table) => table.slice(1).map(() => []))];
  return uPlot.join(tables.map((table) => (table[0].length ? table : [[], ...table.slice(1)])));
}

// -- sign-in and routing -------------------------------------------------------------------

let leaveView = null;

function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  $("#sign-in-error").textContent = message;
  route();
}

async function signIn(event) {
  event.preventDefault();
  const candidate = $("#token").value.trim();
  const error = $("#sign-in-error");
  error.textContent = "";
  let response;
  try {
    response = await fetch("/jobs?limit=1", { headers: { Authorization: `Bearer ${candidate}` } });
  } catch {
    error.textContent = "The server does not answer: is trainbus running?";
    return;
  }
  if (response.status === 401) {
    error.textContent = "Wrong token: use the one the server printed at start-up (or TRAINBUS_TOKEN).";
    $("#token").select();
    return;
  }
  if (!response.ok) {
    error.textContent = `The server answered ${response.status}: try again.`;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  $("#token").value = "";
  route();
}

function route() {
  if (leaveView) { leaveView(); leaveView = null; }
  const view = $("#view");
  view.replaceChildren();
  const signedIn = Boolean(token());
  $("#sign-in").hidden = signedIn;
  $("#nav").hidden = !signedIn;
  $("#sign-out").hidden = !signedIn;
  if (!signedIn) { $("#token").focus(); return; }
  const [path, query] = (location.hash || "#/jobs").slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  let name = "jobs";
  if (parts[0] === "jobs" && parts[1]) { name = "job"; leaveView = jobView(view, decodeURIComponent(parts[1])); }
  else if (parts[0] === "submit") { name = "submit"; leaveView = submitView(view); }
  else if (parts[0] === "compare") { name = "compare"; leaveView = compareView(view, params); }
  else { leaveView = jobsView(view, params); }
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.body.dataset.view = name;
}

// -- jobs ----------------------------------------------------------------------------------

function progressText(job) {
  const epochs = job.spec && job.spec.epochs;
  return `epoch ${job.epoch}${epochs ? `/${epochs}` : ""} · step ${job.step}`;
}

// What people look at first: validation figures, then the training loss.
const metricRank = (name) => (name.startsWith("val_") ? 0 : name === "train_loss" ? 1 : 2);

function metricsText(metrics) {
  return Object.entries(metrics || {})
    .sort((a, b) => metricRank(a[0]) - metricRank(b[0])).slice(0, 4)
    .map(([name, value]) => `${name} ${formatNumber(value)}`).join(" · ");
}

function jobsView(view, params) {
  const filter = h("select", { id: "state-filter" },
    h("option", { value: "", text: "all states" }),
    STATES.map((state) => h("option", { value: state, text: state })));
  filter.value = params.get("state") || "";
  const compare = h("button", { type: "button", class: "secondary", id: "compare-selected", text: "Compare selected", disabled: true });
  const body = h("tbody");
  const status = h("p", { class: "hint", id: "jobs-status" });
  const selected = new Set();
  view.append(
    h("h1", { text: "Jobs" }),
    h("div", { class: "toolbar" }, h("label", { for: "state-filter", text: "State" }), filter,
      compare, h("a", { href: "#/submit", text: "Submit a job" })),
    h("section", { class: "card" }, h("table", { id: "jobs" },
      h("caption", { class: "hint", text: "Updates live" }),
      h("thead", {}, h("tr", {}, ["", "Job", "State", "Progress", "Latest metrics", "Age"]
        .map((label) => h("th", { scope: "col", text: label })))), body), status),
  );
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/jobs?state=${filter.value}` : "#/jobs";
  });
  compare.addEventListener("click", () => {
    location.hash = `#/compare?jobs=${[...selected].map(encodeURIComponent).join(",")}`;
  });

  let stopped = false;
  const load = async () => {
    const query = filter.value ? `&state=${filter.value}` : "";
    let page;
    try { page = await api(`/jobs?limit=500${query}`); } catch (error) {
      status.textContent = `Could not list jobs: ${error.message}`;
      return;
    }
    if (stopped) return;
    const items = [...page.items].reverse(); // newest first
    body.replaceChildren(...items.map((job) => {
      const label = job.name || job.id;
      const box = h("input", { type: "checkbox", "aria-label": `Select ${label} for comparison`, checked: selected.has(job.id) });
      box.addEventListener("change", () => {
        if (box.checked) selected.add(job.id); else selected.delete(job.id);
        compare.disabled = selected.size < 1;
      });
      return h("tr", { "data-job": job.id },
        h("td", {}, box),
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: label }),
          h("div", { class: "metrics", text: job.id })),
        h("td", {}, stateBadge(job.state)),
        h("td", { class: "num", text: progressText(job) }),
        h("td", { class: "metrics", text: metricsText(job.metrics) }),
        h("td", { class: "num", text: formatAge(job.created_at) }));
    }));
    status.textContent = page.total ? `${page.total} job(s)` : "No jobs yet: submit one.";
    body.dataset.loaded = "1";
  };
  const reload = debounce(load, 300);
  load();
  const close = openStream(() => `/events/ws?types=${LOG_TYPES.join(",")}`, reload);
  const ages = setInterval(load, 10000);
  return () => { stopped = true; close(); clearInterval(ages); reload.cancel(); };
}

// -- one job -------------------------------------------------------------------------------

const MARKED = {
  lr_changed: (data) => `lr → ${formatNumber(data.lr ?? data.value ?? data.new_lr)}`,
  early_stop: () => "early stop",
  job_paused: () => "paused",
  job_resumed: () => "resumed",
  job_stopping: (data) => `stop${data.reason ? `: ${data.reason}` : ""}`,
};

// Maps steps to (fractional) epochs from the steps at which epochs ended.
function epochAxis(ends) {
  const knots = [[0, 0], ...ends];
  return (step, fallback) => {
    if (knots.length === 1) return fallback ?? 0;
    for (let i = 1; i < knots.length; i += 1) {
      const [s1, e1] = knots[i];
      if (step <= s1) {
        const [s0, e0] = knots[i - 1];
        return s1 === s0 ? e1 : e0 + ((step - s0) / (s1 - s0)) * (e1 - e0);
      }
    }
    const [s1, e1] = knots[knots.length - 1];
    const [s0] = knots[knots.length - 2];
    return e1 + (step - s1) / Math.max(s1 - s0, 1);
  };
}

function jobView(view, jobId) {
  const path = `/jobs/${encodeURIComponent(jobId)}`;
  const state = {
    record: null,
    seriesSeq: 0, // batch points up to this seq came from the series endpoint
    lastSeq: 0,
    batch: { x: [], loss: [], lr: [], epoch: [], seq: [] },
    epochs: new Map(), // epoch -> {step, metrics}
    markers: [], // {step, label}
    log: [],
    seen: new Set(),
    pending: new Map(), // command_id -> list item waiting for its acknowledgement
    applied: new Map(), // command_id -> data of the event that says it took effect
    batchesPerEpoch: 0,
    lastBatch: null,
    xMode: "step",
  };
  let stopped = false;

  const title = h("h1", { id: "job-title", text: jobId });
  const badge = h("span", { id: "job-state" });
  const progress = h("progress", { id: "epoch-progress", max: 1, value: 0, "aria-label": "Epochs done" });
  const progressLabel = h("span", { id: "job-progress", class: "num" });
  const buttons = Object.fromEntries(["pause", "resume", "stop", "save"].map((command) => [command,
    h("button", { type: "button", id: `${command}-button`, text: command[0].toUpperCase() + command.slice(1), disabled: true })]));
  const lrInput = h("input", { type: "number", id: "lr-input", step: "any", min: "0", placeholder: "new lr", "aria-label": "New learning rate" });
  const lrButton = h("button", { type: "button", id: "set-lr-button", text: "Set LR", disabled: true });
  const acks = h("ul", { class: "acks", id: "acks", role: "status" });
  const reason = h("p", { id: "stop-reason", class: "hint" });
  const xSelect = h("select", { id: "x-axis" }, h("option", { value: "step", text: "step" }), h("option", { value: "epoch", text: "epoch" }));
  const [lossCard, lossBox] = chartCard("chart-loss", "Loss", "Training loss per batch and epoch, validation loss per epoch");
  const [accCard, accBox] = chartCard("chart-accuracy", "Accuracy", "Accuracy metrics per epoch");
  const [lrCard, lrBox] = chartCard("chart-lr", "Learning rate", "Learning rate per batch");
  const [cpuCard, cpuBox] = chartCard("chart-cpu", "CPU (server process and system, %)", "CPU use over time");
  const [memCard, memBox] = chartCard("chart-memory", "Memory (server RSS)", "Memory use over time");
  const [gpuCard, gpuBox] = chartCard("chart-gpu", "GPU 0 (utilisation and memory, %)", "GPU use over time");
  gpuCard.hidden = true; // shown once a sample carries GPU figures
  const filters = h("fieldset", { class: "toolbar", id: "log-filters" }, h("legend", { class: "hint", text: "Event types" }));
  const logBody = h("tbody");
  const checkpoints = h("tbody", { id: "checkpoints" });
  view.append(
    h("p", {}, h("a", { href: "#/jobs", text: "← Jobs" })),
    title,
    h("div", { class: "toolbar" }, badge, progress, progressLabel),
    h("section", { class: "card", "aria-labelledby": "controls-title" },
      h("h2", { id: "controls-title", text: "Control" }),
      h("div", { class: "toolbar" }, Object.values(buttons), lrInput, lrButton), reason, acks),
    h("div", { class: "toolbar" }, h("label", { for: "x-axis", text: "x axis" }), xSelect),
    h("div", { class: "grid" }, lossCard, accCard, lrCard),
    h("section", { class: "card", "aria-labelledby": "log-title" }, h("h2", { id: "log-title", text: "Events" }),
      filters, h("div", { class: "log" }, h("table", { id: "event-log" }, h("thead", {}, h("tr", {},
        ["seq", "type", "data"].map((label) => h("th", { scope: "col", text: label })))), logBody))),
    h("section", { class: "card", "aria-labelledby": "ckpt-title" }, h("h2", { id: "ckpt-title", text: "Checkpoints" }),
      h("table", {}, h("thead", {}, h("tr", {}, ["name", "epoch", "step", "reason", ""].map((label) => h("th", { scope: "col", text: label })))), checkpoints)),
    h("div", { class: "grid" }, cpuCard, memCard, gpuCard),
  );

  const markersFor = () => {
    const toX = state.xMode === "epoch" ? epochAxis(endKnots()) : (step) => step;
    return state.markers.map((marker) => ({ x: toX(marker.step), label: marker.label }));
  };
  const lossChart = new Chart(lossBox, {
    labels: ["batch loss"], markers: markersFor, dotted: (label) => label !== "batch loss",
  });
  const accChart = new Chart(accBox, { labels: [], markers: markersFor, dotted: () => true });
  const lrChart = new Chart(lrBox, {
    labels: ["lr"], markers: markersFor,
    yValues: (plot, ticks) => ticks.map((value) => String(Number(value.toPrecision(3)))),
  });
  const cpuChart = new Chart(cpuBox, { labels: ["process", "system"], xLabel: "time", time: true });
  const gpuChart = new Chart(gpuBox, { labels: ["utilisation", "memory"], xLabel: "time", time: true });
  const memChart = new Chart(memBox, {
    labels: ["rss"], xLabel: "time", time: true,
    yValues: (plot, ticks) => ticks.map((bytes) => `${Math.round(bytes / 2 ** 20)} MiB`),
  });

  const endKnots = () => [...state.epochs.entries()].sort((a, b) => a[0] - b[0])
    .map(([epoch, row]) => [row.step, epoch + 1]);

  const render = () => {
    if (stopped) return;
    const toX = state.xMode === "epoch" ? epochAxis(endKnots()) : (step) => step;
    const xLabel = state.xMode;
    for (const chart of [lossChart, accChart, lrChart]) chart.xLabel = xLabel;
    const batchX = state.batch.x.map((step, i) => toX(step, state.batch.epoch[i]));
    const rows = [...state.epochs.entries()].sort((a, b) => a[0] - b[0]);
    const epochX = rows.map(([, row]) => toX(row.step));
    const names = [...new Set(rows.flatMap(([, row]) => Object.keys(row.metrics)))].sort();
    const lossNames = names.filter((name) => name.includes("loss"));
    const accNames = names.filter((name) => name.includes("acc"));
    const column = (name) => rows.map(([, row]) => row.metrics[name] ?? null);
    lossChart.update(joinTables([[batchX, state.batch.loss], [epochX, ...lossNames.map(column)]]),
      ["batch loss", ...lossNames]);
    accChart.update(accNames.length ? [epochX, ...accNames.map(column)] : [[]], accNames);
    lrChart.update([batchX, state.batch.lr]);
  };
  const scheduleRender = debounce(render, 150);

  const showRecord = (record) => {
    state.record = record;
    title.textContent = record.name ? `${record.name} (${record.id})` : record.id;
    badge.replaceChildren(stateBadge(record.state));
    const epochs = record.spec && record.spec.epochs;
    progress.max = epochs || 1;
    progress.value = Math.min(record.epoch, epochs || 1);
    const batch = state.lastBatch === null ? "" :
      ` · batch ${state.lastBatch + 1}${state.batchesPerEpoch ? `/${state.batchesPerEpoch}` : ""}`;
    progressLabel.textContent = `${progressText(record)}${batch}`;
    buttons.pause.disabled = record.state !== "running";
    buttons.resume.disabled = !["paused", "stopped", "interrupted"].includes(record.state);
    buttons.stop.disabled = !["running", "paused", "queued"].includes(record.state);
    buttons.save.disabled = !["running", "paused"].includes(record.state);
    lrButton.disabled = buttons.save.disabled;
    reason.textContent = record.stop_reason ? `Stop reason: ${record.stop_reason}` :
      record.error ? `Failed: ${record.error.type}: ${record.error.message}` : "";
  };
  const refreshRecord = debounce(async () => {
    try { showRecord(await api(path)); } catch { /* shown on the next event */ }
  }, 100);

  const activeTypes = new Set(LOG_TYPES);
  for (const type of LOG_TYPES) {
    const box = h("input", { type: "checkbox", checked: true, value: type });
    box.addEventListener("change", () => {
      if (box.checked) activeTypes.add(type); else activeTypes.delete(type);
      renderLog();
    });
    filters.append(h("label", { class: "inline" }, box, type));
  }
  const renderLog = () => {
    const shown = state.log.filter((event) => activeTypes.has(event.type)).slice(-300).reverse();
    logBody.replaceChildren(...shown.map((event) => h("tr", { "data-type": event.type },
      h("td", { text: event.seq }), h("td", { text: event.type }),
      h("td", {}, h("code", { text: JSON.stringify(event.data) })))));
  };
  const scheduleLog = debounce(renderLog, 200);

  const loadCheckpoints = debounce(async () => {
    let listing;
    try { listing = await api(`${path}/checkpoints`); } catch { return; }
    checkpoints.replaceChildren(...listing.map((info) => {
      const download = h("button", { type: "button", class: "secondary", text: "Download", "aria-label": `Download checkpoint ${info.name}` });
      download.addEventListener("click", async () => {
        const response = await api(`${path}/checkpoints/${encodeURIComponent(info.name)}`, { raw: true });
        const url = URL.createObjectURL(await response.blob());
        const link = h("a", { href: url, download: `${jobId}-${info.name}.pt` });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      });
      return h("tr", {}, h("td", { text: info.name }), h("td", { text: formatNumber(info.epoch) }),
        h("td", { text: formatNumber(info.step) }), h("td", { text: info.reason ?? "" }), h("td", {}, download));
    }));
  }, 300);

  const acknowledge = (item, data) => {
    item.textContent = data.step === undefined ? `${data.command} took effect`
      : `${data.command} took effect at step ${data.step}`;
    if (data.step !== undefined) item.dataset.step = String(data.step);
    item.className = "ok";
    state.pending.delete(data.command_id);
  };

  const apply = (events) => {
    let recordChanged = false;
    for (const event of events) {
      if (event.type === "gap") continue;
      state.lastSeq = Math.max(state.lastSeq, event.seq);
      const data = event.data || {};
      if (event.type === "train_batch_end") {
        if (event.seq <= state.seriesSeq) continue;
        state.batch.x.push(data.step);
        state.batch.loss.push(Number.isFinite(data.loss) ? data.loss : null);
        state.batch.lr.push(Number.isFinite(data.lr) ? data.lr : null);
        state.batch.epoch.push(data.epoch);
        state.batch.seq.push(event.seq);
        state.lastBatch = data.batch;
        continue;
      }
      if (state.seen.has(event.seq)) continue;
      state.seen.add(event.seq);
      state.log.push(event);
      if (event.type === "fit_epoch_end") {
        state.epochs.set(data.epoch, { step: data.step, metrics: data.metrics || {} });
        state.batchesPerEpoch = Math.max(state.batchesPerEpoch, (state.lastBatch ?? -1) + 1);
        recordChanged = true;
      }
      if (MARKED[event.type] && data.step !== undefined) {
        state.markers.push({ step: data.step, label: MARKED[event.type](data) });
      }
      if (event.type.startsWith("job_")) recordChanged = true;
      if (event.type === "checkpoint_saved") loadCheckpoints();
      if (data.command_id) {
        state.applied.set(data.command_id, data);
        const item = state.pending.get(data.command_id);
        if (item) acknowledge(item, data);
      }
    }
    if (recordChanged) refreshRecord();
    compact();
    scheduleLog();
    scheduleRender();
  };

  const send = async (command, json) => {
    const item = h("li", { "data-command": command, text: `${command}: sent, waiting for the trainer…` });
    acks.prepend(item);
    try {
      const accepted = await api(`${path}/${command}`, { method: "POST", json });
      item.dataset.commandId = accepted.command_id;
      // the stream may have brought the acknowledgement before this answer
      const applied = state.applied.get(accepted.command_id);
      if (applied) acknowledge(item, applied); else state.pending.set(accepted.command_id, item);
    } catch (error) {
      item.textContent = `${command} refused: ${error.message}`;
      item.className = "error";
    }
    refreshRecord();
  };
  for (const [command, button] of Object.entries(buttons)) {
    button.addEventListener("click", () => send(command));
  }
  lrButton.addEventListener("click", () => send("set_lr", { value: Number(lrInput.value) }));
  xSelect.addEventListener("change", () => { state.xMode = xSelect.value; render(); });

  // The batch points: the downsampled series up to its last_seq, then live points (with seqs).
  const useSeries = (series) => {
    const { loss, lr } = series.series;
    const live = state.batch;
    const kept = (live.seq || []).map((seq, i) => i).filter((i) => live.seq[i] > series.last_seq);
    // lr is read from the same events as loss: align it on the loss points' steps
    const lrByStep = new Map(lr.x.map((step, i) => [step, lr.y[i]]));
    state.batch = {
      x: [...loss.x, ...kept.map((i) => live.x[i])],
      loss: [...loss.y, ...kept.map((i) => live.loss[i])],
      lr: [...loss.x.map((step) => lrByStep.get(step) ?? null), ...kept.map((i) => live.lr[i])],
      epoch: [...loss.epoch, ...kept.map((i) => live.epoch[i])],
      seq: [...loss.x.map(() => 0), ...kept.map((i) => live.seq[i])],
    };
    state.seriesSeq = series.last_seq;
  };
  // A page left open on a long run: past twice the resolution, ask the server to downsample.
  let compacting = false;
  const compact = async () => {
    if (compacting || state.batch.x.length <= 2 * SERIES_POINTS) return;
    compacting = true;
    try {
      const series = await api(`${path}/series?metric=loss&metric=lr&points=${SERIES_POINTS}`);
      if (!stopped && series.last_seq > state.seriesSeq) { useSeries(series); scheduleRender(); }
    } catch { /* kept as it is; tried again on the next events */ }
    compacting = false;
  };

  let closeStream = () => {};
  const start = async () => {
    let record;
    let series;
    try {
      [record, series] = await Promise.all([
        api(path), api(`${path}/series?metric=loss&metric=lr&points=${SERIES_POINTS}`)]);
    } catch (error) {
      view.replaceChildren(h("h1", { text: "Job not available" }), h("p", { class: "error", role: "alert", text: error.message }),
        h("a", { href: "#/jobs", text: "← Jobs" }));
      return;
    }
    if (stopped) return;
    useSeries(series);
    state.lastSeq = series.last_seq;
    showRecord(record);
    render();
    const history = await api(`${path}/events?types=${LOG_TYPES.join(",")}&limit=10000`);
    if (stopped) return;
    apply(history.filter((event) => event.seq <= state.seriesSeq));
    closeStream = openStream(
      () => `${path}/events/ws?after_seq=${state.lastSeq}&types=${LIVE_TYPES.join(",")}`, apply);
    loadCheckpoints();
  };
  const loadResources = async () => {
    let series;
    try {
      series = await api("/jobs/_server/series?metric=process_cpu_percent&metric=system_cpu_percent"
        + "&metric=rss_bytes&metric=gpu0.utilization_ratio&metric=gpu0.memory_used_bytes"
        + "&metric=gpu0.memory_total_bytes&points=400");
    } catch { return; }
    if (stopped) return;
    const { process_cpu_percent: cpu, system_cpu_percent: system, rss_bytes: rss } = series.series;
    cpuChart.update(joinTables([[cpu.x, cpu.y], [system.x, system.y]]));
    memChart.update([rss.x, rss.y]);
    const utilisation = series.series["gpu0.utilization_ratio"];
    const used = series.series["gpu0.memory_used_bytes"];
    const total = series.series["gpu0.memory_total_bytes"];
    if (utilisation.total || used.total) {
      gpuCard.hidden = false;
      const memoryShare = used.y.map((bytes, i) => (total.y[i] ? (100 * bytes) / total.y[i] : null));
      gpuChart.update(joinTables([[utilisation.x, utilisation.y.map((r) => 100 * r)], [used.x, memoryShare]]));
    }
  };
  // the job's own figures first: the resource charts wait until they are plotted
  let resourceTimer = null;
  start().then(() => {
    if (stopped) return;
    loadResources();
    resourceTimer = setInterval(loadResources, 5000);
  });

  return () => {
    stopped = true;
    closeStream();
    clearInterval(resourceTimer);
    for (const chart of [lossChart, accChart, lrChart, cpuChart, memChart, gpuChart]) chart.destroy();
    for (const pending of [scheduleRender, scheduleLog, refreshRecord, loadCheckpoints]) pending.cancel();
  };
}

// -- submit --------------------------------------------------------------------------------

const EXAMPLE_SPEC = `# A job spec, in YAML or JSON
name: digits-mlp
model:
  name: mlp
  params:
    hidden_sizes: [64]
dataset:
  name: digits
optimizer:
  name: adam
  lr: 0.001
epochs: 3
batch_size: 32
seed: 0
`;

// The line where the field at `path` (["optimizer", "lr"]) is written, or -1.
function lineOf(text, path) {
  const lines = text.split("\n");
  let from = 0;
  let found = -1;
  for (const key of path) {
    if (typeof key !== "string") continue;
    const pattern = new RegExp(`(^|[\\s{,])["']?${key.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}["']?\\s*:`);
    const index = lines.findIndex((line, i) => i >= from && pattern.test(line));
    if (index < 0) break;
    found = index;
    from = index;
  }
  return found;
}

function submitView(view) {
  const area = h("textarea", { id: "spec", spellcheck: "false", "aria-describedby": "spec-hint spec-errors" });
  area.value = sessionStorage.getItem("trainbus.draft") || EXAMPLE_SPEC;
  const errors = h("ul", { id: "spec-errors", class: "error", role: "alert" });
  const send = h("button", { type: "submit", id: "submit-spec", text: "Submit job" });
  const form = h("form", { class: "card" },
    h("label", { for: "spec", text: "Job spec (YAML or JSON)" }),
    h("p", { class: "hint", id: "spec-hint", text: "The server validates it; errors are shown at the field they name." }),
    area, h("div", { class: "toolbar" }, send), errors);
  view.append(h("h1", { text: "Submit a job" }), form);

  const selectLine = (line) => {
    const lines = area.value.split("\n");
    const start = lines.slice(0, line).reduce((sum, text) => sum + text.length + 1, 0);
    area.focus();
    area.setSelectionRange(start, start + lines[line].length);
  };
  const showErrors = (items) => {
    area.setAttribute("aria-invalid", "true");
    errors.replaceChildren(...items.map(({ field, message, line }) => {
      const where = line >= 0 ? h("button", { type: "button", class: "secondary", text: `line ${line + 1}`, "aria-label": `Go to ${field || "the spec"}, line ${line + 1}` }) : null;
      if (where) where.addEventListener("click", () => selectLine(line));
      return h("li", { "data-field": field }, h("code", { text: field || "spec" }), `: ${message} `, where);
    }));
    if (items.length && items[0].line >= 0) selectLine(items[0].line);
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    errors.replaceChildren();
    area.removeAttribute("aria-invalid");
    sessionStorage.setItem("trainbus.draft", area.value);
    send.disabled = true;
    try {
      const spec = await api("/specs/parse", { method: "POST", text: area.value });
      const job = await api("/jobs", { method: "POST", json: spec });
      sessionStorage.removeItem("trainbus.draft");
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      const detail = error.detail;
      if (Array.isArray(detail)) {
        showErrors(detail.map((item) => {
          const path = (item.loc || []).filter((part, i) => !(i === 0 && part === "body"));
          const line = typeof item.line === "number" ? item.line - 1 : lineOf(area.value, path);
          return { field: path.join("."), message: item.msg, line };
        }));
      } else {
        showErrors([{ field: "", message: error.message, line: -1 }]);
      }
    } finally {
      send.disabled = false;
    }
  });
  return () => {};
}

// -- compare -------------------------------------------------------------------------------

// Per-batch points carry their (whole) epoch: spread each epoch's points over [e, e + 1).
function fractionalEpochs(epochs) {
  const counts = new Map();
  for (const epoch of epochs) counts.set(epoch, (counts.get(epoch) || 0) + 1);
  const seen = new Map();
  return epochs.map((epoch) => {
    const rank = seen.get(epoch) || 0;
    seen.set(epoch, rank + 1);
    const count = counts.get(epoch);
    // epoch metrics already say "after epoch e" (one point each): keep them as they are
    return count === 1 ? epoch : epoch + rank / count;
  });
}

function compareView(view, params) {
  const chosen = new Set((params.get("jobs") || "").split(",").filter(Boolean));
  const metric = h("select", { id: "compare-metric" });
  const xAxis = h("select", { id: "compare-x" }, h("option", { value: "step", text: "step" }),
    h("option", { value: "epoch", text: "epoch" }));
  xAxis.value = params.get("x") === "epoch" ? "epoch" : "step";
  const list = h("fieldset", { id: "compare-jobs", class: "toolbar" }, h("legend", { class: "hint", text: "Jobs" }));
  const [card, box] = chartCard("chart-compare", "Comparison", "The chosen metric of the chosen jobs");
  view.append(h("h1", { text: "Compare jobs" }),
    h("section", { class: "card" }, list,
      h("div", { class: "toolbar" }, h("label", { for: "compare-metric", text: "Metric" }), metric,
        h("label", { for: "compare-x", text: "x axis" }), xAxis)),
    card);
  const chart = new Chart(box, { labels: [] });
  let jobs = [];
  let stopped = false;

  const syncHash = () => {
    const hash = `#/compare?jobs=${[...chosen].map(encodeURIComponent).join(",")}&metric=${encodeURIComponent(metric.value)}&x=${xAxis.value}`;
    history.replaceState(null, "", hash);
  };
  const plot = async () => {
    syncHash();
    const picked = jobs.filter((job) => chosen.has(job.id));
    if (!picked.length || !metric.value) { chart.update([[]], []); return; }
    const results = await Promise.all(picked.map((job) =>
      api(`/jobs/${encodeURIComponent(job.id)}/series?metric=${encodeURIComponent(metric.value)}&points=1000`)
        .catch(() => null)));
    if (stopped) return;
    const tables = results.map((result) => {
      const series = result && result.series[metric.value];
      if (!series) return [[], []];
      return xAxis.value === "epoch" ? [fractionalEpochs(series.epoch), series.y] : [series.x, series.y];
    });
    chart.xLabel = xAxis.value;
    chart.update(joinTables(tables), picked.map((job) => job.name ? `${job.name} (${job.id})` : job.id));
    box.dataset.series = String(picked.length);
  };
  const fillMetrics = () => {
    const names = new Set(["loss", "lr"]);
    for (const job of jobs) if (chosen.has(job.id)) Object.keys(job.metrics || {}).forEach((name) => names.add(name));
    const previous = metric.value || params.get("metric") || (names.has("val_loss") ? "val_loss" : "loss");
    metric.replaceChildren(...[...names].sort().map((name) => h("option", { value: name, text: name })));
    metric.value = names.has(previous) ? previous : "loss";
  };
  metric.addEventListener("change", plot);
  xAxis.addEventListener("change", () => { chart.labels = []; plot(); });
  (async () => {
    const page = await api("/jobs?limit=500");
    if (stopped) return;
    jobs = [...page.items].reverse();
    for (const job of jobs) {
      const box = h("input", { type: "checkbox", value: job.id, checked: chosen.has(job.id) });
      box.addEventListener("change", () => {
        if (box.checked) chosen.add(job.id); else chosen.delete(job.id);
        fillMetrics();
        plot();
      });
      list.append(h("label", { class: "inline" }, box, job.name ? `${job.name} (${job.id})` : job.id));
    }
    fillMetrics();
    plot();
  })();
  return () => { stopped = true; chart.destroy(); };
}

// -- start ---------------------------------------------------------------------------------

$("#sign-in-form").addEventListener("submit", signIn);
$("#sign-out").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", route);
route();
