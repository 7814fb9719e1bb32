// Easel playground: a Wiro API client in the browser. No library, no build step.
// Credentials live in sessionStorage only; requests are signed here with WebCrypto exactly as
// easel/signing.py does: x-signature = hex(HMAC-SHA256(key = API key, message = API secret + x-nonce)).

const API = "/v1";
const WS_PATH = document.body.dataset.wsPath || "/v1";
const STORE_KEY = "easel.playground.credentials";
const TERMINAL = new Set(["task_postprocess_end", "task_cancel"]);
const RUNNING = new Set(["task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign", "task_start",
  "task_output", "task_output_full", "task_error_full", "task_end", "task_postprocess_start"]);
const FILE_TYPES = new Set(["fileinput", "multifileinput", "combinefileinput", "file", "image"]);
const LABELS = {
  "select-model": "Model", "select-model-private": "Private model (id)", "select-lora-model": "LoRA",
  "select-lora-model-private": "Private LoRA (ids)", "numberofoutputs": "Number of outputs",
  "inferencesteps": "Inference steps", "guidancescale": "Guidance scale", "negativeprompt": "Negative prompt",
  "clip-skip": "CLIP skip", "prompt": "Prompt", "seed": "Seed", "width": "Width", "height": "Height",
  "scheduler": "Scheduler",
};

const $ = (id) => document.getElementById(id);
const state = { creds: null, tools: [], tool: null, items: [], task: null, socket: null, poll: null,
  lastNonce: 0, selected: [] };

// ---------------------------------------------------------------- credentials and signing

function loadCreds() {
  try { return JSON.parse(sessionStorage.getItem(STORE_KEY) || "null"); } catch { return null; }
}

function nextNonce() {  // millisecond timestamp, strictly increasing within this page (each is used once)
  state.lastNonce = Math.max(Date.now(), state.lastNonce + 1);
  return String(state.lastNonce);
}

async function hmacHex(key, message) {
  const enc = new TextEncoder();
  const k = await crypto.subtle.importKey("raw", enc.encode(key), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const sig = new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode(message)));
  return Array.from(sig, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function authHeaders() {
  const { key, secret } = state.creds;
  const headers = { "x-api-key": key };
  if (secret) {
    const nonce = nextNonce();
    headers["x-nonce"] = nonce;
    headers["x-signature"] = await hmacHex(key, secret + nonce);
  }
  return headers;
}

class ApiError extends Error {}

async function call(path, body, { multipart = null } = {}) {
  const headers = await authHeaders();
  let payload;
  if (multipart) {
    payload = multipart;
  } else {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body || {});
  }
  let resp;
  try {
    resp = await fetch(API + path, { method: "POST", headers, body: payload });
  } catch (e) {
    throw new ApiError(`${path}: the server could not be reached (${e.message})`);
  }
  let data;
  try { data = await resp.json(); } catch { throw new ApiError(`${path}: HTTP ${resp.status}, not JSON`); }
  if (!data.result) {
    const msg = (data.errors || []).map((e) => e.message).join("; ") || `HTTP ${resp.status}`;
    throw new ApiError(msg);
  }
  return data;
}

function showError(where, err) {
  const box = $(where);
  box.textContent = err ? String(err.message || err) : "";
}

// ---------------------------------------------------------------- tools and the generated form

