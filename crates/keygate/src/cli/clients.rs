//! `keygate clients …`

use std::process::ExitCode;

use clap::Subcommand;
use keygate_server::routes::clients::{CreateClient, RotateSecret, UpdateClient};
use reqwest::Method;
use serde_json::json;

use super::CliResult;
use super::args::{self, PageArgs};
use super::http::Api;
use super::output::{cell, emit, field, items, output, print_next, print_object, print_secret, table};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Register a client; its secret is printed this once.
    Create {
        /// The consumer that owns the client (cons_…).
        #[arg(long, value_parser = args::Quiet(args::consumer_id))]
        consumer: String,
        /// A name people recognise.
        #[arg(long)]
        name: String,
        /// A scope the client may be granted (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// A grant type the client may use (repeatable).
        #[arg(long = "grant", default_value = "client_credentials",
            value_parser = clap::builder::PossibleValuesParser::new(keygate_server::routes::clients::GRANTS))]
        grants: Vec<String>,
        /// A resource (audience URI) the client may ask tokens for (repeatable) [default: the issuer].
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// Access-token format: a signed JWT, or an opaque kgat_ token looked up on verify.
        #[arg(long, default_value = "jwt", value_parser = ["jwt", "opaque"])]
        token_format: String,
        /// Access-token lifetime, e.g. 1h (1s to 24h).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = args::duration_secs)]
        lifetime: u64,
        /// How the client authenticates: with a secret Keygate prints once, or with a JWT signed by its
        /// own private key (RFC 7523; give its public keys with --jwks-file).
        #[arg(long, default_value = "client_secret_basic",
            value_parser = ["client_secret_basic", "client_secret_post", "private_key_jwt"])]
        auth_method: String,
        /// For private_key_jwt: a file with the client's public keys as a JWKS ({"keys": [...]}).
        #[arg(long, value_name = "FILE")]
        jwks_file: Option<std::path::PathBuf>,
        /// Where users are sent back after the authorization code flow, exactly (repeatable).
        #[arg(long = "redirect-uri", value_name = "URI")]
        redirect_uris: Vec<String>,
        /// A public client (SPA, mobile or CLI app): no secret, PKCE only, no client_credentials.
        #[arg(long)]
        public: bool,
        /// A refresh token unused this long expires, e.g. 30d.
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
        refresh_idle: Option<u64>,
        /// Every refresh token of one authorization expires this long after consent, e.g. 90d.
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
        refresh_absolute: Option<u64>,
    },
    /// List clients (never their secrets).
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one client.
    Show {
        /// The client's id (kgc_…).
        #[arg(value_parser = args::Quiet(args::client_id))]
        id: String,
    },
    /// Change a client's name, scopes, audiences, token format or lifetime.
    Update {
        /// The client's id (kgc_…).
        #[arg(value_parser = args::Quiet(args::client_id))]
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// Replace the scopes (repeatable).
        #[arg(long = "scope")]
        scopes: Option<Vec<String>>,
        /// Replace the audiences (repeatable).
        #[arg(long = "audience")]
        audiences: Option<Vec<String>>,
        /// jwt or opaque.
        #[arg(long, value_parser = ["jwt", "opaque"])]
        token_format: Option<String>,
        /// Access-token lifetime, e.g. 15m.
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
        lifetime: Option<u64>,
        /// For private_key_jwt clients: replace the public keys with this JWKS file.
        #[arg(long, value_name = "FILE")]
        jwks_file: Option<std::path::PathBuf>,
        /// Replace the grant types (repeatable).
        #[arg(long = "grant",
            value_parser = clap::builder::PossibleValuesParser::new(keygate_server::routes::clients::GRANTS))]
        grants: Option<Vec<String>>,
        /// Replace the redirect URIs (repeatable).
        #[arg(long = "redirect-uri", value_name = "URI")]
        redirect_uris: Option<Vec<String>>,
    },
    /// Disable a client: no new tokens, and its tokens stop verifying.
    Disable {
        /// The client's id (kgc_…).
        #[arg(value_parser = args::Quiet(args::client_id))]
        id: String,
    },
    /// Enable a disabled client.
    Enable {
        /// The client's id (kgc_…).
        #[arg(value_parser = args::Quiet(args::client_id))]
        id: String,
    },
    /// Delete a client, its secrets and its tokens.
    Delete {
        /// The client's id (kgc_…).
        #[arg(value_parser = args::Quiet(args::client_id))]
        id: String,
    },
    /// Rotate the client secret; the old one keeps working for --overlap.
    RotateSecret {
        /// The client's id (kgc_…).
        #[arg(value_parser = args::Quiet(args::client_id))]
        id: String,
        /// How long the old secret keeps working, e.g. 1h (default 0: it stops now).
        #[arg(long, value_name = "DURATION", default_value = "0", value_parser = args::duration_secs)]
        overlap: u64,
    },
    /// Revoke every token issued to the client until now (tokens issued later keep working).
    RevokeTokens {
        /// The client's id (kgc_…).
        #[arg(value_parser = args::Quiet(args::client_id))]
        id: String,
    },
}

