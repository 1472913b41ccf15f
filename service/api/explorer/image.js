// The Image view: the Energy Transformer completing a masked 8×8 digit (POST /v1/complete with
// "explain": true), frame by frame, for two masks side by side.

import { post } from "./api.js";
import { DIGITS } from "./digits.js";
import { cellAt, drawGrid, lineChart } from "./draw.js";
import { $, Player, el, fmt, say, sayError } from "./ui.js";

const SIDE = 8;
const PRESETS = {
  bottom: (r) => r >= SIDE / 2,
  top: (r) => r < SIDE / 2,
  left: (r, c) => c < SIDE / 2,
  right: (r, c) => c >= SIDE / 2,
  centre: (r, c) => r >= 2 && r < 6 && c >= 2 && c < 6,
  none: () => false,
};

const ink = (v) => v;
const cells = (test) => Array.from({length: SIDE * SIDE}, (_, i) => test(Math.floor(i / SIDE), i % SIDE));
const rows = (flat) => Array.from({length: SIDE}, (_, r) => flat.slice(r * SIDE, (r + 1) * SIDE));

/** The cells of the rectangle spanned by two cells. */
function rectangle(a, b) {
  const [r0, r1] = [Math.min(a.row, b.row), Math.max(a.row, b.row)];
  const [c0, c1] = [Math.min(a.col, b.col), Math.max(a.col, b.col)];
  return cells((r, c) => r >= r0 && r <= r1 && c >= c0 && c <= c1);
}

/** Calls `paint(cell, event, first)` at the pointer's cell while a button is down on the canvas. */
function onDrag(canvas, paint) {
  let dragging = false;
  canvas.addEventListener("pointerdown", (event) => {
    dragging = true;
    canvas.setPointerCapture(event.pointerId);
    paint(cellAt(canvas, event, SIDE), event, true);
  });
  canvas.addEventListener("pointermove", (event) => dragging && paint(cellAt(canvas, event, SIDE), event, false));
  canvas.addEventListener("pointerup", () => { dragging = false; });
}

export function imageView(root) {
  const ui = {
    digits: $("#digits", root), source: $("#source", root), steps: $("#et-steps", root), status: $("#image-status", root),
  };
  const state = {source: DIGITS[0].pixels.flat().map((v) => v / 16)};
  const panels = [...root.querySelectorAll(".et-panel")].map(panel);
  const player = new Player({
    slider: $("#image-slider", root), label: $("#image-step", root), noun: "frame", onFrame: showFrame,
  });

  /** One of the side-by-side runs: its mask (drag a rectangle, or a preset) and its frames. */
  function panel(node, index) {
    node.append($("#et-panel").content.cloneNode(true));
    const preset = $(".preset", node);
    const self = {
      node, preset, maskCanvas: $(".mask", node), frame: $(".frame", node), chart: $(".chart", node),
      note: $(".panel-note", node), frameNote: $(".frame-note", node), mask: [], before: [], frames: null,
    };
    $(".panel-name", node).textContent = `Mask ${"AB"[index]}`;
    preset.value = node.dataset.preset;
    preset.addEventListener("change", () => setMask(self, cells(PRESETS[preset.value])));
    let anchor;
    onDrag(self.maskCanvas, (cell, event, first) => {
      if (first) [anchor, self.before, preset.value] = [cell, event.shiftKey ? self.mask : cells(() => false), "drawn"];
      setMask(self, rectangle(anchor, cell).map((on, i) => on || self.before[i]));
    });
    self.mask = cells(PRESETS[preset.value]);
    return self;
  }

  function setMask(self, mask) {
    self.mask = mask;
    self.frames = null;
    drawPanel(self);
  }

  function drawPanel(self) {
    drawGrid(self.maskCanvas, state.source, SIDE, {ink, marked: self.mask, hatch: true});
    if (!self.frames) {  // until a run: what the model is given, the masked pixels blank
      drawGrid(self.frame, state.source.map((v, i) => (self.mask[i] ? 0 : v)), SIDE, {ink, marked: self.mask});
      self.chart.replaceChildren();
      self.frameNote.textContent = "what the model is given";
      self.note.textContent = "";
    }
  }

  function drawSource() {
    drawGrid(ui.source, state.source, SIDE, {ink, cell: 28});
    panels.forEach((p) => setMask(p, p.mask));
  }

  function showDigits() {
    ui.digits.replaceChildren(...DIGITS.map(({label, index, pixels}) => {
      const canvas = el("canvas", {className: "grid small"});
      drawGrid(canvas, pixels.flat(), SIDE, {ink: (v) => v / 16, cell: 5});
      const button = el("button", {className: "thumb", title: `load_digits() image ${index}`}, canvas,
        el("span", {textContent: String(label)}));
      button.addEventListener("click", () => {
        state.source = pixels.flat().map((v) => v / 16);
        drawSource();
      });
      return button;
    }));
  }

  function pen() {
    return Number($("input[name=pen]:checked", root).value);
  }

  async function run() {
    say(ui.status, "completing…", "busy");
    try {
      const answers = await Promise.all(panels.map((p) => post("v1/complete", {
        model: "energy-transformer", image: rows(state.source), mask: rows(p.mask), steps: Number(ui.steps.value),
        explain: true,
      })));
      answers.forEach((answer, i) => { panels[i].frames = answer.frames; });
      say(ui.status, "", "");
      player.play(Math.max(...answers.map((a) => a.frames.length)));
    } catch (error) {
      sayError(ui.status, error);
    }
  }

  /** The mean squared error on the masked pixels against the input, or null without a mask. */
  function maskedError(image, mask) {
    const errors = image.flatMap((v, i) => (mask[i] ? [(v - state.source[i]) ** 2] : []));
    return errors.length ? errors.reduce((a, b) => a + b, 0) / errors.length : null;
  }

  function showFrame(i) {
    for (const p of panels.filter((p) => p.frames)) {
      const at = Math.min(i, p.frames.length - 1);
      const frame = p.frames[at];
      const image = frame.image.flat();
      drawGrid(p.frame, image, SIDE, {ink, marked: p.mask});
      lineChart(p.chart, [
        {name: "energy", values: p.frames.map((f) => f.energy)},
        {name: "attention", values: p.frames.map((f) => f.attention_energy)},
        {name: "Hopfield", values: p.frames.map((f) => f.hopfield_energy)},
      ], at);
      const error = maskedError(image, p.mask);
      p.frameNote.textContent = `frame ${at}`;
      p.note.textContent = `E ${fmt(frame.energy)} = attention ${fmt(frame.attention_energy)} + Hopfield ` +
        `${fmt(frame.hopfield_energy)}` + (error === null ? "" : ` · masked-pixel error ${fmt(error, 3)}`);
    }
  }

  onDrag(ui.source, ({row, col}) => {
    state.source[row * SIDE + col] = pen();
    drawSource();
  });
  $("#clear-source", root).addEventListener("click", () => {
    state.source = cells(() => 0);
    drawSource();
  });
  $("#run-image", root).addEventListener("click", run);
  showDigits();
  drawSource();
  return {};
}
