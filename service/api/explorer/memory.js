// The Memory view: a bank's energy descent from a corrupted pattern (retrieve with "explain": true),
// step by step; the DrDAM fidelity report for drdam banks.

import { get, post, put } from "./api.js";
import { bars, drawGrid, lineChart, squareSide } from "./draw.js";
import { $, Player, el, fmt, say, sayError } from "./ui.js";

const DEMO_DIM = 64;
const DEMO_PATTERNS = 6;
const KNOWN_STORAGE = "amserve-explorer-patterns";
// β suits ±1 patterns of 64 entries (overlaps of 64 with the pattern itself, about ±8 with the others).
const DEMO_PARAMS = {modern: {beta: 0.1}, rbf: {beta: 0.1}, drdam: {beta: 0.1, features: 4096}, classical: {}, dense: {}};

const randomSigns = (dim) => Array.from({length: dim}, () => (Math.random() < 0.5 ? -1 : 1));
const stateInk = (v) => (v + 1) / 2;  // −1 white, +1 black

function shuffled(count) {
  const order = [...Array(count).keys()];
  for (let i = count - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

function fidelityTable(report) {
  const row = (name, part) => el("tr", {},
    el("th", {textContent: name}),
    ...[part.mean_abs_energy_error, part.max_abs_energy_error, part.mean_gradient_cosine, part.min_gradient_cosine]
      .map((v) => el("td", {textContent: fmt(v, 3)})));
  const head = el("tr", {}, ...["", "mean |Ẽ − E|", "max |Ẽ − E|", "mean cos(∇Ẽ, ∇E)", "min cos(∇Ẽ, ∇E)"]
    .map((h) => el("th", {textContent: h})));
  return [
    el("table", {className: "table"}, head, row("stored patterns", report.patterns), row("noisy copies", report.noisy)),
    el("p", {className: "readout", textContent: `${report.sample_size} patterns, noise ${report.noise}: ` +
      `DrDAM and exact retrieval reach the same nearest memory for ${(100 * report.same_nearest).toFixed(0)}% ` +
      `of the noisy copies (bank version ${report.version})`}),
  ];
}

export function memoryView(root) {
  const ui = {
    bank: $("#bank", root), kind: $("#demo-kind", root), info: $("#bank-info", root), patterns: $("#patterns", root),
    noise: $("#noise", root), cue: $("#cue", root), cueNote: $("#cue-note", root), state: $("#state", root),
    stateNote: $("#state-note", root), energy: $("#memory-energy", root), top: $("#top-memories", root),
    summary: $("#memory-summary", root), status: $("#memory-status", root),
    fidelityCard: $("#fidelity-card", root), fidelity: $("#fidelity", root),
  };
  // bank name → {ids, patterns} that this page stored, kept for the tab's life like the API key
  const known = new Map(JSON.parse(sessionStorage.getItem(KNOWN_STORAGE) ?? "[]"));
  const state = {banks: [], bank: null, base: null, baseId: null, order: [], cue: [], explanation: [], loaded: false};
  const player = new Player({
    slider: $("#memory-slider", root), label: $("#memory-step", root), noun: "step", onFrame: showStep,
  });

  async function refreshBanks(chosen = ui.bank.value) {
    state.banks = (await get("v1/banks")).banks;
    ui.bank.replaceChildren(
      el("option", {value: "", textContent: state.banks.length ? "choose a bank" : "no banks yet"}),
      ...state.banks.map((b) => el("option", {value: b.name, textContent: `${b.name} (${b.kind}, ${b.count} × ${b.dim})`})));
    ui.bank.value = state.banks.some((b) => b.name === chosen) ? chosen : "";
    await chooseBank();
  }

  async function chooseBank() {
    state.bank = state.banks.find((b) => b.name === ui.bank.value) ?? null;
    ui.fidelityCard.hidden = state.bank?.kind !== "drdam";
    if (!state.bank) {
      ui.info.textContent = "pick a bank, or create a demo bank of random ±1 patterns";
      ui.patterns.replaceChildren();
      return;
    }
    const {kind, dim, count, params} = state.bank;
    ui.info.textContent = `${kind}, dimension ${dim}, ${count} patterns, params ${JSON.stringify(params)}`;
    showPatterns();
    if (kind === "drdam") await showFidelity();
  }

  function showPatterns() {
    const stored = known.get(state.bank.name);
    const side = squareSide(state.bank.dim);
    if (!stored) {
      ui.patterns.replaceChildren(el("p", {className: "hint",
        textContent: "this page did not store this bank's patterns (the API does not list them): the cue is random"}));
      choosePattern(randomSigns(state.bank.dim), null);
      return;
    }
    ui.patterns.replaceChildren(...stored.patterns.map((pattern, i) => {
      const canvas = el("canvas", {className: "grid small"});
      if (side) drawGrid(canvas, pattern, side, {ink: stateInk, cell: 7});
      const button = el("button", {className: "thumb", title: `pattern ${stored.ids[i]}`, dataset: {id: stored.ids[i]}},
        canvas, el("span", {textContent: stored.ids[i]}));
      button.addEventListener("click", () => choosePattern(pattern, stored.ids[i]));
      return button;
    }));
    choosePattern(stored.patterns[0], stored.ids[0]);
  }

  function choosePattern(pattern, id) {
    Object.assign(state, {base: pattern, baseId: id, order: shuffled(pattern.length)});
    for (const thumb of ui.patterns.querySelectorAll(".thumb")) thumb.classList.toggle("selected", thumb.dataset.id === id);
    corrupt();
  }

  /** The cue: the base pattern with the signs of a `noise` fraction of its entries flipped. */
  function corrupt() {
    const flips = Math.round(Number(ui.noise.value) * state.base.length);
    state.cue = state.base.slice();
    for (const i of state.order.slice(0, flips)) state.cue[i] = -state.cue[i];
    $("#noise-value", root).textContent = `${Math.round(100 * Number(ui.noise.value))}% (${flips} flipped)`;
    const side = squareSide(state.cue.length);
    ui.cue.hidden = !side;
    if (side) drawGrid(ui.cue, state.cue, side, {ink: stateInk, marked: flipped(state.cue), hatch: true});
    ui.cueNote.textContent = state.baseId ? `pattern ${state.baseId}, corrupted (flipped entries hatched)` : "a random cue";
  }

  /** Per entry: does `vector` disagree in sign with the base pattern? */
  function flipped(vector) {
    return vector.map((v, i) => Math.sign(v) !== Math.sign(state.base[i]));
  }

  async function createDemo() {
    const kind = ui.kind.value;
    const name = `demo-${kind}-${Date.now().toString(36)}`;
    const patterns = Array.from({length: DEMO_PATTERNS}, () => randomSigns(DEMO_DIM));
    const ids = patterns.map((_, i) => `p${i}`);
    say(ui.status, `creating ${name}…`, "busy");
    try {
      await put(`v1/banks/${name}`, {kind, dim: DEMO_DIM, params: DEMO_PARAMS[kind]});
      await post(`v1/banks/${name}/store`, {patterns, ids});
      known.set(name, {ids, patterns});
      sessionStorage.setItem(KNOWN_STORAGE, JSON.stringify([...known]));
      await refreshBanks(name);
      say(ui.status, `created ${name}`, "ok");
    } catch (error) {
      sayError(ui.status, error);
    }
  }

  async function run() {
    if (!state.bank) return;
    say(ui.status, "retrieving…", "busy");
    try {
      const {results: [result]} = await post(`v1/banks/${state.bank.name}/retrieve`, {queries: [state.cue], explain: true});
      state.explanation = result.explanation;
      const nearest = result.nearest ? `nearest ${result.nearest.id} (similarity ${fmt(result.nearest.similarity, 3)})` : "";
      ui.summary.textContent = `${result.steps} steps, ${result.converged ? "converged" : "not converged"}; ${nearest}`;
      say(ui.status, "", "");
      player.play(state.explanation.length);
    } catch (error) {
      sayError(ui.status, error);
    }
  }

  function showStep(i) {
    const step = state.explanation[i];
    const side = squareSide(step.state.length);
    ui.state.hidden = !side;
    const marked = state.baseId ? flipped(step.state) : null;
    if (side) drawGrid(ui.state, step.state, side, {ink: stateInk, marked, hatch: true});
    ui.stateNote.textContent = marked
      ? `${marked.filter(Boolean).length} of ${marked.length} signs differ from ${state.baseId}` : "state";
    lineChart(ui.energy, [{name: "energy", values: state.explanation.map((s) => s.energy)}], i);
    bars(ui.top, step.top_memories.map((m) => ({
      label: m.id, fraction: Math.abs(m.weight), value: fmt(m.weight, 3),
      className: m.id === state.baseId ? "kept" : m.weight < 0 ? "cut" : "",
    })));
  }

  async function showFidelity() {
    ui.fidelity.replaceChildren(el("p", {className: "hint", textContent: "measuring…"}));
    try {
      ui.fidelity.replaceChildren(...fidelityTable(await get(`v1/banks/${state.bank.name}/fidelity`)));
    } catch (error) {
      ui.fidelity.replaceChildren(el("p", {className: "status", textContent: error.message, dataset: {kind: "error"}}));
    }
  }

  const reportErrors = (action) => () => action().catch((error) => sayError(ui.status, error));
  $("#refresh-banks", root).addEventListener("click", reportErrors(() => refreshBanks()));
  $("#create-demo", root).addEventListener("click", createDemo);
  $("#run-memory", root).addEventListener("click", run);
  ui.bank.addEventListener("change", reportErrors(chooseBank));
  ui.noise.addEventListener("input", () => state.base && corrupt());

  return {
    /** When the view is shown, until it once worked: list the banks. */
    activate() {
      if (!state.loaded) refreshBanks().then(() => { state.loaded = true; }, (error) => sayError(ui.status, error));
    },
  };
}
