// The web console in a real browser (Debian's Chromium driven by playwright-core), run by the CLI test
// `the_console_in_a_real_browser`. Environment: BASE (server URL), ADMIN_KEY, PW (playwright-core's
// index.js), AXE (axe-core's axe.min.js), CHROMIUM (the browser), SHOTS (optional: a directory for
// screenshots of the main pages). Prints "console: ok" at the end; any failed check throws.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const pw = await import(process.env.PW);
const chromium = pw.chromium ?? pw.default.chromium;
const BASE = process.env.BASE;
const ADMIN = process.env.ADMIN_KEY;
const AXE = readFileSync(process.env.AXE, "utf8");
const SHOTS = process.env.SHOTS;

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: ["--no-sandbox"] });
// The console's CSP allows only its own scripts; the accessibility checker is injected, so the test
// context bypasses CSP (the CSP itself is asserted by the Rust tests).
const context = await browser.newContext({ bypassCSP: true, viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
const scanned = [];

async function axe(name) {
  await page.addScriptTag({ content: AXE });
  const result = await page.evaluate(async () => await window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  assert.deepEqual(
    bad.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(" ")).join(", ")})`),
    [],
    `accessibility violations on ${name}`,
  );
  scanned.push(name);
}

async function shot(name) {
  if (SHOTS) await page.screenshot({ path: `${SHOTS}/console-${name}.png`, fullPage: true });
}

async function flash() {
  return (await page.locator(".flash").first().textContent())?.trim();
}

async function verify(credential) {
  const r = await fetch(`${BASE}/v1/verify`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN}` },
    body: JSON.stringify({ credential }),
  });
  return (await r.json()).code;
}

// Signed out: every page leads to the sign-in form.
await page.goto(`${BASE}/console/keys`);
assert.match(page.url(), /\/console\/login$/);
await axe("login");
await shot("login");
await page.fill("#key", "kg_live_not_a_real_key_000000000000");
await page.click("button[type=submit]");
assert.match(await flash(), /not a working admin key/);

// Keyboard: the first Tab stop is the skip link, and the form is reachable.
await page.fill("#key", ADMIN);
await page.keyboard.press("Enter");
await page.waitForURL(`${BASE}/console/`);
await page.keyboard.press("Tab");
assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
await axe("overview");

// A consumer and a key.
await page.click("nav >> text=Consumers");
await axe("consumers");
await page.fill("#c-name", "Acme Corp");
await page.click("text=Create consumer");
assert.equal(await flash(), "Consumer created.");
await page.fill("#k-name", "production");
await page.fill("#k-scopes", "read:data write:data");
await page.click("text=Create key");
const secret = await page.inputValue("[data-secret]");
assert.match(secret, /^kg_live_/);
const keyUrl = page.url().split("?")[0];
const keyId = (await page.textContent("[data-key-id]")).trim();
await axe("key (secret shown)");
await page.reload();
assert.equal(await page.locator("[data-secret]").count(), 0, "the secret is gone after a reload");
assert.equal((await page.content()).includes(secret), false);

// Verified through the API: the counts appear in the key's chart.
for (let i = 0; i < 4; i++) assert.equal(await verify(secret), "VALID");
await page.goto(`${keyUrl}?range=1h`);
const bars = await page.$$eval("svg[data-chart] rect", (rs) => rs.map((r) => [r.dataset.code, Number(r.dataset.count)]));
const valid = bars.filter(([c]) => c === "VALID").reduce((s, [, n]) => s + n, 0);
assert.equal(valid, 4, `the chart's VALID bars: ${JSON.stringify(bars)}`);
assert.equal(await page.getAttribute("svg[data-chart]", "data-total"), "4");
assert.equal((await page.textContent("[data-legend=VALID]")).trim(), "4");
await shot("key");

// Rotate with an overlap: a new secret once, the old one still works.
await page.selectOption("#r-overlap", "3600");
await page.click("text=Rotate key");
const rotated = await page.inputValue("[data-secret]");
assert.notEqual(rotated, secret);
assert.match(await page.textContent(".reveal"), /previous secret works until/);
assert.equal(await verify(secret), "VALID");
assert.equal(await verify(rotated), "VALID");

// Revoke: refused without the typed confirmation, then done.
await page.fill("#confirm", "wrong");
await page.click("text=Revoke key");
assert.match(await flash(), /nothing was changed/);
await page.fill("#confirm", keyId);
await page.click("text=Revoke key");
assert.equal(await flash(), "Key revoked.");
assert.equal(await verify(rotated), "REVOKED");

// A state-changing post without the CSRF token is refused, and changes nothing.
const forged = await page.request.post(`${BASE}/console/consumers`, { form: { name: "forged" }, maxRedirects: 0 });
assert.equal(forged.status(), 403);
await page.goto(`${BASE}/console/consumers?q=forged`);
assert.match(await page.textContent("tbody"), /No consumers match/);

// Both changes are in the audit log, made by the signed-in admin key.
await page.goto(`${BASE}/console/audit?target=${encodeURIComponent(keyId)}`);
const rows = await page.$$eval("tr[data-action]", (rs) => rs.map((r) => [r.dataset.action, r.dataset.actor]));
const actions = rows.map(([a]) => a);
for (const a of ["key.create", "key.rotate", "key.revoke"]) assert.ok(actions.includes(a), `${a} in ${actions}`);
assert.equal(new Set(rows.map(([, actor]) => actor)).size, 1, "one actor");
assert.match(rows[0][1], /^key_/);
await axe("audit");
await shot("audit");

// The other pages: each renders and passes the accessibility scan.
for (const [name, path] of [["keys", "/console/keys"], ["clients", "/console/clients"], ["users", "/console/users"], ["plans", "/console/plans"], ["signing keys", "/console/signing-keys"]]) {
  await page.goto(`${BASE}${path}`);
  assert.equal(await page.locator("h1").count(), 1, name);
  await axe(name);
}
await page.goto(`${BASE}/console/consumers`);
await page.click("text=Acme Corp");
await axe("consumer");
await shot("consumer");
await page.goto(`${BASE}/console/`);
await shot("overview");
assert.ok(Number(await page.getAttribute("svg[data-chart]", "data-total")) >= 4);

// A narrow window: nothing wider than the screen.
await page.setViewportSize({ width: 390, height: 800 });
for (const path of ["/console/", keyUrl]) {
  await page.goto(`${BASE}${path.startsWith("http") ? new URL(path).pathname : path}`);
  const [scroll, inner] = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  assert.ok(scroll <= inner + 1, `${path} is ${scroll}px wide in a ${inner}px window`);
}

// Sign out: the session is over.
await page.click("text=Sign out");
assert.match(page.url(), /\/console\/login\?why=out$/);
await page.goto(`${BASE}/console/`);
assert.match(page.url(), /\/console\/login/);

// An operator with a user account (the admin role) signs in too, and acts under their own name.
await page.fill("#username", "operator");
await page.fill("#password", process.env.OPERATOR_PASSWORD);
await page.click("form.second button[type=submit]");
await page.waitForURL(`${BASE}/console/`);
assert.match(await page.textContent("header .signout"), /Signed in as operator/);
await page.click("text=Sign out");

await browser.close();
console.log(`scanned: ${scanned.join(", ")}`);
console.log("console: ok");
