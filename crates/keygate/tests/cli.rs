//! The `keygate` binary as a user runs it: `init`, `serve` on a random port, and the admin CLI against
//! it. One test binary for the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly on purpose")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

fn keygate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn init(dir: &Path) -> String {
    let out = keygate().args(["init", "--json", "--data-dir"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["admin_key"].as_str().unwrap().to_string()
}

struct Server {
    child: Child,
    url: String,
    addr: String,
    stdout: Arc<Mutex<String>>,
    stderr_path: PathBuf,
}

impl Server {
    fn start(dir: &Path, log_path: &Path) -> Server {
        Self::start_env(dir, log_path, &[])
    }

    fn start_env(dir: &Path, log_path: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_with(dir, log_path, env, &[])
    }

    fn start_with(dir: &Path, log_path: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        let stderr = std::fs::File::create(log_path).unwrap();
        let mut child = keygate()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(args)
            .env("KEYGATE_LOG", "trace")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let collected = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = collected.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("Keygate listening on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(60)).expect("server did not say where it listens");
        let addr = url.trim_start_matches("http://").to_string();
        Server { child, url, addr, stdout: collected, stderr_path: log_path.to_path_buf() }
    }

    fn cli(&self, admin_key: &str, args: &[&str]) -> Output {
        keygate()
            .args(args)
            .env("KEYGATE_URL", &self.url)
            .env("KEYGATE_ADMIN_KEY", admin_key)
            .output()
            .unwrap()
    }

    fn json(&self, admin_key: &str, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(admin_key, &all);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// `keygate verify --json`: exit 0 for a valid credential, 4 for any other decision.
    fn decision(&self, admin_key: &str, args: &[&str]) -> Value {
        let mut all = vec!["verify", "--json"];
        all.extend_from_slice(args);
        let out = self.cli(admin_key, &all);
        let v: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stderr(&out)));
        let expected = if v["valid"] == true { 0 } else { 4 };
        assert_eq!(out.status.code(), Some(expected), "{v}");
        v
    }

    /// A raw HTTP/1.1 GET, so the test sends exactly the headers it means to.
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> String {
        raw_get(&self.addr, path, headers)
    }

    /// Kills the server the hard way (SIGKILL): no shutdown, no final flush.
    fn kill9(&self) {
        let status = Command::new("kill").args(["-KILL", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Stops with SIGTERM, as a service manager would, and returns (stdout, stderr).
    fn stop(mut self) -> (String, String) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "graceful stop exits 0, got {exit}");
        std::thread::sleep(Duration::from_millis(50));
        let stdout = self.stdout.lock().unwrap().clone();
        (stdout, std::fs::read_to_string(&self.stderr_path).unwrap())
    }
}

/// A raw HTTP/1.1 GET to `addr`; the whole response.
fn raw_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn init_prints_the_key_once_and_refuses_a_second_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let key = init(&dir);
    assert!(key.starts_with("kg_live_"));

    let again = keygate().args(["init", "--json", "--data-dir"]).arg(&dir).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already initialised"), "{}", stderr(&again));
    assert!(stdout(&again).is_empty());

    let server = Server::start(&dir, &tmp.path().join("log"));
    let keys = server.json(&key, &["keys", "list"]);
    assert_eq!(keys["items"].as_array().unwrap().len(), 1, "the refused init created no second key");
    let (out, _) = server.stop();
    assert!(!out.contains("Bootstrap admin key"), "an initialised directory prints no new key");
}

#[test]
fn walkthrough_with_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));

    let consumer =
        s.json(&admin, &["consumers", "create", "--name", "acme", "--metadata", r#"{"plan":"pro"}"#]);
    let cid = consumer["id"].as_str().unwrap();
    assert_eq!(consumer["metadata"]["plan"], "pro");
    let listed = s.cli(&admin, &["consumers", "list"]);
    assert!(stdout(&listed).contains("NAME") && stdout(&listed).contains("acme"), "{}", stdout(&listed));
    assert_eq!(s.json(&admin, &["consumers", "show", cid])["name"], "acme");
    assert_eq!(s.json(&admin, &["consumers", "update", cid, "--name", "acme2"])["name"], "acme2");

    let key = s.json(
        &admin,
        &["keys", "create", "--consumer", cid, "--name", "prod", "--scope", "articles:read", "--env", "test"],
    );
    let kid = key["id"].as_str().unwrap().to_string();
    let secret = key["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("kg_test_"));
    let human = s.cli(&admin, &["keys", "create", "--consumer", cid, "--name", "human"]);
    assert!(stdout(&human).contains("shown only this once"), "{}", stdout(&human));

    let listed = s.cli(&admin, &["keys", "list", "--consumer", cid]);
    assert!(stdout(&listed).contains(&secret[..12]), "{}", stdout(&listed));
    assert!(!stdout(&listed).contains(&secret), "listing shows a secret");
    assert_eq!(s.json(&admin, &["keys", "show", &kid])["name"], "prod");

    let ok = s.cli(&admin, &["verify", &secret, "--scope", "articles:read"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
    assert!(stdout(&ok).starts_with("VALID"));
    let denied = s.cli(&admin, &["verify", &secret, "--scope", "articles:write"]);
    assert_eq!(denied.status.code(), Some(4));
    assert!(stdout(&denied).contains("INSUFFICIENT_SCOPE"));

    s.json(&admin, &["keys", "update", &kid, "--scope", "articles:write"]);
    assert_eq!(s.cli(&admin, &["verify", &secret, "--scope", "articles:write"]).status.code(), Some(0));
    assert_eq!(s.json(&admin, &["keys", "disable", &kid])["status"], "disabled");
    let d = s.decision(&admin, &[&secret]);
    assert_eq!(d["code"], "DISABLED");
    assert_eq!(s.json(&admin, &["keys", "enable", &kid])["status"], "active");

    let rotated = s.json(&admin, &["keys", "rotate", &kid, "--overlap", "0"]);
    let new_secret = rotated["key"].as_str().unwrap().to_string();
    assert_eq!(s.decision(&admin, &[&secret])["code"], "EXPIRED");
    assert_eq!(s.decision(&admin, &[&new_secret])["code"], "VALID");
    assert_eq!(s.json(&admin, &["keys", "revoke", &kid])["status"], "revoked");
    assert_eq!(s.cli(&admin, &["verify", &new_secret]).status.code(), Some(4));

    assert_eq!(s.json(&admin, &["consumers", "disable", cid])["disabled"], true);
    assert_eq!(s.json(&admin, &["consumers", "enable", cid])["disabled"], false);

    let audit = s.json(&admin, &["audit", "--target", &kid]);
    let actions: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["key.revoke", "key.rotate", "key.enable", "key.disable", "key.update", "key.create"]
    );
    let human = s.cli(&admin, &["audit"]);
    assert!(stdout(&human).contains("ACTION"), "{}", stdout(&human));

    // Failures: clear message, non-zero exit.
    let missing = s.cli(&admin, &["keys", "show", "key_000000000000AAAAAAAAAAAA"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no key with id"), "{}", stderr(&missing));
    let bad = s.cli(&admin, &["keys", "create", "--consumer", cid, "--name", "x", "--scope", "has space"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("validation_failed"), "{}", stderr(&bad));
    let bad_meta = s.cli(&admin, &["consumers", "create", "--name", "x", "--metadata", "{nope"]);
    assert_eq!(bad_meta.status.code(), Some(2), "bad usage is caught by the CLI");
    assert!(stderr(&bad_meta).contains("--metadata"), "{}", stderr(&bad_meta));
    let no_key = keygate().args(["keys", "list"]).env("KEYGATE_URL", &s.url).output().unwrap();
    assert_eq!(no_key.status.code(), Some(1));
    assert!(stderr(&no_key).contains("KEYGATE_ADMIN_KEY"), "{}", stderr(&no_key));
    let wrong_key = s.cli("kg_live_wrong", &["keys", "list"]);
    assert_eq!(wrong_key.status.code(), Some(1));
    assert!(stderr(&wrong_key).contains("unauthorized"), "{}", stderr(&wrong_key));
    let usage = s.cli(&admin, &["keys", "create"]);
    assert_eq!(usage.status.code(), Some(2));
    s.stop();

    // The server is gone: exit 3 and a hint.
    let unreachable = keygate()
        .args(["consumers", "list"])
        .env("KEYGATE_URL", "http://127.0.0.1:9")
        .env("KEYGATE_ADMIN_KEY", &admin)
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(stderr(&unreachable).contains("keygate serve"), "{}", stderr(&unreachable));
}

#[test]
fn no_secret_reaches_the_logs_and_data_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let log1 = tmp.path().join("log1");
    // First start bootstraps and shows the admin key on standard output, once.
    let s = Server::start(&dir, &log1);
    std::thread::sleep(Duration::from_millis(100));
    let out_so_far = s.stdout.lock().unwrap().clone();
    let admin = out_so_far
        .split_whitespace()
        .find(|w| w.starts_with("kg_live_") && w.len() == 46)
        .expect("bootstrap key on stdout")
        .to_string();

    let mut secrets = vec![admin.clone()];
    let c = s.json(&admin, &["consumers", "create", "--name", "acme"]);
    let cid = c["id"].as_str().unwrap();
    let k = s.json(&admin, &["keys", "create", "--consumer", cid, "--name", "k", "--scope", "a"]);
    let kid = k["id"].as_str().unwrap().to_string();
    secrets.push(k["key"].as_str().unwrap().to_string());
    let r = s.json(&admin, &["keys", "rotate", &kid, "--overlap", "60"]);
    secrets.push(r["key"].as_str().unwrap().to_string());
    let k2 = s.json(&admin, &["keys", "create", "--consumer", cid, "--name", "k2"]);
    secrets.push(k2["key"].as_str().unwrap().to_string());
    for secret in &secrets[1..] {
        s.decision(&admin, &[secret, "--scope", "a"]);
        let resp = s.get("/v1/auth", &[("X-API-Key", secret)]);
        assert!(resp.starts_with("HTTP/1.1 "), "{resp}");
        s.get("/v1/auth?scope=a", &[("Authorization", &format!("Bearer {secret}"))]);
    }
    s.json(&admin, &["keys", "revoke", k2["id"].as_str().unwrap()]);
    let (stdout1, stderr1) = s.stop();

    // Restart: no new bootstrap key, everything still there.
    let log2 = tmp.path().join("log2");
    let s = Server::start(&dir, &log2);
    assert_eq!(s.decision(&admin, &[&secrets[2], "--scope", "a"])["code"], "VALID");
    assert_eq!(s.decision(&admin, &[&secrets[3]])["code"], "REVOKED");
    let resp = s.get("/v1/auth", &[("X-API-Key", &secrets[2])]);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (stdout2, stderr2) = s.stop();

    assert!(stderr1.contains("TRACE") || stderr1.contains("DEBUG"), "the log ran at full verbosity");
    assert_eq!(stdout1.matches(&admin).count(), 3, "bootstrap key shown once (key, export line, curl line)");
    assert!(!stdout2.contains("kg_live_"), "{stdout2}");
    for secret in &secrets {
        let body = &secret[12..];
        assert!(!stderr1.contains(body), "a secret reached the log of the first run");
        assert!(!stderr2.contains(body), "a secret reached the log of the second run");
    }
    for secret in &secrets[1..] {
        assert!(!stdout1.contains(&secret[12..]), "a created secret reached stdout");
    }
}

#[test]
fn admin_key_recovery_and_config_handling() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let missing = keygate().args(["admin-key", "--data-dir"]).arg(&dir).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("keygate init"), "{}", stderr(&missing));

    init(&dir);
    let out = keygate().args(["admin-key", "--json", "--data-dir"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let recovered: Value = serde_json::from_slice(&out.stdout).unwrap();
    let recovered = recovered["admin_key"].as_str().unwrap();

    // A config file sets the data directory; the flag sets the port.
    let config = tmp.path().join("keygate.toml");
    let default = keygate().arg("default-config").output().unwrap();
    assert!(default.status.success());
    let text = stdout(&default)
        .replace("data_dir = \"keygate-data\"", &format!("data_dir = {:?}", dir.display().to_string()));
    std::fs::write(&config, text).unwrap();
    let log = tmp.path().join("log");
    let stderr_file = std::fs::File::create(&log).unwrap();
    let mut child = keygate()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(stderr_file)
        .spawn()
        .unwrap();
    // Read the first line, then close the pipe: a server whose stdout goes away must keep serving.
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    drop(reader);
    std::thread::sleep(Duration::from_millis(100));
    let url = first
        .trim()
        .strip_prefix("Keygate listening on ")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let out = keygate()
        .args(["keys", "list", "--json"])
        .env("KEYGATE_URL", &url)
        .env("KEYGATE_ADMIN_KEY", recovered)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "bootstrap and recovered admin keys");

    // A second server on the same data directory refuses, naming the first; on the same port (another
    // directory) it fails clearly too.
    let twin = keygate().args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&dir).output().unwrap();
    assert_eq!(twin.status.code(), Some(1));
    let msg = stderr(&twin);
    assert!(msg.contains(&format!("process {}", child.id())) && msg.contains("PostgreSQL"), "{msg}");
    let addr = url.trim_start_matches("http://");
    let clash = keygate()
        .args(["serve", "--listen", addr, "--data-dir"])
        .arg(tmp.path().join("other"))
        .output()
        .unwrap();
    assert_eq!(clash.status.code(), Some(1));
    assert!(stderr(&clash).contains("--listen"), "{}", stderr(&clash));

    // `admin-key` while the server runs: the key it prints works at once.
    let out = keygate().args(["admin-key", "--json", "--data-dir"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let fresh: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = keygate()
        .args(["keys", "list", "--json"])
        .env("KEYGATE_URL", &url)
        .env("KEYGATE_ADMIN_KEY", fresh["admin_key"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(listed.status.success(), "the new admin key works immediately: {}", stderr(&listed));
    let _ = child.kill();
    let _ = child.wait();

    // A broken config file fails clearly.
    std::fs::write(&config, "listen = 5\n").unwrap();
    let bad = keygate().args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("is not an address"), "{}", stderr(&bad));
    std::fs::write(&config, "lisen = 5\n").unwrap();
    let bad = keygate().args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("unknown setting `lisen`"), "{}", stderr(&bad));
}

#[test]
fn usage_controls_import_and_usage_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    let c = s.json(&admin, &["consumers", "create", "--name", "acme", "--rate-limit", "plan:1000/60"]);
    let cid = c["id"].as_str().unwrap();
    assert_eq!(c["rate_limits"][0]["limit"], 1000);

    let k = s.json(
        &admin,
        &[
            "keys",
            "create",
            "--consumer",
            cid,
            "--name",
            "metered",
            "--rate-limit",
            "per_minute:100/60",
            "--quota",
            "3",
            "--refill-amount",
            "3",
            "--refill-daily",
            "--allow-ip",
            "127.0.0.0/8",
            "--allow-ip",
            "2001:db8::/32",
        ],
    );
    let kid = k["id"].as_str().unwrap().to_string();
    let secret = k["key"].as_str().unwrap().to_string();
    assert_eq!(k["quota"]["refill"]["schedule"], "daily");
    assert_eq!(k["allowed_ips"], serde_json::json!(["127.0.0.0/8", "2001:db8::/32"]));
    let d = s.decision(&admin, &[&secret]);
    assert_eq!(d["quota"]["remaining"], 2, "{d}");
    assert_eq!(d["rate_limit"]["name"], "per_minute");

    assert_eq!(s.json(&admin, &["keys", "quota", &kid, "--add", "10"])["quota"]["remaining"], 12);
    assert_eq!(s.json(&admin, &["keys", "quota", &kid, "--reset"])["quota"]["remaining"], 3);
    assert_eq!(s.json(&admin, &["keys", "quota", &kid, "--set", "1"])["quota"]["remaining"], 1);
    s.decision(&admin, &[&secret]);
    assert_eq!(s.decision(&admin, &[&secret])["code"], "QUOTA_EXCEEDED");
    let updated =
        s.json(&admin, &["keys", "update", &kid, "--no-quota", "--any-ip", "--inherit-rate-limits"]);
    assert!(
        updated["quota"].is_null() && updated["allowed_ips"].is_null() && updated["rate_limits"].is_null()
    );
    assert_eq!(s.decision(&admin, &[&secret])["rate_limit"]["name"], "plan");
    let bad = s.cli(&admin, &["keys", "create", "--consumer", cid, "--name", "x", "--rate-limit", "fast"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("NAME:LIMIT/WINDOW"), "{}", stderr(&bad));

    // Import from a file, with progress and per-item errors.
    let file = tmp.path().join("keys.json");
    let keys: Vec<Value> = (0..25)
        .map(|i| serde_json::json!({"consumer_id": cid, "name": format!("old-{i}"), "key": format!("legacy_key_{i:016}")}))
        .chain([serde_json::json!({"consumer_id": cid, "name": "too short", "key": "abc"})])
        .collect();
    std::fs::write(&file, serde_json::to_string(&keys).unwrap()).unwrap();
    let out = s.cli(&admin, &["keys", "import", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "one item failed");
    assert!(stdout(&out).contains("25 of 26 imported, 1 failed"), "{}", stdout(&out));
    assert!(stdout(&out).contains("key #25: not imported"), "{}", stdout(&out));
    assert!(stdout(&out).contains("key #0: imported as key_"), "new ids are listed: {}", stdout(&out));
    assert_eq!(s.decision(&admin, &["legacy_key_0000000000000007"])["code"], "VALID");

    // Usage as a chart and as JSON.
    let chart = s.cli(&admin, &["usage", &kid, "--granularity", "minute", "--since", "1h"]);
    assert!(chart.status.success(), "{}", stderr(&chart));
    assert!(stdout(&chart).contains("█"), "{}", stdout(&chart));
    assert!(stdout(&chart).contains("QUOTA_EXCEEDED 1"), "{}", stdout(&chart));
    // Every minute of the hour has its line; minutes without verifies show 0.
    let text = stdout(&chart);
    let zeros = text.lines().filter(|l| l.contains('T') && l.ends_with(" 0")).count();
    assert!(zeros >= 55, "empty buckets are shown as zero: {text}");
    let u = s.json(&admin, &["usage", cid, "--consumer", "--granularity", "day", "--since", "2d"]);
    assert!(u["total"].as_i64().unwrap() >= 5, "{u}");
    let bad = s.cli(&admin, &["usage", &kid, "--since", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = s.cli(&admin, &["usage", &kid, "--granularity", "fortnight"]);
    assert_eq!(bad.status.code(), Some(2));
    let hint = s.cli(&admin, &["usage", cid]);
    assert_eq!(hint.status.code(), Some(2));
    assert!(stderr(&hint).contains("--consumer"), "{}", stderr(&hint));
    s.stop();
}

#[test]
fn clients_from_the_cli_and_python_interop_with_authlib_and_pyjwt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    let consumer = s.json(&admin, &["consumers", "create", "--name", "partner"]);
    let cid = consumer["id"].as_str().unwrap();
    // The interface scripts rely on.
    let c = s.json(
        &admin,
        &[
            "clients",
            "create",
            "--consumer",
            cid,
            "--name",
            "etl",
            "--scope",
            "articles:read",
            "--scope",
            "articles:write",
            "--grant",
            "client_credentials",
            "--token-format",
            "jwt",
            "--audience",
            "https://api.example.com",
        ],
    );
    let client_id = c["client_id"].as_str().unwrap().to_string();
    let client_secret = c["client_secret"].as_str().unwrap().to_string();
    assert!(client_secret.starts_with("kgcs_"));
    let listed = s.cli(&admin, &["clients", "list"]);
    assert!(stdout(&listed).contains(&client_id) && !stdout(&listed).contains(&client_secret));
    assert_eq!(s.json(&admin, &["clients", "show", &client_id])["name"], "etl");
    assert_eq!(
        s.json(&admin, &["clients", "update", &client_id, "--lifetime", "600"])["token_lifetime_seconds"],
        600
    );
    let keys = s.json(&admin, &["signing-keys", "list"]);
    assert_eq!(keys[0]["status"], "active");
    let rotated = s.json(&admin, &["signing-keys", "rotate", "--publish-ahead", "0"]);
    assert_eq!(rotated.as_array().unwrap().len(), 2);

    pip_install(&["authlib", "pyjwt[crypto]", "requests"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/oauth_interop.py");
    let run = Command::new("python3")
        .arg(script)
        .env("ISSUER", &s.url)
        .env("CLIENT_ID", &client_id)
        .env("CLIENT_SECRET", &client_secret)
        .env("AUDIENCE", "https://api.example.com")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    assert!(stdout(&run).contains("interop: ok"));

    assert_eq!(s.json(&admin, &["clients", "disable", &client_id])["disabled"], true);
    assert_eq!(s.json(&admin, &["clients", "delete", &client_id])["deleted"], client_id.as_str());
    let gone = s.cli(&admin, &["clients", "show", &client_id]);
    assert_eq!(gone.status.code(), Some(1));
    let (out, log) = s.stop();
    // The server ran at trace level while Python authenticated with the secret and handled its tokens.
    assert!(
        !log.contains(&client_secret[10..]) && !out.contains(&client_secret[10..]),
        "a client secret reached the log"
    );
    assert!(!log.contains("eyJ"), "a JWT reached the log");
}

#[test]
fn users_and_the_authorization_code_flow_from_the_cli_and_authlib() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    let password = "a long passphrase 42";
    let mut cmd = keygate();
    cmd.args([
        "users",
        "create",
        "--username",
        "alice",
        "--password-stdin",
        "--email",
        "a@example.com",
        "--json",
    ])
    .env("KEYGATE_URL", &s.url)
    .env("KEYGATE_ADMIN_KEY", &admin);
    let out = with_stdin(cmd, &format!("{password}\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    let user: Value = serde_json::from_slice(&out.stdout).unwrap();
    let user_id = user["id"].as_str().unwrap().to_string();
    assert!(user_id.starts_with("usr_"));
    // A weak password is refused with the reason.
    let mut cmd = keygate();
    cmd.args(["users", "create", "--username", "bob", "--password-stdin"])
        .env("KEYGATE_URL", &s.url)
        .env("KEYGATE_ADMIN_KEY", &admin);
    let weak = with_stdin(cmd, "password123\n");
    assert_eq!(weak.status.code(), Some(1));
    assert!(stderr(&weak).contains("common"), "{}", stderr(&weak));

    let cid =
        s.json(&admin, &["consumers", "create", "--name", "reader"])["id"].as_str().unwrap().to_string();
    let redirect = "http://127.0.0.1:9/callback";
    let c = s.json(
        &admin,
        &[
            "clients",
            "create",
            "--consumer",
            &cid,
            "--name",
            "Reader",
            "--scope",
            "articles:read",
            "--grant",
            "authorization_code",
            "--grant",
            "refresh_token",
            "--redirect-uri",
            redirect,
        ],
    );
    assert_eq!(c["redirect_uris"][0], redirect);
    s.json(&admin, &["scopes", "describe", "articles:read", "Read your articles"]);

    pip_install(&["authlib", "requests"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/authcode_authlib.py");
    let run = Command::new("python3")
        .arg(script)
        .env("ISSUER", &s.url)
        .env("CLIENT_ID", c["client_id"].as_str().unwrap())
        .env("CLIENT_SECRET", c["client_secret"].as_str().unwrap())
        .env("USERNAME", "alice")
        .env("PASSWORD", password)
        .env("REDIRECT_URI", redirect)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    let printed = stdout(&run);
    assert!(printed.contains("authcode: ok"), "{printed}");
    let seen: Value = serde_json::from_str(printed.lines().next().unwrap()).unwrap();

    // Personal access tokens from the CLI: printed once, listed without the secret.
    let pat = s.json(
        &admin,
        &[
            "users",
            "tokens",
            "create",
            "alice",
            "--name",
            "laptop",
            "--scope",
            "articles:read",
            "--expires",
            "30d",
        ],
    );
    let pat_token = pat["token"].as_str().unwrap().to_string();
    assert!(pat_token.starts_with("kgpat_"));
    assert_eq!(
        s.decision(&admin, &[&pat_token, "--scope", "articles:read"])["kind"],
        "personal_access_token"
    );
    let listed = stdout(&s.cli(&admin, &["users", "tokens", "list", "alice"]));
    assert!(listed.contains("laptop") && !listed.contains(&pat_token[10..]), "{listed}");
    let never = s.cli(
        &admin,
        &["users", "tokens", "create", "alice", "--name", "x", "--scope", "a:b", "--expires", "never"],
    );
    assert_eq!(never.status.code(), Some(1), "no tokens without expiry unless the operator allows them");
    assert!(stderr(&never).contains("expiry"), "{}", stderr(&never));
    let expiring = s.json(&admin, &["users", "expiring-tokens", "--within", "31d"]);
    assert_eq!(expiring["items"][0]["id"], pat["id"]);
    let rotated = s.json(&admin, &["users", "tokens", "rotate", "alice", pat["id"].as_str().unwrap()]);
    assert_ne!(rotated["token"], pat["token"]);
    s.json(&admin, &["users", "tokens", "revoke", "alice", pat["id"].as_str().unwrap()]);
    assert_eq!(s.decision(&admin, &[rotated["token"].as_str().unwrap()])["code"], "REVOKED");

    let grants = s.json(&admin, &["users", "grants", "alice"]);
    let grant = grants["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(grants["items"][0]["scopes"], serde_json::json!(["articles:read"]));
    s.json(&admin, &["users", "revoke-grant", "alice", &grant]);
    assert_eq!(s.json(&admin, &["users", "grants", &user_id])["items"].as_array().unwrap().len(), 0);
    assert_eq!(s.json(&admin, &["users", "disable", "alice"])["disabled"], true);
    assert!(s.json(&admin, &["users", "show", "alice"])["last_login_at"].is_string());
    let listed = stdout(&s.cli(&admin, &["users", "list"]));
    assert!(listed.contains("alice") && !listed.contains("argon2"), "{listed}");
    let (out, log) = s.stop();
    // The server ran at trace level through the whole flow: no password, code or token in its output.
    let mut secrets = vec![password.to_string(), seen["code"].as_str().unwrap().to_string()];
    for t in
        seen["access_tokens"].as_array().unwrap().iter().chain(seen["refresh_tokens"].as_array().unwrap())
    {
        secrets.push(t.as_str().unwrap().to_string());
    }
    for secret in secrets {
        let tail = &secret[secret.len() - 16..];
        assert!(!log.contains(tail) && !out.contains(tail), "a secret reached the log: …{tail}");
    }
}

#[test]
fn device_flow_token_exchange_and_dpop_with_authlib_and_pyjwt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    let password = "another long passphrase";
    let mut cmd = keygate();
    cmd.args(["users", "create", "--username", "tv-owner", "--password-stdin"])
        .env("KEYGATE_URL", &s.url)
        .env("KEYGATE_ADMIN_KEY", &admin);
    assert!(with_stdin(cmd, &format!("{password}\n")).status.success());
    let cid = s.json(&admin, &["consumers", "create", "--name", "media"])["id"].as_str().unwrap().to_string();
    let device = s.json(
        &admin,
        &[
            "clients",
            "create",
            "--consumer",
            &cid,
            "--name",
            "TV",
            "--public",
            "--scope",
            "videos:watch",
            "--grant",
            "urn:ietf:params:oauth:grant-type:device_code",
        ],
    );
    let exchanger = s.json(
        &admin,
        &[
            "clients",
            "create",
            "--consumer",
            &cid,
            "--name",
            "backend",
            "--scope",
            "articles:read",
            "--audience",
            "https://downstream.example",
            "--grant",
            "client_credentials",
            "--grant",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ],
    );
    let key =
        s.json(&admin, &["keys", "create", "--consumer", &cid, "--name", "svc", "--scope", "articles:read"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/token_kinds_authlib.py");
    pip_install(&["authlib", "requests", "pyjwt[crypto]"]);
    let run = Command::new("python3")
        .arg(script)
        .env("ISSUER", &s.url)
        .env("DEVICE_CLIENT_ID", device["client_id"].as_str().unwrap())
        .env("EXCHANGE_CLIENT_ID", exchanger["client_id"].as_str().unwrap())
        .env("EXCHANGE_CLIENT_SECRET", exchanger["client_secret"].as_str().unwrap())
        .env("API_KEY", key["key"].as_str().unwrap())
        .env("USERNAME", "tv-owner")
        .env("PASSWORD", password)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    let out = stdout(&run);
    assert!(out.contains("token kinds: ok"), "{out}");
    let seen: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        s.decision(&admin, &[seen["device"].as_str().unwrap(), "--scope", "videos:watch"])["code"],
        "VALID"
    );
    assert_eq!(
        s.decision(&admin, &[seen["exchanged"].as_str().unwrap(), "--scope", "articles:read"])["code"],
        "VALID"
    );
    // The DPoP-bound token: refused as a bare bearer token, accepted with PyJWT's proof.
    assert_eq!(s.decision(&admin, &[seen["bound"].as_str().unwrap()])["code"], "DPOP_PROOF_INVALID");
    let body = serde_json::json!({"credential": seen["bound"], "dpop": {"proof": seen["proof"], "method": "GET", "url": seen["url"]}});
    let d: Value = tokio::runtime::Runtime::new().unwrap().block_on(async {
        keygate_server::webhooks::install_tls();
        let r = reqwest::Client::new()
            .post(format!("{}/v1/verify", s.url))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    });
    assert_eq!(d["code"], "VALID", "{d}");
    // Revoking the key stops the exchanged token.
    s.json(&admin, &["keys", "revoke", key["id"].as_str().unwrap()]);
    assert_eq!(s.decision(&admin, &[seen["exchanged"].as_str().unwrap()])["code"], "REVOKED");
    let (out, log) = s.stop();
    for secret in
        [seen["device"].as_str().unwrap(), seen["exchanged"].as_str().unwrap(), key["key"].as_str().unwrap()]
    {
        let tail = &secret[secret.len() - 16..];
        assert!(!log.contains(tail) && !out.contains(tail), "a secret reached the log: …{tail}");
    }
}

/// Runs the CLI with `input` on standard input.
fn with_stdin(mut cmd: Command, input: &str) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_cli_without_rough_edges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    let cid = s.json(&admin, &["consumers", "create", "--name", "acme", "--external-id", "cust-42"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s.json(&admin, &["consumers", "show", "--external-id", "cust-42"])["id"], cid.as_str());

    // Ids are checked by their prefix and never climb out of their path segment.
    for bad in ["../consumers/".to_string() + &cid, "../consumers".into(), "key_..%2F..".into()] {
        let out = s.cli(&admin, &["keys", "disable", &bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
    assert_eq!(s.json(&admin, &["consumers", "show", &cid])["disabled"], false, "nothing was disabled");
    let (kid, secret) = {
        let k = s.json(
            &admin,
            &[
                "keys",
                "create",
                "--consumer",
                &cid,
                "--name",
                "k",
                "--expires-in",
                "30d",
                "--rate-limit",
                "per_second:10/1s",
                "--quota",
                "5",
                "--allow-ip",
                "203.0.113.0/24",
            ],
        );
        (k["id"].as_str().unwrap().to_string(), k["key"].as_str().unwrap().to_string())
    };
    // A secret pasted where an id belongs: said so, and not echoed.
    let pasted = s.cli(&admin, &["keys", "show", &secret]);
    assert_eq!(pasted.status.code(), Some(2));
    assert!(
        stderr(&pasted).contains("secret") && !stderr(&pasted).contains(&secret[8..]),
        "{}",
        stderr(&pasted)
    );

    // Human output: id first, limits and quotas as typed.
    let created = s.cli(
        &admin,
        &["keys", "create", "--consumer", &cid, "--name", "human", "--expires-at", "2031-01-31"],
    );
    let text = stdout(&created);
    assert!(text.starts_with("Created key key_"), "{text}");
    assert!(text.contains("2031-01-31T00:00:00") && text.contains("shown only this once"), "{text}");
    let shown = stdout(&s.cli(&admin, &["keys", "show", &kid]));
    assert!(shown.contains("per_second:10/1s") && shown.contains("5 left"), "{shown}");

    // verify: the secret from standard input, with --ip and --cost.
    let mut cmd = keygate();
    cmd.args(["verify", "-", "--ip", "203.0.113.7", "--cost", "0", "--json"])
        .env("KEYGATE_URL", &s.url)
        .env("KEYGATE_ADMIN_KEY", &admin);
    let out = with_stdin(cmd, &format!("{secret}\n"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((d["code"].as_str(), d["quota"]["remaining"].as_u64()), (Some("VALID"), Some(5)));
    assert_eq!(s.decision(&admin, &[&secret, "--ip", "198.51.100.1"])["code"], "IP_NOT_ALLOWED");

    // Durations everywhere: rotation overlap.
    let rotated = s.json(&admin, &["keys", "rotate", &kid, "--overlap", "1h"]);
    assert!(rotated["previous_expires_at"].is_string(), "{rotated}");
    assert_eq!(s.decision(&admin, &[&secret, "--ip", "203.0.113.7"])["code"], "VALID", "old secret overlaps");
    let help = stdout(&keygate().args(["keys", "rotate", "--help"]).output().unwrap());
    assert!(help.contains("[default: 0]") && help.contains("confirm"), "{help}");

    // Global options before or after the command; --help documents every argument.
    let before = keygate()
        .args(["--json", "--url", &s.url, "consumers", "list"])
        .env("KEYGATE_ADMIN_KEY", &admin)
        .output()
        .unwrap();
    assert!(before.status.success() && serde_json::from_slice::<Value>(&before.stdout).is_ok());
    let help = stdout(&keygate().args(["keys", "create", "--help"]).output().unwrap());
    assert!(help.contains("Global options") && help.contains("--expires-in <DURATION>"), "{help}");
    let grant_help = stdout(&keygate().args(["clients", "create", "--help"]).output().unwrap());
    assert!(grant_help.contains("client_credentials"), "{grant_help}");
    let init_help = stdout(&keygate().args(["init", "--help"]).output().unwrap());
    assert!(!init_help.contains("--cache-capacity"), "init shows only what it uses: {init_help}");

    // A closed pipe ends the output quietly.
    for _ in 0..30 {
        s.json(&admin, &["consumers", "create", "--name", "filler"]);
    }
    let mut child = keygate()
        .args(["audit"])
        .env("KEYGATE_URL", &s.url)
        .env("KEYGATE_ADMIN_KEY", &admin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(first.contains("ACTION"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    // Audit: actor names and details, paged with --before.
    let page = stdout(&s.cli(&admin, &["audit", "--limit", "2"]));
    assert!(page.contains("bootstrap admin (key_"), "{page}");
    assert!(page.contains("name=filler"), "{page}");
    let older = page.lines().find_map(|l| l.strip_prefix("(older: --before ")).unwrap().trim_end_matches(')');
    let next = s.json(&admin, &["audit", "--limit", "2", "--before", older]);
    assert_eq!(next["items"].as_array().unwrap().len(), 2);

    // Connection errors say what is wrong.
    let no_scheme = keygate()
        .args(["consumers", "list"])
        .env("KEYGATE_URL", s.url.trim_start_matches("http://"))
        .env("KEYGATE_ADMIN_KEY", &admin)
        .output()
        .unwrap();
    assert_eq!(no_scheme.status.code(), Some(2));
    assert!(stderr(&no_scheme).contains("no scheme"), "{}", stderr(&no_scheme));
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_url = format!("http://{}", other.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in other.incoming().take(1) {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: 9\r\nconnection: close\r\n\r\n<h1>x</h1");
        }
    });
    let wrong = keygate()
        .args(["consumers", "list"])
        .env("KEYGATE_URL", &other_url)
        .env("KEYGATE_ADMIN_KEY", &admin)
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("not Keygate's"), "{}", stderr(&wrong));

    // `keygate token`: a client gets a token from the command line.
    let c = s.json(
        &admin,
        &["clients", "create", "--consumer", &cid, "--name", "etl", "--scope", "r", "--lifetime", "10m"],
    );
    let mut cmd = keygate();
    cmd.args(["token", "--client-id", c["client_id"].as_str().unwrap(), "--client-secret-stdin", "--json"])
        .env("KEYGATE_URL", &s.url);
    let out = with_stdin(cmd, c["client_secret"].as_str().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["expires_in"], 600);
    assert_eq!(s.decision(&admin, &[t["access_token"].as_str().unwrap(), "--scope", "r"])["code"], "VALID");

    // The last admin key cannot be revoked; the message says how to recover.
    let admin_id = s.json(&admin, &["keys", "list"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "bootstrap admin")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = s.cli(&admin, &["keys", "revoke", &admin_id]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("last admin key") && stderr(&refused).contains("keygate admin-key"));
    let (_, log) = s.stop();
    // Logs: no colour codes when stderr is a file; one line per request with the route template.
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log file");
    assert!(log.contains("keygate::access") && log.contains("route=\"/v1/keys/{id}\""), "no access log line");
    assert!(!log.contains(&secret[12..]), "a secret reached the log");
}

#[test]
fn separate_admin_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let mut child = keygate()
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut public = String::new();
    let mut admin_url = String::new();
    while public.is_empty() || admin_url.is_empty() {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("Keygate listening on ") {
            public = rest.split_whitespace().next().unwrap().to_string();
        }
        if let Some(rest) = line.strip_prefix("Admin API listening on ") {
            admin_url = rest.trim().to_string();
        }
    }
    let run = |url: &str, args: &[&str]| {
        keygate().args(args).env("KEYGATE_URL", url).env("KEYGATE_ADMIN_KEY", &admin).output().unwrap()
    };
    // Admin routes answer on the admin listener only; verify on the public one.
    assert!(run(&admin_url, &["consumers", "list"]).status.success());
    let on_public = run(&public, &["consumers", "list"]);
    assert_eq!(on_public.status.code(), Some(1));
    assert!(stderr(&on_public).contains("not_found"), "{}", stderr(&on_public));
    assert_eq!(run(&public, &["verify", &admin, "--json"]).status.code(), Some(0));
    let metrics = |url: &str| {
        let addr = url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    };
    assert!(metrics(&public).starts_with("HTTP/1.1 404"));
    assert!(metrics(&admin_url).starts_with("HTTP/1.1 200"));
    let _ = child.kill();
    let _ = child.wait();
}

/// The README's walkthrough, run as written: every `keygate` line of its shell blocks, with the ids and
/// secrets that earlier steps printed put in for the `…` placeholders.
#[test]
fn readme_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme.find("## Five-minute walkthrough").unwrap();
    let end = readme.find("### Protecting an API").unwrap();
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        let mut full = std::mem::take(&mut pending) + line.trim_start();
        if let Some(i) = full.find("  #") {
            full.truncate(i);
        }
        let full = full.trim().to_string();
        if full.starts_with("keygate ") && !full.starts_with("keygate serve") || full.starts_with("echo ") {
            lines.push(full);
        }
    }
    assert!(lines.len() >= 20, "the walkthrough has its commands: {lines:?}");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_keygate")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut vars: Vec<(&str, String)> = Vec::new();
    for line in &lines {
        let mut cmd = line.clone();
        for (placeholder, value) in &vars {
            cmd = cmd.replace(placeholder, value);
        }
        assert!(!cmd.contains('…'), "no value yet for a placeholder in {line:?}");
        let run = if cmd.starts_with("echo ") && !cmd.contains('|') {
            cmd.clone()
        } else {
            format!("{cmd} --json")
        };
        let out = Command::new("sh")
            .args(["-c", &run])
            .current_dir(tmp.path())
            .env("PATH", &path)
            .env("KEYGATE_URL", &s.url)
            .env("KEYGATE_ADMIN_KEY", &admin)
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}\n{}{}", stdout(&out), stderr(&out));
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else { continue };
        let mut set = |k: &'static str, v: &Value| {
            if let Some(v) = v.as_str() {
                vars.retain(|(p, _)| *p != k);
                vars.push((k, v.to_string()));
            }
        };
        if let Some(id) = v["id"].as_str() {
            if id.starts_with("cons_") && line.starts_with("keygate consumers create") {
                set("cons_…", &v["id"]);
            }
            if id.starts_with("key_") && v.get("key").is_some() {
                set("key_…", &v["id"]);
                set("kg_live_…", &v["key"]);
            }
        }
        set("kgc_…", &v["client_id"]);
        set("kgcs_…", &v["client_secret"]);
        set("eyJ…", &v["access_token"]);
    }
    s.stop();
}

fn pip_install(packages: &[&str]) {
    let pip = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .output()
        .unwrap();
    assert!(pip.status.success(), "pip install failed: {}", stderr(&pip));
}

/// The test receiver (tests/interop/webhook_receiver.py): verifies with the `standardwebhooks` package.
struct Receiver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Receiver {
    fn start(dir: &Path, secret_file: &Path, fail_first: u32) -> Receiver {
        let log = dir.join("received.jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/webhook_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .env("SECRET_FILE", secret_file)
            .env("LOG", &log)
            .env("FAIL_FIRST", fail_first.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("receiver printed {line:?}"));
        Receiver { child, url: format!("http://127.0.0.1:{port}/hook"), log }
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn webhooks_survive_kill_9_with_every_event_delivered_and_verified_by_standardwebhooks() {
    pip_install(&["standardwebhooks"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let env = [("KEYGATE_WEBHOOKS_ALLOW_PRIVATE", "true"), ("KEYGATE_WEBHOOKS_FIRST_RETRY_SECONDS", "1")];
    let s = Server::start_env(&dir, &tmp.path().join("log1"), &env);
    let secret_file = tmp.path().join("secret");
    // The receiver fails its first two requests: those deliveries are retried.
    let rx = Receiver::start(tmp.path(), &secret_file, 2);
    // Without allow_private the same URL would be refused: it is a loopback address.
    let hook = s.json(&admin, &["webhooks", "create", &rx.url, "--event", "consumer.created"]);
    let secret = hook["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    std::fs::write(&secret_file, secret).unwrap();
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let listed = s.cli(&admin, &["webhooks", "list"]);
    assert!(stdout(&listed).contains(&hook_id) && !stdout(&listed).contains(secret));

    // A burst of changes from four writers; the server is killed with SIGKILL in the middle of it.
    let acknowledged = Mutex::new(Vec::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for w in 0..4 {
            let (s, admin, acknowledged, stop) = (&s, &admin, &acknowledged, &stop);
            scope.spawn(move || {
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let out =
                        s.cli(admin, &["consumers", "create", "--name", &format!("w{w}-{i}"), "--json"]);
                    if out.status.success() {
                        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                        acknowledged.lock().unwrap().push(v["id"].as_str().unwrap().to_string());
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while acknowledged.lock().unwrap().len() < 24 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        s.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mut s = s;
    s.child.wait().unwrap();
    let acknowledged = acknowledged.into_inner().unwrap();
    assert!(acknowledged.len() >= 24, "{} changes acknowledged", acknowledged.len());

    // Restarted on the same data: every acknowledged change's event arrives.
    let s = Server::start_env(&dir, &tmp.path().join("log2"), &env);
    let deadline = Instant::now() + Duration::from_secs(90);
    let lines = loop {
        let lines = rx.lines();
        let got: std::collections::HashSet<_> =
            lines.iter().filter(|l| l["answered"] == 204).filter_map(|l| l["object_id"].as_str()).collect();
        if acknowledged.iter().all(|id| got.contains(id.as_str())) {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "missing events: {:?}",
            acknowledged.iter().filter(|i| !got.contains(i.as_str())).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(lines.iter().all(|l| l["verified"] == true), "every delivery verifies: {lines:?}");
    assert!(lines.iter().all(|l| l["type"] == "consumer.created"));
    // Duplicates only with the same webhook-id.
    let mut ids: std::collections::HashMap<String, std::collections::HashSet<String>> = Default::default();
    for l in &lines {
        ids.entry(l["object_id"].as_str().unwrap().to_string())
            .or_default()
            .insert(l["id"].as_str().unwrap().to_string());
    }
    assert!(ids.values().all(|w| w.len() == 1), "{ids:?}");
    // The two refused attempts were retried, and the attempts are listed.
    assert!(lines.iter().filter(|l| l["answered"] == 500).count() == 2);
    // (The receiver logs before Keygate records the attempt: look again until they are recorded.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = s.json(&admin, &["webhooks", "deliveries", &hook_id, "--limit", "1000"]);
        let retried: Vec<&Value> = d["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["attempts"].as_array().unwrap().iter().any(|a| a["status_code"] == 500))
            .collect();
        if !retried.is_empty() && retried.iter().all(|d| d["status"] == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "the refused deliveries were retried and delivered: {d}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let human = s.cli(&admin, &["webhooks", "deliveries", &hook_id]);
    assert!(stdout(&human).contains("delivered"), "{}", stdout(&human));
    let types = s.json(&admin, &["webhooks", "event-types"]);
    assert!(types.as_array().unwrap().len() > 20);
    let bad = s.cli(&admin, &["webhooks", "create", "ftp://x", "--event", "*"]);
    assert_ne!(bad.status.code(), Some(0));
    assert!(stderr(&bad).contains("url"), "{}", stderr(&bad));
    s.stop();
}

#[test]
fn an_mcp_agent_built_on_oauth4webapi_reaches_a_protected_api() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let resource = format!("http://127.0.0.1:{port}/mcp");
    let env = [
        ("KEYGATE_OAUTH_PROTECTED_RESOURCES", resource.as_str()),
        ("KEYGATE_OAUTH_REGISTRATION", "open"),
        ("KEYGATE_OAUTH_REGISTRATION_SCOPES", "tools:call"),
        // The API's forward-auth calls come from this host: its X-Forwarded-* name the resource.
        ("KEYGATE_TRUSTED_PROXIES", "127.0.0.1"),
    ];
    let s = Server::start_env(&dir, &tmp.path().join("log"), &env);
    let password = "a long passphrase 42";
    let mut cmd = keygate();
    cmd.args(["users", "create", "--username", "agent-user", "--password-stdin"])
        .env("KEYGATE_URL", &s.url)
        .env("KEYGATE_ADMIN_KEY", &admin);
    let out = with_stdin(cmd, &format!("{password}\n"));
    assert!(out.status.success(), "{}", stderr(&out));

    let modules = tmp.path().join("node");
    std::fs::create_dir_all(&modules).unwrap();
    let npm = Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "oauth4webapi@3"])
        .current_dir(&modules)
        .output()
        .unwrap();
    assert!(npm.status.success(), "npm install failed: {}", stderr(&npm));
    let o4w = modules.join("node_modules/oauth4webapi/build/index.js");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/mcp_oauth4webapi.mjs");
    let run = Command::new("node")
        .arg(script)
        .env("O4W", format!("file://{}", o4w.display()))
        .env("ISSUER", &s.url)
        .env("RESOURCE_PORT", port.to_string())
        .env("USERNAME", "agent-user")
        .env("PASSWORD", password)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    assert!(stdout(&run).contains("mcp: ok"), "{}", stdout(&run));
    // The operator sees the agent's client, under "Registered clients".
    let clients = s.json(&admin, &["clients", "list"]);
    assert!(clients["items"].as_array().unwrap().iter().any(|c| c["name"] == "o4w agent"), "{clients}");
    s.stop();
}

/// Debian's Chromium, installed when missing (as root, from Debian's packages: the machines this runs on
/// have no other source).
fn chromium() -> PathBuf {
    let path = PathBuf::from("/usr/bin/chromium");
    if !path.exists() {
        let apt = Command::new("sh")
            .args(["-c", "apt-get update -qq && apt-get install -y -qq chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap();
        assert!(
            apt.status.success() && path.exists(),
            "the console test needs Debian's chromium; install it with `apt-get install chromium` (as root): {}",
            stderr(&apt)
        );
    }
    path
}

#[test]
fn the_console_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    // An operator with a user account: the admin role signs them in to the console.
    let password = "a long passphrase for the console";
    let mut cmd = keygate();
    cmd.args(["users", "create", "--username", "operator", "--role", "admin", "--password-stdin", "--json"])
        .env("KEYGATE_URL", &s.url)
        .env("KEYGATE_ADMIN_KEY", &admin);
    let out = with_stdin(cmd, &format!("{password}\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["roles"], serde_json::json!(["admin"]));
    let browser = chromium();
    let modules = tmp.path().join("node");
    std::fs::create_dir_all(&modules).unwrap();
    let npm = Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "playwright-core@1", "axe-core@4"])
        .current_dir(&modules)
        .output()
        .unwrap();
    assert!(npm.status.success(), "npm install failed: {}", stderr(&npm));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/console_playwright.mjs");
    let mut cmd = Command::new("node");
    cmd.arg(script)
        .env("BASE", &s.url)
        .env("ADMIN_KEY", &admin)
        .env("PW", modules.join("node_modules/playwright-core/index.js"))
        .env("AXE", modules.join("node_modules/axe-core/axe.min.js"))
        .env("CHROMIUM", &browser)
        .env("OPERATOR_PASSWORD", password);
    // `KEYGATE_TEST_SCREENSHOTS=DIR` keeps screenshots of the main pages (docs/console/ has them).
    if let Ok(shots) = std::env::var("KEYGATE_TEST_SCREENSHOTS") {
        cmd.env("SHOTS", shots);
    }
    let run = cmd.output().unwrap();
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    assert!(stdout(&run).contains("console: ok"), "{}", stdout(&run));
    // What the browser did is in the audit log through the API too, with the admin key as the actor.
    let audit = s.json(&admin, &["audit", "--action", "key.revoke"]);
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");
    s.stop();
}

/// The developer portal in a real browser: sign-up, the address confirmed through the mail test mode
/// (the link in the server's log), an application on the operator's plan (made with the CLI), a key
/// used, charted, rotated and revoked, a second developer who reaches none of it, accessibility scans.
#[test]
fn the_portal_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let log = tmp.path().join("log");
    let s = Server::start_env(&dir, &log, &[("KEYGATE_PORTAL_SIGNUP", "open")]);
    let plan = s.json(
        &admin,
        &[
            "plans",
            "create",
            "--name",
            "Free",
            "--default",
            "--rate-limit",
            "minute:100/1m",
            "--quota",
            "100",
            "--allow-scope",
            "read",
            "--allow-scope",
            "write",
            "--key-lifetime",
            "90d",
        ],
    );
    assert_eq!(
        (plan["is_default"].as_bool(), plan["self_service"].as_bool()),
        (Some(true), Some(true)),
        "{plan}"
    );
    let browser = chromium();
    let modules = tmp.path().join("node");
    std::fs::create_dir_all(&modules).unwrap();
    let npm = Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "playwright-core@1", "axe-core@4"])
        .current_dir(&modules)
        .output()
        .unwrap();
    assert!(npm.status.success(), "npm install failed: {}", stderr(&npm));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/portal_playwright.mjs");
    let run = Command::new("node")
        .arg(script)
        .env("BASE", &s.url)
        .env("ADMIN_KEY", &admin)
        .env("LOG", &log)
        .env("PW", modules.join("node_modules/playwright-core/index.js"))
        .env("AXE", modules.join("node_modules/axe-core/axe.min.js"))
        .env("CHROMIUM", &browser)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    assert!(stdout(&run).contains("portal: ok"), "{}", stdout(&run));
    // The operator sees the developer and their application, and every change has the developer as its
    // actor.
    let alice = s.json(&admin, &["users", "show", "alice"]);
    let alice_id = alice["id"].as_str().unwrap();
    assert!(alice["email_verified_at"].is_string(), "{alice}");
    let apps = s.json(&admin, &["consumers", "list", "--owner", alice_id]);
    let apps = apps["items"].as_array().unwrap();
    assert_eq!(apps.len(), 1, "{apps:?}");
    assert_eq!(apps[0]["plan_id"], plan["id"]);
    let audit = s.json(&admin, &["audit", "--actor", alice_id]);
    let actions: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    for a in ["consumer.create", "key.create", "key.rotate", "key.revoke"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    s.stop();
}

/// Debian packages a test runs, installed when missing (as root; the machines this runs on have no other
/// source).
fn debian_tools(tools: &[(&str, &str)]) {
    let missing: Vec<&str> =
        tools.iter().filter(|(path, _)| !Path::new(path).exists()).map(|(_, package)| *package).collect();
    if missing.is_empty() {
        return;
    }
    let apt = Command::new("sh")
        .args(["-c", &format!("apt-get update -qq && apt-get install -y -qq {}", missing.join(" "))])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    assert!(
        apt.status.success(),
        "this test needs {missing:?}: install them with apt-get (as root): {}",
        stderr(&apt)
    );
}

#[test]
fn forward_auth_behind_nginx_and_caddy() {
    debian_tools(&[("/usr/sbin/nginx", "nginx-light"), ("/usr/bin/caddy", "caddy")]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/forward_auth_proxies.py");
    let run = Command::new("python3")
        .arg(script)
        .env("KEYGATE_URL", &s.url)
        .env("ADMIN_KEY", &admin)
        .env("WORK", tmp.path())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    let out = stdout(&run);
    for line in ["nginx: ok", "caddy: ok", "nginx-path: ok", "proxies: ok"] {
        assert!(out.contains(line), "{out}");
    }
    s.stop();
}

/// The README's gateway walkthrough, with its own routes file: Python's http.server behind the gateway,
/// `keygate routes check`, a key, and reloads on SIGHUP (a broken file is refused, the old routes stay).
#[test]
fn the_readme_gateway_walkthrough_in_front_of_a_real_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    std::fs::create_dir_all(&demo).unwrap();
    std::fs::write(demo.join("articles.json"), "{\"articles\": []}\n").unwrap();
    std::fs::write(demo.join("demo.txt"), "not routed\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut python = Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(&demo)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let block = readme.split("<!-- test: gateway-routes -->").nth(1).expect("the README's routes block");
    let block = block.split("```toml").nth(1).unwrap().split("```").next().unwrap();
    let routes_text = block.replace("127.0.0.1:9000", &format!("127.0.0.1:{port}"));
    let routes = tmp.path().join("routes.toml");
    std::fs::write(&routes, &routes_text).unwrap();

    let check = keygate().args(["routes", "check"]).arg(&routes).output().unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    let out = stdout(&check);
    assert!(
        out.contains("2 routes, in matching order")
            && out.contains("articles")
            && out.contains("scopes articles:read"),
        "{out}"
    );
    let json = keygate().args(["routes", "check", "--json"]).arg(&routes).output().unwrap();
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["routes"][0]["name"], "articles", "longer paths first: {v}");
    assert!(v["warnings"].as_array().unwrap().is_empty(), "the README's public route is exact: {v}");

    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start_with(
        &dir,
        &tmp.path().join("log"),
        &[],
        &["--gateway-listen", "127.0.0.1:0", "--gateway-routes", routes.to_str().unwrap()],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let said = s.stdout.lock().unwrap().clone();
        if let Some(l) = said.lines().find(|l| l.starts_with("Gateway listening on http://")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "{said}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line.contains("2 routes from"), "{line}");
    let gw_addr = line
        .trim_start_matches("Gateway listening on http://")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let gw = |path: &str, headers: &[(&str, &str)]| raw_get(&gw_addr, path, headers);
    // python may still be starting.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw("/", &[]).starts_with("HTTP/1.1 502") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }

    let consumer = s.json(&admin, &["consumers", "create", "--name", "reader"]);
    let cid = consumer["id"].as_str().unwrap();
    let key =
        s.json(&admin, &["keys", "create", "--consumer", cid, "--name", "demo", "--scope", "articles:read"]);
    let secret = key["key"].as_str().unwrap();

    assert!(gw("/articles.json", &[]).starts_with("HTTP/1.1 401"));
    let ok = gw("/articles.json", &[("X-API-Key", secret)]);
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("{\"articles\": []}"), "{ok}");
    assert!(gw("/demo.txt", &[("X-API-Key", secret)]).starts_with("HTTP/1.1 404"));
    assert!(gw("/", &[]).starts_with("HTTP/1.1 200"), "the public home route");

    // A new route, reloaded on SIGHUP.
    std::fs::write(&routes, format!("{routes_text}\n[[route]]\nname = \"demo\"\npath = \"/demo.txt\"\nupstream = \"http://127.0.0.1:{port}\"\npublic = true\n")).unwrap();
    let hup = |s: &Server| {
        assert!(Command::new("kill").args(["-HUP", &s.child.id().to_string()]).status().unwrap().success())
    };
    hup(&s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw("/demo.txt", &[]).starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the new route never came");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken file is refused; the routes in use stay.
    std::fs::write(&routes, "[[route]]\nname = \"broken\"\n").unwrap();
    hup(&s);
    std::thread::sleep(Duration::from_millis(500));
    assert!(gw("/demo.txt", &[]).starts_with("HTTP/1.1 200"));
    assert!(gw("/articles.json", &[("X-API-Key", secret)]).starts_with("HTTP/1.1 200"));
    let bad = keygate().args(["routes", "check"]).arg(&routes).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("missing field"), "{}", stderr(&bad));

    let (_, log) = s.stop();
    assert!(log.contains("reloaded the gateway routes"), "{log}");
    assert!(log.contains("the changed routes file was refused"), "{log}");
    assert!(!log.contains(secret), "the key never reaches the log");
    let _ = python.kill();
    let _ = python.wait();
}

/// `POST /v1/verify` with a raw HTTP/1.1 request: the decision's code (or `HTTP <status>` when the
/// answer is not a decision).
fn verify_code(addr: &str, bearer: &str, credential: &str) -> String {
    let body = serde_json::json!({ "credential": credential }).to_string();
    let Ok(mut s) = TcpStream::connect(addr) else { return "unreachable".into() };
    let req = format!(
        "POST /v1/verify HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return "unreachable".into();
    }
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() {
        return "unreachable".into();
    }
    let status = resp.split_whitespace().nth(1).unwrap_or("").to_string();
    let json = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    match serde_json::from_str::<Value>(json) {
        Ok(v) if v["code"].is_string() => v["code"].as_str().unwrap().to_string(),
        _ => format!("HTTP {status}"),
    }
}

/// `threads` threads each verify `secret` `each` times, taking the nodes in turn; every decision's code.
fn spread_verifies(nodes: &[Server], bearer: &str, secret: &str, threads: usize, each: usize) -> Vec<String> {
    let codes = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for t in 0..threads {
            let codes = &codes;
            scope.spawn(move || {
                for i in 0..each {
                    let code = verify_code(&nodes[(t + i) % nodes.len()].addr, bearer, secret);
                    codes.lock().unwrap().push(code);
                }
            });
        }
    });
    codes.into_inner().unwrap()
}

/// Polls until `check` holds (a liveness bound, not a performance assertion).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three `keygate serve` processes on one PostgreSQL database, as README's "Several nodes" runs them:
/// what one node creates the others verify at once; a revocation, a disable and a quota change on one
/// node reach the others; a quota of 100 spread over three nodes admits exactly 100 of 200 concurrent
/// verifies; a node killed with SIGKILL in the middle of load leaves the others serving, and every
/// change acknowledged during the load is there afterwards.
#[test]
fn three_nodes_on_one_postgresql() {
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(keygate_store::testing::postgres_database())
        .unwrap();
    let redis = keygate_store::testing::redis_url().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Every node needs the same master key (it seals the shared signing keys); rate limits are shared
    // through Redis.
    let env = [
        ("KEYGATE_DATABASE_URL", url.as_str()),
        ("KEYGATE_MASTER_KEY", "a2V5Z2F0ZS10ZXN0LW1hc3Rlci1rZXktMzJieXRlcyE="),
        ("KEYGATE_RATE_LIMITS_REDIS_URL", redis.as_str()),
    ];
    let out = keygate()
        .args(["init", "--json", "--data-dir"])
        .arg(tmp.path().join("a"))
        .envs(env)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let admin =
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["admin_key"].as_str().unwrap().to_string();
    let again = keygate().args(["init", "--data-dir"]).arg(tmp.path().join("b")).envs(env).output().unwrap();
    assert_eq!(again.status.code(), Some(1), "the shared database is initialised once");
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|n| Server::start_env(&tmp.path().join(n), &tmp.path().join(format!("{n}.log")), &env))
        .collect();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    assert!(a.stdout.lock().unwrap().contains("data in PostgreSQL"), "{}", a.stdout.lock().unwrap());
    assert!(!a.stdout.lock().unwrap().contains("Bootstrap admin key"));
    for n in &nodes {
        eventually("ready", || n.get("/readyz", &[]).starts_with("HTTP/1.1 200"));
    }

    // Created on A, valid on B and C at once.
    let cid = a.json(&admin, &["consumers", "create", "--name", "acme"])["id"].as_str().unwrap().to_string();
    let key = a.json(&admin, &["keys", "create", "--consumer", &cid, "--name", "k"]);
    let (kid, secret) = (key["id"].as_str().unwrap().to_string(), key["key"].as_str().unwrap().to_string());
    for n in &nodes {
        assert_eq!(verify_code(&n.addr, &admin, &secret), "VALID", "{}", n.addr);
    }
    // Revoked on C: refused by A and B (they had it cached).
    assert_eq!(c.json(&admin, &["keys", "revoke", &kid])["status"], "revoked");
    for n in [a, b] {
        eventually("the revocation reaches every node", || {
            verify_code(&n.addr, &admin, &secret) == "REVOKED"
        });
    }
    // A consumer disabled on B stops its keys everywhere.
    let key2 = a.json(&admin, &["keys", "create", "--consumer", &cid, "--name", "k2"]);
    let secret2 = key2["key"].as_str().unwrap().to_string();
    for n in &nodes {
        assert_eq!(verify_code(&n.addr, &admin, &secret2), "VALID");
    }
    b.json(&admin, &["consumers", "disable", &cid]);
    for n in [a, c] {
        eventually("the disable reaches every node", || verify_code(&n.addr, &admin, &secret2) == "DISABLED");
    }

    // A quota of 100 across three nodes: 200 concurrent verifies admit exactly 100.
    let q = a.json(&admin, &["consumers", "create", "--name", "metered"])["id"].as_str().unwrap().to_string();
    let qkey = a.json(&admin, &["keys", "create", "--consumer", &q, "--name", "q", "--quota", "100"]);
    let qsecret = qkey["key"].as_str().unwrap().to_string();
    let codes = spread_verifies(&nodes, &admin, &qsecret, 20, 10);
    let valid = codes.iter().filter(|c| *c == "VALID").count();
    let exceeded = codes.iter().filter(|c| *c == "QUOTA_EXCEEDED").count();
    assert_eq!((valid, exceeded), (100, 100), "{codes:?}");
    // The three nodes' usage counts add up (each flushes its own increments every second).
    let qid0 = qkey["id"].as_str().unwrap().to_string();
    eventually("every node's usage counts are written", || {
        c.json(&admin, &["usage", &qid0, "--granularity", "day", "--since", "2d"])["total"] == 200
    });
    // A rate limit of 10 a minute holds across the three nodes: 30 concurrent verifies, 10 admitted.
    let rkey =
        a.json(&admin, &["keys", "create", "--consumer", &q, "--name", "r", "--rate-limit", "m:10/60"]);
    let rsecret = rkey["key"].as_str().unwrap().to_string();
    let codes = spread_verifies(&nodes, &admin, &rsecret, 6, 5);
    let limited = codes.iter().filter(|c| *c == "RATE_LIMITED").count();
    assert_eq!((codes.len() - limited, limited), (10, 20), "{codes:?}");
    // Topped up on C: the others admit again.
    let qid = qkey["id"].as_str().unwrap().to_string();
    let added = c.json(&admin, &["keys", "quota", &qid, "--add", "5"]);
    assert_eq!(added["quota"]["remaining"], 5, "{added}");
    eventually("the top-up reaches A", || verify_code(&a.addr, &admin, &qsecret) == "VALID");

    // kill -9 B under load: A and C keep serving; every change acknowledged meanwhile is kept.
    let live = a.json(&admin, &["keys", "create", "--consumer", &q, "--name", "live"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let acknowledged = Mutex::new(Vec::new());
    let refused = Mutex::new(Vec::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (nodes, admin, live, refused, stop) = (&nodes, &admin, &live, &refused, &stop);
            scope.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    for n in [&nodes[0], &nodes[2]] {
                        let code = verify_code(&n.addr, admin, live);
                        if code != "VALID" {
                            refused.lock().unwrap().push(format!("{t} {}: {code}", n.addr));
                        }
                    }
                }
            });
        }
        let (nodes, admin, acknowledged, stop) = (&nodes, &admin, &acknowledged, &stop);
        scope.spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let n = &nodes[[0, 2][i % 2]];
                let out = n.cli(admin, &["consumers", "create", "--name", &format!("during-{i}"), "--json"]);
                if out.status.success() {
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                    acknowledged.lock().unwrap().push(v["id"].as_str().unwrap().to_string());
                }
                i += 1;
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        nodes[1].kill9();
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let refused = refused.into_inner().unwrap();
    assert!(refused.is_empty(), "A and C kept serving: {refused:?}");
    let acknowledged = acknowledged.into_inner().unwrap();
    assert!(!acknowledged.is_empty());
    for id in &acknowledged {
        assert_eq!(c.json(&admin, &["consumers", "show", id])["id"], id.as_str());
    }
    let mut nodes = nodes;
    nodes[1].child.wait().unwrap();
    // A restarted B catches up with everything it missed.
    let b = Server::start_env(&tmp.path().join("b"), &tmp.path().join("b2.log"), &env);
    assert_eq!(verify_code(&b.addr, &admin, &secret), "REVOKED");
    assert_eq!(verify_code(&b.addr, &admin, &live), "VALID");
    let logs: String = ["a.log", "b.log", "b2.log", "c.log"]
        .iter()
        .map(|f| std::fs::read_to_string(tmp.path().join(f)).unwrap_or_default())
        .collect();
    assert!(!logs.contains(&secret) && !logs.contains(&admin), "no secret in the logs");
    b.stop();
    let c = nodes.pop().unwrap();
    c.stop();
    nodes.swap_remove(0).stop();
}

/// `keygate migrate-to-postgres`: an SQLite installation with keys, usage, an OAuth client and its
/// signing keys, copied into PostgreSQL while its server is stopped (refused while it runs, and into a
/// database that is not empty); a node on PostgreSQL with the installation's master key then serves
/// all of it, and new changes continue the copied history.
#[test]
fn migrate_an_sqlite_installation_to_postgresql() {
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(keygate_store::testing::postgres_database())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let admin = init(&dir);
    let s = Server::start(&dir, &tmp.path().join("log1"));
    let cid = s.json(&admin, &["consumers", "create", "--name", "acme"])["id"].as_str().unwrap().to_string();
    let key = s.json(&admin, &["keys", "create", "--consumer", &cid, "--name", "k", "--quota", "50"]);
    let (kid, secret) = (key["id"].as_str().unwrap().to_string(), key["key"].as_str().unwrap().to_string());
    for _ in 0..3 {
        assert_eq!(verify_code(&s.addr, &admin, &secret), "VALID");
    }
    let revoked = s.json(&admin, &["keys", "create", "--consumer", &cid, "--name", "old"]);
    s.json(&admin, &["keys", "revoke", revoked["id"].as_str().unwrap()]);
    let client = s.json(&admin, &["clients", "create", "--consumer", &cid, "--name", "app", "--scope", "a"]);
    let client_id = client["client_id"].as_str().unwrap().to_string();
    let running =
        keygate().args(["migrate-to-postgres", "--from"]).arg(&dir).args(["--to", &url]).output().unwrap();
    assert_eq!(running.status.code(), Some(1));
    assert!(stderr(&running).contains("stop it first"), "{}", stderr(&running));
    s.stop();

    let out = keygate()
        .args(["migrate-to-postgres", "--json", "--from"])
        .arg(&dir)
        .args(["--to", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tables = report["tables"].as_array().unwrap();
    assert!(tables.iter().all(|t| t["sqlite"] == t["postgres"]), "{report}");
    let count =
        |name: &str| tables.iter().find(|t| t["table"] == name).unwrap()["postgres"].as_u64().unwrap();
    assert_eq!(count("api_keys"), 3, "the admin key and two keys");
    assert!(count("audit_events") >= 5 && count("signing_keys") >= 1 && count("oauth_clients") == 1);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("secret@"), "no password in the report");
    let again =
        keygate().args(["migrate-to-postgres", "--from"]).arg(&dir).args(["--to", &url]).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already holds a Keygate installation"), "{}", stderr(&again));

    // A node on PostgreSQL, with the installation's master key, serves everything that was copied.
    let master = keygate_server_master_key_path(&dir);
    let env = [("KEYGATE_DATABASE_URL", url.as_str()), ("KEYGATE_MASTER_KEY_FILE", master.as_str())];
    let node = Server::start_env(&tmp.path().join("node"), &tmp.path().join("log2"), &env);
    assert!(!node.stdout.lock().unwrap().contains("Bootstrap admin key"), "already initialised");
    assert_eq!(verify_code(&node.addr, &admin, &secret), "VALID");
    assert_eq!(verify_code(&node.addr, &admin, revoked["key"].as_str().unwrap()), "REVOKED");
    let shown = node.json(&admin, &["keys", "show", &kid]);
    // 50 - 3 used before; 1 more here (the pool, plus what this node leased and did not use).
    assert_eq!(shown["quota"]["remaining"], 46, "{shown}");
    let out = keygate()
        .args(["token", "--client-id", &client_id, "--scope", "a", "--json"])
        .env("KEYGATE_URL", &node.url)
        .env("KEYGATE_CLIENT_SECRET", client["client_secret"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let token: Value = serde_json::from_slice(&out.stdout).unwrap();
    let access = token["access_token"].as_str().unwrap();
    assert_eq!(verify_code(&node.addr, &admin, access), "VALID", "the copied signing keys sign and verify");
    node.json(&admin, &["keys", "disable", &kid]);
    let audit = node.json(&admin, &["audit", "--target", &kid]);
    let actions: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["key.disable", "key.create"], "the history continues");
    node.stop();
}

/// Where `keygate init` put a data directory's master key (beside it).
fn keygate_server_master_key_path(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap();
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    dir.with_file_name(format!("{name}.master-key")).display().to_string()
}
