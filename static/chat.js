/* temma chat: receives a room's messages over Server-Sent Events, sends them with a POST.
 * Every message is rendered with textContent: a <script> in a message is shown as text. */
"use strict";

const $ = (id) => document.getElementById(id);
const list = $("liste");
const form = $("send");
const fromInput = $("from");
const textInput = $("text");
const errorLine = $("error");
const statusLine = $("status");
const counter = $("counter");
const presenceLine = $("presence");
const roomTitle = $("room-title");
const roomList = $("room-list");
const joinForm = $("join");
const joinName = $("join-name");
const newMessagesButton = $("new-messages");

/* The server's rule for room names (capitals are folded to lower case). */
const ROOM_RULE = /^[a-z0-9_-]{1,64}$/;
const HEALTH_EVERY_MS = 2000;
const ROOMS_EVERY_MS = 5000;

let limits = { text: 2000, from: 64 }; // replaced by the server's, from GET /rooms
let defaultRoom = "general";
let lastRooms = [];
let room = ""; // "" is the server's default room
/* A private room's token (the access hook's `token` parameter), from the page's URL: passed
 * on to the stream and the POSTs of that room only. */
const opened = new URLSearchParams(location.search);
const token = opened.get("token");
let tokenRoom = null;
let events = null;
let streamOpen = false;
let canSend = true; // false while the node's /health says its broker link is down
let unread = 0;
let newBelow = 0;
const seen = new Map(); // message id → its list item
let pending = []; // messages sent, not yet seen in the stream: { from, text, key, item, id }

fromInput.value = localStorage.getItem("temma.from") || "";

/* *** ROOM, STATUS, TITLE *** */

