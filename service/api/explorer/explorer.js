// The explorer page: the API key field, the tabs (#text, #memory, #image) and the three views.

import { apiKey, setApiKey } from "./api.js";
import { imageView } from "./image.js";
import { memoryView } from "./memory.js";
import { textView } from "./text.js";
import { $ } from "./ui.js";

const views = {
  text: textView($("#view-text")),
  memory: memoryView($("#view-memory")),
  image: imageView($("#view-image")),
};

function show() {
  const name = location.hash.slice(1) in views ? location.hash.slice(1) : "text";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.dataset.view !== name;
  for (const tab of document.querySelectorAll(".tabs a")) tab.ariaSelected = String(tab.dataset.view === name);
  views[name].activate?.();
}

const key = $("#api-key");
key.value = apiKey();
key.addEventListener("input", () => setApiKey(key.value.trim()));
window.addEventListener("hashchange", show);
show();
