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
const EXIT_USAGE: u8 = 2;
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
    /// Manage OAuth 2 clients: applications that obtain access tokens.
    Clients {
        #[command(subcommand)]
        command: ClientsCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List or rotate the JWT signing keys.
    SigningKeys {
        #[command(subcommand)]
        command: SigningKeysCmd,
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
    /// Show verify counts of a key (or with --consumer, of a consumer) as a small chart.
    Usage {
        /// Key id (or consumer id with --consumer).
        id: String,
        /// The id is a consumer's.
        #[arg(long)]
        consumer: bool,
        /// minute, hour or day.
        #[arg(long, default_value = "hour")]
        granularity: String,
        /// How far back, e.g. 60m, 24h, 30d.
        #[arg(long, default_value = "24h")]
        since: String,
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
        /// The plan's rate limit NAME:LIMIT/SECONDS, inherited by keys without their own (repeatable).
        #[arg(long = "rate-limit")]
        rate_limits: Vec<String>,
    },
    /// List consumers.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one consumer.
    Show { id: String },
    /// Change a consumer's name, metadata or plan.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        metadata: Option<String>,
        /// Replace the plan's rate limits (repeatable).
        #[arg(long = "rate-limit")]
        rate_limits: Vec<String>,
        /// Remove the plan's rate limits.
        #[arg(long, conflicts_with = "rate_limits")]
        no_rate_limits: bool,
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
        /// A rate limit NAME:LIMIT/SECONDS, e.g. per_minute:100/60 (repeatable).
        #[arg(long = "rate-limit")]
        rate_limits: Vec<String>,
        #[command(flatten)]
        quota: QuotaArgs,
        /// An address or CIDR range the key may be used from (repeatable).
        #[arg(long = "allow-ip")]
        allowed_ips: Vec<String>,
    },
    /// List keys (never their secrets).
    List {
        /// Only keys of this consumer.
        #[arg(long)]
        consumer: Option<String>,
        #[command(flatten)]
        page: PageArgs,
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
        /// A rate limit NAME:LIMIT/SECONDS, e.g. per_minute:100/60 (repeatable).
        #[arg(long = "rate-limit")]
        rate_limits: Vec<String>,
        #[command(flatten)]
        quota: QuotaArgs,
        /// An address or CIDR range the key may be used from (repeatable).
        #[arg(long = "allow-ip")]
        allowed_ips: Vec<String>,
        /// Drop the key's own rate limits and use its consumer's.
        #[arg(long, conflicts_with = "rate_limits")]
        inherit_rate_limits: bool,
        /// Remove the quota.
        #[arg(long)]
        no_quota: bool,
        /// Remove the IP allow-list.
        #[arg(long, conflicts_with = "allowed_ips")]
        any_ip: bool,
    },
    /// Set, top up or reset a key's quota.
    Quota {
        id: String,
        #[arg(long, conflicts_with_all = ["add", "reset"])]
        set: Option<u64>,
        #[arg(long, conflicts_with = "reset")]
        add: Option<u64>,
        /// Back to the refill amount.
        #[arg(long)]
        reset: bool,
    },
    /// Import existing keys from a JSON file: an array of keys, or {"keys": [...]}, each with
    /// consumer_id, name, scopes and the key as "key" (plaintext) or "sha256".
    Import { file: std::path::PathBuf },
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

#[derive(Debug, Subcommand)]
enum ClientsCmd {
    /// Register a client; its secret is printed this once.
    Create {
        /// Consumer id.
        #[arg(long)]
        consumer: String,
        #[arg(long)]
        name: String,
        /// A scope the client may be granted (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// An allowed grant type (repeatable) [default: client_credentials].
        #[arg(long = "grant")]
        grants: Vec<String>,
        /// A resource (audience) the client may ask tokens for (repeatable).
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// jwt or opaque.
        #[arg(long, default_value = "jwt")]
        token_format: String,
        /// Access-token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        lifetime: i64,
    },
    /// List clients (never their secrets).
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one client.
    Show { id: String },
    /// Change a client's name, scopes, audiences, token format or lifetime.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Replace the scopes (repeatable).
        #[arg(long = "scope")]
        scopes: Option<Vec<String>>,
        /// Replace the audiences (repeatable).
        #[arg(long = "audience")]
        audiences: Option<Vec<String>>,
        #[arg(long)]
        token_format: Option<String>,
        #[arg(long)]
        lifetime: Option<i64>,
    },
    /// Disable a client: no new tokens, and its tokens stop verifying.
    Disable { id: String },
    /// Enable a disabled client.
    Enable { id: String },
    /// Delete a client, its secrets and its tokens.
    Delete { id: String },
    /// Rotate the client secret; the old one works for --overlap seconds more.
    RotateSecret {
        id: String,
        #[arg(long, default_value_t = 0)]
        overlap: u64,
    },
    /// Revoke every token issued to the client so far.
    RevokeTokens { id: String },
}

