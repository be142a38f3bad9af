//! `keygate verify` (check a credential as your API would) and `keygate token` (get an access token as
//! an application would).

use std::process::ExitCode;

use clap::Args;
use keygate_server::routes::verify::VerifyRequest;
use reqwest::Method;
use serde_json::Value;

use super::args::secret_or_stdin;
use super::http::Api;
use super::output::{cell, emit};
use super::{CliResult, EXIT_INVALID, Failure};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The credential to check: an API key or an access token; `-` reads it from standard input (keeps
    /// it out of process lists and shell history).
    pub credential: String,
    /// A scope the credential must carry (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// The end client's address, for keys with an IP allow-list [default: this machine's].
    #[arg(long)]
    pub ip: Option<std::net::IpAddr>,
    /// Units of rate limit and quota this check spends; 0 checks without spending.
    #[arg(long, default_value_t = 1)]
    pub cost: u64,
    /// For access tokens: a resource the token's audience must include.
    #[arg(long)]
    pub audience: Option<String>,
}

pub async fn verify(c: &Api, a: VerifyArgs) -> CliResult {
    let credential = secret_or_stdin(a.credential, "credential")?;
    let body = VerifyRequest {
        credential,
        scopes: a.scopes,
        cost: Some(a.cost),
        ip: a.ip.map(|ip| ip.to_string()),
        audience: a.audience,
        dpop: None,
    };
    let d = c.send(Method::POST, &["v1", "verify"], &body).await?;
    let valid = d.get("valid").and_then(Value::as_bool).unwrap_or(false);
    if c.json {
        emit(&d);
    } else {
        print_decision(&d);
    }
    Ok(if valid { ExitCode::SUCCESS } else { ExitCode::from(EXIT_INVALID) })
}

fn print_decision(d: &Value) {
    let code = d.get("code").and_then(Value::as_str).unwrap_or("?");
    if d.get("valid").and_then(Value::as_bool).unwrap_or(false) {
        emit("VALID");
        for f in ["kind", "key_id", "client_id", "consumer_id", "name", "environment", "scopes", "expires_at"]
        {
            if let Some(v) = d.get(f) {
                emit(format!("  {f:<12} {}", cell(v)));
            }
        }
    } else {
        emit(format!("{code}: {}", d.get("message").and_then(Value::as_str).unwrap_or("")));
        if let Some(m) = d.get("missing_scopes") {
            emit(format!("  missing scopes: {}", cell(m)));
        }
    }
    if let Some(r) = d.get("rate_limit") {
        emit(format!(
            "  rate limit   {} {}/{} left, resets in {} s",
            cell(&r["name"]),
            r["remaining"],
            r["limit"],
            r["reset"]
        ));
    }
    if let Some(q) = d.get("quota") {
        emit(format!("  quota        {} left", q["remaining"]));
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The client's id (kgc_…).
    #[arg(long)]
    pub client_id: String,
    /// Read the client secret from standard input (else from KEYGATE_CLIENT_SECRET).
    #[arg(long)]
    pub client_secret_stdin: bool,
    /// A scope to ask for (repeatable) [default: every scope the client may have].
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// A resource (audience) the token is for (repeatable).
    #[arg(long = "resource")]
    pub resources: Vec<String>,
}

pub async fn token(c: &Api, a: TokenArgs) -> CliResult {
    let secret = if a.client_secret_stdin {
        secret_or_stdin("-".into(), "client secret")?
    } else {
        std::env::var("KEYGATE_CLIENT_SECRET").ok().filter(|s| !s.is_empty()).ok_or_else(|| {
            Failure::usage("give the client secret on standard input with --client-secret-stdin, or in KEYGATE_CLIENT_SECRET")
        })?
    };
    let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
    if !a.scopes.is_empty() {
        form.push(("scope", a.scopes.join(" ")));
    }
    form.extend(a.resources.into_iter().map(|r| ("resource", r)));
    let req = c.http().post(c.url(&["oauth2", "token"])).basic_auth(&a.client_id, Some(&secret)).form(&form);
    let t = c.answer(req).await?;
    if c.json {
        emit(&t);
    } else {
        emit(format!(
            "Access token for {} (expires in {} s; scope: {}):\n\n    {}\n",
            a.client_id,
            t["expires_in"],
            cell(&t["scope"]),
            cell(&t["access_token"])
        ));
    }
    Ok(ExitCode::SUCCESS)
}