function labelOf(item) {
  const raw = item.label || item.id;
  if (LABELS[raw]) return LABELS[raw];
  if (/\s/.test(raw) || /[A-Z]/.test(raw)) return raw;
  const words = raw.replace(/[-_]+/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function helpOf(item) {
  const parts = [];
  if (item.help && !/-help$/.test(item.help)) parts.push(item.help);
  if (item.min !== undefined || item.max !== undefined) {
    parts.push(`From ${item.min ?? "–"} to ${item.max ?? "–"}${item.multiple_of ? `, a multiple of ${item.multiple_of}` : ""}.`);
  }
  return parts.join(" ");
}

function isFileItem(item) {
  return FILE_TYPES.has(item.type) || (item.type === "text" && /^input.*(Image|File|Mask|Audio|Video).*Url$/i.test(item.id));
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function defaults(item) {
  const d = item.default;
  if (item.type === "multiselect") {
    if (Array.isArray(d)) return d.map(String);
    return String(d ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  }
  return d === null || d === undefined ? "" : String(d);
}

function fieldFor(item) {
  const id = `f-${item.id}`;
  const help = helpOf(item);
  const helpId = help ? `${id}-help` : undefined;
  const wrap = el("div", { class: "field", "data-item": item.id });
  const label = el("label", { for: id }, labelOf(item), " ", el("code", { class: "param", text: item.id }));
  const options = item.options || [];
  let control;
  if ((item.type === "select" || item.type === "multiselect") && options.length) {
    if (item.type === "select") {
      control = el("select", { id, name: item.id, "aria-describedby": helpId });
      const chosen = defaults(item);
      if (!options.some((o) => String(o.value) === chosen)) {  // the default need not be one of the listed options
        control.append(el("option", { value: chosen, selected: true, text: chosen ? `${chosen} (default)` : "(none)" }));
      }
      for (const o of options) {
        control.append(el("option", { value: o.value, selected: String(o.value) === chosen,
          text: o.label && o.label !== o.value ? `${o.label} (${o.value})` : String(o.value) }));
      }
      control.addEventListener("change", () => refreshModelExtras(item));
      wrap.append(label, control);
    } else {
      const chosen = new Set(defaults(item));
      const fs = el("fieldset", { id, class: "checks", "aria-describedby": helpId });
      fs.append(el("legend", {}, labelOf(item), " ", el("code", { class: "param", text: item.id })));
      options.forEach((o, i) => {
        const cid = `${id}-${i}`;
        const box = el("input", { type: "checkbox", id: cid, name: item.id, value: o.value, checked: chosen.has(String(o.value)) });
        box.addEventListener("change", () => refreshModelExtras(item));
        fs.append(el("div", { class: "check" }, box, el("label", { for: cid, text: o.label && o.label !== o.value ? `${o.label} (${o.value})` : String(o.value) })));
      });
      wrap.append(fs);
    }
    wrap.append(el("div", { class: "extras", id: `${id}-extras` }));
  } else if (item.type === "textarea") {
    control = el("textarea", { id, name: item.id, rows: item.id === "prompt" ? 4 : 2, "aria-describedby": helpId, required: item.required });
    control.value = defaults(item);
    wrap.append(label, control);
  } else if (item.type === "number" || item.type === "float") {
    control = el("input", { id, name: item.id, type: "number", inputmode: item.type === "float" ? "decimal" : "numeric",
      min: item.min, max: item.max, step: item.type === "float" ? "any" : (item.multiple_of || 1),
      value: defaults(item), "aria-describedby": helpId });
    wrap.append(label, control);
  } else if (isFileItem(item)) {
    control = el("input", { id, name: item.id, type: "text", inputmode: "url", value: defaults(item),
      placeholder: "https://… or drop a file below", "aria-describedby": helpId });
    const many = item.type === "multifileinput" || item.type === "combinefileinput";  // several, comma-separated URLs
    const picker = el("input", { type: "file", id: `${id}-file`, class: "visually-hidden", accept: "image/*", multiple: many });
    const zone = el("div", { class: "drop", tabindex: "0", role: "button", "aria-controls": id,
      "aria-label": `Upload a file for ${labelOf(item)} (drop it here, or press Enter to choose one)` },
      "Drop a file here or choose one");
    const upload = async (file) => {
      zone.textContent = `Uploading ${file.name}…`;
      try {
        const form = new FormData();
        form.append("file", file, file.name);
        const data = await call("/File/Upload", null, { multipart: form });
        const url = data.list[0].url;
        control.value = many ? [control.value.trim(), url].filter(Boolean).join(",") : url;
        zone.replaceChildren(el("img", { src: URL.createObjectURL(file), alt: "" }), `Uploaded ${file.name}`);
      } catch (e) {
        zone.textContent = `Upload failed: ${e.message}`;
      }
    };
    const uploadAll = async (files) => {
      for (const file of many ? [...files] : [...files].slice(0, 1)) await upload(file);
    };
    zone.addEventListener("click", () => picker.click());
    zone.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); picker.click(); } });
    zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault(); zone.classList.remove("over");
      uploadAll(ev.dataTransfer.files);
    });
    picker.addEventListener("change", () => uploadAll(picker.files));
    wrap.append(label, control, zone, picker);
  } else {
    control = el("input", { id, name: item.id, type: "text", value: defaults(item), "aria-describedby": helpId,
      required: item.required, spellcheck: "false" });
    if (item.type === "multiselect" || item.type === "select") control.placeholder = item.type === "multiselect" ? "comma-separated ids" : "an id";
    wrap.append(label, control);
  }
  if (help) wrap.append(el("p", { class: "help", id: helpId, text: help }));
  return wrap;
}