#[derive(Debug, Subcommand)]
enum SigningKeysCmd {
    /// List the signing keys and their stage (pending, active, retired, expired, revoked).
    List,
    /// Emergency revocation of a compromised key: it leaves the JWKS now, no token it signed verifies
    /// from the next request on, and if it was signing a new key takes over at once.
    Revoke {
        /// The key id (`kid`), as `signing-keys list` shows it.
        kid: String,
    },
    /// Start a rotation: the new key is published now and signs after --publish-ahead seconds.
    Rotate {
        #[arg(long)]
        publish_ahead: Option<u64>,
        /// EdDSA or ES256.
        #[arg(long)]
        alg: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
struct PageArgs {
    /// Page size (1-1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Continue after this id (printed at the end of the previous page).
    #[arg(long)]
    after: Option<String>,
}

impl PageArgs {
    fn query(self) -> Vec<(&'static str, String)> {
        let mut q = vec![("limit", self.limit.to_string())];
        q.extend(self.after.map(|a| ("after", a)));
        q
    }
}

#[derive(Debug, Clone, Args)]
struct QuotaArgs {
    /// Give the key a quota of N uses.
    #[arg(long = "quota")]
    quota: Option<u64>,
    /// Refill the quota to this amount…
    #[arg(long, requires = "quota")]
    refill_amount: Option<u64>,
    /// …every N seconds,
    #[arg(long, requires = "refill_amount", conflicts_with_all = ["refill_daily", "refill_monthly"])]
    refill_every: Option<u64>,
    /// …daily at 00:00 UTC,
    #[arg(long, requires = "refill_amount", conflicts_with = "refill_monthly")]
    refill_daily: bool,
    /// …or monthly on this day (1-31) at 00:00 UTC.
    #[arg(long, requires = "refill_amount")]
    refill_monthly: Option<u32>,
}

impl QuotaArgs {
    fn to_json(&self) -> Result<Option<Value>, Failure> {
        let Some(remaining) = self.quota else { return Ok(None) };
        let refill = match self.refill_amount {
            None => Value::Null,
            Some(amount) => {
                if let Some(s) = self.refill_every {
                    json!({"amount": amount, "interval_seconds": s})
                } else if self.refill_daily {
                    json!({"amount": amount, "schedule": "daily"})
                } else if let Some(d) = self.refill_monthly {
                    json!({"amount": amount, "schedule": "monthly", "day_of_month": d})
                } else {
                    return Err(Failure::new(
                        "--refill-amount needs --refill-every SECONDS, --refill-daily or --refill-monthly DAY",
                    ));
                }
            }
        };
        Ok(Some(json!({"remaining": remaining, "refill": refill})))
    }
}

/// `per_minute:100/60` → `{"name": "per_minute", "limit": 100, "window_seconds": 60}`.
fn parse_rate_limits(specs: &[String]) -> Result<Vec<Value>, Failure> {
    specs
        .iter()
        .map(|spec| {
            let bad = || {
                Failure::new(format!(
                    "--rate-limit {spec:?}: write NAME:LIMIT/SECONDS, e.g. per_minute:100/60"
                ))
            };
            let (name, rest) = spec.split_once(':').ok_or_else(bad)?;
            let (limit, window) = rest.split_once('/').ok_or_else(bad)?;
            let limit: u64 = limit.trim().parse().map_err(|_| bad())?;
            let window: u64 = window.trim().trim_end_matches('s').parse().map_err(|_| bad())?;
            Ok(json!({"name": name.trim(), "limit": limit, "window_seconds": window}))
        })
        .collect()
}

/// `90s`, `60m`, `24h`, `30d` → milliseconds.
fn parse_span(s: &str) -> Result<i64, Failure> {
    let bad = || Failure::new(format!("--since {s:?}: write a number and s, m, h or d, e.g. 24h"));
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    Ok(n.saturating_mul(ms))
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
        Command::Clients { command, client } => clients(Client::new(client)?, command).await,
        Command::SigningKeys { command, client } => {
            let c = Client::new(client)?;
            let v = match command {
                SigningKeysCmd::List => c.call(Method::GET, "/v1/signing-keys", &[], None).await?,
                SigningKeysCmd::Revoke { kid } => {
                    if kid.is_empty() || !kid.bytes().all(|b| b.is_ascii_alphanumeric()) {
                        return Err(Failure {
                            code: EXIT_USAGE,
                            message: format!(
                                "{kid:?} is not a signing key id; `keygate signing-keys list` shows them"
                            ),
                        });
                    }
                    c.call(Method::POST, &format!("/v1/signing-keys/{kid}/revoke"), &[], None).await?
                }
                SigningKeysCmd::Rotate { publish_ahead, alg } => {
                    let mut body = json!({});
                    if let Some(s) = publish_ahead {
                        body["publish_ahead_seconds"] = json!(s);
                    }
                    if let Some(a) = alg {
                        body["alg"] = json!(a);
                    }
                    c.call(Method::POST, "/v1/signing-keys/rotate", &[], Some(body)).await?
                }
            };
            output(&c, &v, |v| {
                let rows = v.as_array().map(Vec::as_slice).unwrap_or(&[]);
                table(
                    rows,
                    &[
                        ("KID", "kid"),
                        ("ALG", "alg"),
                        ("STATUS", "status"),
                        ("SIGNS FROM", "active_from"),
                        ("PUBLISHED UNTIL", "publish_until"),
                    ],
                );
            });
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Usage { id, consumer, granularity, since, client } => {
            let c = Client::new(client)?;
            let now = chrono::Utc::now();
            let from = now - chrono::Duration::milliseconds(parse_span(&since)?);
            let q = vec![
                ("granularity", granularity),
                ("from", from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            ];
            let path =
                if consumer { format!("/v1/consumers/{id}/usage") } else { format!("/v1/keys/{id}/usage") };
            let v = c.call(Method::GET, &path, &q, None).await?;
            output(&c, &v, print_usage);
            Ok(ExitCode::SUCCESS)
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
        ConsumersCmd::Create { name, metadata, rate_limits } => {
            let mut body = json!({"name": name});
            if let Some(m) = parse_metadata(metadata)? {
                body["metadata"] = m;
            }
            if !rate_limits.is_empty() {
                body["rate_limits"] = json!(parse_rate_limits(&rate_limits)?);
            }
            c.call(Method::POST, "/v1/consumers", &[], Some(body)).await?
        }
        ConsumersCmd::List { page } => {
            let q = page.query();
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
        ConsumersCmd::Update { id, name, metadata, rate_limits, no_rate_limits } => {
            let mut body = json!({});
            if no_rate_limits {
                body["rate_limits"] = Value::Null;
            } else if !rate_limits.is_empty() {
                body["rate_limits"] = json!(parse_rate_limits(&rate_limits)?);
            }
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
        KeysCmd::Create {
            consumer,
            name,
            scopes,
            expires_at,
            environment,
            metadata,
            rate_limits,
            quota,
            allowed_ips,
        } => {
            let mut body =
                json!({"consumer_id": consumer, "name": name, "scopes": scopes, "environment": environment});
            if !rate_limits.is_empty() {
                body["rate_limits"] = json!(parse_rate_limits(&rate_limits)?);
            }
            if let Some(q) = quota.to_json()? {
                body["quota"] = q;
            }
            if !allowed_ips.is_empty() {
                body["allowed_ips"] = json!(allowed_ips);
            }
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
        KeysCmd::List { consumer, page } => {
            let mut q = page.query();
            q.extend(consumer.map(|c| ("consumer_id", c)));
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
        KeysCmd::Update {
            id,
            name,
            scopes,
            metadata,
            expires_at,
            no_expiry,
            rate_limits,
            quota,
            allowed_ips,
            inherit_rate_limits,
            no_quota,
            any_ip,
        } => {
            let mut body = json!({});
            if inherit_rate_limits {
                body["rate_limits"] = Value::Null;
            } else if !rate_limits.is_empty() {
                body["rate_limits"] = json!(parse_rate_limits(&rate_limits)?);
            }
            if no_quota {
                body["quota"] = Value::Null;
            } else if let Some(q) = quota.to_json()? {
                body["quota"] = q;
            }
            if any_ip {
                body["allowed_ips"] = Value::Null;
            } else if !allowed_ips.is_empty() {
                body["allowed_ips"] = json!(allowed_ips);
            }
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
        KeysCmd::Quota { id, set, add, reset } => {
            let body = match (set, add, reset) {
                (Some(n), None, false) => json!({"set": n}),
                (None, Some(n), false) => json!({"add": n}),
                (None, None, true) => json!({"reset": true}),
                _ => return Err(Failure::new("give one of --set N, --add N or --reset")),
            };
            c.call(Method::POST, &format!("/v1/keys/{id}/quota"), &[], Some(body)).await?
        }
        KeysCmd::Import { file } => return import(&c, &file).await,
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

/// Sends a file of keys in chunks of 10,000, reporting progress on stderr.
async fn import(c: &Client, file: &std::path::Path) -> Result<ExitCode, Failure> {
    const CHUNK: usize = 10_000;
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::new(format!("{} is not JSON: {e}", file.display())))?;
    let keys = match v {
        Value::Array(a) => a,
        Value::Object(mut o) => match o.remove("keys") {
            Some(Value::Array(a)) => a,
            _ => return Err(Failure::new("the file must be a JSON array of keys or {\"keys\": [...]}")),
        },
        _ => return Err(Failure::new("the file must be a JSON array of keys or {\"keys\": [...]}")),
    };
    let total = keys.len();
    let (mut imported, mut failed) = (0u64, 0u64);
    let mut results = Vec::new();
    for (n, chunk) in keys.chunks(CHUNK).enumerate() {
        let r = c.call(Method::POST, "/v1/keys/import", &[], Some(json!({"keys": chunk}))).await?;
        imported += r["imported"].as_u64().unwrap_or(0);
        failed += r["failed"].as_u64().unwrap_or(0);
        for mut item in r["results"].as_array().cloned().unwrap_or_default() {
            // Indexes relative to the whole file.
            if let Some(i) = item["index"].as_u64() {
                item["index"] = json!(i + (n * CHUNK) as u64);
            }
            results.push(item);
        }
        if !c.json {
            eprintln!("imported {}/{total} (failed {failed})", ((n + 1) * CHUNK).min(total));
        }
    }
    if c.json {
        println!("{}", json!({"imported": imported, "failed": failed, "results": results}));
    } else {
        println!("{imported} imported, {failed} failed");
        for r in results.iter().filter(|r| r.get("error").is_some()) {
            println!(
                "  key #{}: {} ({})",
                r["index"],
                r["error"]["message"].as_str().unwrap_or(""),
                r["error"]["code"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(EXIT_ERROR) })
}

async fn clients(c: Client, cmd: ClientsCmd) -> Result<ExitCode, Failure> {
    let v = match cmd {
        ClientsCmd::Create { consumer, name, scopes, grants, audiences, token_format, lifetime } => {
            let grants = if grants.is_empty() { vec!["client_credentials".to_string()] } else { grants };
            let body = json!({"consumer_id": consumer, "name": name, "scopes": scopes, "grant_types": grants,
                "audiences": audiences, "token_format": token_format, "token_lifetime_seconds": lifetime});
            let v = c.call(Method::POST, "/v1/clients", &[], Some(body)).await?;
            output(&c, &v, print_client_secret);
            return Ok(ExitCode::SUCCESS);
        }
        ClientsCmd::List { page } => {
            let v = c.call(Method::GET, "/v1/clients", &page.query(), None).await?;
            output(&c, &v, |v| {
                table(
                    items(v),
                    &[
                        ("CLIENT ID", "client_id"),
                        ("NAME", "name"),
                        ("FORMAT", "token_format"),
                        ("SCOPES", "scopes"),
                        ("DISABLED", "disabled"),
                    ],
                );
                print_next(v);
            });
            return Ok(ExitCode::SUCCESS);
        }
        ClientsCmd::Show { id } => c.call(Method::GET, &format!("/v1/clients/{id}"), &[], None).await?,
        ClientsCmd::Update { id, name, scopes, audiences, token_format, lifetime } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(s) = scopes {
                body["scopes"] = json!(s);
            }
            if let Some(a) = audiences {
                body["audiences"] = json!(a);
            }
            if let Some(f) = token_format {
                body["token_format"] = json!(f);
            }
            if let Some(l) = lifetime {
                body["token_lifetime_seconds"] = json!(l);
            }
            c.call(Method::PATCH, &format!("/v1/clients/{id}"), &[], Some(body)).await?
        }
        ClientsCmd::Disable { id } => {
            c.call(Method::POST, &format!("/v1/clients/{id}/disable"), &[], None).await?
        }
        ClientsCmd::Enable { id } => {
            c.call(Method::POST, &format!("/v1/clients/{id}/enable"), &[], None).await?
        }
        ClientsCmd::RevokeTokens { id } => {
            c.call(Method::POST, &format!("/v1/clients/{id}/revoke-tokens"), &[], None).await?
        }
        ClientsCmd::Delete { id } => {
            c.call(Method::DELETE, &format!("/v1/clients/{id}"), &[], None).await?;
            let v = json!({"deleted": id});
            output(&c, &v, |_| println!("deleted {id}"));
            return Ok(ExitCode::SUCCESS);
        }
        ClientsCmd::RotateSecret { id, overlap } => {
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/clients/{id}/rotate-secret"),
                    &[],
                    Some(json!({"overlap_seconds": overlap})),
                )
                .await?;
            output(&c, &v, print_client_secret);
            return Ok(ExitCode::SUCCESS);
        }
    };
    output(&c, &v, print_object);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Human output

fn print_usage(v: &Value) {
    let buckets = v["buckets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    println!(
        "{} verifies from {} to {} ({} buckets)",
        v["total"],
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
        v["granularity"].as_str().unwrap_or("?")
    );
    if let Some(codes) = v["codes"].as_object() {
        let parts: Vec<String> = codes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("by outcome: {}", if parts.is_empty() { "-".into() } else { parts.join(", ") });
    }
    let max = buckets.iter().filter_map(|b| b["total"].as_i64()).max().unwrap_or(0).max(1);
    for b in buckets {
        let total = b["total"].as_i64().unwrap_or(0);
        let valid = b["codes"]["VALID"].as_i64().unwrap_or(0);
        let width = (total * 40 / max).max(i64::from(total > 0)) as usize;
        let valid_width = if total > 0 { (valid * width as i64 / total) as usize } else { 0 };
        println!(
            "{}  {}{} {total}",
            b["start"].as_str().unwrap_or("?"),
            "█".repeat(valid_width),
            "░".repeat(width - valid_width)
        );
    }
    if !buckets.is_empty() {
        println!("(█ valid, ░ rejected)");
    }
}

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

/// Prints an object whose `field` holds a secret shown this once: the rest first, the secret last.
fn print_with_secret(v: &Value, field: &str, label: &str) {
    let mut rest = v.clone();
    let secret = rest.as_object_mut().and_then(|o| o.remove(field)).map(|k| cell(&k)).unwrap_or_default();
    print_object(&rest);
    println!("\n{label} (shown only this once; store it now):\n\n    {secret}\n");
}

fn print_secret(v: &Value) {
    print_with_secret(v, "key", "Secret");
}

fn print_client_secret(v: &Value) {
    print_with_secret(v, "client_secret", "Client secret");
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
