// What both UI suites share: the repository, the binary under test, free ports, starting
// `temma` and headless Chromium.
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const binary = process.env.UI_TEMMA_BIN || join(repo, "target/debug/temma");
const browserPath = process.env.UI_CHROMIUM || "/usr/bin/chromium";
export const DEADLINE = 10_000;

export function freePort() {
  return new Promise((done, fail) => {
    const server = createServer();
    server.on("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

/* Starts `temma ARGS` (without the runner's TEMMA_ variables, with `env`) and waits for
   `ready` in its log. */
export function startTemma(args, env, ready) {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("TEMMA_")));
  const child = spawn(binary, args, { env: { ...clean, ...env }, stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`temma ${args.join(" ")} did not start`)), DEADLINE);
    let log = "";
    child.stderr.on("data", (chunk) => {
      log += chunk;
      if (log.includes(ready)) { clearTimeout(timer); done(child); }
    });
    child.on("exit", (code) => { clearTimeout(timer); fail(new Error(`temma exited with ${code}: ${log}`)); });
  });
}

export function launchBrowser() {
  return chromium.launch({
    executablePath: browserPath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}