function chosenOptions(item) {
  const id = `f-${item.id}`;
  const opts = item.options || [];
  if (item.type === "select") {
    const v = $(id)?.value;
    return opts.filter((o) => String(o.value) === v);
  }
  const checked = new Set([...document.querySelectorAll(`#${CSS.escape(id)} input:checked`)].map((b) => b.value));
  return opts.filter((o) => checked.has(String(o.value)));
}

// Trigger words and per-model scale sliders (a LoRA's or ControlNet's generatesettings) of the chosen options.
function refreshModelExtras(item) {
  const box = $(`f-${item.id}-extras`);
  if (!box) return;
  const previous = {};
  box.querySelectorAll("input[type=range]").forEach((r) => { previous[r.name] = r.value; });
  box.replaceChildren();
  for (const o of chosenOptions(item)) {
    if (o.triggerwords && o.triggerwords.length) {
      const row = el("div", { class: "triggers" }, el("span", { class: "help", text: `Trigger words for ${o.label}: ` }));
      for (const w of o.triggerwords) {
        row.append(el("button", { type: "button", class: "chip", text: w, title: "Add to the prompt",
          "aria-label": `Add trigger word ${w} to the prompt`, onclick: () => addToPrompt(w) }));
      }
      box.append(row);
    }
    for (const gs of o.generatesettings || []) {
      const sid = `gs-${gs.id}`;
      const min = Number(gs.minvalue ?? 0), max = Number(gs.maxvalue ?? 1);
      const step = Number(gs.incrementby || 0.05);
      let value = Number(previous[gs.id] ?? gs.value ?? gs.defaultvalue ?? max);
      value = Math.min(max, Math.max(min, value));
      const out = el("output", { for: sid, id: `${sid}-out`, text: String(value) });
      const range = el("input", { type: "range", id: sid, name: gs.id, min, max, step, value, "data-scale": "1",
        "aria-valuetext": String(value) });
      range.addEventListener("input", () => { out.textContent = range.value; range.setAttribute("aria-valuetext", range.value); });
      box.append(el("div", { class: "field slider" },
        el("label", { for: sid }, gs.label || `${gs.id} scale`, " ", el("code", { class: "param", text: gs.id })),
        el("div", { class: "range-row" }, range, out),
        el("p", { class: "help", text: `From ${min} to ${max}.` })));
    }
  }
}

function addToPrompt(word) {
  const p = $("f-prompt");
  if (!p) return;
  p.value = p.value.trim() ? `${word}, ${p.value.trim()}` : word;
  p.focus();
}

function formValues() {
  const body = {};
  for (const item of state.items) {
    const id = `f-${item.id}`;
    if (item.type === "multiselect" && (item.options || []).length) {
      body[item.id] = [...document.querySelectorAll(`#${CSS.escape(id)} input:checked`)].map((b) => b.value);
      continue;
    }
    const node = $(id);
    if (!node) continue;
    const raw = node.value;
    if ((item.type === "number" || item.type === "float") && raw.trim() !== "" && !Number.isNaN(Number(raw))) {
      body[item.id] = Number(raw);
    } else {
      body[item.id] = raw;
    }
  }
  document.querySelectorAll("#fields input[data-scale]").forEach((r) => { body[r.name] = Number(r.value); });
  return body;
}

async function loadTools() {
  const data = await call("/Tool/List", { limit: 200 });
  state.tools = data.tool.filter((t) => t.available !== false);
  const sel = $("tool-select");
  sel.replaceChildren(...state.tools.map((t) => el("option", { value: `${t.slugowner}/${t.slugproject}`,
    text: `${t.slugowner}/${t.slugproject}` })));
  const m = location.pathname.match(/^\/playground\/([^/]+)\/([^/]+)\/?$/);
  const wanted = m ? `${decodeURIComponent(m[1])}/${decodeURIComponent(m[2])}` : sel.options[0]?.value;
  if (wanted && [...sel.options].some((o) => o.value === wanted)) sel.value = wanted;
  $("tool").hidden = false;
  $("history").hidden = false;
  await loadTool(sel.value, false);
  await refreshHistory();
}

