// The ferrytune web console: plain JS, no build step, no library.
//
// The token lives in sessionStorage (this tab only) and travels only as the Authorization
// header of fetch() calls to the tenant-scoped /v1/ routes: never in a URL, never in a cookie.
// Everything the API returns is put on the page with textContent / SVG attributes, never as
// HTML, so a job name, spec or log line is shown as the characters it is.
"use strict";

(() => {
  const TOKEN_KEY = "ferrytune.token";
  const REFRESH_MS = 2000;
  const API = new URL("../v1/", document.baseURI);  // /ui/ -> /v1/ (also under a path prefix)
  const ACTIVE = new Set(["queued", "running"]);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_DOTS = 200;  // a dot per metrics row up to this many rows; the line always has every row

  let token = null;
  let selectedId = null;
  let specShownFor = null;
  let timer = null;
  let refreshing = false;

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, detail) {
      super(`HTTP ${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  async function api(path, method = "GET") {
    const response = await fetch(new URL(path, API), {
      method,
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
    if (!response.ok) {
      let detail = response.statusText || "request failed";
      try {
        const body = await response.json();
        if (body && typeof body.detail === "string") detail = body.detail;
      } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  const jobPath = (id, rest = "") => `jobs/${encodeURIComponent(id)}${rest}`;

  // ---- formatting -----------------------------------------------------------------------
  const DASH = "\u2014";
  const isNum = (x) => typeof x === "number" && Number.isFinite(x);

  function fmt(x, digits = 4) {
    if (!isNum(x)) return DASH;
    if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(2);
    return Number(x.toPrecision(digits)).toString();
  }

  function fmtTime(ts) {
    if (!isNum(ts)) return DASH;
    return new Date(ts * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function firstNum(...values) {
    for (const v of values) if (isNum(v)) return v;
    return null;
  }

  // eval_accuracy / eval_loss of a job, wherever the job's status carries them
  function jobEval(job, key) {
    return firstNum(job[key], job.metrics && job.metrics[key], job.eval && job.eval[key.replace("eval_", "")]);
  }

  function tokensPerSecond(job) {
    const given = firstNum(job.tokens_per_s, job.tokens_per_second);
    if (given !== null) return given;
    if (!isNum(job.tokens) || !isNum(job.started_at) || job.tokens <= 0) return null;
    const end = firstNum(job.finished_at, job.updated_at);
    return end !== null && end > job.started_at ? job.tokens / (end - job.started_at) : null;
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svgEl(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // ---- sign in / out --------------------------------------------------------------------
  function showSignedIn(signedIn) {
    $("signin").hidden = signedIn;
    $("jobs-section").hidden = !signedIn;
    $("signout").hidden = !signedIn;
    $("who").hidden = !signedIn;
    if (!signedIn) $("detail").hidden = true;
  }

  function signOut(message) {
    token = null;
    selectedId = null;
    specShownFor = null;
    sessionStorage.removeItem(TOKEN_KEY);
    if (timer !== null) clearInterval(timer);
    timer = null;
    $("jobs-body").replaceChildren();
    showSignedIn(false);
    $("signin-error").textContent = message || "";
  }

  function authMessage(err) {
    if (err instanceof ApiError && err.status === 401)
      return "That token was not accepted (HTTP 401): check that you pasted the whole ftk_... token " +
        "and that it has not been rotated or revoked.";
    if (err instanceof ApiError && err.status === 429)
      return `Too many failed sign-ins from this address (HTTP 429): ${err.detail}`;
    return `Cannot reach the service: ${err.message}`;
  }

  async function signIn(candidate) {
    token = candidate;
    $("signin-error").textContent = "";
    try {
      const jobs = await loadJobs();
      sessionStorage.setItem(TOKEN_KEY, candidate);
      showSignedIn(true);
      renderJobs(jobs);
      if (timer === null) timer = setInterval(refresh, REFRESH_MS);
    } catch (err) {
      signOut(authMessage(err));
    }
  }

  // ---- the job list ---------------------------------------------------------------------
  async function loadJobs() {
    const body = await (await api("jobs")).json();
    return Array.isArray(body.jobs) ? body.jobs : [];
  }

  function renderJobs(jobs) {
    const rows = jobs.map((job) => {
      const tr = el("tr");
      tr.dataset.jobId = job.id;
      if (job.id === selectedId) tr.classList.add("selected");
      const idCell = el("td");
      const link = el("button", job.id, "job-link");
      link.type = "button";
      idCell.append(link);
      const state = job.cancel_requested && ACTIVE.has(job.state) ? `${job.state} (cancelling)` : job.state;
      tr.append(
        idCell,
        el("td", job.name || DASH, "name"),
        el("td", state, `state state-${job.state}`),
        el("td", `${job.step} / ${job.max_steps}`, "num step"),
        el("td", fmt(job.loss), "num loss"),
        el("td", fmt(tokensPerSecond(job), 3), "num tps"),
        el("td", fmt(jobEval(job, "eval_accuracy")), "num eval-accuracy"),
        el("td", fmt(jobEval(job, "eval_loss")), "num eval-loss"),
        el("td", fmtTime(job.updated_at), "updated"),
      );
      tr.addEventListener("click", () => selectJob(job.id));
      return tr;
    });
    $("jobs-body").replaceChildren(...rows);
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs-status").textContent = `${jobs.length} job${jobs.length === 1 ? "" : "s"}; ` +
      `refreshed ${new Date().toLocaleTimeString()} (every ${REFRESH_MS / 1000} s)`;
  }

  // ---- one job --------------------------------------------------------------------------
  function selectJob(id) {
    selectedId = id;
    specShownFor = null;
    $("action-message").textContent = "";
    for (const tr of $("jobs-body").children) tr.classList.toggle("selected", tr.dataset.jobId === id);
    $("detail-id").textContent = id;
    $("detail-name").textContent = "";
    $("spec").textContent = "";
    $("logs").textContent = "";
    $("detail-summary").replaceChildren();
    $("loss-chart").replaceChildren();
    $("eval-chart").replaceChildren();
    $("detail").hidden = false;
    refreshDetail().catch(detailError);
  }

  function detailError(err) {
    if (err instanceof ApiError && err.status === 401) signOut(authMessage(err));
    else $("action-message").textContent = `Could not load the job: ${err.message}`;
  }

  async function refreshDetail() {
    const id = selectedId;
    if (id === null) return;
    const [job, metrics, logs] = await Promise.all([
      api(jobPath(id)).then((r) => r.json()),
      api(jobPath(id, "/metrics")).then((r) => r.json()),
      api(jobPath(id, "/logs")).then((r) => r.text()),
    ]);
    let spec = null;
    if (specShownFor !== id) spec = await api(jobPath(id, "/spec")).then((r) => r.text());
    if (id !== selectedId) return;  // another job was opened meanwhile
    if (spec !== null) {
      $("spec").textContent = spec;
      specShownFor = id;
    }
    renderDetail(job, metrics, logs);
  }

  function rowTokensPerSecond(rows) {
    const recent = rows.slice(-20);
    if (recent.length < 2) return null;
    const dt = recent[recent.length - 1].time - recent[0].time;
    const tokens = recent.slice(1).reduce((sum, r) => sum + (isNum(r.tokens) ? r.tokens : 0), 0);
    return dt > 0 ? tokens / dt : null;
  }

  // Eval points: the metrics answer's "evals" rows ({step, eval_loss, eval_accuracy, ...}), else
  // training rows that carry eval_loss / eval_accuracy themselves.
  function evalRows(metrics) {
    const list = [metrics.evals, metrics.eval].find(Array.isArray);
    const source = list || metrics.metrics || [];
    return source.map((r) => ({
      step: r.step,
      loss: firstNum(r.eval_loss, list ? r.loss : null),
      accuracy: firstNum(r.eval_accuracy, list ? r.accuracy : null),
    })).filter((r) => isNum(r.step) && (r.loss !== null || r.accuracy !== null));
  }

  function renderDetail(job, metrics, logs) {
    const rows = (metrics.metrics || []).filter((r) => isNum(r.step) && isNum(r.loss));
    const evals = evalRows(metrics);
    const lastEval = evals.length ? evals[evals.length - 1] : {};
    $("detail-name").textContent = job.name ? `(${job.name})` : "";
    const summary = [
      ["state", job.cancel_requested && ACTIVE.has(job.state) ? `${job.state} (cancel requested)` : job.state],
      ["step", `${job.step} / ${job.max_steps}`],
      ["loss", fmt(job.loss)],
      ["tokens/s", `${fmt(rowTokensPerSecond(rows), 3)} over its last steps, ` +
        `${fmt(tokensPerSecond(job), 3)} since it started (with queueing and loading)`],
      ["eval accuracy", fmt(firstNum(jobEval(job, "eval_accuracy"), lastEval.accuracy))],
      ["eval loss", fmt(firstNum(jobEval(job, "eval_loss"), lastEval.loss))],
      ["base", `${job.base} (${job.dtype})`],
      ["priority", job.priority],
      ["checkpoint step", job.checkpoint_step],
      ["created", fmtTime(job.created_at)],
      ["finished", fmtTime(job.finished_at)],
    ];
    if (job.error) summary.push(["error", job.error]);
    const items = [];
    for (const [k, v] of summary) items.push(el("dt", k), el("dd", v));
    $("detail-summary").replaceChildren(...items);
    $("detail-summary").dataset.state = job.state;

    const cancel = $("cancel-button");
    cancel.disabled = !ACTIVE.has(job.state) || job.cancel_requested;
    $("download-button").disabled = job.state !== "succeeded";

    drawChart($("loss-chart"), [
      { cls: "train", points: rows.map((r) => [r.step, r.loss]) },
      { cls: "eval", points: evals.filter((r) => r.loss !== null).map((r) => [r.step, r.loss]) },
    ], "no loss yet");
    drawChart($("eval-chart"), [
      { cls: "eval", points: evals.filter((r) => r.accuracy !== null).map((r) => [r.step, r.accuracy]) },
    ], "no evaluation in this job");

    const pre = $("logs");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = logs;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  // A line (and a dot per point, up to MAX_DOTS) per series, on shared axes.
  function drawChart(svg, series, emptyText) {
    const W = 480, H = 240, left = 52, right = 12, top = 12, bottom = 30;
    const all = series.flatMap((s) => s.points);
    svg.replaceChildren();
    svg.dataset.points = String(all.length);
    if (all.length === 0) {
      svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, emptyText));
      return;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
    const pad = (y1 - y0) * 0.05;
    y0 -= pad; y1 += pad;
    const sx = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
    const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom);
    for (let i = 0; i <= 4; i++) {
      const v = y0 + ((y1 - y0) * i) / 4;
      svg.append(svgEl("line", { x1: left, x2: W - right, y1: sy(v), y2: sy(v), class: "grid" }));
      svg.append(svgEl("text", { x: left - 4, y: sy(v) + 4, "text-anchor": "end" }, fmt(v, 3)));
    }
    svg.append(svgEl("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" }));
    svg.append(svgEl("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" }));
    for (const x of [x0, x1]) {
      svg.append(svgEl("text", { x: sx(x), y: H - bottom + 16, "text-anchor": "middle" }, fmt(x, 6)));
    }
    svg.append(svgEl("text", { x: W - right, y: H - 4, "text-anchor": "end" }, "step"));
    for (const s of series) {
      if (s.points.length === 0) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      svg.append(svgEl("path", { d, class: `series ${s.cls}`, "data-points": s.points.length }));
      if (s.points.length <= MAX_DOTS) {
        for (const p of s.points) {
          const dot = { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, class: `pt ${s.cls}` };
          svg.append(svgEl("circle", dot));
        }
      }
    }
  }

  // ---- actions --------------------------------------------------------------------------
  async function cancelSelected() {
    const id = selectedId;
    if (id === null) return;
    $("cancel-button").disabled = true;
    try {
      await api(jobPath(id, "/cancel"), "POST");
      $("action-message").textContent = "Cancel requested; the job stops after its current step.";
    } catch (err) {
      $("action-message").textContent = `Cancel failed: ${err.message}`;
    }
    refresh();
  }

  function downloadName(response, id) {
    const header = response.headers.get("content-disposition") || "";
    const m = /filename="?([^";]+)"?/i.exec(header);
    const name = m ? m[1] : `${id}-adapter.tar`;
    return name.replace(/[^A-Za-z0-9._-]/g, "_");
  }

  // fetch (with the Authorization header) -> Blob -> object URL: the token never enters a URL.
  async function downloadSelected() {
    const id = selectedId;
    if (id === null) return;
    const button = $("download-button");
    button.disabled = true;
    $("action-message").textContent = "Downloading the adapter\u2026";
    try {
      const response = await api(jobPath(id, "/adapter"));
      const blob = await response.blob();
      const url = URL.createObjectURL(blob);
      const a = document.createElement("a");
      a.href = url;
      a.download = downloadName(response, id);
      a.hidden = true;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      $("action-message").textContent = `Downloaded ${a.download} (${blob.size} bytes).`;
    } catch (err) {
      $("action-message").textContent = `Download failed: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  }

  // ---- refresh loop ---------------------------------------------------------------------
  async function refresh() {
    if (token === null || refreshing) return;
    refreshing = true;
    try {
      renderJobs(await loadJobs());
      await refreshDetail();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) signOut(authMessage(err));
      else $("jobs-status").textContent = `Refresh failed: ${err.message}`;
    } finally {
      refreshing = false;
    }
  }

  // ---- wiring ---------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const candidate = $("token").value.trim();
      $("token").value = "";
      if (candidate) signIn(candidate);
    });
    $("signout").addEventListener("click", () => signOut("Signed out."));
    $("cancel-button").addEventListener("click", cancelSelected);
    $("download-button").addEventListener("click", downloadSelected);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved);
  });
})();
