// The Text view: what the language model attends to and what it would say next (POST /v1/explain),
// and prompt variants compared side by side (plus their greedy continuations, POST /v1/completions).

import { post } from "./api.js";
import { bars, drawHeatmap, weightColor } from "./draw.js";
import { $, debounce, el, percent, say, sayError } from "./ui.js";

const TOP_N = 10;
const COMPARE_TOP_N = 5;
const MAX_VARIANTS = 4;

/** A token as shown: its spaces, newlines and tabs made visible. */
function visible(token) {
  return token.replaceAll(" ", "␣").replaceAll("\n", "⏎").replaceAll("\t", "⇥") || "∅";
}

/** The index drawn from `weights` (not necessarily summing to 1). */
function draw(weights) {
  let rest = Math.random() * weights.reduce((a, b) => a + b, 0);
  const index = weights.findIndex((w) => (rest -= w) < 0);
  return index >= 0 ? index : weights.findLastIndex((w) => w > 0);
}

function cutBy({kept_by_top_k: k, kept_by_top_p: p}) {
  if (!k && !p) return "cut by top-k and top-p";
  return k ? "cut by top-p" : "cut by top-k";
}

/** Bars of next-token candidates: the probability after temperature, and each one's share of the draw. */
function candidateBars(container, {candidates, distribution}) {
  const top = Math.max(...candidates.map((c) => c.probability));
  bars(container, candidates.map((c, i) => ({
    label: visible(c.token),
    fraction: c.probability / top,
    value: percent(c.probability),
    note: distribution[i] > 0 ? `draws ${percent(distribution[i])}` : cutBy(c),
    className: distribution[i] > 0 ? "kept" : "cut",
  })));
}