async function loadTool(name, push = true) {
  const [owner, slug] = name.split("/");
  const data = await call("/Tool/Detail", { slugowner: owner, slugproject: slug });
  const tool = data.tool[0];
  state.tool = tool;
  state.items = tool.parameters.flatMap((g) => g.items);
  $("tool-description").textContent = tool.description || "";
  const fields = $("fields");
  fields.replaceChildren(...state.items.map(fieldFor));
  state.items.forEach(refreshModelExtras);
  document.title = `${name} · Easel playground`;
  if (push) history.pushState({}, "", `/playground/${encodeURIComponent(owner)}/${encodeURIComponent(slug)}`);
  $("snippet-box").hidden = true;
}

// ---------------------------------------------------------------- copy as curl / Python

function shellQuote(s) { return `'${String(s).replace(/'/g, "'\\''")}'`; }

function pyLiteral(v, indent = "") {
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number") return String(v);
  if (typeof v === "string") return JSON.stringify(v);
  const inner = indent + "    ";
  if (Array.isArray(v)) return v.length ? `[${v.map((x) => pyLiteral(x, inner)).join(", ")}]` : "[]";
  const entries = Object.entries(v);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, x]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(x, inner)},`).join("\n")}\n${indent}}`;
}

function runUrl() { return `${location.origin}${API}/Run/${state.tool.slugowner}/${state.tool.slugproject}`; }

async function copyCurl() {
  const headers = await authHeaders();  // a fresh nonce that this page never uses itself
  const lines = [`curl -sS -X POST ${shellQuote(runUrl())}`, `  -H 'Content-Type: application/json'`];
  for (const [k, v] of Object.entries(headers)) lines.push(`  -H ${shellQuote(`${k}: ${v}`)}`);
  lines.push(`  -d ${shellQuote(JSON.stringify(formValues()))}`);
  const note = state.creds.secret
    ? "x-nonce and x-signature are computed for this request (a project with a strict nonce policy accepts each nonce once, within 5 minutes: copy again for another run). The secret is not in the command."
    : "API-key project: no signature headers.";
  await showSnippet("curl command", lines.join(" \\\n"), note);
}

async function copyPython() {
  const { key, secret } = state.creds;
  const body = pyLiteral(formValues());
  let code;
  if (secret) {
    code = `import hashlib
import hmac
import os
import time

import requests

API_KEY = ${JSON.stringify(key)}
API_SECRET = os.environ["EASEL_API_SECRET"]  # your API secret (never paste it into shared code)

nonce = str(int(time.time() * 1000))
signature = hmac.new(API_KEY.encode(), (API_SECRET + nonce).encode(), hashlib.sha256).hexdigest()

response = requests.post(
    ${JSON.stringify(runUrl())},
    headers={
        "x-api-key": API_KEY,
        "x-nonce": nonce,
        "x-signature": signature,
        "Content-Type": "application/json",
    },
    json=${body.replace(/\n/g, "\n    ")},
)
print(response.json())
`;
  } else {
    code = `import requests

API_KEY = ${JSON.stringify(key)}

response = requests.post(
    ${JSON.stringify(runUrl())},
    headers={"x-api-key": API_KEY, "Content-Type": "application/json"},
    json=${body.replace(/\n/g, "\n    ")},
)
print(response.json())
`;
  }
  await showSnippet("Python (requests)", code, secret ? "Set EASEL_API_SECRET in the environment before running it." : "");
}

async function showSnippet(title, text, note) {
  $("snippet-label").textContent = `${title}${text.includes("\n") ? "" : ""}`;
  $("snippet").value = text;
  $("snippet").rows = Math.min(24, text.split("\n").length + 1);
  $("snippet-note").textContent = note;
  $("snippet-box").hidden = false;
  try {
    await navigator.clipboard.writeText(text);
    $("snippet-note").textContent = `Copied to the clipboard. ${note}`;
  } catch {
    $("snippet").select();  // clipboard refused (permissions): the text is selected for Ctrl+C
  }
}

// ---------------------------------------------------------------- running a task, live progress

