//! `keygate signing-keys …`

use std::process::ExitCode;

use clap::Subcommand;
use keygate_server::routes::clients::RotateSigningKey;
use reqwest::Method;
use serde_json::Value;

use super::CliResult;
use super::args;
use super::http::Api;
use super::output::{emit, field, output, table};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List the signing keys and their stage (pending, active, retired, expired, revoked).
    List,
    /// Start a rotation: the new key is published now and signs after --publish-ahead.
    Rotate {
        /// How long the new key is published before it signs, e.g. 10m [default: the server's
        /// oauth.key_publish_ahead_seconds, 10m].
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
        publish_ahead: Option<u64>,
        /// The new key's algorithm [default: the server's oauth.signing_alg].
        #[arg(long, value_parser = ["EdDSA", "ES256", "RS256"])]
        alg: Option<String>,
    },
    /// Emergency revocation of a compromised key: it leaves the JWKS now, no token it signed verifies
    /// from the next request on, and if it was signing a new key takes over at once.
    Revoke {
        /// The key id (`kid`), as `signing-keys list` shows it.
        #[arg(value_parser = args::Quiet(args::kid))]
        kid: String,
    },
}

pub async fn run(c: &Api, cmd: Cmd) -> CliResult {
    let v = match cmd {
        Cmd::List => c.call(Method::GET, &["v1", "signing-keys"], &[], None).await?,
        Cmd::Revoke { kid } => {
            let v = c.call(Method::POST, &["v1", "signing-keys", &kid, "revoke"], &[], None).await?;
            if !c.json {
                emit(format!("Revoked signing key {kid}: unpublished, and its tokens no longer verify"));
            }
            v
        }
        Cmd::Rotate { publish_ahead, alg } => {
            let body = RotateSigningKey { publish_ahead_seconds: publish_ahead, alg };
            c.send(Method::POST, &["v1", "signing-keys", "rotate"], &body).await?
        }
    };
    output(c, &v, |v: &Value| {
        table(
            v.as_array().map(Vec::as_slice).unwrap_or(&[]),
            &[
                ("KID", &field("kid")),
                ("ALG", &field("alg")),
                ("STATUS", &field("status")),
                ("SIGNS FROM", &field("active_from")),
                ("PUBLISHED UNTIL", &field("publish_until")),
            ],
        )
    });
    Ok(ExitCode::SUCCESS)
}
