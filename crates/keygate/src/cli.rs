//! Command-line interface. Admin commands talk to a running server over HTTP (`KEYGATE_URL`,
//! `KEYGATE_ADMIN_KEY`); `--json` prints the server's JSON for scripts.
//!
//! Exit codes: 0 success (for `verify`: the credential is valid); 1 error (the message says what to
//! do); 2 bad usage; 3 the server cannot be reached; 4 `verify` answered that the credential is not valid.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::config::{DEFAULT_CONFIG, ServerArgs};

const EXIT_ERROR: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_INVALID: u8 = 4;

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "API keys and API tokens in one self-hosted server")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (creates and initialises the data directory on first start).
    Serve(ServerArgs),
    /// Create and initialise a data directory without serving; prints the bootstrap admin key.
    Init {
        #[command(flatten)]
        server: ServerArgs,
        /// Print `{"admin_key": "..."}`.
        #[arg(long)]
        json: bool,
    },
    /// Write a new admin key straight into a data directory (when every admin key is lost).
    AdminKey {
        #[command(flatten)]
        server: ServerArgs,
        /// Name of the new key.
        #[arg(long, default_value = "local admin")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print an example configuration file with every setting and its default.
    DefaultConfig,
    /// Manage consumers: the applications or accounts that call your API.
    Consumers {
        #[command(subcommand)]
        command: ConsumersCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Verify a credential, as your API would. Exit code 0 if valid, 4 if not.
    Verify {
        /// The credential to check.
        credential: String,
        /// A scope the credential must carry (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the audit log, newest first.
    Audit {
        /// Only events about this consumer or key id.
        #[arg(long)]
        target: Option<String>,
        /// Only this action, e.g. key.revoke.
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Clone, Args)]
struct ClientArgs {
    /// URL of the Keygate server.
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// Admin key (prefer the KEYGATE_ADMIN_KEY variable: flags show up in process lists).
    #[arg(long, env = "KEYGATE_ADMIN_KEY", hide_env_values = true, global = true)]
    admin_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ConsumersCmd {
    /// Create a consumer.
    Create {
        #[arg(long)]
        name: String,
        /// A JSON object.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// List consumers.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one consumer.
    Show { id: String },
    /// Change a consumer's name or metadata.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        metadata: Option<String>,
    },
    /// Disable a consumer: all its keys stop verifying.
    Disable { id: String },
    /// Enable a disabled consumer.
    Enable { id: String },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Create an API key; its secret is printed this once.
    Create {
        /// Consumer id.
        #[arg(long)]
        consumer: String,
        #[arg(long)]
        name: String,
        /// A scope (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Expiry as RFC 3339, e.g. 2030-01-31T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// live or test.
        #[arg(long = "env", default_value = "live")]
        environment: String,
        /// A JSON object.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// List keys (never their secrets).
    List {
        /// Only keys of this consumer.
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one key.
    Show { id: String },
    /// Change a key's name, scopes, metadata or expiry.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Replace the scopes (repeatable).
        #[arg(long = "scope")]
        scopes: Option<Vec<String>>,
        #[arg(long)]
        metadata: Option<String>,
        #[arg(long, conflicts_with = "no_expiry")]
        expires_at: Option<String>,
        /// Remove the expiry.
        #[arg(long)]
        no_expiry: bool,
    },
    /// Disable a key.
    Disable { id: String },
    /// Enable a disabled key.
    Enable { id: String },
    /// Revoke a key, permanently.
    Revoke { id: String },
    /// Rotate a key: prints the new secret; the old one works for --overlap seconds more.
    Rotate {
        id: String,
        #[arg(long, default_value_t = 0)]
        overlap: u64,
    },
}

/// What went wrong, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Failure { code: EXIT_ERROR, message: message.into() }
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => crate::server::serve(&args).await,
        Command::Init { server, json } => crate::server::init(&server, json).await,
        Command::AdminKey { server, name, json } => crate::server::admin_key(&server, &name, json).await,
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        other => match run_client(other).await {
            Ok(code) => code,
            Err(f) => {
                eprintln!("error: {}", f.message);
                ExitCode::from(f.code)
            }
        },
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    admin_key: String,
    json: bool,
}

impl Client {
    fn new(args: ClientArgs) -> Result<Self, Failure> {
        let admin_key = args.admin_key.filter(|k| !k.is_empty()).ok_or_else(|| {
            Failure::new(
                "no admin key: set KEYGATE_ADMIN_KEY to the key printed when Keygate first started \
                 (or pass --admin-key)",
            )
        })?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| Failure::new(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client { http, base: args.url.trim_end_matches('/').to_string(), admin_key, json: args.json })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.admin_key).query(query);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| Failure {
            code: EXIT_UNREACHABLE,
            message: format!(
                "cannot reach Keygate at {}: {e}\nis `keygate serve` running? set KEYGATE_URL or --url to its address",
                self.base
            ),
        })?;
        let status = resp.status();
        let text =
            resp.text().await.map_err(|e| Failure::new(format!("reading the response failed: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let code = value.get("code").and_then(Value::as_str).unwrap_or("unknown");
        let message = value.get("message").and_then(Value::as_str).unwrap_or("no message");
        Err(Failure::new(format!("{message} (code {code}, HTTP {})", status.as_u16())))
    }
}

fn parse_metadata(s: Option<String>) -> Result<Option<Value>, Failure> {
    s.map(|s| {
        serde_json::from_str::<Value>(&s).map_err(|e| {
            Failure::new(format!("--metadata must be a JSON object, e.g. '{{\"plan\":\"pro\"}}': {e}"))
        })
    })
    .transpose()
}

async fn run_client(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Consumers { command, client } => consumers(Client::new(client)?, command).await,
        Command::Keys { command, client } => keys(Client::new(client)?, command).await,
        Command::Verify { credential, scopes, client } => {
            let c = Client::new(client)?;
            let d = c
                .call(
                    Method::POST,
                    "/v1/verify",
                    &[],
                    Some(json!({"credential": credential, "scopes": scopes})),
                )
                .await?;
            let valid = d.get("valid").and_then(Value::as_bool).unwrap_or(false);
            if c.json {
                println!("{d}");
            } else {
                print_decision(&d);
            }
            Ok(if valid { ExitCode::SUCCESS } else { ExitCode::from(EXIT_INVALID) })
        }
        Command::Audit { target, action, limit, client } => {
            let c = Client::new(client)?;
            let mut q = vec![("limit", limit.to_string())];
            q.extend(target.map(|t| ("target_id", t)));
            q.extend(action.map(|a| ("action", a)));
            let v = c.call(Method::GET, "/v1/audit", &q, None).await?;
            output(&c, &v, |v| {
                table(
                    items(v),
                    &[
                        ("TIME", "at"),
                        ("ACTION", "action"),
                        ("TARGET", "target_id"),
                        ("ACTOR", "actor"),
                        ("IP", "ip"),
                    ],
                )
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(_) | Command::Init { .. } | Command::AdminKey { .. } | Command::DefaultConfig => {
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn consumers(c: Client, cmd: ConsumersCmd) -> Result<ExitCode, Failure> {
    let v = match cmd {
        ConsumersCmd::Create { name, metadata } => {
            let mut body = json!({"name": name});
            if let Some(m) = parse_metadata(metadata)? {
                body["metadata"] = m;
            }
            c.call(Method::POST, "/v1/consumers", &[], Some(body)).await?
        }
        ConsumersCmd::List { limit, after } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(after.map(|a| ("after", a)));
            let v = c.call(Method::GET, "/v1/consumers", &q, None).await?;
            output(&c, &v, |v| {
                table(
                    items(v),
                    &[("ID", "id"), ("NAME", "name"), ("DISABLED", "disabled"), ("CREATED", "created_at")],
                );
                print_next(v);
            });
            return Ok(ExitCode::SUCCESS);
        }
        ConsumersCmd::Show { id } => c.call(Method::GET, &format!("/v1/consumers/{id}"), &[], None).await?,
        ConsumersCmd::Update { id, name, metadata } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(m) = parse_metadata(metadata)? {
                body["metadata"] = m;
            }
            c.call(Method::PATCH, &format!("/v1/consumers/{id}"), &[], Some(body)).await?
        }
        ConsumersCmd::Disable { id } => {
            c.call(Method::POST, &format!("/v1/consumers/{id}/disable"), &[], None).await?
        }
        ConsumersCmd::Enable { id } => {
            c.call(Method::POST, &format!("/v1/consumers/{id}/enable"), &[], None).await?
        }
    };
    output(&c, &v, print_object);
    Ok(ExitCode::SUCCESS)
}

async fn keys(c: Client, cmd: KeysCmd) -> Result<ExitCode, Failure> {
    let v = match cmd {
        KeysCmd::Create { consumer, name, scopes, expires_at, environment, metadata } => {
            let mut body =
                json!({"consumer_id": consumer, "name": name, "scopes": scopes, "environment": environment});
            if let Some(t) = expires_at {
                body["expires_at"] = json!(t);
            }
            if let Some(m) = parse_metadata(metadata)? {
                body["metadata"] = m;
            }
            let v = c.call(Method::POST, "/v1/keys", &[], Some(body)).await?;
            output(&c, &v, print_secret);
            return Ok(ExitCode::SUCCESS);
        }
        KeysCmd::List { consumer, limit, after } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(consumer.map(|c| ("consumer_id", c)));
            q.extend(after.map(|a| ("after", a)));
            let v = c.call(Method::GET, "/v1/keys", &q, None).await?;
            output(&c, &v, |v| {
                table(
                    items(v),
                    &[
                        ("ID", "id"),
                        ("NAME", "name"),
                        ("START", "start"),
                        ("STATUS", "status"),
                        ("SCOPES", "scopes"),
                        ("EXPIRES", "expires_at"),
                    ],
                );
                print_next(v);
            });
            return Ok(ExitCode::SUCCESS);
        }
        KeysCmd::Show { id } => c.call(Method::GET, &format!("/v1/keys/{id}"), &[], None).await?,
        KeysCmd::Update { id, name, scopes, metadata, expires_at, no_expiry } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(s) = scopes {
                body["scopes"] = json!(s);
            }
            if let Some(m) = parse_metadata(metadata)? {
                body["metadata"] = m;
            }
            if no_expiry {
                body["expires_at"] = Value::Null;
            } else if let Some(t) = expires_at {
                body["expires_at"] = json!(t);
            }
            c.call(Method::PATCH, &format!("/v1/keys/{id}"), &[], Some(body)).await?
        }
        KeysCmd::Disable { id } => c.call(Method::POST, &format!("/v1/keys/{id}/disable"), &[], None).await?,
        KeysCmd::Enable { id } => c.call(Method::POST, &format!("/v1/keys/{id}/enable"), &[], None).await?,
        KeysCmd::Revoke { id } => c.call(Method::POST, &format!("/v1/keys/{id}/revoke"), &[], None).await?,
        KeysCmd::Rotate { id, overlap } => {
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/keys/{id}/rotate"),
                    &[],
                    Some(json!({"overlap_seconds": overlap})),
                )
                .await?;
            output(&c, &v, print_secret);
            return Ok(ExitCode::SUCCESS);
        }
    };
    output(&c, &v, print_object);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Human output

fn output(c: &Client, v: &Value, human: impl FnOnce(&Value)) {
    if c.json {
        println!("{v}");
    } else {
        human(v);
    }
}

fn items(v: &Value) -> &[Value] {
    v.get("items").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

fn table(rows: &[Value], columns: &[(&str, &str)]) {
    if rows.is_empty() {
        println!("(none)");
        return;
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, f)| cell(r.get(*f).unwrap_or(&Value::Null))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| cells.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(h.len()))
        .collect();
    let line = |vals: Vec<&str>| {
        let parts: Vec<String> = vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for r in &cells {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_next(v: &Value) {
    if let Some(n) = v.get("next_after").and_then(Value::as_str) {
        println!("(more: --after {n})");
    }
}

fn print_object(v: &Value) {
    if let Some(obj) = v.as_object() {
        let width = obj.keys().map(String::len).max().unwrap_or(0);
        for (k, val) in obj {
            let shown = match val {
                Value::Object(_) => val.to_string(),
                other => cell(other),
            };
            println!("{k:<width$}  {shown}");
        }
    } else {
        println!("{v}");
    }
}

fn print_secret(v: &Value) {
    let mut rest = v.clone();
    let secret = rest.as_object_mut().and_then(|o| o.remove("key")).map(|k| cell(&k)).unwrap_or_default();
    print_object(&rest);
    println!("\nSecret (shown only this once; store it now):\n\n    {secret}\n");
}

fn print_decision(d: &Value) {
    let code = d.get("code").and_then(Value::as_str).unwrap_or("?");
    if d.get("valid").and_then(Value::as_bool).unwrap_or(false) {
        println!("VALID");
        for f in ["key_id", "consumer_id", "name", "environment", "scopes", "expires_at"] {
            if let Some(v) = d.get(f) {
                println!("  {f:<12} {}", cell(v));
            }
        }
    } else {
        let message = d.get("message").and_then(Value::as_str).unwrap_or("");
        println!("{code}: {message}");
        if let Some(m) = d.get("missing_scopes") {
            println!("  missing scopes: {}", cell(m));
        }
    }
}