function progressOf(frame) {
  // Both shapes: {message: {type: "progressGenerate", percentage, ...}} (Wiro's documented, flat) and
  // {message: {type: "progressGenerate", progressGenerate: {...}}} (nested, older Easel).
  const m = frame && frame.message;
  if (!m || typeof m !== "object" || Array.isArray(m)) return null;
  if (m.progressGenerate && typeof m.progressGenerate === "object") return m.progressGenerate;
  if (m.type === "progressGenerate" || "percentage" in m) return m;
  return null;
}

function previewOf(frame) {
  const m = frame && typeof frame.message === "object" && frame.message ? frame.message : {};
  const nested = m.progressGenerate && typeof m.progressGenerate === "object" ? m.progressGenerate : {};
  const p = frame.preview || frame.previewImage || m.preview || m.previewImage || nested.preview;
  if (!p || typeof p !== "string") return null;
  if (/^(data:|blob:|https?:\/\/)/.test(p)) return p;  // base64 JPEG otherwise ("/9j/..." is base64, not a path)
  return `data:${frame.previewType || m.previewType || "image/jpeg"};base64,${p}`;
}

function showProgress(info) {
  const pct = Math.max(0, Math.min(100, Number(info.percentage) || 0));
  $("progress").value = pct;
  $("pct").textContent = `${pct} %`;
  $("step").textContent = `${info.stepCurrent ?? "?"}/${info.stepTotal ?? "?"}`;
  $("speed").textContent = `${info.speed ?? "–"} ${info.speedType || "it/s"}`;
  $("eta").textContent = info.remainingTime || "–";
}

function setStatus(status, extra = "") {
  const words = {
    task_queue: "Queued", task_accept: "Accepted", task_preprocess_start: "Preparing", task_preprocess_end: "Prepared",
    task_assign: "Loading the model", task_start: "Started", task_output: "Generating", task_output_full: "Finishing",
    task_error_full: "Finishing", task_end: "Finishing", task_postprocess_start: "Saving outputs",
    task_postprocess_end: "Done", task_cancel: "Cancelled",
  };
  state.status = status;
  $("status").textContent = `${words[status] || status}${extra ? ` — ${extra}` : ""}`;
  $("status").dataset.status = status;
  $("cancel").disabled = status !== "task_queue";
  $("kill").disabled = !RUNNING.has(status);
}

async function runTool(ev) {
  ev.preventDefault();
  showError("form-error", null);
  $("run").disabled = true;
  try {
    const path = `/Run/${state.tool.slugowner}/${state.tool.slugproject}`;
    const data = await call(path, formValues());
    follow(data.taskid, data.socketaccesstoken);
    refreshHistory();
  } catch (e) {
    showError("form-error", e);
  } finally {
    $("run").disabled = false;
  }
}

function follow(taskid, token) {
  stopFollowing();
  state.task = { id: taskid, token };
  $("current").hidden = false;
  $("task-id").textContent = `#${taskid}`;
  $("outputs").replaceChildren();
  $("preview-box").hidden = true;
  showProgress({ percentage: 0, stepCurrent: 0, stepTotal: "?", speed: "–", remainingTime: "–" });
  setStatus("task_queue");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let ended = false;
  try {
    const ws = new WebSocket(`${scheme}//${location.host}${WS_PATH}?previews=1`);
    state.socket = ws;
    ws.onopen = () => ws.send(JSON.stringify({ type: "task_info", tasktoken: token, previews: true }));
    ws.onmessage = (msg) => {
      let frame;
      try { frame = JSON.parse(msg.data); } catch { return; }
      if (frame.result === false) return;
      const info = progressOf(frame);
      if (info) showProgress(info);
      const preview = previewOf(frame);
      if (preview) {
        $("preview").src = preview;
        $("preview-caption").textContent = `Latent preview, step ${info?.stepCurrent ?? "?"}`;
        $("preview-box").hidden = false;
      }
      if (frame.type && frame.type !== "task_error" && frame.type !== "task_output_full" && frame.type !== "task_error_full") setStatus(frame.type);
      if (TERMINAL.has(frame.type)) { ended = true; finish(taskid); }
    };
    ws.onclose = () => { if (!ended && state.task?.id === taskid) pollUntilEnd(taskid); };
  } catch {
    pollUntilEnd(taskid);
  }
}

