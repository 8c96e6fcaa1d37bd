// qtasks-web: live updates by Server-Sent Events and small SVG charts. No build step.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const live = document.getElementById("live");

  function follow(url, handlers) {
    const source = new EventSource(url);
    source.addEventListener("open", () => live && live.classList.add("on"));
    source.addEventListener("error", () => live && live.classList.remove("on"));
    source.addEventListener("end", () => source.close());
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => handler(JSON.parse(event.data), event));
    }
    return source;
  }

  function dig(object, path) {
    return path.split(".").reduce((value, key) => (value == null ? undefined : value[key]), object);
  }

  // --- charts -----------------------------------------------------------------------------

  function line(svg, points, maxY, cls) {
    const path = document.createElementNS(SVG, "path");
    let d = "";
    let pen = false;
    points.forEach((y, i) => {
      if (y == null) { pen = false; return; }
      const x = 40 + (i * 550) / Math.max(points.length - 1, 1);
      const v = 140 - (y / maxY) * 130;
      d += (pen ? "L" : "M") + x.toFixed(1) + " " + v.toFixed(1) + " ";
      pen = true;
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", x.toFixed(1));
      dot.setAttribute("cy", v.toFixed(1));
      dot.setAttribute("r", "2.5");
      dot.setAttribute("class", "dot " + cls);
      svg.appendChild(dot);
    });
    path.setAttribute("d", d.trim() || "M0 0");
    path.setAttribute("class", "line " + cls);
    svg.appendChild(path);
  }

  function text(x, y, content, cls) {
    const node = document.createElementNS(SVG, "text");
    node.setAttribute("x", x);
    node.setAttribute("y", y);
    node.setAttribute("class", cls || "axis");
    node.textContent = content;
    return node;
  }

  // ceiling: the most the axis may read (a percentage's 100), headroom or not.
  function chart(id, series, ceiling) {
    const svg = document.getElementById(id);
    if (!svg) return;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    let maxY = 0;
    for (const s of series) for (const y of s.points) if (y != null && y > maxY) maxY = y;
    maxY = maxY > 0 ? maxY * 1.1 : 1;
    if (ceiling != null && maxY > ceiling) maxY = ceiling;
    const axis = document.createElementNS(SVG, "path");
    axis.setAttribute("d", "M40 10 L40 140 L590 140");
    axis.setAttribute("class", "frame");
    svg.appendChild(axis);
    svg.appendChild(text(2, 16, maxY >= 10 ? maxY.toFixed(0) : maxY.toPrecision(2)));
    svg.appendChild(text(2, 140, "0"));
    svg.appendChild(text(40, 156, "-" + Math.round((series[0].points.length * interval) / 60) + " min"));
    svg.appendChild(text(570, 156, "now"));
    for (const s of series) line(svg, s.points, maxY, s.cls);
    const last = series[0].points[series[0].points.length - 1];
    svg.setAttribute("data-last", last == null ? "" : String(last));
  }

  let interval = 10;

  function drawOverview(figures) {
    interval = figures.interval || interval;
    for (const node of document.querySelectorAll("[data-figure]")) {
      const value = dig(figures, node.dataset.figure);
      node.textContent = value == null ? "0" : String(value);
    }
    const body = document.querySelector("#priorities tbody");
    if (body) {
      body.textContent = "";
      // Lowest first, as they run: an object lists "-2" after "0" and "3" (integer-like
      // keys come first, in ascending order, then the others).
      const entries = Object.entries(figures.queue.ready_by_priority)
        .sort((a, b) => Number(a[0]) - Number(b[0]));
      for (const [priority, count] of entries) {
        const row = body.insertRow();
        row.insertCell().textContent = priority;
        row.insertCell().textContent = String(count);
      }
      if (!entries.length) {
        const cell = body.insertRow().insertCell();
        cell.colSpan = 2;
        cell.className = "muted";
        cell.textContent = "nothing ready";
      }
    }
    const series = figures.series;
    if (!series) return;
    const pick = (key, scale) => series.map((p) => (p[key] == null ? null : p[key] * (scale || 1)));
    chart("chart-rate", [
      { points: pick("started"), cls: "started" },
      { points: pick("finished"), cls: "finished" },
    ]);
    chart("chart-failures", [{ points: pick("failure_rate", 100), cls: "failed" }], 100);
    chart("chart-wait", [
      { points: pick("wait_p50"), cls: "p50" },
      { points: pick("wait_p95"), cls: "p95" },
    ]);
    chart("chart-run", [
      { points: pick("run_p50"), cls: "p50" },
      { points: pick("run_p95"), cls: "p95" },
    ]);
  }

  const root = document.body.dataset.root || "";
  const initial = document.getElementById("overview-data");
  if (initial) {
    drawOverview(JSON.parse(initial.dataset.json));
    follow(root + "/events/overview", { overview: drawOverview });
  }

  // --- tasks list -------------------------------------------------------------------------

  const table = document.getElementById("tasks");
  if (table && table.dataset.live) {
    const rows = document.getElementById("task-rows");
    const source = new EventSource(table.dataset.live);
    source.addEventListener("open", () => live && live.classList.add("on"));
    source.addEventListener("error", () => live && live.classList.remove("on"));
    source.addEventListener("rows", (event) => {
      // Rendered (and escaped) by the server from the same template as the page.
      rows.innerHTML = event.data;
    });
  }

  // --- task page ----------------------------------------------------------------------------

  const state = document.getElementById("task-state");
  if (state && state.dataset.live) {
    const steps = document.getElementById("steps");
    const seen = new Set();
    follow(state.dataset.live, {
      step: (step) => {
        if (seen.has(step.i)) return;
        seen.add(step.i);
        const item = document.createElement("li");
        if (step.restart !== undefined) {
          // The task ran again and its generator started over: the steps below are run N's.
          item.className = "step restart";
          item.textContent = `run ${step.restart} starts over`;
        } else {
          item.className = "step";
          item.textContent = JSON.stringify(step.value);
        }
        steps.appendChild(item);
        const none = document.getElementById("no-steps");
        if (none) none.remove();
      },
      state: (update) => {
        state.innerHTML = update.html; // rendered and escaped by the server
        if (update.status !== "new" && update.status !== "process" && update.status !== "retry") {
          const cancel = document.getElementById("cancel");
          if (cancel) cancel.closest("form").remove();
        }
      },
    });
  }
})();
