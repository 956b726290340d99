// The bundled chat page in real headless Chromium against a real `temma serve`.
// Run: cargo build && (cd tests/ui && npm ci && npm test). `.ci/run` does this.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { repo, DEADLINE, freePort, startTemma, launchBrowser } from "./harness.mjs";

let server, browser, base, work, config, ports;
const extra = []; // other temma processes, stopped after the suite

before(async () => {
  work = mkdtempSync(join(tmpdir(), "temma-ui-"));
  mkdirSync(join(work, "etc"));
  const [pull, pub, http] = [await freePort(), await freePort(), await freePort()];
  ports = { pull, pub, http };
  config = join(work, "etc/temma.toml");
  writeFileSync(config, `
[application]
root = "${repo}"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:${pull}"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:${pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:${pub}"
zmq_client_sub = "zmq://SUB@127.0.0.1:${pub}"
[server]
listen = "127.0.0.1:${http}"
# Each browser below gets its own X-Forwarded-For: the rate limit keys on the client.
trusted_proxies = ["127.0.0.1"]
[[broker.scripts]]
file = "scripts/ratelimit.rhai"
params = { max = 5, window_secs = 60 }
[[broker.scripts]]
file = "scripts/commands.rhai"
[access]
file = "scripts/private_rooms.rhai"
params = { rooms = { ui-private = "t0k" } }
`);
  base = `http://127.0.0.1:${http}`;
  server = await startTemma(["serve", "-c", config], {}, "listening on http://");
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  server?.kill("SIGTERM");
  for (const child of extra) child.kill("SIGKILL");
  rmSync(work, { recursive: true, force: true });
});

let clients = 0;
async function openChat(path = "/", at = base, options = {}) {
  clients += 1;
  const context = await browser.newContext({
    extraHTTPHeaders: { "x-forwarded-for": `198.51.100.${clients}` },
    ...options,
  });
  const page = await context.newPage();
  await page.goto(at + path);
  await page.locator("#status.open").waitFor({ timeout: DEADLINE });
  return page;
}

/* Posts a message as another user would, straight to a node. */
async function postAs(from, text, room, at = base) {
  clients += 1;
  const body = new URLSearchParams({ from, text });
  if (room) body.set("room", room);
  const response = await fetch(at + "/message/broadcast", {
    method: "POST", body, headers: { "x-forwarded-for": `203.0.113.${clients % 250}` },
  });
  assert.equal(response.status, 200, await response.text());
}