function stopFollowing() {
  if (state.socket) { state.socket.onclose = null; try { state.socket.close(); } catch { /* closed */ } }
  state.socket = null;
  if (state.poll) clearTimeout(state.poll);
  state.poll = null;
}

function pollUntilEnd(taskid) {  // the socket is gone (a proxy without WebSocket support): Task/Detail
  const tick = async () => {
    if (state.task?.id !== taskid) return;
    try {
      const task = (await call("/Task/Detail", { taskid })).tasklist[0];
      if (task.progress && Object.keys(task.progress).length) showProgress(task.progress);
      setStatus(task.status);
      if (TERMINAL.has(task.status)) { finish(taskid); return; }
    } catch (e) { showError("form-error", e); }
    state.poll = setTimeout(tick, 1000);
  };
  tick();
}

async function finish(taskid) {
  let task;
  try { task = (await call("/Task/Detail", { taskid })).tasklist[0]; } catch (e) { showError("form-error", e); return; }
  if (state.task?.id !== taskid) return;
  const failed = task.status === "task_postprocess_end" && task.pexit !== "0";
  // Wiro shows pexit "0" for both; a killed task had been accepted by a worker, a cancelled one not
  const killed = task.status === "task_cancel" && (task.accepttime || "0") !== "0";
  setStatus(task.status);
  if (failed) {
    $("status").textContent = `Failed: ${(task.debugerror || "").trim().split("\n").pop()}`;
    $("status").dataset.status = "failed";
  } else if (task.status === "task_cancel") {
    $("status").textContent = killed ? "Killed while running" : "Cancelled while queued";
  }
  if (task.status !== "task_postprocess_end" || failed) $("eta").textContent = "–";
  if (task.status === "task_postprocess_end" && !failed) showProgress({ ...(task.progress || {}), percentage: 100, remainingTime: "0s" });
  $("outputs").replaceChildren(...task.outputs.map((o, i) => outputFigure(o, i)));
  $("cancel").disabled = true;
  $("kill").disabled = true;
  refreshHistory();
}

function localUrl(url) {  // outputs are served by this server: use this origin (works behind a proxy too)
  try { const u = new URL(url, location.href); return u.pathname + u.search; } catch { return url; }
}

function outputFigure(o, i) {
  const details = el("details", { class: "png-info" }, el("summary", { text: "PNG parameters" }));
  const pre = el("pre", { text: "Reading…" });
  details.append(pre);
  const img = el("img", { src: localUrl(o.url), alt: `Output ${i + 1}: ${o.name}`, loading: "lazy" });
  const fig = el("figure", { class: "output" }, el("a", { href: localUrl(o.url), target: "_blank", rel: "noopener" }, img),
    el("figcaption", {}, el("span", { text: `${o.name} · ${Math.round(Number(o.size) / 1024)} KiB` }), details));
  pngText(localUrl(o.url)).then((chunks) => {
    const text = chunks.parameters || Object.entries(chunks).map(([k, v]) => `${k}: ${v}`).join("\n");
    pre.textContent = text || "(no parameters in this file)";
    fig.dataset.parameters = chunks.parameters || "";
  }).catch(() => { pre.textContent = "(could not read the file)"; });
  return fig;
}

// PNG tEXt / iTXt chunks (the generation parameters written by the tools), read in the browser.
async function pngText(url) {
  const buf = new Uint8Array(await (await fetch(url)).arrayBuffer());
  const view = new DataView(buf.buffer);
  const latin1 = new TextDecoder("latin1"), utf8 = new TextDecoder("utf-8");
  const out = {};
  let pos = 8;
  while (pos + 8 <= buf.length) {
    const len = view.getUint32(pos);
    const type = latin1.decode(buf.subarray(pos + 4, pos + 8));
    const data = buf.subarray(pos + 8, pos + 8 + len);
    if (type === "tEXt") {
      const z = data.indexOf(0);
      out[latin1.decode(data.subarray(0, z))] = latin1.decode(data.subarray(z + 1));
    } else if (type === "iTXt") {
      const z = data.indexOf(0);
      if (data[z + 1] === 0) {  // uncompressed
        let p = z + 3;
        p = data.indexOf(0, p) + 1;  // language tag
        p = data.indexOf(0, p) + 1;  // translated keyword
        out[latin1.decode(data.subarray(0, z))] = utf8.decode(data.subarray(p));
      }
    } else if (type === "IEND") {
      break;
    }
    pos += 12 + len;
  }
  return out;
}

