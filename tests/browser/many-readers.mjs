// Many live SSE readers in one browser page, on one origin.
//
// Headless Chromium opens a page on the gateway's own origin (its /healthz), and
// the page creates a stream, opens READERS EventSources on it
// (offset=now&live=sse), appends once they are all open, and waits until every
// reader has received that append. Over HTTP/1.1 a browser holds at most six
// connections per origin, so readers beyond six (and the append itself) wait
// forever; over HTTP/2 they share one connection.
//
// Environment:
//   GATEWAY_URL   base URL, e.g. https://127.0.0.1:4437 (required)
//   SPKI_SHA256   base64 SHA-256 of the server certificate's public key: Chromium
//                 trusts that key (--ignore-certificate-errors-spki-list)
//   READERS       number of EventSources (default 20)
//   TIMEOUT_MS    how long the page waits for each phase (default 15000)
//   CHROMIUM      browser executable (default /usr/bin/chromium)
//   SCREENSHOT    if set, a PNG of the page's report is written there
//
// Prints one JSON object on stdout; exits 0 once the report is printed, even
// when the readers stalled (the report says so), and 1 when the browser fails.

import puppeteer from "puppeteer-core";

const base = process.env.GATEWAY_URL;
if (!base) {
  console.error("GATEWAY_URL is required");
  process.exit(1);
}
const readers = Number(process.env.READERS ?? 20);
const timeoutMs = Number(process.env.TIMEOUT_MS ?? 15000);
const args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"];
if (process.env.SPKI_SHA256) {
  args.push(`--ignore-certificate-errors-spki-list=${process.env.SPKI_SHA256}`);
}

// Runs inside the page.
async function pageTest({ readers, timeoutMs }) {
  const stream = `${location.origin}/v1/stream/browser-${Date.now()}-${Math.random().toString(36).slice(2)}`;
  const marker = `append-${Date.now()}`;
  const report = { stream, readers, opened: 0, received: 0, timedOut: null };

  const withTimeout = (promise, phase) =>
    Promise.race([
      promise.then(() => true),
      new Promise((resolve) => setTimeout(() => resolve(false), timeoutMs)),
    ]).then((ok) => {
      if (!ok && report.timedOut === null) report.timedOut = phase;
      return ok;
    });

  const created = await fetch(stream, { method: "PUT", headers: { "content-type": "text/plain" } });
  report.createStatus = created.status;

  const started = performance.now();
  const sources = [];
  const opened = [];
  const received = [];
  for (let i = 0; i < readers; i++) {
    const source = new EventSource(`${stream}?offset=now&live=sse&reader=${i}`);
    sources.push(source);
    opened.push(new Promise((resolve) => source.addEventListener("open", () => {
      report.opened++;
      resolve();
    }, { once: true })));
    received.push(new Promise((resolve) => {
      // The protocol names its events: "data" (the appends) and "control".
      source.addEventListener("data", (event) => {
        if (event.data.includes(marker)) {
          report.received++;
          resolve();
        }
      });
    }));
  }
  const allOpen = await withTimeout(Promise.all(opened), "open");
  report.openMs = Math.round(performance.now() - started);

  let delivered = false;
  if (allOpen) {
    const appendStarted = performance.now();
    const append = fetch(stream, {
      method: "POST",
      headers: { "content-type": "text/plain" },
      body: marker,
    }).then(async (response) => {
      report.appendStatus = response.status;
      await response.arrayBuffer(); // its timing entry comes once the body has ended
    });
    delivered = await withTimeout(Promise.all([append, ...received]), "append");
    report.deliveredMs = Math.round(performance.now() - appendStarted);
  }
  for (const source of sources) source.close();

  // Entries of finished requests only: the PUT and the POST, made on the
  // origin while the readers held their streams open. An entry is queued
  // after its response has ended: wait a moment for the POST's.
  const ours = () => performance.getEntriesByType("resource")
    .filter((entry) => entry.name.startsWith(stream) && entry.initiatorType === "fetch");
  for (let waited = 0; delivered && ours().length < 2 && waited < timeoutMs; waited += 50) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  report.resources = ours()
    .map((entry) => ({
      name: entry.name.slice(location.origin.length),
      initiatorType: entry.initiatorType,
      nextHopProtocol: entry.nextHopProtocol,
    }));
  report.navigationProtocol = performance.getEntriesByType("navigation")[0]?.nextHopProtocol;
  report.ok = delivered;

  document.body.innerHTML = "";
  const pre = document.createElement("pre");
  pre.style.font = "16px monospace";
  pre.textContent = `${readers} EventSources on ${location.origin}\n` +
    `opened: ${report.opened}, received the append: ${report.received}\n` +
    `protocols: ${[...new Set(report.resources.map((e) => e.nextHopProtocol))].join(", ")}\n` +
    JSON.stringify(report, null, 2);
  document.body.append(pre);
  return report;
}

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args,
});
let status = 0;
try {
  const page = await browser.newPage();
  // What the browser itself says about the SSE responses, per request.
  const sseProtocols = [];
  const cdp = await page.createCDPSession();
  await cdp.send("Network.enable");
  cdp.on("Network.responseReceived", ({ response }) => {
    if (response.url.includes("live=sse")) sseProtocols.push(response.protocol);
  });

  const landing = await page.goto(`${base}/healthz`, { timeout: timeoutMs });
  const report = await page.evaluate(pageTest, { readers, timeoutMs });
  report.landingStatus = landing?.status();
  report.sseResponseProtocols = sseProtocols;
  report.browser = await browser.version();
  if (process.env.SCREENSHOT) {
    await page.setViewport({ width: 1000, height: 1400 });
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  }
  process.stdout.write(`${JSON.stringify(report)}\n`);
} catch (error) {
  console.error(error);
  status = 1;
} finally {
  await browser.close();
}
process.exit(status);