function roomFromLocation() {
  const query = new URLSearchParams(location.search).get("room");
  let hash = "";
  try { hash = decodeURIComponent(location.hash.replace(/^#/, "")); } catch (_) { /* bad escape */ }
  const name = (query || hash || "").trim().toLowerCase();
  if (name && !ROOM_RULE.test(name)) {
    showError(`"${name}" is not a room name (1 to 64 of a-z, 0-9, _ and -): showing #${defaultRoom}`);
    return "";
  }
  return name;
}

const currentRoom = () => room || defaultRoom;

function updateTitle() {
  roomTitle.textContent = "#" + currentRoom();
  document.title = (unread ? `(${unread}) ` : "") + `#${currentRoom()} — temma chat`;
}

function updateStatus() {
  let state, text;
  if (!streamOpen) {
    const closed = events && events.readyState === EventSource.CLOSED;
    [state, text] = closed ? ["closed", "disconnected"] : ["connecting", events ? "reconnecting…" : "connecting…"];
  } else if (!canSend) {
    [state, text] = ["degraded", "sending unavailable"];
  } else {
    [state, text] = ["open", "connected"];
  }
  statusLine.className = "status " + state;
  statusLine.textContent = text;
  statusLine.title = state === "degraded"
    ? "the chat server cannot reach its message broker: messages cannot be sent right now"
    : "";
}

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = !message;
}

function updateCounter() {
  const length = [...textInput.value.trim()].length;
  counter.textContent = length ? `${length}/${limits.text}` : "";
  counter.classList.toggle("over", length > limits.text);
  counter.setAttribute("aria-label", length > limits.text
    ? `too long: ${length} of ${limits.text} characters` : `${length} of ${limits.text} characters`);
}

/* *** THE MESSAGE LIST *** */

function formatTime(ms) {
  const date = typeof ms === "number" ? new Date(ms) : new Date();
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

const atBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < 40;

function scrollToEnd() {
  list.scrollTop = list.scrollHeight;
  newBelow = 0;
  newMessagesButton.hidden = true;
}

/* After adding an item: follow the conversation only if the reader was at the bottom;
 * otherwise say that there is more below. Count unread messages while the tab is hidden. */
function added(wasAtBottom, countsAsNew) {
  if (wasAtBottom) {
    scrollToEnd();
  } else if (countsAsNew) {
    newBelow += 1;
    newMessagesButton.textContent = newBelow === 1 ? "1 new message ↓" : `${newBelow} new messages ↓`;
    newMessagesButton.hidden = false;
  }
  if (countsAsNew && document.hidden) {
    unread += 1;
    updateTitle();
  }
}

function addNotice(text) {
  const wasAtBottom = atBottom();
  const item = document.createElement("li");
  item.className = "notice";
  item.textContent = text;
  list.appendChild(item);
  added(wasAtBottom, false);
}

function fill(item, message) {
  item.replaceChildren();
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = formatTime(message.time);
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = String(message.from ?? "");
  const text = document.createElement("span");
  text.className = "text";
  item.classList.toggle("action", message.kind === "action");
  if (message.kind === "action") from.textContent = "* " + from.textContent;
  text.textContent = String(message.text ?? "");
  item.append(time, from, text);
}

function addMessage(message) {
  const id = message.id;
  if (id !== undefined && seen.has(id)) return;
  const wasAtBottom = atBottom();
  // The echo of a message this page sent: the pending item becomes the message.
  const mine = pending.find((p) => p.id === id && id !== undefined)
    || pending.find((p) => p.id === undefined && p.from === message.from && p.text === message.text);
  let item;
  if (mine) {
    item = mine.item;
    pending = pending.filter((p) => p !== mine);
    mine.done = true;
    item.classList.remove("pending");
  } else {
    item = document.createElement("li");
  }
  fill(item, message);
  if (mine || (message.from && message.from === fromInput.value.trim())) item.classList.add("own");
  if (id !== undefined) {
    item.dataset.id = id;
    seen.set(id, item);
  }
  if (!item.isConnected) list.appendChild(item);
  added(wasAtBottom || Boolean(mine), !mine);
}

/* The server said the id of a message this page sent. */
function confirmSent(entry, id) {
  if (entry.done) return;
  const shown = id && seen.get(id);
  if (shown) {
    // The stream had it already (changed by moderation, so not matched): keep that one.
    entry.item.remove();
    shown.classList.add("own");
    pending = pending.filter((p) => p !== entry);
    entry.done = true;
  } else if (id) {
    entry.id = id; // the stream will bring it
  }
}

/* *** RECEPTION BY SSE *** */

function tokenFor(name) {
  return token && name === tokenRoom ? token : null;
}

function streamUrl() {
  const query = new URLSearchParams();
  if (room) query.set("room", room);
  if (tokenFor(room)) query.set("token", tokenFor(room));
  const text = query.toString();
  return text ? "/event/fetch?" + text : "/event/fetch";
}

function openStream() {
  if (events) events.close();
  streamOpen = false;
  const source = new EventSource(streamUrl());
  events = source;
  updateStatus();
  source.addEventListener("open", () => {
    if (source !== events) return;
    streamOpen = true;
    updateStatus();
    checkHealth();
  });
  source.addEventListener("error", async () => {
    if (source !== events) return;
    streamOpen = false;
    updateStatus();
    if (source.readyState === EventSource.CLOSED) {
      // Refused (a bad room name, too many rooms…): the server says why.
      try {
        const response = await fetch(streamUrl(), { headers: { accept: "application/json" } });
        if (!response.ok) showError((await response.json()).error || `the stream was refused (${response.status})`);
      } catch (_) {
        showError("the chat server cannot be reached");
      }
    }
  });
  source.addEventListener("msg", (event) => {
    try {
      addMessage(JSON.parse(event.data));
    } catch (error) {
      console.warn("unreadable message", event.data, error);
    }
  });
  source.addEventListener("reset", (event) => {
    let reason = "some messages could not be recovered";
    try { reason = JSON.parse(event.data).reason || reason; } catch (_) { /* keep default */ }
    addNotice("— " + reason + " —");
  });
  source.addEventListener("presence", (event) => {
    try {
      const { count, names } = JSON.parse(event.data);
      presenceLine.textContent = count === 1 ? "1 person here" : `${count} people here`;
      // With sessions on, who they are (never rendered as HTML).
      presenceLine.title = Array.isArray(names) && names.length ? names.map(String).join(", ") : "";
      if (presenceLine.title) presenceLine.textContent += ": " + presenceLine.title;
      const known = lastRooms.find((r) => r.room === currentRoom());
      if (known) known.count = count; else lastRooms.push({ room: currentRoom(), count });
      renderRooms();
    } catch (_) { /* ignore */ }
  });
}

async function checkHealth() {
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const health = await response.json();
    canSend = Boolean(health.push_connected);
  } catch (_) {
    canSend = false;
  }
  updateStatus();
}

/* *** ROOMS *** */

function renderRooms() {
  const rooms = lastRooms.slice();
  for (const name of [defaultRoom, currentRoom()]) {
    if (!rooms.some((r) => r.room === name)) rooms.push({ room: name, count: 0 });
  }
  roomList.replaceChildren(...rooms.map(({ room: name, count }) => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = "/?room=" + encodeURIComponent(name);
    link.dataset.room = name;
    const label = document.createElement("span");
    label.textContent = "#" + name;
    const number = document.createElement("span");
    number.className = "count";
    number.textContent = String(count);
    number.setAttribute("aria-label", count === 1 ? "1 person" : `${count} people`);
    link.append(label, number);
    if (name === currentRoom()) link.setAttribute("aria-current", "page");
    link.addEventListener("click", (event) => {
      event.preventDefault();
      switchRoom(name);
    });
    item.append(link);
    return item;
  }));
}

async function refreshRooms() {
  try {
    const response = await fetch("/rooms", { cache: "no-store" });
    const data = await response.json();
    defaultRoom = data.default || defaultRoom;
    if (data.limits) limits = data.limits;
    lastRooms = data.rooms || [];
    updateTitle();
    updateCounter();
    renderRooms();
  } catch (_) { /* the stream status says the server is away */ }
}

function switchRoom(name, push = true) {
  name = name.trim().toLowerCase();
  if (!ROOM_RULE.test(name)) {
    showError(`"${name}" is not a room name: use 1 to 64 of a-z, 0-9, _ and -`);
    return;
  }
  if (name === currentRoom() && events) return;
  room = name;
  if (push) history.pushState({ room }, "", "/?room=" + encodeURIComponent(name));
  list.replaceChildren();
  seen.clear();
  pending = [];
  presenceLine.textContent = "";
  showError("");
  scrollToEnd();
  updateTitle();
  renderRooms();
  openStream();
  textInput.focus();
}

joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  switchRoom(joinName.value);
  joinName.value = "";
});

