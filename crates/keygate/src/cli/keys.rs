//! `keygate keys …`

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Subcommand;
use keygate_core::limits::RateLimit;
use keygate_server::routes::keys::{CreateKey, QuotaChange, RotateKey, UpdateKey};
use reqwest::Method;
use serde_json::{Value, json};

use super::args::{self, PageArgs, QuotaArgs, show_quota};
use super::http::Api;
use super::output::{cell, emit, field, items, output, print_next, print_object, print_secret, table};
use super::{CliResult, EXIT_ERROR, Failure};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create an API key; its secret is printed this once.
    Create {
        /// The consumer that owns the key (cons_…).
        #[arg(long, value_parser = args::Quiet(args::consumer_id))]
        consumer: String,
        /// A name people recognise, e.g. "acme production".
        #[arg(long)]
        name: String,
        /// A scope the key carries, e.g. articles:read (repeatable; no spaces, quotes or commas).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// The key stops working after this long, e.g. 30d.
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs, conflicts_with = "expires_at")]
        expires_in: Option<u64>,
        /// The key stops working at this time: a date (2030-01-31) or RFC 3339.
        #[arg(long, value_name = "TIME", value_parser = args::time)]
        expires_at: Option<String>,
        /// The key's environment, part of its prefix (kg_live_ / kg_test_).
        #[arg(long = "env", default_value = "live", value_parser = ["live", "test"])]
        environment: String,
        /// Free-form JSON object returned with every verify.
        #[arg(long, value_parser = args::metadata)]
        metadata: Option<Value>,
        /// A rate limit NAME:LIMIT/WINDOW, e.g. per_minute:100/1m (repeatable) [default: the consumer's
        /// plan].
        #[arg(long = "rate-limit", value_name = "NAME:LIMIT/WINDOW", value_parser = args::rate_limit)]
        rate_limits: Vec<RateLimit>,
        #[command(flatten)]
        quota: QuotaArgs,
        /// An address or CIDR range the key may be used from (repeatable) [default: anywhere].
        #[arg(long = "allow-ip", value_name = "IP/CIDR")]
        allowed_ips: Vec<String>,
    },
    /// List keys (never their secrets), oldest first.
    List {
        /// Only keys of this consumer.
        #[arg(long, value_parser = args::Quiet(args::consumer_id))]
        consumer: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one key.
    Show {
        /// The key's id (key_…).
        #[arg(value_parser = args::Quiet(args::key_id))]
        id: String,
    },
    /// Change a key's name, scopes, metadata, expiry, limits, quota or allowed addresses.
    Update {
        /// The key's id (key_…).
        #[arg(value_parser = args::Quiet(args::key_id))]
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// Replace the scopes (repeatable).
        #[arg(long = "scope")]
        scopes: Option<Vec<String>>,
        /// New metadata (a JSON object; replaces the old one).
        #[arg(long, value_parser = args::metadata)]
        metadata: Option<Value>,
        /// Expire this long from now, e.g. 30d.
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs, conflicts_with_all = ["expires_at", "no_expiry"])]
        expires_in: Option<u64>,
        /// Expire at this time: a date (2030-01-31) or RFC 3339.
        #[arg(long, value_name = "TIME", value_parser = args::time, conflicts_with = "no_expiry")]
        expires_at: Option<String>,
        /// Remove the expiry.
        #[arg(long)]
        no_expiry: bool,
        /// Replace the key's own rate limits, NAME:LIMIT/WINDOW (repeatable).
        #[arg(long = "rate-limit", value_name = "NAME:LIMIT/WINDOW", value_parser = args::rate_limit)]
        rate_limits: Vec<RateLimit>,
        #[command(flatten)]
        quota: QuotaArgs,
        /// Replace the allowed addresses or CIDR ranges (repeatable).
        #[arg(long = "allow-ip", value_name = "IP/CIDR")]
        allowed_ips: Vec<String>,
        /// Drop the key's own rate limits and use its consumer's plan.
        #[arg(long, conflicts_with = "rate_limits")]
        inherit_rate_limits: bool,
        /// Remove the quota.
        #[arg(long)]
        no_quota: bool,
        /// Remove the IP allow-list.
        #[arg(long, conflicts_with = "allowed_ips")]
        any_ip: bool,
    },
    /// Set, top up or reset a key's quota (takes effect at once).
    Quota {
        /// The key's id (key_…).
        #[arg(value_parser = args::Quiet(args::key_id))]
        id: String,
        /// Set the remaining uses to N.
        #[arg(long, value_name = "N", conflicts_with_all = ["add", "reset"], required_unless_present_any = ["add", "reset"])]
        set: Option<u64>,
        /// Add N uses.
        #[arg(long, value_name = "N", conflicts_with = "reset")]
        add: Option<u64>,
        /// Back to the refill amount.
        #[arg(long)]
        reset: bool,
    },
    /// Import existing keys from a JSON file (or `-` for standard input): an array of keys, or
    /// {"keys": [...]}, each with consumer_id, name, scopes and the key as "key" (plaintext) or "sha256".
    Import {
        /// The file, or `-` to read standard input.
        file: String,
    },
    /// Disable a key (enable it again later).
    Disable {
        /// The key's id (key_…).
        #[arg(value_parser = args::Quiet(args::key_id))]
        id: String,
    },
    /// Enable a disabled key.
    Enable {
        /// The key's id (key_…).
        #[arg(value_parser = args::Quiet(args::key_id))]
        id: String,
    },
    /// Revoke a key, permanently.
    Revoke {
        /// The key's id (key_…).
        #[arg(value_parser = args::Quiet(args::key_id))]
        id: String,
    },
    /// Rotate a key: prints the new secret; the old one keeps working for --overlap.
    Rotate {
        /// The key's id (key_…).
        #[arg(value_parser = args::Quiet(args::key_id))]
        id: String,
        /// How long the old secret keeps working, e.g. 1h (at most 30d). The default, 0, ends it at once:
        /// on a terminal you are asked to confirm that.
        #[arg(long, value_name = "DURATION", default_value = "0", value_parser = args::duration_secs)]
        overlap: u64,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

fn expiry(expires_in: Option<u64>, expires_at: Option<String>) -> Option<String> {
    expires_at.or_else(|| {
        expires_in.map(|s| {
            let at = chrono::Utc::now() + chrono::Duration::seconds(s.min(i64::MAX as u64 / 2000) as i64);
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
    })
}

fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return true;
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
}

fn key_line(v: &Value) -> String {
    format!(
        "{} ({}, {}; scopes: {})",
        v["id"].as_str().unwrap_or("?"),
        v["name"].as_str().unwrap_or(""),
        v["start"].as_str().unwrap_or(""),
        cell(&v["scopes"])
    )
}

pub async fn run(c: &Api, cmd: Cmd) -> CliResult {
    match cmd {
        Cmd::Create {
            consumer,
            name,
            scopes,
            expires_in,
            expires_at,
            environment,
            metadata,
            rate_limits,
            quota,
            allowed_ips,
        } => {
            let body = CreateKey {
                consumer_id: consumer,
                name,
                scopes,
                expires_at: expiry(expires_in, expires_at),
                environment: keygate_core::Environment::parse(&environment),
                metadata,
                rate_limits: (!rate_limits.is_empty()).then_some(rate_limits),
                quota: quota.quota()?,
                allowed_ips: (!allowed_ips.is_empty()).then_some(allowed_ips),
            };
            let v = c.send(Method::POST, &["v1", "keys"], &body).await?;
            output(c, &v, |v| {
                emit(format!("Created key {}", key_line(v)));
                if !v["expires_at"].is_null() {
                    emit(format!("Expires {}", cell(&v["expires_at"])));
                }
                print_secret("Secret", &v["key"]);
            });
        }
        Cmd::List { consumer, page } => {
            let mut q = page.query();
            q.extend(consumer.map(|c| ("consumer_id", c)));
            let v = c.call(Method::GET, &["v1", "keys"], &q, None).await?;
            output(c, &v, |v| {
                let quota = |r: &Value| show_quota(&r["quota"]);
                table(
                    items(v),
                    &[
                        ("ID", &field("id")),
                        ("NAME", &field("name")),
                        ("START", &field("start")),
                        ("STATUS", &field("status")),
                        ("SCOPES", &field("scopes")),
                        ("QUOTA", &quota),
                        ("EXPIRES", &field("expires_at")),
                    ],
                );
                print_next(v);
            });
        }
        Cmd::Show { id } => {
            let v = c.call(Method::GET, &["v1", "keys", &id], &[], None).await?;
            output(c, &v, print_object);
        }
        Cmd::Update {
            id,
            name,
            scopes,
            metadata,
            expires_in,
            expires_at,
            no_expiry,
            rate_limits,
            quota,
            allowed_ips,
            inherit_rate_limits,
            no_quota,
            any_ip,
        } => {
            let body = UpdateKey {
                name,
                scopes,
                metadata,
                expires_at: if no_expiry { Some(None) } else { expiry(expires_in, expires_at).map(Some) },
                rate_limits: if inherit_rate_limits {
                    Some(None)
                } else {
                    (!rate_limits.is_empty()).then_some(Some(rate_limits))
                },
                quota: if no_quota { Some(None) } else { quota.quota()?.map(Some) },
                allowed_ips: if any_ip {
                    Some(None)
                } else {
                    (!allowed_ips.is_empty()).then_some(Some(allowed_ips))
                },
            };
            let v = c.send(Method::PATCH, &["v1", "keys", &id], &body).await?;
            output(c, &v, |v| {
                emit(format!("Updated key {}", key_line(v)));
                print_object(v);
            });
        }
        Cmd::Quota { id, set, add, reset } => {
            let body = match (set, add, reset) {
                (Some(n), None, false) => QuotaChange { set: Some(n), ..QuotaChange::default() },
                (None, Some(n), false) => QuotaChange { add: Some(n), ..QuotaChange::default() },
                _ => QuotaChange { reset: Some(true), ..QuotaChange::default() },
            };
            let v = c.send(Method::POST, &["v1", "keys", &id, "quota"], &body).await?;
            output(c, &v, |v| emit(format!("Quota of {id}: {}", show_quota(&v["quota"]))));
        }
        Cmd::Import { file } => return import(c, &file).await,
        Cmd::Disable { id } => {
            let v = c.call(Method::POST, &["v1", "keys", &id, "disable"], &[], None).await?;
            output(c, &v, |_| emit(format!("Disabled key {id}; `keygate keys enable {id}` undoes it")));
        }
        Cmd::Enable { id } => {
            let v = c.call(Method::POST, &["v1", "keys", &id, "enable"], &[], None).await?;
            output(c, &v, |_| emit(format!("Enabled key {id}")));
        }
        Cmd::Revoke { id } => {
            let v = c.call(Method::POST, &["v1", "keys", &id, "revoke"], &[], None).await?;
            output(c, &v, |v| emit(format!("Revoked key {id} at {} (permanent)", cell(&v["revoked_at"]))));
        }
        Cmd::Rotate { id, overlap, yes } => {
            if overlap == 0
                && !yes
                && !c.json
                && !confirm("With no --overlap the old secret stops working now. Rotate anyway?")
            {
                return Err(Failure::usage("not rotated; pass --overlap 1h (for example) or --yes"));
            }
            let body = RotateKey { overlap_seconds: overlap };
            let v = c.send(Method::POST, &["v1", "keys", &id, "rotate"], &body).await?;
            output(c, &v, |v| {
                emit(format!("Rotated key {}", key_line(v)));
                match v["previous_expires_at"].as_str() {
                    Some(t) if overlap > 0 => emit(format!("The old secret keeps working until {t}.")),
                    _ => emit("The old secret no longer works."),
                }
                print_secret("New secret", &v["key"]);
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends a file of keys in batches of the server's import limit, reporting progress on stderr.
async fn import(c: &Api, file: &str) -> CliResult {
    let batch = keygate_server::routes::import::MAX_IMPORT;
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Failure::new(format!("cannot read standard input: {e}")))?
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure::new(format!("cannot read {file}: {e}")))?
    };
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Failure::usage(format!("{file} is not JSON: {e}")))?;
    let keys = match v {
        Value::Array(a) => a,
        Value::Object(mut o) => match o.remove("keys") {
            Some(Value::Array(a)) => a,
            _ => return Err(Failure::usage("the file must be a JSON array of keys or {\"keys\": [...]}")),
        },
        _ => return Err(Failure::usage("the file must be a JSON array of keys or {\"keys\": [...]}")),
    };
    let total = keys.len();
    let (mut imported, mut failed) = (0u64, 0u64);
    let mut results = Vec::new();
    for (n, chunk) in keys.chunks(batch).enumerate() {
        let r = c.call(Method::POST, &["v1", "keys", "import"], &[], Some(json!({"keys": chunk}))).await?;
        imported += r["imported"].as_u64().unwrap_or(0);
        failed += r["failed"].as_u64().unwrap_or(0);
        for mut item in r["results"].as_array().cloned().unwrap_or_default() {
            // Indexes relative to the whole file.
            if let Some(i) = item["index"].as_u64() {
                item["index"] = json!(i + (n * batch) as u64);
            }
            results.push(item);
        }
        if !c.json && total > batch {
            let sent = ((n + 1) * batch).min(total);
            eprintln!("sent {sent}/{total}: {imported} imported, {failed} failed so far");
        }
    }
    if c.json {
        emit(json!({"imported": imported, "failed": failed, "results": results}));
    } else {
        emit(format!("{imported} of {total} imported, {failed} failed"));
        for r in &results {
            match (r["id"].as_str(), r.get("error")) {
                (Some(id), _) => emit(format!("  key #{}: imported as {id}", r["index"])),
                (None, Some(e)) => emit(format!(
                    "  key #{}: not imported: {} ({})",
                    r["index"],
                    e["message"].as_str().unwrap_or(""),
                    e["code"].as_str().unwrap_or("")
                )),
                _ => {}
            }
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(EXIT_ERROR) })
}
