// The team chat: conversations kept by the broker (docs/chat.md). No framework, no build
// step: this file talks to /portal/api/conversations and renders with DOM nodes only
// (textContent and markdown.js, which never parses HTML).
"use strict";

(function () {
  const app = document.getElementById("chat-app");
  if (!app) return;
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const API = "/portal/api/conversations";
  const UNDO_MS = 8000;
  let current = app.dataset.conversation || "";
  let controller = null;
  let pollTimer = null;
  let toastTimer = null;
  let undoId = "";

  function say(text) { $("status").textContent = text; }

  async function call(path, body) {
    const init = body === undefined ? { credentials: "same-origin" } : {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    };
    const response = await fetch(path, init);
    let data = {};
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
    return data;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function money(cost, currency) {
    return cost === null || cost === undefined ? "" : cost.toFixed(6) + (currency ? " " + currency : "");
  }

  function meta(m) {
    const parts = [];
    if (m.role === "assistant") {
      if (m.model) parts.push(m.model);
      if (m.tokens_in !== null && m.tokens_in !== undefined) parts.push(m.tokens_in + " in");
      if (m.tokens_out !== null && m.tokens_out !== undefined) parts.push((m.estimated ? "~" : "") + m.tokens_out + " out");
      const cost = money(m.cost, m.currency);
      if (cost) parts.push(cost);
    }
    if (m.state === "stopped") parts.push("stopped");
    if (m.state === "failed") parts.push("failed" + (m.error ? ": " + m.error : ""));
    if (m.state === "streaming") parts.push("writing…");
    return parts.join(" · ");
  }

  // ---- the list ----------------------------------------------------------------------

  async function loadList() {
    const params = new URLSearchParams();
    const q = $("search").value.trim();
    if (q) params.set("q", q);
    if (app.dataset.day) params.set("day", app.dataset.day);
    let data;
    try { data = await call(API + "?" + params.toString()); } catch (err) { say(err.message); return; }
    const list = $("conversations");
    list.replaceChildren();
    for (const c of data.conversations) {
      const li = el("li");
      const a = el("a", "conv-link", c.title);
      a.href = "/portal/chat/" + encodeURIComponent(c.id);
      a.dataset.id = c.id;
      if (c.id === current) a.setAttribute("aria-current", "page");
      const when = el("span", "dim small conv-when", new Date(c.updated * 1000).toLocaleString());
      li.append(a, when);
      list.appendChild(li);
    }
    $("list-empty").hidden = data.conversations.length > 0;
    if (app.dataset.day) {
      const all = el("a", "", "show all");
      all.href = "/portal/chat";
      $("day-filter").replaceChildren("used on " + app.dataset.day + " (UTC) · ", all);
      $("day-filter").hidden = false;
    }
  }

  $("conversations").addEventListener("click", (event) => {
    const a = event.target.closest("a.conv-link");
    if (!a || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    go(a.dataset.id);
  });

  let searchTimer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(loadList, 200);
  });

  // ---- one conversation ----------------------------------------------------------------

  function go(id) {
    history.pushState({ id }, "", id ? "/portal/chat/" + encodeURIComponent(id) : "/portal/chat");
    closeList();
    open(id);
  }

  window.addEventListener("popstate", () => {
    const m = /^\/portal\/chat\/([A-Za-z0-9_-]+)$/.exec(location.pathname);
    open(m ? m[1] : "");
  });

  function bubble(m) {
    const wrap = el("article", "msg " + m.role + (m.state === "failed" ? " error" : ""));
    wrap.dataset.id = m.id;
    const head = el("div", "who");
    head.append(el("span", "role", m.role), el("span", "meta", meta(m)));
    const body = el("div", "body");
    if (m.role === "assistant") body.appendChild(window.renderMarkdown(m.content));
    else body.textContent = m.content;
    const actions = el("div", "msg-actions");
    const branch = el("button", "small branch", "branch from here");
    branch.type = "button";
    branch.dataset.id = m.id;
    actions.appendChild(branch);
    wrap.append(head, body, actions);
    return wrap;
  }

  function showConversation(data) {
    const c = data.conversation;
    $("conv-title").textContent = c.title;
    document.title = c.title + " · chat · RemoteLLM";
    const t = data.totals;
    const cost = money(t.cost, t.currency);
    $("totals").textContent = t.tokens_in + " in · " + t.tokens_out + " out" + (cost ? " · " + cost : "");
    $("conv-actions").hidden = false;
    $("export-json").href = API + "/" + encodeURIComponent(c.id) + "/export?format=json";
    $("export-md").href = API + "/" + encodeURIComponent(c.id) + "/export?format=md";
    const log = $("messages");
    log.replaceChildren(...data.messages.map(bubble));
    log.scrollTop = log.scrollHeight;
    const last = data.messages[data.messages.length - 1];
    if (last && last.model && [...$("model").options].some((o) => o.value === last.model)) {
      $("model").value = last.model;
    }
  }

  function blank() {
    $("conv-title").textContent = "new conversation";
    document.title = "Chat · RemoteLLM";
    $("totals").textContent = "";
    $("conv-actions").hidden = true;
    $("messages").replaceChildren(el("p", "dim empty", "Say something to start a conversation. It is kept for you on the broker."));
  }

  async function open(id) {
    clearTimeout(pollTimer);
    current = id;
    hideRename();
    if (!id) { blank(); loadList(); return; }
    let data;
    try { data = await call(API + "/" + encodeURIComponent(id)); } catch (err) {
      blank();
      say(err.message);
      return;
    }
    if (current !== id) return;
    showConversation(data);
    loadList();
    // A reply this broker is still writing (another tab or device): follow it.
    if (data.busy && !controller) pollTimer = setTimeout(() => open(id), 1000);
  }

  // ---- sending -----------------------------------------------------------------------

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    if (busy) $("stop").focus({ preventScroll: true });
  }

  async function readReply(response, target, reply) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let painted = false;
    const paint = () => {
      painted = false;
      target.replaceChildren(window.renderMarkdown(reply.text));
      $("messages").scrollTop = $("messages").scrollHeight;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 1);
        if (!line) continue;
        const event = JSON.parse(line);
        if (event.delta) {
          reply.text += event.delta;
          if (!painted) { painted = true; requestAnimationFrame(paint); }
        } else if (event.end) {
          reply.end = event.end;
        }
      }
    }
    paint();
  }

  async function ensureConversation(content) {
    if (current) return current;
    const title = content.replace(/\s+/g, " ").trim().slice(0, 60);
    const data = await call(API, { model: $("model").value, title });
    current = data.conversation.id;
    history.pushState({ id: current }, "", "/portal/chat/" + encodeURIComponent(current));
    $("conv-title").textContent = data.conversation.title;
    return current;
  }

  async function send(content) {
    const model = $("model").value;
    if (!model) { say("no model is online"); return; }
    const id = await ensureConversation(content);
    const log = $("messages");
    log.querySelectorAll(".empty").forEach((n) => n.remove());
    const mine = bubble({ id: 0, role: "user", content, state: "done" });
    const theirs = bubble({ id: 0, role: "assistant", content: "", model, state: "streaming" });
    log.append(mine, theirs);
    log.scrollTop = log.scrollHeight;
    controller = new AbortController();
    setBusy(true);
    say("writing…");
    const reply = { text: "", end: null };
    try {
      const response = await fetch(API + "/" + encodeURIComponent(id) + "/messages", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ content, model }),
        signal: controller.signal,
      });
      if (!response.ok) {
        let message = "HTTP " + response.status;
        try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
        throw new Error(message);
      }
      $("prompt").value = "";
      await readReply(response, theirs.querySelector(".body"), reply);
      say(reply.end ? reply.end.state : "stopped");
    } catch (err) {
      say(err.name === "AbortError" ? "stopped" : err.message);
    } finally {
      controller = null;
      setBusy(false);
      if (current === id) await open(id);  // what the broker saved, with tokens and cost
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const content = $("prompt").value;
    if (!content.trim() || controller) return;
    send(content).catch((err) => say(err.message));
  });

  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("composer").requestSubmit();
  });

  // Stop asks the broker, whose reply then ends with what arrived marked stopped; the
  // abort (at once if asking fails, else after a grace) ends it too, like a reload would.
  $("stop").addEventListener("click", async () => {
    const running = controller;
    if (!running || !current) return;
    say("stopping…");
    try {
      await call(API + "/" + encodeURIComponent(current) + "/stop", {});
      setTimeout(() => { if (controller === running) running.abort(); }, 3000);
    } catch (e) {
      running.abort();
    }
  });

  // ---- conversation actions --------------------------------------------------------------

  $("new-chat").addEventListener("click", () => { go(""); $("prompt").focus(); });

  $("messages").addEventListener("click", async (event) => {
    const button = event.target.closest("button.branch");
    if (!button || !current || controller) return;
    const message = Number(button.dataset.id);
    if (!message) return;
    try {
      const data = await call(API + "/" + encodeURIComponent(current) + "/clone", { message });
      go(data.conversation.id);
      say("branched");
    } catch (err) { say(err.message); }
  });

  function hideRename() { $("rename-form").hidden = true; }

  $("rename").addEventListener("click", () => {
    $("rename-form").hidden = false;
    $("rename-input").value = $("conv-title").textContent;
    $("rename-input").focus();
    $("rename-input").select();
  });
  $("rename-cancel").addEventListener("click", hideRename);
  $("rename-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const data = await call(API + "/" + encodeURIComponent(current) + "/rename", { title: $("rename-input").value });
      $("conv-title").textContent = data.conversation.title;
      hideRename();
      loadList();
    } catch (err) { say(err.message); }
  });

  function toast(text, id) {
    undoId = id;
    $("toast-text").textContent = text;
    $("toast").hidden = false;
    $("undo").focus({ preventScroll: true });
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { $("toast").hidden = true; undoId = ""; }, UNDO_MS);
  }

  $("delete").addEventListener("click", async () => {
    if (!current) return;
    const id = current;
    const title = $("conv-title").textContent;
    try {
      await call(API + "/" + encodeURIComponent(id) + "/delete", {});
      go("");
      toast("Deleted “" + title + "”.", id);
    } catch (err) { say(err.message); }
  });

  $("undo").addEventListener("click", async () => {
    if (!undoId) return;
    const id = undoId;
    $("toast").hidden = true;
    clearTimeout(toastTimer);
    try {
      await call(API + "/" + encodeURIComponent(id) + "/restore", {});
      go(id);
      say("restored");
    } catch (err) { say(err.message); }
  });

  $("delete-all").addEventListener("click", async () => {
    if (!window.confirm("Delete every one of your conversations? This cannot be undone.")) return;
    try {
      const data = await call(API + "/delete-all", { confirm: "delete all" });
      go("");
      say("deleted " + data.deleted + " conversations");
    } catch (err) { say(err.message); }
  });

  // ---- phone layout: the list as a panel, the input above the on-screen keyboard ----------

  function closeList() {
    document.body.classList.remove("list-open");
    $("show-list").setAttribute("aria-expanded", "false");
  }
  $("show-list").addEventListener("click", () => {
    document.body.classList.add("list-open");
    $("show-list").setAttribute("aria-expanded", "true");
    $("search").focus();
  });
  $("hide-list").addEventListener("click", () => { closeList(); $("show-list").focus(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { closeList(); hideRename(); }
  });

  // When the keyboard opens the log shrinks: keep its end in view if it was there.
  let atEnd = true;
  const log = $("messages");
  log.addEventListener("scroll", () => { atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40; });
  const keepEnd = () => { if (atEnd) log.scrollTop = log.scrollHeight; };
  window.addEventListener("resize", keepEnd);
  if (window.visualViewport) {
    const fit = () => {
      document.documentElement.style.setProperty("--vvh", window.visualViewport.height + "px");
      keepEnd();
    };
    window.visualViewport.addEventListener("resize", fit);
    fit();
  }

  // From the usage page's day link: the list of that day's conversations is what to show.
  if (app.dataset.day && !current) {
    document.body.classList.add("list-open");
    $("show-list").setAttribute("aria-expanded", "true");
  }
  open(current);
})();