window.addEventListener("popstate", () => {
  room = roomFromLocation();
  list.replaceChildren();
  seen.clear();
  pending = [];
  updateTitle();
  renderRooms();
  openStream();
});

list.addEventListener("scroll", () => { if (atBottom()) scrollToEnd(); });
newMessagesButton.addEventListener("click", scrollToEnd);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) {
    unread = 0;
    updateTitle();
  }
});
textInput.addEventListener("input", updateCounter);

/* *** SENDING *** */
/* Each message gets an idempotency key. A 503 (or a network error) may come back for a
 * message the server publishes anyway a moment later: the page retries with the same key,
 * and the server publishes a key once, so a retry never posts twice. */
const RETRY_DELAYS_MS = [500, 1500];
let outgoing = null; // { from, text, room, key } until the server confirms it

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

async function post(message) {
  const fields = { from: message.from, text: message.text };
  if (message.room) fields.room = message.room;
  const private_ = tokenFor(message.room);
  const url = private_ ? "/message/broadcast?token=" + encodeURIComponent(private_) : "/message/broadcast";
  return fetch(url, {
    method: "POST",
    headers: { "Idempotency-Key": message.key },
    body: new URLSearchParams(fields),
  });
}

/* What to tell the sender when the server refused a message. */
async function refusal(response) {
  if (!response) {
    return "the chat server cannot be reached; your message was not sent — try again (it will not be sent twice)";
  }
  if (response.status === 503) {
    checkHealth();
    return "the chat server is busy, your message was not sent — retry (it will not be sent twice)";
  }
  let error = `the message could not be sent (${response.status})`;
  try { error = (await response.json()).error || error; } catch (_) { /* keep default */ }
  return error;
}

/* Sends go one after the other, in the order they were typed; the button and the field stay
 * usable meanwhile (an Enter pressed during a send is queued, not lost). */
let queue = Promise.resolve();

function sendMessage() {
  const from = fromInput.value.trim();
  const text = textInput.value.trim();
  if (!from) { showError("Enter your name first."); fromInput.focus(); return; }
  if (!text) { textInput.focus(); return; }
  localStorage.setItem("temma.from", from);
  // Sending the same message again (after an error) keeps its key.
  if (!outgoing || outgoing.from !== from || outgoing.text !== text || outgoing.room !== room) {
    outgoing = { from, text, room, key: newKey() };
  }
  const message = outgoing;
  // Shown at once (and scrolled to: the sender is writing at the bottom), pending until the
  // stream brings it back.
  const item = document.createElement("li");
  item.className = "own pending";
  fill(item, { from, text });
  list.appendChild(item);
  added(true, false);
  const entry = { from, text, key: message.key, item, id: undefined, done: false };
  pending.push(entry);
  // The field is free for the next message while this one goes.
  textInput.value = "";
  updateCounter();
  showError("");
  textInput.focus();
  queue = queue.then(() => deliver(message, entry));
}

async function deliver(message, entry) {
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
    confirmSent(entry, response.headers.get("x-message-id"));
    return;
  }
  // Not sent: the item goes, the text comes back to be fixed or sent again.
  if (!entry.done) {
    entry.item.remove();
    pending = pending.filter((p) => p !== entry);
  }
  if (!textInput.value.trim()) {
    textInput.value = message.text;
    updateCounter();
  }
  showError(await refusal(response));
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});

/* *** START *** */
room = roomFromLocation();
tokenRoom = room;
updateTitle();
renderRooms();
openStream();
refreshRooms();
setInterval(refreshRooms, ROOMS_EVERY_MS);
setInterval(checkHealth, HEALTH_EVERY_MS);
if (fromInput.value) textInput.focus(); else fromInput.focus();