async function killOrCancel(which) {
  if (!state.task) return;
  showError("form-error", null);
  try {
    await call(which === "kill" ? "/Task/Kill" : "/Task/Cancel", { taskid: state.task.id });
  } catch (e) { showError("form-error", e); }
}

// ---------------------------------------------------------------- history, compare, delete

async function refreshHistory() {
  let data;
  try { data = await call("/Task/List", { limit: 24 }); } catch (e) { showError("form-error", e); return; }
  const list = $("history-list");
  state.history = data.tasklist;
  state.selected = state.selected.filter((id) => data.tasklist.some((t) => t.id === id));
  list.replaceChildren(...data.tasklist.map(historyCard));
  updateCompareButton();
}

function historyCard(t) {
  const first = t.outputs[0];
  const tool = `${t.modelslugowner}/${t.modelslugproject}`;
  const outcome = t.status === "task_cancel" ? ((t.accepttime || "0") !== "0" ? "killed" : "cancelled")
    : t.status === "task_postprocess_end" ? (t.pexit === "0" ? "done" : "failed") : t.status === "task_queue" ? "queued" : "running";
  const when = new Date(Number(t.createtime) * 1000).toLocaleString();
  const box = el("input", { type: "checkbox", id: `cmp-${t.id}`, checked: state.selected.includes(t.id), disabled: !first,
    onchange: (ev) => toggleCompare(t.id, ev.target.checked) });
  const actions = el("div", { class: "buttons small" });
  if (t.status === "task_queue") actions.append(el("button", { type: "button", class: "secondary", text: "Cancel", onclick: () => call("/Task/Cancel", { taskid: t.id }).then(refreshHistory, (e) => showError("form-error", e)) }));
  if (RUNNING.has(t.status)) actions.append(el("button", { type: "button", class: "danger", text: "Kill", onclick: () => call("/Task/Kill", { taskid: t.id }).then(refreshHistory, (e) => showError("form-error", e)) }));
  if (!TERMINAL.has(t.status)) actions.append(el("button", { type: "button", class: "secondary", text: "Follow", onclick: () => follow(t.id, t.socketaccesstoken) }));
  if (TERMINAL.has(t.status) && first) actions.append(el("button", { type: "button", class: "secondary", text: "Show", onclick: () => { follow(t.id, t.socketaccesstoken); } }));
  if (TERMINAL.has(t.status)) actions.append(el("button", { type: "button", class: "danger", text: "Delete files",
    "aria-label": `Delete the inputs and outputs of task ${t.id}`, onclick: () => deleteTask(t.id) }));
  return el("li", { class: "card", "data-task": t.id, "data-status": outcome },
    first ? el("img", { src: localUrl(first.url), alt: `Task ${t.id}, first output`, loading: "lazy" })
      : el("div", { class: "noimg", text: outcome }),
    el("div", { class: "meta" },
      el("strong", { text: `#${t.id} · ${outcome}` }),
      el("span", { class: "help", text: `${tool} · ${t.outputs.length} image(s) · ${when}` }),
      el("span", { class: "help prompt", text: String(t.parameters?.prompt || "") }),
      el("div", { class: "check" }, box, el("label", { for: `cmp-${t.id}`, text: "Compare" })),
      actions));
}

function toggleCompare(id, on) {
  state.selected = state.selected.filter((x) => x !== id);
  if (on) state.selected.push(id);
  while (state.selected.length > 2) {
    const dropped = state.selected.shift();
    const box = $(`cmp-${dropped}`);
    if (box) box.checked = false;
  }
  updateCompareButton();
}

function updateCompareButton() {
  const b = $("compare");
  b.textContent = `Compare selected (${state.selected.length}/2)`;
  b.disabled = state.selected.length !== 2;
}

