// blockdiff playground: streams chat answers from /v1/chat/completions and animates the canvas
// from the `blockdiff_frame` chunks the server sends when asked with `blockdiff_frames`.
// No framework, no build step, nothing loaded from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];       // the conversation sent with each request: [{role, content}]
let modelName = null;
// Knob fields filled with the server's defaults until the user edits them; an empty field is left out
// of the request, so the server's default applies.
const DEFAULTED = [["steps", "max_denoising_steps"], ["entropy", "entropy_bound"], ["temperature", "temperature"]];
const edited = new Set();

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model").textContent = "model: " + modelName;
    // The knobs a request that leaves them out gets (the checkpoint's generation_config.json, else built-in).
    const d = body.data[0].blockdiff_sampling_defaults || {};
    for (const [id, knob] of DEFAULTED) {
      if (d[knob] != null && !edited.has(id)) $(id).value = d[knob];
    }
  } catch (e) {
    $("model").textContent = "model list unavailable: " + e.message;
  }
}

function addMessage(role, text, imageUrl) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "attached image";
    div.prepend(img);
  }
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// Control characters and whitespace made visible, so every position has something to show.
function visible(token) {
  if (token === "") return "∅";
  return token.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣")
              .replace(/[\u0000-\u001f\u007f]/g, "·");
}

function renderFrame(f) {
  const canvas = $("canvas");
  while (canvas.children.length < f.tokens.length) {
    const span = document.createElement("span");
    span.className = "pos";
    canvas.appendChild(span);
  }
  while (canvas.children.length > f.tokens.length) canvas.lastChild.remove();
  f.tokens.forEach((tok, i) => {
    const span = canvas.children[i];
    const c = Math.max(0, Math.min(1, f.max_prob[i]));
    span.textContent = visible(tok);
    span.style.backgroundColor = `hsl(215, 85%, ${Math.round(96 - 50 * c)}%)`;
    span.style.color = c > 0.6 ? "#fff" : "#1d2330";
    span.classList.toggle("accepted", !!f.accepted[i]);
    span.title = `id ${f.token_ids[i]} · max prob ${c.toFixed(3)}${f.accepted[i] ? " · accepted" : ""}`;
  });
  canvas.dataset.canvas = f.canvas;
  canvas.dataset.step = f.step;
  $("frame-info").textContent = `canvas ${f.canvas + 1} · step ${f.step} / ${f.max_steps}`;
}

function requestBody() {
  const num = (id) => Number($(id).value);
  const knob = (id) => ($(id).value.trim() === "" ? undefined : num(id));    // undefined: left out of the JSON
  return {
    model: modelName, messages: conversation, stream: true, stream_options: { include_usage: true },
    max_tokens: num("max-tokens"), temperature: knob("temperature"),
    max_denoising_steps: knob("steps"), entropy_bound: knob("entropy"), fixed_steps: $("fixed-steps").checked,
    blockdiff_frames: { max_fps: num("fps") },
  };
}

// Yields each parsed `data:` payload of an SSE response ("[DONE]" as a string).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        yield data === "[DONE]" ? data : JSON.parse(data);
      }
    }
  }
}

function showTimings(usage, t) {
  if (!t) return;
  const f = (x, d = 1) => (x == null ? "–" : x.toFixed(d));
  $("timings").textContent = `${usage.completion_tokens} tokens · ${t.canvases} canvases · ` +
    `${t.denoising_steps} steps · ${f(t.tokens_per_second)} tok/s end to end · ` +
    `${f(t.in_step_tokens_per_second)} tok/s in steps · first canvas ${f(t.time_to_first_token_s, 2)} s`;
}

// The attached image as a data URL (the server fetches nothing), or null.
function readImage() {
  const file = $("image").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read " + file.name));
    reader.readAsDataURL(file);
  });
}

function clearImage() {
  $("image").value = "";
  $("attach").classList.remove("has-image");
}

async function send(text) {
  if (!modelName) await loadModel();
  const imageUrl = await readImage().catch((e) => { addMessage("error", e.message); return null; });
  clearImage();
  const content = imageUrl ? [{ type: "image_url", image_url: { url: imageUrl } }, { type: "text", text: text }] : text;
  conversation.push({ role: "user", content: content });
  addMessage("user", text, imageUrl);
  const bubble = addMessage("assistant", "");
  $("committed").textContent = "";
  $("status").textContent = "streaming";
  $("send").disabled = true;
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(requestBody()) });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    }
    for await (const chunk of sseEvents(r)) {
      if (chunk === "[DONE]") break;
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.blockdiff_frame) { renderFrame(chunk.blockdiff_frame); continue; }
      if (chunk.usage) showTimings(chunk.usage, chunk.blockdiff_timings);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          bubble.textContent = answer;
          $("committed").textContent = answer;
        }
        if (choice.finish_reason) $("status").dataset.finish = choice.finish_reason;
      }
    }
    conversation.push({ role: "assistant", content: answer });
    $("status").textContent = "done (" + ($("status").dataset.finish || "?") + ")";
  } catch (e) {
    conversation.pop();
    bubble.remove();
    addMessage("error", e.message);
    $("status").textContent = "error";
  } finally {
    $("send").disabled = false;
  }
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || $("send").disabled) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
});
$("image").addEventListener("change", () => $("attach").classList.toggle("has-image", $("image").files.length > 0));
$("api-key").addEventListener("change", loadModel);
for (const [id] of DEFAULTED) $(id).addEventListener("input", () => edited.add(id));
loadModel();
