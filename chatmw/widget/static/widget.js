/*
 * chatmw web chat widget. Embed with one tag:
 *   <script src="https://chat.example.com/chat/widget.js" async></script>
 * Optional attributes on that tag: data-chatmw-endpoint (the chat base URL; by default the
 * script's own URL without "/widget.js"), data-chatmw-title, data-chatmw-greeting and
 * data-chatmw-color (a hex colour).
 *
 * Text from the visitor and the bot is always set with textContent, never parsed as HTML.
 * The visitor id, first touch, conversation and history live in localStorage; the last
 * touch of the browser session and the open state live in sessionStorage.
 */
(function () {
  "use strict";

  var script = document.currentScript;
  if (!script || window.__chatmwWidgetLoaded) {
    return;
  }
  window.__chatmwWidgetLoaded = true;

  var MAX_CHARS = 2000;
  var HISTORY_LIMIT = 100;
  // After this much idle time, the next message starts a new conversation.
  var CONVERSATION_IDLE_MS = 30 * 60 * 1000;
  var KEYS = {
    visitor: "chatmw:visitor",
    conversation: "chatmw:conversation",
    history: "chatmw:history",
    firstTouch: "chatmw:first_touch",
    lastTouch: "chatmw:last_touch",
    pending: "chatmw:pending",
    open: "chatmw:open",
    poll: "chatmw:poll"
  };
  // When responses carry poll_seconds (surveys run on the web channel), the widget polls for
  // this long after the visitor's last message, to fetch a survey prompt sent after the end.
  var POLL_WINDOW_MS = 60 * 60 * 1000;
  var UTM_FIELDS = ["source", "medium", "campaign", "term", "content"];
  var CLICK_IDS = ["gclid", "fbclid"];

  var endpoint = (script.getAttribute("data-chatmw-endpoint") ||
    script.src.replace(/\/widget\.js(\?.*)?$/, "")).replace(/\/$/, "");
  endpoint = new URL(endpoint, script.src || location.href).href.replace(/\/$/, "");
  var title = script.getAttribute("data-chatmw-title") || "Chat with us";
  var greeting = script.getAttribute("data-chatmw-greeting") || "";
  var color = script.getAttribute("data-chatmw-color") || "";

  // Storage that keeps working (in memory) when the browser blocks localStorage.
  function makeStore(kind) {
    var memory = {};
    var backend = null;
    try {
      backend = window[kind];
      backend.setItem("chatmw:probe", "1");
      backend.removeItem("chatmw:probe");
    } catch (error) {
      backend = null;
    }
    return {
      get: function (key) {
        var raw = backend ? backend.getItem(key) : memory[key];
        if (raw === null || raw === undefined) {
          return null;
        }
        try {
          return JSON.parse(raw);
        } catch (error) {
          return null;
        }
      },
      set: function (key, value) {
        var raw = JSON.stringify(value);
        try {
          if (backend) {
            backend.setItem(key, raw);
            return;
          }
        } catch (error) {
          // Quota exceeded: keep the value for this page only.
        }
        memory[key] = raw;
      },
      remove: function (key) {
        if (backend) {
          backend.removeItem(key);
        }
        delete memory[key];
      }
    };
  }

  var local = makeStore("localStorage");
  var session = makeStore("sessionStorage");

  function newId() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    var binary = "";
    for (var i = 0; i < bytes.length; i++) {
      binary += String.fromCharCode(bytes[i]);
    }
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  var ID_PATTERN = /^[A-Za-z0-9_-]{8,64}$/;

  function visitorId() {
    var id = local.get(KEYS.visitor);
    if (typeof id !== "string" || !ID_PATTERN.test(id)) {
      id = newId();
      local.set(KEYS.visitor, id);
    }
    return id;
  }

  // Attribution ------------------------------------------------------------------------

  // Read this page's campaign parameters, click ids and referrer. Returns null for a direct
  // visit or a navigation inside the site, because those must not replace a stored touch.
  function captureTouch() {
    var params = new URLSearchParams(location.search);
    var touch = {};
    var found = false;

    UTM_FIELDS.forEach(function (name) {
      var value = params.get("utm_" + name);
      if (value) {
        touch[name] = value;
        found = true;
      }
    });
    CLICK_IDS.forEach(function (name) {
      var value = params.get(name);
      if (value) {
        touch[name] = value;
        found = true;
      }
    });

    var referrer = document.referrer || "";
    var external = false;
    try {
      external = referrer !== "" && new URL(referrer).host !== location.host;
    } catch (error) {
      external = false;
    }
    if (!found && !external) {
      return null;
    }

    touch.referrer = referrer || null;
    touch.landing_url = location.href;
    touch.at = Date.now();
    return touch;
  }

  function updateAttribution() {
    var touch = captureTouch();
    if (touch === null) {
      return;
    }
    if (!local.get(KEYS.firstTouch)) {
      local.set(KEYS.firstTouch, touch);
    }
    session.set(KEYS.lastTouch, touch);
  }

  function attribution() {
    return { first: local.get(KEYS.firstTouch), last: session.get(KEYS.lastTouch) };
  }

  // Conversation and history -------------------------------------------------------------

  function currentConversation(create) {
    var record = local.get(KEYS.conversation);
    var fresh = record && typeof record.id === "string" && ID_PATTERN.test(record.id) &&
      Date.now() - record.last < CONVERSATION_IDLE_MS;
    if (fresh) {
      return record;
    }
    if (!create) {
      return null;
    }
    record = { id: newId(), last: Date.now() };
    local.set(KEYS.conversation, record);
    local.set(KEYS.history, { conversation_id: record.id, items: [] });
    return record;
  }

  function touchConversation(record) {
    record.last = Date.now();
    local.set(KEYS.conversation, record);
  }

  function loadHistory() {
    var conversation = currentConversation(false);
    var history = local.get(KEYS.history);
    if (!conversation || !history || history.conversation_id !== conversation.id ||
        !Array.isArray(history.items)) {
      return [];
    }
    return history.items;
  }

  function saveHistory(items) {
    var conversation = currentConversation(false);
    if (!conversation) {
      return;
    }
    local.set(KEYS.history, {
      conversation_id: conversation.id,
      items: items.slice(-HISTORY_LIMIT)
    });
  }

  // Network ----------------------------------------------------------------------------

  function postJson(path, body, keepalive) {
    return fetch(endpoint + path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
      keepalive: !!keepalive
    });
  }

  function recordEvent(kind) {
    var conversation = currentConversation(false);
    postJson("/events", {
      visitor_id: visitorId(),
      event_id: newId(),
      kind: kind,
      conversation_id: conversation ? conversation.id : null,
      page_url: location.href
    }, true).catch(function () {
      // Funnel events are best effort: a lost impression must not disturb the visitor.
    });
  }

  // Polls of the outbox: messages the server sends later, such as a survey prompt.
  var pollTimer = null;

  function notePoll(body) {
    var seconds = body && typeof body.poll_seconds === "number" ? body.poll_seconds : 0;
    if (seconds > 0) {
      local.set(KEYS.poll, { every_ms: seconds * 1000, until: Date.now() + POLL_WINDOW_MS });
    } else {
      local.remove(KEYS.poll);
    }
    schedulePoll();
  }

  function schedulePoll() {
    var state = local.get(KEYS.poll);
    if (pollTimer !== null) {
      clearTimeout(pollTimer);
      pollTimer = null;
    }
    if (!state || typeof state.every_ms !== "number" || !(state.until > Date.now())) {
      return;
    }
    pollTimer = setTimeout(pollOnce, Math.max(1000, state.every_ms));
  }

  function pollOnce() {
    pollTimer = null;
    if (document.hidden || busy) {
      schedulePoll();
      return;
    }
    postJson("/poll", { visitor_id: visitorId() })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (body) {
        (body && Array.isArray(body.replies) ? body.replies : []).forEach(function (reply) {
          addItem({ role: "bot", text: reply.text || "", buttons: reply.buttons || [] });
        });
      }, function () {
        // A failed poll is retried at the next interval.
      })
      .then(schedulePoll);
  }

  function failure(message, retryable) {
    var error = new Error(message);
    error.retryable = retryable;
    return error;
  }

  function readFailure(response, body) {
    var detail = body && typeof body.detail === "string" ? body.detail : "";
    if (response.status === 429) {
      var wait = response.headers.get("Retry-After") || "a few";
      return failure("You are sending messages too quickly. Try again in " + wait + " seconds.", true);
    }
    if (response.status === 413 || response.status === 422 || response.status === 400) {
      return failure("That message could not be sent: " + (detail || "it is not valid") + ".", false);
    }
    if (response.status === 403) {
      return failure("The chat is not available on this site.", false);
    }
    return failure(detail || "The assistant is not available right now.", true);
  }

  // Interface --------------------------------------------------------------------------

  function element(tag, attributes, text) {
    var node = document.createElement(tag);
    Object.keys(attributes || {}).forEach(function (name) {
      node.setAttribute(name, attributes[name]);
    });
    if (text !== undefined && text !== null) {
      node.textContent = text;
    }
    return node;
  }

  function chatIcon() {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "28");
    svg.setAttribute("height", "28");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    var path = document.createElementNS(ns, "path");
    path.setAttribute("d", "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4H4a2 2 0 0 1-2-2V6" +
      "a2 2 0 0 1 2-2z");
    path.setAttribute("fill", "currentColor");
    svg.appendChild(path);
    return svg;
  }

  var host = element("div", { id: "chatmw-widget", "data-chatmw": "" });
  host.style.display = "none";
  var root = host.attachShadow({ mode: "open" });
  var stylesheet = element("link", { rel: "stylesheet", href: endpoint + "/widget.css" });
  root.appendChild(stylesheet);
  if (/^#[0-9a-fA-F]{3,8}$/.test(color)) {
    host.style.setProperty("--chatmw-accent", color);
  }

  var container = element("div", { "class": "chatmw" });
  var launcher = element("button", {
    type: "button", "class": "launcher", "aria-label": "Open chat",
    "aria-expanded": "false", "aria-controls": "chatmw-panel"
  });
  launcher.appendChild(chatIcon());

  var panel = element("section", {
    id: "chatmw-panel", "class": "panel", role: "dialog", "aria-labelledby": "chatmw-title"
  });
  panel.hidden = true;
  var header = element("header", { "class": "header" });
  var heading = element("h2", { id: "chatmw-title" }, title);
  var closeButton = element("button", { type: "button", "class": "close", "aria-label": "Close chat" }, "\u00d7");
  header.appendChild(heading);
  header.appendChild(closeButton);

  var log = element("div", {
    "class": "log", role: "log", "aria-live": "polite", "aria-label": "Conversation", tabindex: "0"
  });
  var typing = element("div", { "class": "typing", role: "status" });
  var typingDots = element("span", { "class": "dots", "aria-hidden": "true" });
  typingDots.appendChild(element("span"));
  typingDots.appendChild(element("span"));
  typingDots.appendChild(element("span"));
  var typingText = element("span", { "class": "visually-hidden" }, "");
  typing.appendChild(typingDots);
  typing.appendChild(typingText);
  typing.hidden = true;

  var errorBox = element("div", { "class": "error", role: "alert" });
  var errorText = element("span", { "class": "error-text" });
  var retryButton = element("button", { type: "button", "class": "retry" }, "Retry");
  errorBox.appendChild(errorText);
  errorBox.appendChild(retryButton);
  errorBox.hidden = true;

  var form = element("form", { "class": "composer" });
  var label = element("label", { "for": "chatmw-input", "class": "visually-hidden" }, "Message");
  var input = element("input", {
    id: "chatmw-input", type: "text", autocomplete: "off", maxlength: String(MAX_CHARS),
    placeholder: "Type a message\u2026", enterkeyhint: "send"
  });
  var sendButton = element("button", { type: "submit", "class": "send", "aria-label": "Send message" }, "Send");
  form.appendChild(label);
  form.appendChild(input);
  form.appendChild(sendButton);

  panel.appendChild(header);
  panel.appendChild(log);
  panel.appendChild(typing);
  panel.appendChild(errorBox);
  panel.appendChild(form);
  container.appendChild(panel);
  container.appendChild(launcher);
  root.appendChild(container);

  var items = [];
  var busy = false;
  var pending = null;

  function scrollToEnd() {
    log.scrollTop = log.scrollHeight;
  }

  function renderItem(item, index) {
    var bubble = element("div", { "class": "message " + (item.role === "user" ? "user" : "bot") });
    var speaker = element("span", { "class": "visually-hidden" }, item.role === "user" ? "You: " : "Assistant: ");
    bubble.appendChild(speaker);
    if (item.text) {
      bubble.appendChild(element("span", { "class": "text" }, item.text));
    }
    log.appendChild(bubble);
    if (item.buttons && item.buttons.length) {
      log.appendChild(renderButtons(item, index));
    }
    scrollToEnd();
  }

  function renderButtons(item, index) {
    var group = element("div", { "class": "choices", role: "group", "aria-label": "Suggested replies" });
    item.buttons.forEach(function (button) {
      var choice = element("button", { type: "button", "class": "choice" }, button.title);
      choice.disabled = !!item.used;
      choice.addEventListener("click", function () {
        if (busy) {
          return;
        }
        items[index].used = true;
        saveHistory(items);
        Array.prototype.forEach.call(group.querySelectorAll("button"), function (node) {
          node.disabled = true;
        });
        send(button.payload, button.title);
      });
      group.appendChild(choice);
    });
    return group;
  }

  function resetTranscript() {
    items = [];
    while (log.firstChild) {
      log.removeChild(log.firstChild);
    }
    if (greeting) {
      renderItem({ role: "bot", text: greeting }, -1);
    }
  }

  function addItem(item) {
    items.push(item);
    renderItem(item, items.length - 1);
    saveHistory(items);
  }

  function setBusy(value) {
    busy = value;
    typing.hidden = !value;
    typingText.textContent = value ? "Assistant is typing" : "";
    sendButton.disabled = value;
    if (value) {
      scrollToEnd();
    }
  }

  function showError(message, retryable) {
    errorText.textContent = message;
    retryButton.hidden = !retryable;
    errorBox.hidden = false;
  }

  function hideError() {
    errorBox.hidden = true;
    errorText.textContent = "";
  }

  // The message being sent, or the last one that failed, kept across page loads so that the
  // visitor can retry it on the next page. A retry reuses the message id, so the endpoint
  // stores the message once.
  function setPending(message) {
    pending = message;
    var conversation = currentConversation(false);
    if (message && conversation) {
      local.set(KEYS.pending, { conversation_id: conversation.id, message: message });
    } else {
      local.remove(KEYS.pending);
    }
  }

  function restorePending() {
    var saved = local.get(KEYS.pending);
    var conversation = currentConversation(false);
    if (saved && conversation && saved.conversation_id === conversation.id && saved.message) {
      pending = saved.message;
      showError("Your last message was not sent.", true);
    }
  }

  function deliver(message) {
    var conversation = currentConversation(true);
    touchConversation(conversation);
    setPending(message);
    hideError();
    setBusy(true);
    var payload = {
      visitor_id: visitorId(),
      conversation_id: conversation.id,
      message_id: message.id,
      text: message.text,
      display: message.display || null,
      page_url: location.href,
      attribution: attribution()
    };
    return postJson("/messages", payload)
      .then(function (response) {
        return response.json().catch(function () {
          return null;
        }).then(function (body) {
          if (!response.ok) {
            throw readFailure(response, body);
          }
          return body;
        });
      }, function () {
        throw failure("The chat could not be reached. Check your connection and retry.", true);
      })
      .then(function (body) {
        setPending(null);
        setBusy(false);
        (body && Array.isArray(body.replies) ? body.replies : []).forEach(function (reply) {
          addItem({ role: "bot", text: reply.text || "", buttons: reply.buttons || [] });
        });
        notePoll(body);
      })
      .catch(function (error) {
        setBusy(false);
        showError(error.message, error.retryable !== false);
        if (error.retryable === false) {
          setPending(null);
        }
      });
  }

  function send(text, display) {
    if (busy) {
      return false;
    }
    if (!text || !text.trim()) {
      return false;
    }
    if (text.length > MAX_CHARS) {
      showError("That message is too long: the limit is " + MAX_CHARS + " characters.", false);
      return false;
    }
    if (!currentConversation(false)) {
      // The conversation went idle while this page stayed open: the next one starts empty.
      resetTranscript();
    }
    currentConversation(true);
    var message = { id: newId(), text: text, display: display };
    addItem({ role: "user", text: display || text });
    deliver(message);
    return true;
  }

  function openPanel(byVisitor) {
    if (!panel.hidden) {
      return;
    }
    panel.hidden = false;
    launcher.setAttribute("aria-expanded", "true");
    launcher.setAttribute("aria-label", "Close chat");
    session.set(KEYS.open, true);
    scrollToEnd();
    if (byVisitor) {
      input.focus();
      recordEvent("open");
    }
  }

  function closePanel() {
    if (panel.hidden) {
      return;
    }
    panel.hidden = true;
    launcher.setAttribute("aria-expanded", "false");
    launcher.setAttribute("aria-label", "Open chat");
    session.set(KEYS.open, false);
    launcher.focus();
  }

  launcher.addEventListener("click", function () {
    if (panel.hidden) {
      openPanel(true);
    } else {
      closePanel();
    }
  });
  closeButton.addEventListener("click", closePanel);
  container.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && !panel.hidden) {
      event.preventDefault();
      closePanel();
    }
  });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (send(input.value)) {
      input.value = "";
    }
    input.focus();
  });
  retryButton.addEventListener("click", function () {
    if (pending && !busy) {
      deliver(pending);
      input.focus();
    }
  });

  function start() {
    updateAttribution();
    resetTranscript();
    items = loadHistory().slice();
    items.forEach(renderItem);
    restorePending();
    if (session.get(KEYS.open)) {
      openPanel(false);
    }
    document.body.appendChild(host);
    recordEvent("impression");
    schedulePoll();
  }

  function reveal() {
    host.style.display = "";
  }

  stylesheet.addEventListener("load", reveal);
  stylesheet.addEventListener("error", reveal);
  if (document.body) {
    start();
  } else {
    document.addEventListener("DOMContentLoaded", start);
  }
})();
