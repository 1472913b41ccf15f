// Small DOM helpers shared by the views.

export const $ = (selector, root = document) => root.querySelector(selector);

/** A new element: `props` are set as properties (className, textContent, value…), `dataset` merged. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else node[name] = value;
  }
  node.append(...children);
  return node;
}

export function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** A number in at most `digits` significant digits. */
export function fmt(value, digits = 4) {
  return Number(value.toPrecision(digits)).toString();
}

export function percent(p) {
  return `${(100 * p).toFixed(p >= 0.1 ? 1 : 2)}%`;
}

/** A status line: `kind` is "busy", "ok" or "error" (styled by the page). */
export function say(node, text, kind = "") {
  node.textContent = text;
  node.dataset.kind = kind;
}

export function sayError(node, error) {
  say(node, error.message, "error");
}

/** Shows frames 0…count-1 one after another, with a range input to scrub and a "step i / last" label
 * (its data-step and data-last say the same). */
export class Player {
  constructor({slider, label, noun, onFrame, interval = 450}) {
    Object.assign(this, {slider, label, noun, onFrame, interval, count: 0, frame: 0, timer: undefined});
    slider.addEventListener("input", () => {
      this.stop();
      this.show(Number(slider.value));
    });
  }

  play(count) {
    this.stop();
    this.count = count;
    this.slider.max = String(count - 1);
    this.slider.disabled = false;
    this.show(0);
    if (count > 1) this.timer = setInterval(() => {
      this.show(this.frame + 1);
      if (this.frame >= this.count - 1) this.stop();
    }, this.interval);
  }

  show(frame) {
    this.frame = frame;
    this.slider.value = String(frame);
    this.label.textContent = `${this.noun} ${frame} / ${this.count - 1}`;
    Object.assign(this.label.dataset, {step: frame, last: this.count - 1});
    this.onFrame(frame);
  }

  stop() {
    clearInterval(this.timer);
  }
}