async function send(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

test("two browsers chat; messages render as text, never as HTML", async () => {
  const alice = await openChat();
  const bob = await openChat();
  const text = `hello <b>world</b> <img src=x onerror="window.pwned=1"> ${Date.now()}`;
  await alice.fill("#from", "Alice");
  await alice.fill("#text", text);
  await alice.press("#text", "Enter");

  for (const page of [alice, bob]) {
    const item = page.locator("#liste li", { hasText: text });
    await item.waitFor({ timeout: DEADLINE });
    assert.equal(await item.locator(".from").textContent(), "Alice");
    assert.equal(await item.locator(".text").textContent(), text);
    assert.match(await item.locator(".time").textContent(), /\d/);
    assert.equal(await page.locator("#liste img, #liste b").count(), 0, "no markup from a message");
    assert.equal(await page.evaluate(() => window.pwned), undefined);
  }
  // The sender's field is cleared once the server confirmed publication.
  await alice.waitForFunction(() => document.getElementById("text").value === "", null, { timeout: DEADLINE });
  assert.equal(await alice.inputValue("#from"), "Alice", "the name stays");

  // Bob answers with the button.
  await bob.fill("#from", "Bob");
  await bob.fill("#text", "hi Alice");
  await bob.click("#button");
  await alice.locator("#liste li", { hasText: "hi Alice" }).waitFor({ timeout: DEADLINE });
  if (process.env.UI_SCREENSHOT) await alice.screenshot({ path: process.env.UI_SCREENSHOT });

  // Both browsers' streams are written by the direct path's writer shards, whether the
  // EventSource opened a connection or reused the one that fetched the page (hyper served
  // that, and the stream request was taken over from it).
  const metrics = await (await fetch(base + "/metrics")).text();
  const count = (request) =>
    Number(metrics.match(new RegExp(`^temma_direct_requests_total\\{request="${request}"\\} (\\d+)`, "m"))?.[1] ?? 0);
  assert.ok(count("Stream") + count("TakenStream") >= 2, metrics);
});

test("a new visitor sees recent messages once; the name is remembered", async () => {
  const carol = await openChat();
  await carol.fill("#from", "Carol");
  const text = `context ${Date.now()}`;
  await carol.fill("#text", text);
  await carol.press("#text", "Enter");
  await carol.locator("#liste li", { hasText: text }).waitFor({ timeout: DEADLINE });
  await carol.reload();
  await carol.locator("#status.open").waitFor({ timeout: DEADLINE });
  const item = carol.locator("#liste li", { hasText: text });
  await item.waitFor({ timeout: DEADLINE });
  assert.equal(await item.count(), 1, "recent history shown once");
  assert.equal(await carol.inputValue("#from"), "Carol");
});

test("sending without a name explains what is missing", async () => {
  const dave = await openChat();
  await dave.fill("#from", "");
  await dave.fill("#text", "anonymous?");
  await dave.evaluate(() => document.getElementById("from").removeAttribute("required"));
  await dave.click("#button");
  await dave.locator("#error:not([hidden])").waitFor({ timeout: DEADLINE });
  assert.match(await dave.locator("#error").textContent(), /name/i);
});

test("a too-long message shows the counter, then the server's words; the text is kept", async () => {
  const erin = await openChat();
  await erin.fill("#from", "Erin");
  // No silent cut: the field takes 3000 characters, and the counter says they are too many.
  assert.equal(await erin.getAttribute("#text", "maxlength"), null);
  await erin.fill("#text", "x".repeat(3000));
  await erin.locator("#counter.over").waitFor({ timeout: DEADLINE });
  assert.equal(await erin.locator("#counter").textContent(), "3000/2000");
  await erin.press("#text", "Enter");
  await erin.locator("#error:not([hidden])").waitFor({ timeout: DEADLINE });
  assert.equal(await erin.locator("#error").textContent(), "`text` is too long: 3000 of 2000 characters");
  assert.equal((await erin.inputValue("#text")).length, 3000, "the text is kept to fix and resend");
  assert.equal(await erin.locator("#liste li", { hasText: "xxxxxxxxxx" }).count(), 0, "nothing left pending");
});

test("/me shows an action; a moderation refusal is shown to the sender", async () => {
  const frank = await openChat();
  await frank.fill("#from", "Frank");
  await frank.fill("#text", "/me waves at everyone");
  await frank.press("#text", "Enter");
  const action = frank.locator("#liste li.action", { hasText: "waves at everyone" });
  await action.waitFor({ timeout: DEADLINE });
  assert.equal(await action.locator(".from").textContent(), "* Frank");

  await frank.fill("#text", "/dance");
  await frank.press("#text", "Enter");
  await frank.locator("#error:not([hidden])").waitFor({ timeout: DEADLINE });
  assert.match(await frank.locator("#error").textContent(), /unknown command \/dance/);

  // The rate limit (5 a minute here; two used above) refuses the fourth of these.
  for (const n of [1, 2, 3, 4]) {
    await frank.fill("#text", `message ${n}`);
    await frank.press("#text", "Enter");
    if (n < 4) {
      await frank.locator("#liste li", { hasText: `message ${n}` }).waitFor({ timeout: DEADLINE });
    }
  }
  await frank.waitForFunction(
    () => /too many messages/.test(document.getElementById("error").textContent), null, { timeout: DEADLINE });
  assert.equal(await frank.locator("#liste li", { hasText: "message 4" }).count(), 0);
});

test("a 503 is retried with the same idempotency key, and the message appears once", async () => {
  const gina = await openChat();
  const keys = [];
  await gina.route("**/message/broadcast", async (route) => {
    keys.push(await route.request().headerValue("idempotency-key"));
    if (keys.length === 1) {
      await route.fulfill({ status: 503, contentType: "application/json", body: '{"error":"busy"}' });
    } else {
      await route.continue();
    }
  });
  await gina.fill("#from", "Gina");
  const text = `retried ${Date.now()}`;
  await gina.fill("#text", text);
  await gina.press("#text", "Enter");
  await gina.locator("#liste li:not(.pending)", { hasText: text }).waitFor({ timeout: DEADLINE });
  await gina.waitForFunction(() => document.getElementById("text").value === "", null, { timeout: DEADLINE });
  assert.equal(keys.length, 2, "one retry");
  assert.ok(keys[0] && keys[0].length >= 16, `a key was sent: ${keys[0]}`);
  assert.equal(keys[1], keys[0], "the retry carries the same key");
  assert.equal(await gina.locator("#liste li", { hasText: text }).count(), 1);
  // A new message gets a new key.
  await gina.fill("#text", `${text} again`);
  await gina.press("#text", "Enter");
  await gina.locator("#liste li:not(.pending)", { hasText: `${text} again` }).waitFor({ timeout: DEADLINE });
  assert.notEqual(keys[2], keys[0]);
});

test("rooms: two sessions in one room talk; a third, in another room, sees none of it", async () => {
  const ann = await openChat("/?room=ui-one");
  const ben = await openChat("/#ui-one");
  const cid = await openChat("/?room=ui-two");
  assert.equal(await ann.locator("#room-title").textContent(), "#ui-one");
  assert.equal(await ben.locator("#room-title").textContent(), "#ui-one");
  await ann.fill("#from", "Ann");
  await send(ann, "only for room one");
  await ben.fill("#from", "Ben");
  await ben.locator("#liste li", { hasText: "only for room one" }).waitFor({ timeout: DEADLINE });
  await send(ben, "room one answers");
  await ann.locator("#liste li", { hasText: "room one answers" }).waitFor({ timeout: DEADLINE });
  await cid.fill("#from", "Cid");
  await send(cid, "room two here");
  await cid.locator("#liste li:not(.pending)", { hasText: "room two here" }).waitFor({ timeout: DEADLINE });
  assert.equal(await cid.locator("#liste li", { hasText: "room one" }).count(), 0);
  assert.equal(await ann.locator("#liste li", { hasText: "room two" }).count(), 0);
  // Own messages look different from the others'.
  assert.equal(await ann.locator("#liste li.own", { hasText: "only for room one" }).count(), 1);
  assert.equal(await ann.locator("#liste li.own", { hasText: "room one answers" }).count(), 0);
  // Switching room by name: the URL, the title and the stream follow.
  await cid.fill("#join-name", "UI-One");
  await cid.press("#join-name", "Enter");
  await cid.locator("#liste li", { hasText: "room one answers" }).waitFor({ timeout: DEADLINE });
  assert.equal(new URL(cid.url()).searchParams.get("room"), "ui-one");
  assert.equal(await cid.locator("#room-title").textContent(), "#ui-one");
  assert.equal(await cid.locator("#liste li", { hasText: "room two here" }).count(), 0);
  // The room list shows the rooms with their counts, the current one marked.
  await cid.locator('#room-list a[aria-current="page"][data-room="ui-one"]').waitFor({ timeout: DEADLINE });
  // A bad name is explained, not sent.
  await cid.fill("#join-name", "no spaces");
  await cid.evaluate(() => document.getElementById("join-name").removeAttribute("pattern"));
  await cid.press("#join-name", "Enter");
  assert.match(await cid.locator("#error").textContent(), /not a room name/);
  if (process.env.UI_SCREENSHOT) await ann.screenshot({ path: process.env.UI_SCREENSHOT });
});

test("presence counts go 1 → 2 → 1 as sessions join and leave, over two web nodes", async () => {
  const http2 = await freePort();
  const second = await startTemma(["serve", "-c", config],
    { TEMMA_BROKER__EMBEDDED: "false", TEMMA_SERVER__LISTEN: `127.0.0.1:${http2}` }, "listening on http://");
  extra.push(second);
  const here = await openChat("/?room=ui-presence");
  await here.waitForFunction(() => document.getElementById("presence").textContent === "1 person here",
    null, { timeout: DEADLINE });
  const there = await openChat("/?room=ui-presence", `http://127.0.0.1:${http2}`);
  for (const page of [here, there]) {
    await page.waitForFunction(() => document.getElementById("presence").textContent === "2 people here",
      null, { timeout: DEADLINE });
  }
  await there.context().close();
  await here.waitForFunction(() => document.getElementById("presence").textContent === "1 person here",
    null, { timeout: DEADLINE });
  second.kill("SIGTERM");
});

test("a reader scrolled up stays put; new messages wait behind a button", async () => {
  const reader = await openChat("/?room=ui-scroll", base, { viewport: { width: 900, height: 500 } });
  for (let i = 0; i < 40; i++) await postAs("Poster", `line ${i}`, "ui-scroll");
  await reader.locator("#liste li", { hasText: "line 39" }).waitFor({ timeout: DEADLINE });
  await reader.evaluate(() => { document.getElementById("liste").scrollTop = 0; });
  await reader.waitForTimeout(100);
  await postAs("Poster", "while reading", "ui-scroll");
  await reader.locator("#liste li", { hasText: "while reading" }).waitFor({ state: "attached", timeout: DEADLINE });
  assert.equal(await reader.evaluate(() => document.getElementById("liste").scrollTop), 0, "not moved");
  await reader.locator("#new-messages:not([hidden])").waitFor({ timeout: DEADLINE });
  assert.equal(await reader.locator("#new-messages").textContent(), "1 new message ↓");
  await reader.click("#new-messages");
  await reader.waitForFunction(() => {
    const list = document.getElementById("liste");
    return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  }, null, { timeout: DEADLINE });
  assert.equal(await reader.locator("#new-messages").isHidden(), true);
});

test("a sent message shows at once as pending, then confirmed; the field stays free", async () => {
  const page = await openChat("/?room=ui-pending");
  await page.fill("#from", "Pat");
  let release;
  const held = new Promise((done) => { release = done; });
  await page.route("**/message/broadcast", async (route) => { await held; await route.continue(); });
  await send(page, "on its way");
  await page.locator("#liste li.pending.own", { hasText: "on its way" }).waitFor({ timeout: DEADLINE });
  // Typing goes on while the message is in flight, and is not lost when the answer comes.
  await page.fill("#text", "next thought");
  release();
  await page.locator("#liste li.own:not(.pending)", { hasText: "on its way" }).waitFor({ timeout: DEADLINE });
  assert.equal(await page.locator("#liste li", { hasText: "on its way" }).count(), 1);
  assert.equal(await page.inputValue("#text"), "next thought");
});

test("unread messages are counted in the title while the tab is hidden; a favicon is served", async () => {
  const page = await openChat("/?room=ui-unread");
  await page.evaluate(() => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await postAs("Other", "one", "ui-unread");
  await postAs("Other", "two", "ui-unread");
  await page.waitForFunction(() => document.title.startsWith("(2) #ui-unread"), null, { timeout: DEADLINE });
  await page.evaluate(() => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => false });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  assert.equal(await page.title(), "#ui-unread — temma chat");
  for (const icon of ["/favicon.ico", "/favicon.svg"]) {
    assert.equal((await fetch(base + icon)).status, 200, icon);
  }
  // Readable on a phone: nothing wider than the screen.
  const phone = await openChat("/?room=ui-unread", base, { viewport: { width: 360, height: 640 } });
  assert.ok(await phone.evaluate(() => document.documentElement.scrollWidth <= 360));
});

test("broker killed and restarted: the badge says sending is unavailable, then recovers", async () => {
  const [pull, pub, http] = [await freePort(), await freePort(), await freePort()];
  const own = join(work, "etc/broker.toml");
  writeFileSync(own, `
[application]
root = "${repo}"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:${pull}"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:${pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:${pub}"
zmq_client_sub = "zmq://SUB@127.0.0.1:${pub}"
[server]
listen = "127.0.0.1:${http}"
[broker]
embedded = false
`);
  let broker = await startTemma(["broker", "-c", own], {}, "broker running");
  extra.push(broker);
  const web = await startTemma(["serve", "-c", own], {}, "listening on http://");
  extra.push(web);
  const at = `http://127.0.0.1:${http}`;
  const page = await openChat("/?room=ui-broker", at);
  broker.kill("SIGKILL");
  await page.locator("#status.degraded").waitFor({ timeout: DEADLINE });
  assert.equal(await page.locator("#status").textContent(), "sending unavailable");
  broker = await startTemma(["broker", "-c", own], {}, "broker running");
  extra.push(broker);
  await page.locator("#status.open").waitFor({ timeout: DEADLINE });
  // Messages posted by others once the broker is back appear once.
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(at + "/message/broadcast", {
      method: "POST", body: new URLSearchParams({ from: "Other", text: "after the restart", room: "ui-broker" }),
    });
    if (response.status === 200) break;
    assert.ok(attempt < 50, `still ${response.status}`);
    await new Promise((done) => setTimeout(done, 100));
  }
  await page.locator("#liste li", { hasText: "after the restart" }).waitFor({ timeout: DEADLINE });
  assert.equal(await page.locator("#liste li", { hasText: "after the restart" }).count(), 1);
});

test("a private room refuses a session without its token, and lets one with it in", async () => {
  clients += 1;
  const context = await browser.newContext();
  const outsider = await context.newPage();
  await outsider.goto(base + "/?room=ui-private");
  await outsider.locator("#status.closed").waitFor({ timeout: DEADLINE });
  await outsider.waitForFunction(
    () => document.getElementById("error").textContent === "room ui-private is private: it needs its token",
    null, { timeout: DEADLINE });
  const member = await openChat("/?room=ui-private&token=t0k");
  await member.fill("#from", "Member");
  await send(member, "for members only");
  await member.locator("#liste li.own:not(.pending)", { hasText: "for members only" }).waitFor({ timeout: DEADLINE });
  // The token goes to that room only: another room is open without it.
  await member.fill("#join-name", "ui-public");
  await member.press("#join-name", "Enter");
  await member.locator("#status.open").waitFor({ timeout: DEADLINE });
  assert.equal(new URL(member.url()).searchParams.get("token"), null);
});
