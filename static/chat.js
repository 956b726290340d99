/* temma chat: receives messages over Server-Sent Events, sends them with a POST.
 * Every message is rendered with textContent: a <script> in a message is shown as text. */
"use strict";

const list = document.getElementById("liste");
const form = document.getElementById("send");
const fromInput = document.getElementById("from");
const textInput = document.getElementById("text");
const button = document.getElementById("button");
const errorLine = document.getElementById("error");
const statusLine = document.getElementById("status");

fromInput.value = localStorage.getItem("temma.from") || "";
if (fromInput.value) textInput.focus(); else fromInput.focus();

function setStatus(state, text) {
  statusLine.className = "status " + state;
  statusLine.textContent = text;
}

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = !message;
}

function formatTime(ms) {
  const date = typeof ms === "number" ? new Date(ms) : new Date();
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function scrollToEnd() {
  list.scrollTop = list.scrollHeight;
}

function addNotice(text) {
  const item = document.createElement("li");
  item.className = "notice";
  item.textContent = text;
  list.appendChild(item);
  scrollToEnd();
}

const seen = new Set();

function addMessage(message) {
  if (message.id !== undefined) {
    if (seen.has(message.id)) return;
    seen.add(message.id);
  }
  const item = document.createElement("li");
  if (message.id !== undefined) item.dataset.id = message.id;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = formatTime(message.time);
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = String(message.from ?? "");
  const text = document.createElement("span");
  text.className = "text";
  if (message.kind === "action") {
    item.classList.add("action");
    from.textContent = "* " + from.textContent;
  }
  text.textContent = String(message.text ?? "");
  item.append(time, from, text);
  list.appendChild(item);
  scrollToEnd();
}

/* *** MESSAGE RECEPTION BY SSE *** */
const events = new EventSource("/event/fetch");
events.addEventListener("open", () => setStatus("open", "connected"));
events.addEventListener("error", () => {
  setStatus(events.readyState === EventSource.CLOSED ? "closed" : "connecting",
            events.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
});
events.addEventListener("msg", (event) => {
  try {
    addMessage(JSON.parse(event.data));
  } catch (error) {
    console.warn("unreadable message", event.data, error);
  }
});
events.addEventListener("reset", (event) => {
  let reason = "some messages could not be recovered";
  try { reason = JSON.parse(event.data).reason || reason; } catch (_) { /* keep default */ }
  addNotice("— " + reason + " —");
});

/* *** MESSAGE SENDING *** */
/* Each message gets an idempotency key. A 503 (or a network error) may come back for a
 * message the server publishes anyway a moment later: the page retries with the same key,
 * and the server publishes a key once, so a retry never posts twice. */
const RETRY_DELAYS_MS = [500, 1500];
let outgoing = null; // { from, text, key } until the server confirms it

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

async function post(message) {
  return fetch("/message/broadcast", {
    method: "POST",
    headers: { "Idempotency-Key": message.key },
    body: new URLSearchParams({ from: message.from, text: message.text }),
  });
}

async function sendMessage() {
  const from = fromInput.value.trim();
  const text = textInput.value.trim();
  if (!from) { showError("Enter your name first."); fromInput.focus(); return; }
  if (!text) { textInput.focus(); return; }
  localStorage.setItem("temma.from", from);
  // Sending the same message again (after an error) keeps its key.
  if (!outgoing || outgoing.from !== from || outgoing.text !== text) {
    outgoing = { from, text, key: newKey() };
  }
  const message = outgoing;
  button.disabled = true;
  showError("");
  try {
    let response = null;
    for (let attempt = 0; ; attempt++) {
      try {
        response = await post(message);
      } catch (_) {
        response = null; // unreachable: it may still have been sent
      }
      if ((response && response.status !== 503) || attempt >= RETRY_DELAYS_MS.length) break;
      await sleep(RETRY_DELAYS_MS[attempt]);
    }
    if (response && response.ok) {
      if (outgoing === message) outgoing = null;
      if (textInput.value.trim() === text) textInput.value = "";
    } else if (!response) {
      showError("the server cannot be reached; your message may still appear — press Send to try again (it will not be sent twice)");
    } else {
      let error = "the message could not be sent (" + response.status + ")";
      try { error = (await response.json()).error || error; } catch (_) { /* keep default */ }
      if (response.status === 503) {
        error = "the chat server is busy; your message may still appear — press Send to try again (it will not be sent twice)";
      }
      showError(error);
    }
  } finally {
    button.disabled = false;
    textInput.focus();
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
