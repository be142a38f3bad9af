// The developer portal in a real browser (Debian's Chromium driven by playwright-core), run by the CLI
// test `the_portal_in_a_real_browser`. Environment: BASE (server URL), ADMIN_KEY (for /v1/verify), LOG
// (the server's log, where the mail test mode writes the verification link), PW, AXE, CHROMIUM.
// Prints "portal: ok" at the end; any failed check throws.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const pw = await import(process.env.PW);
const chromium = pw.chromium ?? pw.default.chromium;
const BASE = process.env.BASE;
const ADMIN = process.env.ADMIN_KEY;
const AXE = readFileSync(process.env.AXE, "utf8");
const PASSWORD = "a long developer passphrase";

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: ["--no-sandbox"] });
const scanned = [];

async function axe(page, name) {
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

async function flash(page) {
  return (await page.locator(".flash").first().textContent())?.trim();
}

async function verify(credential) {
  const r = await fetch(`${BASE}/v1/verify`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN}` },
    body: JSON.stringify({ credential, scopes: ["read"] }),
  });
  return (await r.json()).code;
}

/// The newest link to `path` the mail test mode wrote to the log for `username`.
async function mailedLink(username, path) {
  for (let i = 0; i < 50; i++) {
    const log = readFileSync(process.env.LOG, "utf8");
    const lines = log.split("\n").filter((l) => l.includes("keygate::mail") && l.includes(`Hello ${username}`));
    const m = lines.length ? lines[lines.length - 1].match(new RegExp(`${path.replace("?", "\\?")}[A-Za-z0-9_-]+`)) : null;
    if (m) return m[0];
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no mailed ${path} link for ${username} in the log`);
}

async function signUp(page, username) {
  await page.goto(`${BASE}/portal/signup`);
  await page.fill("#username", username);
  await page.fill("#email", `${username}@example.com`);
  await page.fill("#password", PASSWORD);
  await page.fill("#password2", PASSWORD);
  await page.click("text=Make my account");
  await page.waitForURL(`${BASE}/portal/`);
}

const alice = await (await browser.newContext({ bypassCSP: true, viewport: { width: 1280, height: 900 } })).newPage();

// Signed out: the portal leads to its sign-in page, which offers sign-up.
await alice.goto(`${BASE}/portal/`);
assert.match(alice.url(), /\/portal\/login$/);
await axe(alice, "portal sign-in");
await alice.click("text=Make an account");
await axe(alice, "sign-up");

// Sign up; confirm the address with the link the test mode wrote to the log.
await signUp(alice, "alice");
assert.match(await alice.textContent("main"), /Confirm your email address/);
await axe(alice, "home (unconfirmed)");
assert.equal(await alice.isDisabled("text=Create application"), true, "no application before the address is confirmed");
await alice.goto(`${BASE}${await mailedLink("alice", "/portal/verify?token=")}`);
assert.equal(await flash(alice), "Your email address is confirmed.");

// An application and a key.
await alice.fill("#app-name", "Weather bot");
await alice.click("text=Create application");
assert.match(alice.url(), /\/portal\/apps\/cons_/);
const appUrl = alice.url();
await axe(alice, "application");
await alice.fill("#k-name", "production");
await alice.check("#ks-1");
await alice.click("text=Create key");
const secret = await alice.inputValue("[data-secret]");
assert.match(secret, /^kg_live_/);
const keyUrl = alice.url().split("?")[0];
const keyId = (await alice.textContent("[data-key-id]")).trim();
await axe(alice, "key (secret shown)");
await alice.reload();
assert.equal(await alice.locator("[data-secret]").count(), 0, "the secret is gone after a reload");

// Used a few times: the counts in the key's chart and the quota left.
for (let i = 0; i < 3; i++) assert.equal(await verify(secret), "VALID");
await alice.goto(`${keyUrl}?range=1h`);
assert.equal((await alice.textContent("[data-legend=VALID]")).trim(), "3");
assert.equal(await alice.getAttribute("svg[data-chart]", "data-total"), "3");
assert.equal((await alice.textContent("[data-quota-remaining]")).trim(), "97");
await alice.goto(`${appUrl}?range=1h`);
assert.equal((await alice.textContent("[data-legend=VALID]")).trim(), "3");

// Rotate (no overlap): a new secret once, the old one stops.
await alice.goto(keyUrl);
await alice.selectOption("#r-overlap", "0");
await alice.click("text=Rotate key");
const rotated = await alice.inputValue("[data-secret]");
assert.notEqual(rotated, secret);
assert.equal(await verify(rotated), "VALID");
assert.notEqual(await verify(secret), "VALID");

// Revoke: refused without the typed confirmation, then done.
await alice.fill("#confirm", "wrong");
await alice.click("text=Revoke key");
assert.match(await flash(alice), /nothing was changed/);
await alice.fill("#confirm", keyId);
await alice.click("text=Revoke key");
assert.match(await flash(alice), /Key revoked/);
assert.equal(await verify(rotated), "REVOKED");

await alice.goto(`${BASE}/portal/tokens`);
await axe(alice, "tokens and access");

// A state-changing post without the CSRF token is refused.
const forged = await alice.request.post(`${BASE}/portal/apps`, { form: { name: "forged" }, maxRedirects: 0 });
assert.equal(forged.status(), 403);

// A second developer sees none of it, through pages or forms.
const bob = await (await browser.newContext({ bypassCSP: true })).newPage();
await signUp(bob, "bob");
await bob.goto(`${BASE}${await mailedLink("bob", "/portal/verify?token=")}`);
assert.match(await bob.textContent("tbody"), /No application yet/);
for (const url of [appUrl, keyUrl]) {
  const r = await bob.goto(url);
  assert.equal(r.status(), 404, url);
  assert.equal((await bob.content()).includes("Weather bot"), false);
}
const csrf = await bob.inputValue("input[name=csrf]").catch(async () => {
  await bob.goto(`${BASE}/portal/`);
  return bob.inputValue("input[name=csrf]");
});
const theirs = await bob.request.post(`${appUrl}/keys`, { form: { csrf, name: "sneaky", scopes: "read" }, maxRedirects: 0 });
assert.equal(theirs.status(), 404);

// A narrow window: nothing wider than the screen.
await alice.setViewportSize({ width: 390, height: 800 });
for (const url of [`${BASE}/portal/`, appUrl]) {
  await alice.goto(url);
  const [scroll, inner] = await alice.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  assert.ok(scroll <= inner + 1, `${url} is ${scroll}px wide in a ${inner}px window`);
}

// Sign out: the session is over.
await alice.click("text=Sign out");
assert.match(alice.url(), /\/portal\/login\?why=out$/);
await alice.goto(`${BASE}/portal/`);
assert.match(alice.url(), /\/portal\/login/);

await browser.close();
console.log(`scanned: ${scanned.join(", ")}`);
console.log("portal: ok");