pub async fn run(c: &Api, cmd: Cmd) -> CliResult {
    match cmd {
        Cmd::Create {
            consumer,
            name,
            scopes,
            grants,
            audiences,
            token_format,
            lifetime,
            auth_method,
            jwks_file,
            redirect_uris,
            public,
            refresh_idle,
            refresh_absolute,
        } => {
            let secs = |d: u64| d.min(i64::MAX as u64) as i64;
            let body = CreateClient {
                consumer_id: consumer,
                name,
                grant_types: Some(grants),
                scopes,
                audiences,
                token_format: Some(token_format),
                token_lifetime_seconds: Some(lifetime.min(i64::MAX as u64) as i64),
                token_endpoint_auth_method: if public { None } else { Some(auth_method) },
                jwks: jwks_file.map(|f| read_jwks(&f)).transpose()?,
                redirect_uris,
                public,
                refresh_idle_seconds: refresh_idle.map(secs),
                refresh_absolute_seconds: refresh_absolute.map(secs),
                id: None,
            };
            let v = c.send(Method::POST, &["v1", "clients"], &body).await?;
            output(c, &v, |v| {
                emit(format!(
                    "Created client {} ({}; {} tokens; scopes: {})",
                    cell(&v["client_id"]),
                    cell(&v["name"]),
                    cell(&v["token_format"]),
                    cell(&v["scopes"])
                ));
                if v["public"] == serde_json::Value::Bool(true) {
                    emit("A public client: it has no secret and must use PKCE (S256).");
                } else if v["client_secret"].is_null() {
                    emit(
                        "It authenticates with JWTs signed by its own key (private_key_jwt); it has no secret.",
                    );
                } else {
                    print_secret("Client secret", &v["client_secret"]);
                }
            });
        }
        Cmd::List { page } => {
            let v = c.call(Method::GET, &["v1", "clients"], &page.query(), None).await?;
            output(c, &v, |v| {
                table(
                    items(v),
                    &[
                        ("CLIENT ID", &field("client_id")),
                        ("NAME", &field("name")),
                        ("FORMAT", &field("token_format")),
                        ("SCOPES", &field("scopes")),
                        ("DISABLED", &field("disabled")),
                    ],
                );
                print_next(v);
            });
        }
        Cmd::Show { id } => {
            let v = c.call(Method::GET, &["v1", "clients", &id], &[], None).await?;
            output(c, &v, print_object);
        }
        Cmd::Update {
            id,
            name,
            scopes,
            audiences,
            token_format,
            lifetime,
            jwks_file,
            grants,
            redirect_uris,
        } => {
            let body = UpdateClient {
                jwks: jwks_file.map(|f| read_jwks(&f)).transpose()?,
                name,
                grant_types: grants,
                scopes,
                audiences,
                token_format,
                token_lifetime_seconds: lifetime.map(|l| l.min(i64::MAX as u64) as i64),
                redirect_uris,
                ..UpdateClient::default()
            };
            let v = c.send(Method::PATCH, &["v1", "clients", &id], &body).await?;
            output(c, &v, |v| {
                emit(format!("Updated client {id}"));
                print_object(v);
            });
        }
        Cmd::Disable { id } => {
            let v = c.call(Method::POST, &["v1", "clients", &id, "disable"], &[], None).await?;
            output(c, &v, |_| {
                emit(format!("Disabled client {id}: no new tokens, and its tokens stop working"))
            });
        }
        Cmd::Enable { id } => {
            let v = c.call(Method::POST, &["v1", "clients", &id, "enable"], &[], None).await?;
            output(c, &v, |_| emit(format!("Enabled client {id}")));
        }
        Cmd::RevokeTokens { id } => {
            let v = c.call(Method::POST, &["v1", "clients", &id, "revoke-tokens"], &[], None).await?;
            output(c, &v, |_| {
                emit(format!("Revoked every token of {id} issued until now"));
                emit("(services that validate JWTs offline cannot see this; see docs/SECURITY.md)");
            });
        }
        Cmd::Delete { id } => {
            c.call(Method::DELETE, &["v1", "clients", &id], &[], None).await?;
            output(c, &json!({"deleted": id}), |_| emit(format!("Deleted client {id}")));
        }
        Cmd::RotateSecret { id, overlap } => {
            let body = RotateSecret { overlap_seconds: overlap };
            let v = c.send(Method::POST, &["v1", "clients", &id, "rotate-secret"], &body).await?;
            output(c, &v, |v| {
                emit(format!("Rotated the secret of client {id}"));
                if overlap > 0 {
                    emit(format!("The old secret keeps working until {}.", cell(&v["previous_expires_at"])));
                }
                print_secret("New client secret", &v["client_secret"]);
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_jwks(path: &std::path::Path) -> Result<serde_json::Value, super::Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| super::Failure::usage(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| super::Failure::usage(format!("{} is not JSON: {e}", path.display())))
}
