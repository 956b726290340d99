// The operator's console in real headless Chromium against a real `temma serve`: refused
// without the token, live charts with it, a web node that dies turns red.
// Run: cargo build && (cd tests/ui && npm ci && npm test). `.ci/run` does this.
// UI_CONSOLE_SCREENSHOT=path saves a screenshot of the console under load.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { repo, DEADLINE, freePort, startTemma, launchBrowser } from "./harness.mjs";

const TOKEN = "console-ui-token-0123456789";

let work, browser, base, ports;
const children = [];

function writeConfig(name, http, embedded) {
  const path = join(work, "etc", name);
  writeFileSync(path, `
[application]
root = "${repo}"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:${ports.pull}"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:${ports.pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:${ports.pub}"
zmq_client_sub = "zmq://SUB@127.0.0.1:${ports.pub}"
[server]
listen = "127.0.0.1:${http}"
trusted_proxies = ["127.0.0.1"]
[broker]
embedded = ${embedded}
[[broker.scripts]]
file = "scripts/trim.rhai"
[[broker.scripts]]
file = "${join(work, "mod.rhai")}"
[console]
enabled = true
`);
  return path;
}

before(async () => {
  work = mkdtempSync(join(tmpdir(), "temma-console-ui-"));
  mkdirSync(join(work, "etc"));
  writeFileSync(join(work, "mod.rhai"), "fn on_message(msg) {\n    msg\n}\n");
  ports = { pull: await freePort(), pub: await freePort(), http: await freePort() };
  base = `http://127.0.0.1:${ports.http}`;
  const config = writeConfig("temma.toml", ports.http, true);
  children.push(await startTemma(["serve", "-c", config], { TEMMA_CONSOLE_TOKEN: TOKEN }, "listening on http://"));
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  for (const child of children) child.kill("SIGKILL");
  rmSync(work, { recursive: true, force: true });
});

async function logIn(token) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1100 } });
  const page = await context.newPage();
  await page.goto(`${base}/console`);
  await page.fill("#token", token);
  await page.click("#login button");
  return page;
}

test("the console refuses without the token", async () => {
  const page = await logIn("not-the-token-at-all");
  await page.locator("#error", { hasText: "wrong token" }).waitFor({ timeout: DEADLINE });
  assert.equal(await page.locator("#charts").count(), 0, "no console without a session");
  const status = await page.evaluate(async () => (await fetch("/console/stats")).status);
  assert.equal(status, 401);
  await page.context().close();
});

test("with the token, the charts move while messages flow", async () => {
  const page = await logIn(TOKEN);
  await page.locator("#status.live").waitFor({ timeout: DEADLINE });
  // A reader of the chat, so that messages are delivered too.
  const reader = await (await browser.newContext()).newPage();
  await reader.goto(base + "/");
  await reader.locator("#status.open").waitFor({ timeout: DEADLINE });
  let sent = 0;
  const load = setInterval(() => {
    sent += 1;
    fetch(base + "/message/broadcast", {
      method: "POST",
      body: new URLSearchParams({ from: "load", text: `load ${sent}` }),
      headers: { "x-forwarded-for": `203.0.113.${sent % 250}` },
    }).catch(() => {});
  }, 50);
  try {
    await page.waitForFunction(() => {
      const now = document.getElementById("now-messages").textContent;
      const published = Number((now.match(/published ([\d.,]+)/) || [])[1]?.replace(/,/g, ""));
      const delivered = Number((now.match(/delivered ([\d.,]+)/) || [])[1]?.replace(/,/g, ""));
      return published > 5 && delivered > 5;
    }, null, { timeout: DEADLINE });
    await page.waitForFunction(() => /200 [\d.]+/.test(document.getElementById("now-posts").textContent)
      && /p50 [\d.]+/.test(document.getElementById("now-latency").textContent), null, { timeout: DEADLINE });
    await page.locator("#scripts tbody tr", { hasText: "trim" }).waitFor({ timeout: DEADLINE });
    // The reader's room, with its message rate.
    await page.waitForFunction(() => [...document.querySelectorAll("#rooms tbody tr")].some((tr) =>
      tr.cells[0].textContent === "general" && Number(tr.cells[2].textContent) > 5), null, { timeout: DEADLINE });
    if (process.env.UI_CONSOLE_SCREENSHOT) {
      await page.waitForTimeout(4000);
      await page.screenshot({ path: process.env.UI_CONSOLE_SCREENSHOT, fullPage: true });
    }
  } finally {
    clearInterval(load);
  }
  // A reload keeps the session and gets the history back at once.
  await page.reload();
  await page.waitForFunction(() => /published [\d.]+/.test(document.getElementById("now-messages").textContent),
    null, { timeout: DEADLINE });
  await reader.context().close();
  await page.context().close();
});

test("a script with a syntax error shows where; a message tried on the chain", async () => {
  const page = await logIn(TOKEN);
  await page.locator("#status.live").waitFor({ timeout: DEADLINE });
  await page.locator("#chain tbody tr", { hasText: "mod.rhai" }).waitFor({ timeout: DEADLINE });
  // The message box runs the chain, publishing nothing.
  await page.fill("#try-message", '{"from":"ann","text":"   spaced out   "}');
  await page.click("#try button");
  await page.locator("#try-result", { hasText: 'published: {"from":"ann","text":"spaced out"' }).waitFor({ timeout: DEADLINE });
  assert.match(await page.locator("#try-result").textContent(), /trim: passed \(changed\)/);
  // A broken edit: the running version stays, the console shows the file, line and column.
  writeFileSync(join(work, "mod.rhai"), "fn on_message(msg) {\n    let x = ;\n    msg\n}\n");
  await page.locator("#chain-errors li", { hasText: "mod.rhai:2:13" }).waitFor({ timeout: DEADLINE });
  assert.equal(await page.locator("#chain tbody tr.silent").count(), 1, "the broken script is marked");
  // Fixed: the error goes.
  writeFileSync(join(work, "mod.rhai"), "fn on_message(msg) {\n    msg\n}\n");
  await page.waitForFunction(() => document.querySelectorAll("#chain-errors li").length === 0, null, { timeout: DEADLINE });
  await page.context().close();
});

test("a web node that dies turns red", async () => {
  const http = await freePort();
  const config = writeConfig("second.toml", http, false);
  const second = await startTemma(["serve", "-c", config], { TEMMA_CONSOLE_TOKEN: TOKEN }, "listening on http://");
  children.push(second);
  // No client on the second node: with the console on, it announces itself every second.
  const page = await logIn(TOKEN);
  await page.locator("#status.live").waitFor({ timeout: DEADLINE });
  const row = page.locator("#nodes tbody tr.alive", { hasText: `127.0.0.1:${http}` });
  await row.waitFor({ timeout: DEADLINE });
  assert.match(await row.textContent(), /\d+\.\d+\.\d+ · up 0 min/, "its version and uptime");
  assert.equal(await page.locator("#nodes tbody tr").count(), 2, "this node and the second");
  second.kill("SIGKILL");
  await page.locator("#nodes tbody tr.silent").waitFor({ timeout: 6000 });
  assert.match(await page.locator("#nodes tbody tr.silent").textContent(), /silent/);
  assert.equal(await page.locator("#nodes tbody tr.alive").count(), 1, "this node stays alive");
  await page.context().close();
});
