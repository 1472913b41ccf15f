// Drawing: pixel grids and the attention heat-map on canvas, energy curves in SVG, bars in HTML.

import { el, fmt } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const FONT = "12px system-ui, sans-serif";
const ACCENT = [47, 111, 222];
const DEEP = [14, 42, 102];

/** The side of the square grid `dim` values make when it is one of at most 32×32, else null. */
export function squareSide(dim) {
  const side = Math.round(Math.sqrt(dim));
  return side * side === dim && side <= 32 ? side : null;
}

/** A canvas `width`×`height` CSS pixels, sharp on high-density screens; returns its 2D context. */
function sized(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

const clamp01 = (x) => Math.min(1, Math.max(0, x));

/** Paints `values` (row-major, `side` per row) as grey cells, `ink(value)` in [0,1] from white to black.
 * Cells where `marked` is true get a tinted hatch (`hatch`) or an accent outline. */
export function drawGrid(canvas, values, side, {ink, marked = null, hatch = false, cell = 22}) {
  const context = sized(canvas, side * cell, side * cell);
  values.forEach((value, i) => {
    const grey = Math.round(255 * (1 - clamp01(ink(value))));
    context.fillStyle = `rgb(${grey},${grey},${grey})`;
    context.fillRect((i % side) * cell, Math.floor(i / side) * cell, cell, cell);
  });
  context.strokeStyle = "rgba(120,130,150,0.25)";
  context.lineWidth = 1;
  for (let k = 1; k < side && cell >= 10; k++) {  // grid lines, but not on thumbnails
    line(context, k * cell, 0, k * cell, side * cell);
    line(context, 0, k * cell, side * cell, k * cell);
  }
  marked?.forEach((on, i) => on && mark(context, (i % side) * cell, Math.floor(i / side) * cell, cell, hatch));
}

function line(context, x0, y0, x1, y1) {
  context.beginPath();
  context.moveTo(x0 + 0.5, y0 + 0.5);
  context.lineTo(x1 + 0.5, y1 + 0.5);
  context.stroke();
}

function mark(context, x, y, cell, hatch) {
  if (hatch) {
    context.fillStyle = "rgba(220,60,60,0.35)";
    context.fillRect(x, y, cell, cell);
    context.strokeStyle = "rgba(180,30,30,0.55)";
    line(context, x, y + cell, x + cell, y);
  } else {
    context.strokeStyle = `rgba(${ACCENT},0.7)`;
    context.strokeRect(x + 1.5, y + 1.5, cell - 3, cell - 3);
  }
}

/** The cell {row, col} of a `side`×`side` grid under a pointer event. */
export function cellAt(canvas, event, side) {
  const box = canvas.getBoundingClientRect();
  const index = (offset, length) => Math.min(side - 1, Math.max(0, Math.floor((offset / length) * side)));
  return {row: index(event.clientY - box.top, box.height), col: index(event.clientX - box.left, box.width)};
}

function mix(a, b, t) {
  return a.map((x, i) => Math.round(x + (b[i] - x) * t));
}

/** White → accent → deep blue as a weight goes 0 → 0.5 → 1. */
export function weightColor(weight) {
  const w = clamp01(weight);
  const rgb = w < 0.5 ? mix([255, 255, 255], ACCENT, w * 2) : mix(ACCENT, DEEP, (w - 0.5) * 2);
  return `rgb(${rgb})`;
}

const short = (label) => (label.length > 10 ? `${label.slice(0, 9)}…` : label);

/** The attention weights [query][key] as a heat-map, queries down the left, keys along the top, the
 * `selected` query row outlined. Returns the geometry {margin, cell} for finding the cell under a pointer. */
export function drawHeatmap(canvas, weights, labels, selected) {
  const n = labels.length;
  const cell = Math.max(6, Math.min(40, Math.floor(480 / n)));
  const measure = canvas.getContext("2d");
  measure.font = FONT;
  const margin = Math.ceil(Math.max(...labels.map((l) => measure.measureText(short(l)).width))) + 10;
  const context = sized(canvas, margin + n * cell + 2, margin + n * cell + 2);
  context.font = FONT;
  context.fillStyle = "#4a5365";
  context.textBaseline = "middle";
  labels.forEach((label, i) => {
    context.textAlign = "right";
    context.fillText(short(label), margin - 6, margin + (i + 0.5) * cell);
    context.save();
    context.translate(margin + (i + 0.5) * cell, margin - 6);
    context.rotate(-Math.PI / 2);
    context.textAlign = "left";
    context.fillText(short(label), 0, 0);
    context.restore();
  });
  weights.forEach((row, q) => row.forEach((w, k) => {
    context.fillStyle = k > q ? "#f1f2f5" : weightColor(w);  // the causal mask's cells in grey
    context.fillRect(margin + k * cell, margin + q * cell, cell, cell);
  }));
  context.strokeStyle = "#d92d20";
  context.lineWidth = 2;
  context.strokeRect(margin + 1, margin + selected * cell + 1, n * cell - 2, cell - 2);
  return {margin, cell};
}

function svg(tag, attributes = {}, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.textContent = text;
  return node;
}

/** Curves of one value per step: `series` is [{name, values}], the first the main one. Points after
 * `upto` are drawn faint; each point is a circle with data-series and data-value. */
export function lineChart(target, series, upto) {
  const [width, height] = [380, 190];
  const pad = {left: 62, right: 12, top: 14, bottom: series.length > 1 ? 40 : 26};
  const all = series.flatMap((s) => s.values);
  let [lo, hi] = [Math.min(...all), Math.max(...all)];
  if (hi - lo < 1e-9) [lo, hi] = [lo - 1, hi + 1];
  const n = Math.max(...series.map((s) => s.values.length));
  const x = (i) => pad.left + (i * (width - pad.left - pad.right)) / Math.max(1, n - 1);
  const y = (v) => pad.top + ((hi - v) * (height - pad.top - pad.bottom)) / (hi - lo);
  const bottom = height - pad.bottom;
  target.setAttribute("viewBox", `0 0 ${width} ${height}`);
  target.replaceChildren(
    svg("line", {x1: pad.left, y1: pad.top, x2: pad.left, y2: bottom, class: "axis"}),
    svg("line", {x1: pad.left, y1: bottom, x2: width - pad.right, y2: bottom, class: "axis"}),
    ...[hi, (hi + lo) / 2, lo].map((v) => svg("text", {x: pad.left - 6, y: y(v) + 4, class: "tick end"}, fmt(v, 4))),
    svg("text", {x: pad.left, y: bottom + 15, class: "tick"}, "0"),
    svg("text", {x: width - pad.right, y: bottom + 15, class: "tick end"}, String(n - 1)),
    svg("text", {x: (pad.left + width) / 2, y: bottom + 15, class: "tick middle"}, "step"),
    ...series.flatMap((s, k) => curve(s, k, x, y, upto)),
    ...(series.length > 1 ? legend(series, width, height) : []),
  );
  target.dataset.points = String(series[0].values.length);
}

function curve({name, values}, k, x, y, upto) {
  const points = (vs) => vs.map((v, i) => `${x(i)},${y(v)}`).join(" ");
  return [
    svg("polyline", {points: points(values), class: `curve faint s${k}`}),
    svg("polyline", {points: points(values.slice(0, upto + 1)), class: `curve s${k}`}),
    ...values.map((v, i) => svg("circle", {
      cx: x(i), cy: y(v), r: i === upto ? 4.5 : 3, class: `point s${k}${i > upto ? " faint" : ""}`,
      "data-series": name, "data-value": String(v),
    })),
  ];
}

function legend(series, width, height) {
  const step = (width - 70) / series.length;
  return series.flatMap(({name}, k) => [
    svg("rect", {x: 62 + k * step, y: height - 12, width: 10, height: 4, class: `swatch s${k}`}),
    svg("text", {x: 76 + k * step, y: height - 8, class: "tick"}, name),
  ]);
}

/** Horizontal bars: rows of {label, fraction (bar width, 0–1), value, note, className}. */
export function bars(container, rows) {
  container.replaceChildren(...rows.map(({label, fraction, value, note = "", className = ""}) => {
    const fill = el("span", {className: "bar-fill"});
    fill.style.width = `${(100 * clamp01(fraction)).toFixed(1)}%`;
    return el("div", {className: `bar-row ${className}`},
      el("span", {className: "bar-label", textContent: label, title: label}),
      el("span", {className: "bar-track"}, fill),
      el("span", {className: "bar-value", textContent: value}),
      el("span", {className: "bar-note", textContent: note}));
  }));
}
