// Screenshots of the console for docs/console/, taken against a running Keygate that has data (for
// example the one `bench/console.py --keep` leaves running). Environment: BASE, ADMIN_KEY, PW
// (playwright-core's index.js), CHROMIUM, OUT (directory), KEY and CONSUMER (ids of a busy key and its
// consumer).
const pw = await import(process.env.PW);
const chromium = pw.chromium ?? pw.default.chromium;
const { BASE, ADMIN_KEY, OUT, KEY, CONSUMER } = process.env;
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: ["--no-sandbox"] });
const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
await page.goto(`${BASE}/console/login`);
await page.screenshot({ path: `${OUT}/console-login.png` });
await page.fill("#key", ADMIN_KEY);
await page.click("button[type=submit]");
await page.waitForURL(`${BASE}/console/`);
for (const [name, path] of [
  ["overview", "/console/?range=7d"],
  ["key", `/console/keys/${KEY}?range=24h`],
  ["consumer", `/console/consumers/${CONSUMER}?range=30d`],
  ["keys", "/console/keys"],
  ["audit", "/console/audit"],
]) {
  await page.goto(`${BASE}${path}`);
  await page.screenshot({ path: `${OUT}/console-${name}.png`, fullPage: name === "overview" || name === "key" });
}
await browser.close();
console.log("screenshots: ok");
