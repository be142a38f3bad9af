//! `TestApp`: a real Keygate server on port 0 with its own data directory.
//!
//! With `KEYGATE_TEST_BACKEND=postgres` every server keeps its data in a fresh PostgreSQL database
//! (`keygate_store::testing`) instead of SQLite; a server restarted on the same data directory gets the
//! same database back. Tests of SQLite's own behaviour (its files, its lock) ask for SQLite with
//! `Builder::sqlite()` and run on it in both passes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_server::{AppState, ServerConfig, bootstrap, launch_all, open_store};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub struct TestApp {
    /// The server's clock: `app.clock.advance(ms)` moves its time forward.
    pub clock: std::sync::Arc<keygate_server::time::ManualClock>,
    pub base: String,
    pub admin_key: String,
    pub client: reqwest::Client,
    pub state: std::sync::Arc<AppState>,
    pub data_dir: PathBuf,
    /// With `Builder::gateway`: the gateway's base URL and its routes.
    pub gateway_base: String,
    pub gateway: Option<std::sync::Arc<keygate_server::gateway::Gateway>>,
    _dir: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub struct Builder {
    config: ServerConfig,
    dir: Option<tempfile::TempDir>,
    admin_key: Option<String>,
    sqlite: bool,
}

/// Does this run keep the servers' data in PostgreSQL?
pub fn on_postgres() -> bool {
    std::env::var("KEYGATE_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The PostgreSQL database of each data directory (so that a restarted server finds its data).
fn database_for(data_dir: &Path) -> impl std::future::Future<Output = keygate_server::DatabaseUrl> + use<> {
    static DATABASES: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let data_dir = data_dir.to_path_buf();
    async move {
        let known = DATABASES.lock().unwrap().iter().find(|(d, _)| *d == data_dir).map(|(_, u)| u.clone());
        let url = match known {
            Some(u) => u,
            None => {
                let u = keygate_store::testing::postgres_database().await.unwrap();
                DATABASES.lock().unwrap().push((data_dir, u.clone()));
                u
            }
        };
        keygate_server::DatabaseUrl::parse(&url).unwrap()
    }
}

impl Builder {
    /// Keep this server's data in SQLite whatever the run's backend (for tests of SQLite itself).
    pub fn sqlite(mut self) -> Self {
        self.sqlite = true;
        self
    }

    /// Keep this server's data in PostgreSQL whatever the run's backend (for tests of PostgreSQL itself).
    pub async fn postgres(mut self) -> Self {
        self.config.database_url = Some(database_for(&self.config.data_dir).await);
        self
    }

    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.config.busy_timeout = d;
        self
    }

    pub fn trusted_proxies(mut self, list: &[&str]) -> Self {
        self.config.trusted_proxies = list.iter().map(|s| s.parse().unwrap()).collect();
        self
    }

    pub fn key_rotation(mut self, every: Duration, publish_ahead: Duration) -> Self {
        self.config.key_rotation_interval = every;
        self.config.key_publish_ahead = publish_ahead;
        self
    }

    pub fn config(mut self, f: impl FnOnce(&mut ServerConfig)) -> Self {
        f(&mut self.config);
        self
    }

    /// Serves a gateway with these routes (written to `routes.toml` in the data directory's parent).
    pub fn gateway(mut self, routes: &str) -> Self {
        let dir = self.config.data_dir.parent().unwrap().to_path_buf();
        let file = dir.join("routes.toml");
        std::fs::write(&file, routes).unwrap();
        self.config.gateway_routes = Some(file);
        self.config.gateway_listen = Some("127.0.0.1:0".parse().unwrap());
        self
    }

    pub fn failures_per_minute(mut self, n: u64) -> Self {
        self.config.failures_per_minute = n;
        self
    }

    /// Reuse a data directory (and its admin key) from an earlier server.
    pub fn data_dir(mut self, dir: &Path, admin_key: &str) -> Self {
        self.config.data_dir = dir.to_path_buf();
        self.dir = None;
        self.admin_key = Some(admin_key.to_string());
        self
    }

    pub async fn start(self) -> TestApp {
        let Builder { mut config, dir, admin_key, sqlite } = self;
        config.listen = "127.0.0.1:0".parse().unwrap();
        if on_postgres() && !sqlite && config.database_url.is_none() {
            config.database_url = Some(database_for(&config.data_dir).await);
        }
        let store = open_store(&config).await.unwrap();
        let secret = bootstrap(store.as_ref()).await.unwrap();
        let admin_key = match (secret, admin_key) {
            (Some(s), _) => s.expose().to_string(),
            (None, Some(k)) => k,
            (None, None) => panic!("data directory already initialised but no admin key given"),
        };
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        config.listen = addr;
        let data_dir = config.data_dir.clone();
        let clock = std::sync::Arc::new(keygate_server::time::ManualClock::new());
        let state = AppState::with_clock(store, config, clock.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let mut gateway_base = String::new();
        let mut gateway = None;
        let gated = match &state.config.gateway_routes {
            Some(file) => {
                let g = keygate_server::gateway::Gateway::open(file.clone()).unwrap();
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                gateway_base = format!("http://{}", l.local_addr().unwrap());
                gateway = Some(g.clone());
                Some((l, g))
            }
            None => None,
        };
        let task = tokio::spawn(launch_all(state.clone(), listener, None, gated, async {
            let _ = rx.await;
        }));
        TestApp {
            clock,
            base: format!("http://{addr}"),
            admin_key,
            client: reqwest::Client::new(),
            state,
            data_dir,
            gateway_base,
            gateway,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }
}

impl TestApp {
    pub fn builder() -> Builder {
        keygate_server::webhooks::install_tls();
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig { data_dir: dir.path().join("data"), ..ServerConfig::default() };
        Builder { config, dir: Some(dir), admin_key: None, sqlite: false }
    }

    pub async fn start() -> TestApp {
        Self::builder().start().await
    }

    /// Stops the server gracefully and returns its data directory (kept alive by the returned guard).
    pub async fn stop(mut self) -> (PathBuf, String, Option<tempfile::TempDir>) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        (self.data_dir.clone(), self.admin_key.clone(), self._dir.take())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request authenticated with the admin key.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(&self.admin_key.clone(), method, path, body).await
    }

    pub async fn call_as(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, self.url(path)).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn create_consumer(&self, name: &str) -> String {
        let (status, body) = self.post("/v1/consumers", json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Creates a key and returns (id, secret).
    pub async fn create_key(&self, consumer_id: &str, scopes: &[&str]) -> (String, String) {
        self.create_key_with(json!({"consumer_id": consumer_id, "name": "test key", "scopes": scopes})).await
    }

    pub async fn create_key_with(&self, body: Value) -> (String, String) {
        let (status, body) = self.post("/v1/keys", body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (body["id"].as_str().unwrap().to_string(), body["key"].as_str().unwrap().to_string())
    }

    /// `POST /v1/verify` as the admin; returns the decision.
    pub async fn verify(&self, credential: &str, scopes: &[&str]) -> Value {
        let (status, body) =
            self.post("/v1/verify", json!({"credential": credential, "scopes": scopes})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub async fn verify_code(&self, credential: &str, scopes: &[&str]) -> String {
        self.verify(credential, scopes).await["code"].as_str().unwrap().to_string()
    }
}

/// The HTTP function the `oauth2` crate calls: an `http::Request` sent with reqwest (no redirects
/// followed), its answer as an `http::Response`.
pub async fn oauth2_send(
    http: reqwest::Client,
    req: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, reqwest::Error> {
    let (parts, body) = req.into_parts();
    let resp =
        http.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
    let mut builder = oauth2::http::Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        builder = builder.header(k, v);
    }
    let bytes = resp.bytes().await?;
    Ok(builder.body(bytes.to_vec()).expect("a response built from a response"))
}

/// RFC 3339 time `ms` from now.
pub fn rfc3339_in(ms: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    keygate_server::time::rfc3339(now + ms)
}

/// A mail server for tests: it speaks enough SMTP to take messages from Keygate's mailer, and keeps
/// them (recipient, decoded text).
pub struct MailSink {
    pub url: String,
    messages: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl MailSink {
    pub async fn start() -> MailSink {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("smtp://{}", listener.local_addr().unwrap());
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = messages.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let keep = keep.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    w.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                    let (mut to, mut data, mut in_data) = (String::new(), String::new(), false);
                    while let Ok(Some(line)) = lines.next_line().await {
                        if in_data {
                            if line == "." {
                                in_data = false;
                                keep.lock().unwrap().push((to.clone(), decode_quoted_printable(&data)));
                                data.clear();
                                w.write_all(b"250 queued\r\n").await.unwrap();
                            } else {
                                data.push_str(&line);
                                data.push('\n');
                            }
                            continue;
                        }
                        let upper = line.to_ascii_uppercase();
                        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                            b"250 sink\r\n"
                        } else if upper.starts_with("RCPT TO:") {
                            to = line[8..].trim().trim_matches(['<', '>']).to_string();
                            b"250 ok\r\n"
                        } else if upper.starts_with("DATA") {
                            in_data = true;
                            b"354 go on\r\n"
                        } else if upper.starts_with("QUIT") {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            b"250 ok\r\n"
                        };
                        if w.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        MailSink { url, messages }
    }

    /// The messages sent to `to` so far, oldest first.
    pub fn to(&self, to: &str) -> Vec<String> {
        self.messages.lock().unwrap().iter().filter(|(t, _)| t == to).map(|(_, m)| m.clone()).collect()
    }

    /// The first link to `path` in the newest message to `to` that has one (waiting up to 10 s for it: some
    /// mail is sent in the background), as a path with its query.
    pub async fn link(&self, to: &str, path: &str) -> String {
        for _ in 0..200 {
            if let Some(m) = self.to(to).iter().rev().find(|m| m.contains(path)) {
                let rest = &m[m.find(path).unwrap()..];
                return rest[..rest.find(char::is_whitespace).unwrap_or(rest.len())].to_string();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no mail to {to} with a link to {path}: {:?}", self.to(to))
    }
}

/// Undoes quoted-printable (soft line breaks and `=XX` escapes).
fn decode_quoted_printable(s: &str) -> String {
    let joined = s.replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