function compare() {
  const tasks = state.selected.map((id) => state.history.find((t) => t.id === id)).filter(Boolean);
  if (tasks.length !== 2) return;
  const keys = [...new Set(tasks.flatMap((t) => Object.keys(t.parameters || {})))].sort();
  const view = $("compare-view");
  const cols = tasks.map((t) => el("figure", { class: "output" },
    el("img", { src: localUrl(t.outputs[0].url), alt: `Task ${t.id}, first output` }),
    el("figcaption", { text: `#${t.id} · ${t.elapsedseconds.replace(/(\.\d)\d+$/, "$1")} s` })));
  const table = el("table", {}, el("caption", { text: "Parameters (differences highlighted)" }),
    el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Parameter" }),
      ...tasks.map((t) => el("th", { scope: "col", text: `#${t.id}` })))));
  const body = el("tbody");
  for (const k of keys) {
    const vals = tasks.map((t) => JSON.stringify(t.parameters?.[k] ?? null));
    body.append(el("tr", { class: vals[0] !== vals[1] ? "diff" : "" }, el("th", { scope: "row", text: k }),
      ...vals.map((v) => el("td", { text: v }))));
  }
  table.append(body);
  view.replaceChildren(el("h3", { text: `Comparing #${tasks[0].id} and #${tasks[1].id}` }),
    el("div", { class: "side-by-side" }, ...cols), table,
    el("button", { type: "button", class: "secondary", text: "Close comparison", onclick: () => { view.hidden = true; } }));
  view.hidden = false;
  view.scrollIntoView({ block: "nearest" });
}

async function deleteTask(id) {
  showError("form-error", null);
  try {
    await call("/Task/InputOutputDelete", { taskid: id });
    state.selected = state.selected.filter((x) => x !== id);
    await refreshHistory();
  } catch (e) { showError("form-error", e); }
}

// ---------------------------------------------------------------- start

async function useCredentials(ev) {
  ev?.preventDefault();
  const key = $("apikey").value.trim(), secret = $("apisecret").value.trim();
  if (!key) { $("auth-state").textContent = "Paste an API key first."; return; }
  if (secret && !(window.crypto && crypto.subtle)) {
    $("auth-state").textContent = "This page needs a secure context (https:// or http://127.0.0.1 / localhost) to sign requests.";
    return;
  }
  state.creds = { key, secret };
  sessionStorage.setItem(STORE_KEY, JSON.stringify(state.creds));
  $("auth-state").textContent = "Checking…";
  try {
    await loadTools();
    $("auth-state").textContent = `Signed in with key ${key.slice(0, 4)}…${key.slice(-4)}${secret ? " (signature)" : " (API key only)"}.`;
  } catch (e) {
    $("auth-state").textContent = `Not accepted: ${e.message}`;
  }
}

function forget() {
  sessionStorage.removeItem(STORE_KEY);
  state.creds = null;
  $("apikey").value = "";
  $("apisecret").value = "";
  $("auth-state").textContent = "Forgotten.";
  for (const id of ["tool", "current", "history"]) $(id).hidden = true;
}

function start() {
  $("auth-form").addEventListener("submit", useCredentials);
  $("auth-forget").addEventListener("click", forget);
  $("tool-select").addEventListener("change", (ev) => loadTool(ev.target.value).catch((e) => showError("form-error", e)));
  $("tool-form").addEventListener("submit", runTool);
  $("cancel").addEventListener("click", () => killOrCancel("cancel"));
  $("kill").addEventListener("click", () => killOrCancel("kill"));
  $("copy-curl").addEventListener("click", () => copyCurl().catch((e) => showError("form-error", e)));
  $("copy-python").addEventListener("click", () => copyPython().catch((e) => showError("form-error", e)));
  $("history-refresh").addEventListener("click", refreshHistory);
  $("compare").addEventListener("click", compare);
  window.addEventListener("popstate", () => {
    const m = location.pathname.match(/^\/playground\/([^/]+)\/([^/]+)\/?$/);
    if (m && state.creds) {
      const name = `${decodeURIComponent(m[1])}/${decodeURIComponent(m[2])}`;
      $("tool-select").value = name;
      loadTool(name, false).catch((e) => showError("form-error", e));
    }
  });
  const saved = loadCreds();
  if (saved && saved.key) {
    $("apikey").value = saved.key;
    $("apisecret").value = saved.secret || "";
    useCredentials();
  }
  document.body.dataset.ready = "1";
}

// For tests and the curious: the frame parsers and the signature, as the page uses them.
window.easelPlayground = { progressOf, previewOf, hmacHex };

start();
