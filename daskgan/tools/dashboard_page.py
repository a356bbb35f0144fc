"""The dashboard's one page (``daskgan.tools.dashboard``): its style and script inline, nothing fetched from elsewhere,
so it works on a machine or cluster that reaches no internet. The script polls ``api/runs`` (and each shown run's
``api/curves``) every ``REFRESH_MS``, draws the curves as SVG and moves a grid's image only when a newer grid is
written. Text from the cluster is set as text, never as markup."""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>daskgan runs</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.stale { color: #b00; }
.run { display: flex; gap: 1.5em; align-items: flex-start; border-top: 1px solid #ccc; padding: 0.8em 0; }
.run h3 { font-size: 14px; margin: 0 0 0.4em; }
.run img { image-rendering: pixelated; width: 256px; border: 1px solid #ccc; }
svg { border: 1px solid #ddd; background: #fff; }
#note { color: #666; }
</style>
</head>
<body>
<h1>daskgan runs</h1>
<p id="note">loading…</p>
<h2>Queued</h2>
<table id="queued"><thead><tr><th>position</th><th>run</th><th>workers asked</th><th>priority</th>
<th>waiting since</th></tr></thead><tbody></tbody></table>
<h2>Running</h2>
<table id="running"><thead><tr><th>run</th><th>driver</th><th>workers</th><th>iteration</th><th>kimg</th>
<th>last losses</th><th>p</th><th>latest metric</th><th>ETA</th></tr></thead><tbody></tbody></table>
<h2>Recently ended</h2>
<table id="ended"><thead><tr><th>run</th><th>outcome</th><th>ended</th><th>iteration</th></tr></thead>
<tbody></tbody></table>
<div id="runs"></div>
<script>
"use strict";
const REFRESH_MS = 3000;
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
const SVG = "http://www.w3.org/2000/svg";

function fixed(value, digits) { return value === undefined || value === null ? "" : Number(value).toFixed(digits); }
function clock(seconds) { return new Date(seconds * 1000).toISOString().slice(11, 19) + " UTC"; }
function duration(seconds) {
  if (seconds === undefined) { return ""; }
  if (seconds >= 86400) { return (seconds / 86400).toFixed(1) + " days"; }
  return new Date(seconds * 1000).toISOString().slice(11, 19);
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows.map(cells => {
    const row = document.createElement("tr");
    row.replaceChildren(...cells.map(text => {
      const cell = document.createElement("td");
      cell.textContent = text;
      return cell;
    }));
    return row;
  }));
}

function losses(progress) {
  return ["loss_G", "loss_D_real", "loss_D_fake"].filter(name => name in progress)
    .map(name => name + " " + fixed(progress[name], 3)).join(", ");
}

function metric(progress) {
  return Object.entries(progress.metrics || {})
    .map(([name, seen]) => name + " " + fixed(seen.value, 2) + " at iteration " + seen.iteration).join(", ");
}

function tables(data) {
  const now = Date.now() / 1000;
  fill("queued", data.queued.map(run => [run.position, run.run_url, run.asked, run.priority,
    clock(run.since) + " (" + Math.round(now - run.since) + " s)"]));
  fill("running", data.running.map(run => {
    const progress = run.progress || {};
    return [run.run_url, run.live ? run.driver : "stale: " + run.driver,
      run.workers ? run.workers.join(", ") : "every worker", run.iteration + " of " + run.iterations,
      fixed(progress.kimg, 2), losses(progress), fixed(progress.ada_p, 3), metric(progress), duration(progress.eta_s)];
  }));
  fill("ended", data.ended.map(run => [run.run_url, run.outcome, clock(run.ended_at),
    run.iteration + " of " + run.iterations]));
  document.getElementById("note").textContent = data.queued.length + " queued, " + data.running.length +
    " running, " + data.ended.length + " ended in the last day; as of " + clock(data.updated_at);
}

function plot(title, series) {
  const width = 320, height = 160, pad = 28;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const points = Object.values(series).flat();
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", pad);
  label.setAttribute("y", 14);
  label.setAttribute("font-size", "12");
  label.textContent = title + (points.length ? "" : ": nothing yet");
  svg.append(label);
  if (!points.length) { return svg; }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const x = v => pad + (width - 2 * pad) * (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5);
  const y = v => height - pad + (2 * pad - height) * (y1 > y0 ? (v - y0) / (y1 - y0) : 0.5);
  Object.entries(series).forEach(([name, values], i) => {
    const line = document.createElementNS(SVG, values.length > 1 ? "polyline" : "circle");
    if (values.length > 1) {
      line.setAttribute("points", values.map(p => x(p[0]) + "," + y(p[1])).join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", COLOURS[i % COLOURS.length]);
    } else if (values.length) {
      line.setAttribute("cx", x(values[0][0]));
      line.setAttribute("cy", y(values[0][1]));
      line.setAttribute("r", 3);
      line.setAttribute("fill", COLOURS[i % COLOURS.length]);
    }
    svg.append(line);
    const key = document.createElementNS(SVG, "text");
    key.setAttribute("x", width - pad - 90);
    key.setAttribute("y", 14 + 12 * i);
    key.setAttribute("font-size", "11");
    key.setAttribute("fill", COLOURS[i % COLOURS.length]);
    key.textContent = name;
    svg.append(key);
  });
  const axis = document.createElementNS(SVG, "text");
  axis.setAttribute("x", pad);
  axis.setAttribute("y", height - 8);
  axis.setAttribute("font-size", "11");
  axis.textContent = "kimg " + x0.toFixed(2) + " to " + x1.toFixed(2) + "; " + y0.toPrecision(3) + " to " +
    y1.toPrecision(3);
  svg.append(axis);
  return svg;
}

function card(url) {
  const found = [...document.querySelectorAll("#runs .run")].find(div => div.dataset.run === url);
  if (found) { return found; }
  const div = document.createElement("div");
  div.className = "run";
  div.dataset.run = url;
  const heading = document.createElement("h3");
  heading.textContent = url;
  const text = document.createElement("div");
  const charts = document.createElement("div");
  charts.className = "charts";
  text.append(heading, charts);
  const image = document.createElement("img");
  image.className = "grid";
  image.alt = "newest sample grid of " + url;
  image.dataset.run = url;
  div.append(text, image);
  document.getElementById("runs").append(div);
  return div;
}

async function showRun(run) {
  const div = card(run.run_url);
  div.querySelector("h3").textContent = run.run_url + (run.grid_error ? " (its grids: " + run.grid_error + ")" : "");
  const image = div.querySelector("img.grid");
  image.hidden = run.grid === null;
  if (run.grid !== null && image.dataset.iteration !== String(run.grid)) {
    image.src = "grid?" + new URLSearchParams({run: run.run_url, iteration: run.grid});
    image.dataset.iteration = run.grid;
  }
  const answer = await fetch("api/curves?" + new URLSearchParams({run: run.run_url}));
  if (!answer.ok) { return; }
  const series = await answer.json();
  const losses = Object.fromEntries(Object.entries(series).filter(([name]) => name.startsWith("loss")));
  const metrics = Object.entries(series).filter(([name]) => !name.startsWith("loss"))
    .map(([name, values]) => plot(name, {[name]: values}));  // each on its own scale: FID and KID differ 100-fold
  div.querySelector(".charts").replaceChildren(plot("losses", losses),
    ...(metrics.length ? metrics : [plot("metrics", {})]));
}

async function refresh() {
  try {
    const answer = await fetch("api/runs");
    if (!answer.ok) { throw new Error(await answer.text()); }
    const data = await answer.json();
    tables(data);
    const shown = data.running.concat(data.ended);
    const urls = new Set(shown.map(run => run.run_url));
    document.querySelectorAll("#runs .run").forEach(div => { if (!urls.has(div.dataset.run)) { div.remove(); } });
    await Promise.all(shown.map(showRun));
  } catch (error) {
    document.getElementById("note").textContent = "not updated: " + error.message;
  }
  setTimeout(refresh, REFRESH_MS);
}
refresh();
</script>
</body>
</html>
"""
