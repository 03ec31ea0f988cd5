// Playground: stream a chat completion from the broker with one of the user's keys.
// The key lives in this script's memory only: never in the page's HTML or in storage.
"use strict";

(function () {
  const form = document.getElementById("chat");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const baseUrl = form.dataset.baseUrl;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const keyInput = $("api-key");
  const log = $("log");
  const status = $("status");
  const messages = [];
  let controller = null;

  function say(text) { status.textContent = text; }

  function bubble(role, text) {
    const wrap = document.createElement("div");
    wrap.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "body";
    if (role === "assistant") body.appendChild(window.renderMarkdown(text));
    else body.textContent = text;
    wrap.append(who, body);
    log.appendChild(wrap);
    log.scrollTop = log.scrollHeight;
    return body;
  }

  $("get-key").addEventListener("click", async () => {
    say("getting a playground key…");
    try {
      const r = await fetch("/portal/api/playground-key", {
        method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin",
      });
      const data = await r.json();
      if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
      keyInput.value = data.key;
      $("key-status").textContent = "Using your key “" + data.name + "” (new secret, in memory only).";
      say("");
    } catch (err) {
      say("could not get a key: " + err.message);
    }
  });

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  // ``reply.text`` is the raw answer so far, also when the stream is stopped or fails.
  async function stream(body, target, reply) {
    let pending = false;
    const paint = () => {
      pending = false;
      target.replaceChildren(window.renderMarkdown(reply.text));
      log.scrollTop = log.scrollHeight;
    };
    const response = await fetch(baseUrl + "/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + keyInput.value.trim() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).error.message || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          let chunk;
          try { chunk = JSON.parse(data); } catch (e) { continue; }
          if (chunk.error) throw new Error(chunk.error.message || "error from the broker");
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            reply.text += delta.content;
            if (!pending) { pending = true; requestAnimationFrame(paint); }
          }
        }
      }
    }
    paint();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = $("prompt").value;
    if (!prompt.trim() || controller) return;
    if (!keyInput.value.trim()) { say("paste one of your keys or get a playground key first"); return; }
    const model = $("model").value;
    if (!model) { say("no model is online"); return; }
    messages.push({ role: "user", content: prompt });
    bubble("user", prompt);
    $("prompt").value = "";
    const target = bubble("assistant", "");
    controller = new AbortController();
    setBusy(true);
    say("streaming…");
    const reply = { text: "" };
    try {
      await stream({ model, messages, stream: true }, target, reply);
      say("done");
    } catch (err) {
      if (err.name === "AbortError") {
        say("stopped");
      } else {
        target.parentElement.classList.add("error");
        target.textContent = err.message;
        say("failed");
      }
    } finally {
      messages.push({ role: "assistant", content: reply.text });
      controller = null;
      setBusy(false);
    }
  });

  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });

  $("copy-json").addEventListener("click", async (event) => {
    const json = JSON.stringify({ model: $("model").value, messages }, null, 2);
    try {
      await window.remotellmCopy(json);
      window.remotellmFlash(event.target, "copied");
    } catch (err) {
      window.remotellmFlash(event.target, "copy failed");
    }
  });

  $("clear").addEventListener("click", () => { messages.length = 0; log.replaceChildren(); say(""); });

  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
})();
