// scriven playground: plain JavaScript against the server's own API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// Talking to the server

async function* readEvents(response) {
  // Server-sent events over a POST response: "event: NAME\ndata: JSON\n\n" blocks.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

async function errorText(response) {
  // FastAPI errors: {"detail": "..."} or {"detail": [{"loc": [...], "msg": "..."}]}.
  try {
    const body = await response.json();
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => {
        const where = (d.loc || []).filter((x) => x !== "body").join(".");
        return where ? `${where}: ${d.msg}` : d.msg;
      }).join("; ");
    }
    return String(body.detail || response.statusText);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function post(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

function numberOrNull(input) {
  return input.value.trim() === "" ? null : Number(input.value);
}

function fillModels(select, models, task) {
  select.replaceChildren();
  for (const m of models.filter((x) => x.task === task)) {
    const option = document.createElement("option");
    option.value = m.name;
    // An export's weights live in its runtime's files: it says which runtime, not a count.
    const size = m.parameters === null ? `${m.runtime} export`
      : `${m.parameters.toLocaleString()} parameters`;
    option.textContent = `${m.name} (${m.kind}, ${size})`;
    select.append(option);
  }
  return select.options.length > 0;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const { models } = await response.json();
    const hasLM = fillModels($("gen-model"), models, "generate");
    const hasTranslator = fillModels($("tr-model"), models, "translate");
    // An export's own position table stays inside its runtime: only checkpoints offer theirs.
    for (const m of models.filter((x) => x.task === "translate" && x.runtime === "pytorch")) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = `${m.name}'s own table`;
      $("pos-model").append(option);
    }
    $("gen-submit").disabled = !hasLM;
    $("tr-submit").disabled = !hasTranslator;
    if (!hasLM) $("gen-error").textContent = "No language model is being served.";
    if (!hasTranslator) $("tr-error").textContent = "No translator is being served.";
    $("server-status").textContent =
      `Serving ${models.map((m) => `${m.name} (${m.task})`).join(", ")}.`;
  } catch (e) {
    $("server-status").textContent = `Cannot reach the server: ${e.message}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Generation

let generation = null; // the AbortController of the running request

// What to call a token: its text, or, when its text is held back until the next token (a quote
// mark whose side that token shows), the token itself.
function tokenLabel(token) {
  return token.text.trim() || (token.text ? "(space)" : token.token);
}

function tokenSpan(token) {
  const span = document.createElement("span");
  span.className = "tok";
  span.tabIndex = 0;
  span.textContent = token.text;
  span.style.setProperty("--alpha", (0.08 + 0.55 * token.probability).toFixed(3));
  span.dataset.token = JSON.stringify(token);
  span.setAttribute("aria-label",
    `${tokenLabel(token)}, probability ${(100 * token.probability).toFixed(1)} percent`);
  return span;
}

function showTooltip(span) {
  const token = JSON.parse(span.dataset.token);
  const tip = $("tooltip");
  const rows = token.alternatives.map(([text, p]) => {
    const chosen = text === token.token ? " class=\"chosen\"" : "";
    return `<tr${chosen}><td>${escapeHtml(text)}</td><td class="p">${p.toFixed(3)}</td></tr>`;
  }).join("");
  tip.innerHTML = `<div><strong>${escapeHtml(tokenLabel(token))}</strong>: p = ` +
    `${token.probability.toFixed(3)}</div>` +
    (rows ? `<div>Most likely here:</div><table>${rows}</table>` : "");
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const left = Math.min(window.scrollX + box.left,
    window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
  tip.style.left = `${Math.max(window.scrollX + 4, left)}px`;
  tip.style.top = `${window.scrollY + box.bottom + 6}px`;
  span.setAttribute("aria-describedby", "tooltip");
}

function hideTooltip(span) {
  $("tooltip").hidden = true;
  if (span) span.removeAttribute("aria-describedby");
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
    "\"": "&quot;", "'": "&#39;" })[c]);
}

async function generate(event) {
  event.preventDefault();
  if (generation) return;
  const out = $("gen-output");
  $("gen-error").textContent = "";
  $("gen-stats").textContent = "";
  out.replaceChildren();
  hideTooltip();
  const body = {
    model: $("gen-model").value || null,
    prompt: $("gen-prompt").value,
    temperature: Number($("gen-temperature").value),
    top_k: numberOrNull($("gen-top-k")),
    top_p: numberOrNull($("gen-top-p")),
    max_new_tokens: Number($("gen-max-tokens").value),
    seed: numberOrNull($("gen-seed")),
    alternatives: 5,
    stream: true,
  };
  generation = new AbortController();
  $("gen-submit").disabled = true;
  $("gen-stop").disabled = false;
  const started = performance.now();
  let count = 0;
  try {
    const response = await post("/v1/generate", body, generation.signal);
    for await (const { event: kind, data } of readEvents(response)) {
      if (kind === "start") {
        const prompt = document.createElement("span");
        prompt.className = "prompt";
        prompt.textContent = data.prompt;
        out.append(prompt);
        if (data.warnings.length) $("gen-error").textContent = data.warnings.join(" ");
      } else if (kind === "token") {
        out.append(tokenSpan(data));
        count += 1;
      } else if (kind === "done") {
        const seconds = (performance.now() - started) / 1000;
        const reason = data.samples[0].finish_reason;
        $("gen-stats").textContent = `${count} tokens in ${seconds.toFixed(2)} s ` +
          `(${(count / seconds).toFixed(0)} tokens/s), stopped by ${reason === "stop" ?
            "a stop string" : "the token limit"}.`;
      } else if (kind === "error") {
        throw new Error(data.detail);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("gen-error").textContent = e.message;
    else $("gen-stats").textContent = `Stopped after ${count} tokens.`;
  } finally {
    generation = null;
    $("gen-submit").disabled = false;
    $("gen-stop").disabled = true;
  }
}

// ---------------------------------------------------------------------------------------------
// Translation

let attention = null; // the last translation's {source_tokens, target_tokens, cross}

async function translate(event) {
  event.preventDefault();
  const out = $("tr-output");
  $("tr-error").textContent = "";
  $("tr-stats").textContent = "";
  out.textContent = "";
  $("attention-box").hidden = true;
  const body = {
    model: $("tr-model").value || null,
    text: $("tr-source").value,
    beam: Number($("tr-beam").value),
    attention: $("tr-attention").checked,
    stream: true,
  };
  $("tr-submit").disabled = true;
  const started = performance.now();
  try {
    const response = await post("/v1/translate", body);
    for await (const { event: kind, data } of readEvents(response)) {
      if (kind === "start" && data.warnings.length) {
        $("tr-error").textContent = data.warnings.join(" ");
      } else if (kind === "token") {
        out.textContent = data.text;
      } else if (kind === "translation") {
        out.textContent = data.text || "(empty translation)";
        if (data.attention && data.attention.available) showAttention(data.attention);
        else if (data.attention) $("tr-error").textContent = data.attention.reason;
      } else if (kind === "done") {
        const seconds = (performance.now() - started) / 1000;
        $("tr-stats").textContent = `Translated in ${seconds.toFixed(2)} s with ` +
          `${body.beam === 1 ? "greedy search" : `beam search (beam ${body.beam})`}.`;
      } else if (kind === "error") {
        throw new Error(data.detail);
      }
    }
  } catch (e) {
    $("tr-error").textContent = e.message;
  } finally {
    $("tr-submit").disabled = false;
  }
}

function showAttention(found) {
  attention = found;
  const layers = found.cross.length;
  const heads = found.cross[0].length;
  const layer = $("att-layer");
  const head = $("att-head");
  layer.replaceChildren(...Array.from({ length: layers }, (_, i) => new Option(`${i + 1}`, i)));
  layer.value = String(layers - 1);
  head.replaceChildren(new Option("average of heads", "mean"),
    ...Array.from({ length: heads }, (_, i) => new Option(`${i + 1}`, i)));
  $("attention-box").hidden = false;
  drawAttention();
}

function drawAttention() {
  if (!attention) return;
  const layer = attention.cross[Number($("att-layer").value)];
  const choice = $("att-head").value;
  const weights = choice === "mean"
    ? layer[0].map((row, t) => row.map((_, s) => layer.reduce((sum, h) => sum + h[t][s], 0) / layer.length))
    : layer[Number(choice)];
  const table = $("attention");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  head.append(document.createElement("td"));
  for (const token of attention.source_tokens) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = token;
    head.append(th);
  }
  const body = table.createTBody();
  weights.forEach((row, t) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = attention.target_tokens[t];
    tr.append(th);
    row.forEach((w, s) => {
      const td = tr.insertCell();
      td.textContent = w.toFixed(2);
      td.style.background = `rgba(31, 95, 191, ${Math.min(1, w).toFixed(3)})`;
      td.title = `${attention.target_tokens[t]} ← ${attention.source_tokens[s]}: ${w.toFixed(3)}`;
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Positional encodings

function drawHeatmap(canvas, rows, low, high, colour) {
  const h = rows.length;
  const w = rows[0].length;
  canvas.width = w;
  canvas.height = h;
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const t = (rows[y][x] - low) / (high - low || 1);
      const [r, g, b] = colour(Math.max(0, Math.min(1, t)));
      const i = 4 * (y * w + x);
      image.data[i] = r; image.data[i + 1] = g; image.data[i + 2] = b; image.data[i + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
}

const redBlue = (t) => t < 0.5
  ? [Math.round(40 + 430 * t), Math.round(90 + 330 * t), 220]            // blue → white
  : [220, Math.round(255 - 330 * (t - 0.5)), Math.round(255 - 390 * (t - 0.5))]; // → red
const dark = (t) => [Math.round(20 + 235 * t), Math.round(10 + 200 * t * t), Math.round(60 + 120 * t)];

async function drawPositions(event) {
  if (event) event.preventDefault();
  $("pos-error").textContent = "";
  const params = new URLSearchParams({ length: $("pos-length").value, dims: $("pos-dims").value });
  if ($("pos-model").value) params.set("model", $("pos-model").value);
  try {
    const response = await fetch(`/v1/positions?${params}`);
    if (!response.ok) throw new Error(await errorText(response));
    const data = await response.json();
    const values = data.similarity.flat();
    drawHeatmap($("pos-encoding"), data.encoding, -1, 1, redBlue);
    drawHeatmap($("pos-similarity"), data.similarity, Math.min(...values), Math.max(...values), dark);
    $("pos-formula").textContent = data.formula === "learned"
      ? `Learned position embeddings: ${data.length} positions × ${data.dims} dimensions.`
      : `${data.formula}; ${data.length} positions × ${data.dims} dimensions.`;
  } catch (e) {
    $("pos-error").textContent = e.message;
  }
}

// ---------------------------------------------------------------------------------------------

function submitOnCtrlEnter(textarea, form) {
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", generate);
  $("gen-stop").addEventListener("click", () => generation && generation.abort());
  $("translate-form").addEventListener("submit", translate);
  $("positions-form").addEventListener("submit", drawPositions);
  $("att-layer").addEventListener("change", drawAttention);
  $("att-head").addEventListener("change", drawAttention);
  submitOnCtrlEnter($("gen-prompt"), $("generate-form"));
  submitOnCtrlEnter($("tr-source"), $("translate-form"));
  const output = $("gen-output");
  for (const [name, show] of [["mouseover", true], ["focusin", true], ["mouseout", false], ["focusout", false]]) {
    output.addEventListener(name, (e) => {
      const span = e.target.closest(".tok");
      if (!span) return;
      if (show) showTooltip(span); else hideTooltip(span);
    });
  }
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTooltip(); });
  loadModels();
  drawPositions();
});
