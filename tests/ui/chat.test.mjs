// The bundled chat page in real headless Chromium against a real `temma serve`.
// Run: cargo build && (cd tests/ui && npm ci && npm test). `.ci/run` does this.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const binary = process.env.UI_TEMMA_BIN || join(repo, "target/debug/temma");
const browserPath = process.env.UI_CHROMIUM || "/usr/bin/chromium";
const DEADLINE = 10_000;

function freePort() {
  return new Promise((done, fail) => {
    const server = createServer();
    server.on("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

let server, browser, base, work;

before(async () => {
  work = mkdtempSync(join(tmpdir(), "temma-ui-"));
  mkdirSync(join(work, "etc"));
  const [pull, pub, http] = [await freePort(), await freePort(), await freePort()];
  const config = join(work, "etc/temma.toml");
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
`);
  base = `http://127.0.0.1:${http}`;
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("TEMMA_")));
  server = spawn(binary, ["serve", "-c", config], { env, stdio: ["ignore", "ignore", "pipe"] });
  await new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error("temma did not start")), DEADLINE);
    let log = "";
    server.stderr.on("data", (chunk) => {
      log += chunk;
      if (log.includes("listening on http://")) { clearTimeout(timer); done(); }
    });
    server.on("exit", (code) => fail(new Error(`temma exited with ${code}: ${log}`)));
  });
  browser = await chromium.launch({
    executablePath: browserPath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  server?.kill("SIGTERM");
  rmSync(work, { recursive: true, force: true });
});

let clients = 0;
async function openChat() {
  clients += 1;
  const context = await browser.newContext({ extraHTTPHeaders: { "x-forwarded-for": `198.51.100.${clients}` } });
  const page = await context.newPage();
  await page.goto(base + "/");
  await page.locator("#status.open").waitFor({ timeout: DEADLINE });
  return page;
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

test("a server refusal is shown to the sender", async () => {
  const erin = await openChat();
  await erin.fill("#from", "Erin");
  // 2001 characters: over the server's limit (the field's maxlength is lifted to reach it).
  await erin.evaluate(() => document.getElementById("text").removeAttribute("maxlength"));
  await erin.fill("#text", "x".repeat(2001));
  await erin.press("#text", "Enter");
  await erin.locator("#error:not([hidden])").waitFor({ timeout: DEADLINE });
  assert.match(await erin.locator("#error").textContent(), /2000/);
  assert.equal((await erin.inputValue("#text")).length, 2001, "the text is kept to fix and resend");
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
  await gina.locator("#liste li", { hasText: text }).waitFor({ timeout: DEADLINE });
  await gina.waitForFunction(() => document.getElementById("text").value === "", null, { timeout: DEADLINE });
  assert.equal(keys.length, 2, "one retry");
  assert.ok(keys[0] && keys[0].length >= 16, `a key was sent: ${keys[0]}`);
  assert.equal(keys[1], keys[0], "the retry carries the same key");
  assert.equal(await gina.locator("#liste li", { hasText: text }).count(), 1);
  // A new message gets a new key.
  await gina.fill("#text", `${text} again`);
  await gina.press("#text", "Enter");
  await gina.locator("#liste li", { hasText: `${text} again` }).waitFor({ timeout: DEADLINE });
  assert.notEqual(keys[2], keys[0]);
});