export function textView(root) {
  const ui = {
    prompt: $("#prompt", root), layer: $("#layer", root), head: $("#head", root), tokens: $("#tokens", root),
    heatmap: $("#heatmap", root), readout: $("#heat-readout", root), candidates: $("#candidates", root),
    temperature: $("#temperature", root), topK: $("#top-k", root), topP: $("#top-p", root),
    sampled: $("#sampled", root), status: $("#text-status", root),
    variants: $("#variants", root), comparison: $("#comparison", root), compareStatus: $("#compare-status", root),
  };
  const state = {answer: null, query: 0, geometry: null, ticket: 0, started: false};

  function sampling() {
    return {temperature: Number(ui.temperature.value), top_k: Number(ui.topK.value), top_p: Number(ui.topP.value)};
  }

  function showSliders() {
    const {temperature, top_k, top_p} = sampling();
    $("#temperature-value", root).textContent = temperature === 0 ? "0 (greedy)" : temperature.toFixed(2);
    $("#top-k-value", root).textContent = top_k === 0 ? "off" : String(top_k);
    $("#top-p-value", root).textContent = top_p.toFixed(2);
  }

  function fill(select, indices) {
    const current = select.value || "0";
    select.replaceChildren(...indices.map((i) => el("option", {value: String(i), textContent: String(i)})));
    select.value = indices.map(String).includes(current) ? current : String(indices[0]);
  }

  /** The layer selector's options: the layers of the model, learnt once from a one-token prompt. */
  async function knowLayers() {
    if (ui.layer.options.length) return;
    const probe = await post("v1/explain", {prompt: ".", top_n: 1, heads: [0]});
    fill(ui.layer, probe.layers);
  }

  async function explain() {
    const ticket = ++state.ticket;
    state.started = true;
    say(ui.status, "asking the model…", "busy");
    try {
      await knowLayers();
      const answer = await post("v1/explain", {
        prompt: ui.prompt.value, ...sampling(), top_n: TOP_N, layers: [Number(ui.layer.value)],
      });
      if (ticket !== state.ticket) return;  // a newer question is on its way
      if (answer.heads.length !== ui.head.options.length) fill(ui.head, answer.heads);
      const promptChanged = answer.tokens.length !== state.answer?.tokens.length;
      state.answer = answer;
      if (promptChanged || state.query >= answer.tokens.length) state.query = answer.tokens.length - 1;
      render();
      say(ui.status, `${answer.model} · ${answer.tokens.length} tokens`, "ok");
    } catch (error) {
      if (ticket === state.ticket) sayError(ui.status, error);
    }
  }
  const explainSoon = debounce(explain, 300);
  const again = () => state.started && explainSoon();

  /** The selected head's attention [query][key]. */
  function attention() {
    return state.answer.attention[0][state.answer.heads.indexOf(Number(ui.head.value))];
  }

  function render() {
    renderTokens();
    renderHeatmap();
    candidateBars(ui.candidates, state.answer.next_token);
  }

  function renderTokens() {
    const row = attention()[state.query];
    ui.tokens.replaceChildren(...state.answer.tokens.map((token, i) => {
      const chip = el("button", {
        className: i === state.query ? "chip query" : "chip", textContent: visible(token.text),
        title: `token id ${token.id}; attention from the selected token: ${row[i].toFixed(3)}`,
      });
      chip.style.background = i <= state.query ? weightColor(row[i]) : "";
      chip.classList.toggle("dark", row[i] > 0.55);
      chip.addEventListener("click", () => selectQuery(i));
      return chip;
    }));
  }

  function renderHeatmap() {
    const labels = state.answer.tokens.map((t) => visible(t.text));
    state.geometry = drawHeatmap(ui.heatmap, attention(), labels, state.query);
    ui.heatmap.dataset.tokens = String(labels.length);
  }

  function selectQuery(i) {
    state.query = i;
    renderTokens();
    renderHeatmap();
  }

  /** The heat-map cell under a pointer, as {query, key}, or null off the grid. */
  function cellUnder(event) {
    const {margin, cell} = state.geometry;
    const box = ui.heatmap.getBoundingClientRect();
    const [key, query] = [event.clientX - box.left - margin, event.clientY - box.top - margin].map((d) => Math.floor(d / cell));
    const n = state.answer.tokens.length;
    return query >= 0 && query < n && key >= 0 && key < n ? {query, key} : null;
  }

  function describeCell(event) {
    const cell = state.answer && cellUnder(event);
    if (!cell) return;
    const text = (i) => visible(state.answer.tokens[i].text);
    ui.readout.textContent = `${text(cell.query)} (query ${cell.query}) → ${text(cell.key)} (key ${cell.key}): ` +
      `${attention()[cell.query][cell.key].toFixed(4)}`;
  }

  function sampleNext() {
    if (!state.answer) return;
    const {candidates, distribution} = state.answer.next_token;
    const i = draw(distribution);
    ui.prompt.value += candidates[i].token;
    ui.sampled.textContent = `sampled ${visible(candidates[i].token)} (${percent(distribution[i])} of the draw)`;
    explain();
  }

  function addVariant(text) {
    const remove = el("button", {className: "icon", textContent: "×", title: "remove this variant"});
    const variant = el("div", {className: "variant"}, el("textarea", {rows: 2, value: text, spellcheck: false}), remove);
    remove.addEventListener("click", () => variant.remove());
    ui.variants.append(variant);
  }

  async function runVariant(prompt) {
    const explained = await post("v1/explain", {prompt, ...sampling(), top_n: COMPARE_TOP_N, layers: [0], heads: [0]});
    const completion = await post("v1/completions", {model: explained.model, prompt, max_tokens: 16, temperature: 0});
    return {prompt, next: explained.next_token, continuation: completion.choices[0].text};
  }

  function comparisonColumn({prompt, next, continuation}) {
    const candidates = el("div", {className: "bars"});
    candidateBars(candidates, next);
    return el("div", {className: "compare-column"},
      el("h3", {textContent: prompt}), candidates,
      el("p", {className: "continuation"}, el("span", {className: "muted", textContent: prompt}),
        el("strong", {textContent: continuation})));
  }

  async function compare() {
    const prompts = [...ui.variants.querySelectorAll("textarea")].map((t) => t.value);
    say(ui.compareStatus, "asking the model…", "busy");
    try {
      const runs = await Promise.all(prompts.map(runVariant));
      ui.comparison.replaceChildren(...runs.map(comparisonColumn));
      say(ui.compareStatus, `${runs.length} prompts`, "ok");
    } catch (error) {
      sayError(ui.compareStatus, error);
    }
  }

  $("#explain", root).addEventListener("click", explain);
  ui.prompt.addEventListener("input", again);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) explain();
  });
  ui.layer.addEventListener("change", again);
  ui.head.addEventListener("change", () => state.answer && render());
  for (const slider of [ui.temperature, ui.topK, ui.topP]) {
    slider.addEventListener("input", () => {
      showSliders();
      again();
    });
  }
  ui.heatmap.addEventListener("mousemove", describeCell);
  ui.heatmap.addEventListener("click", (event) => {
    const cell = state.answer && cellUnder(event);
    if (cell) selectQuery(cell.query);
  });
  $("#sample", root).addEventListener("click", sampleNext);
  $("#add-variant", root).addEventListener("click", () => {
    if (ui.variants.children.length < MAX_VARIANTS) addVariant(ui.prompt.value);
  });
  $("#compare", root).addEventListener("click", compare);

  showSliders();
  addVariant("The cat sat on the");
  addVariant("The dog sat on the");
  return {};
}
