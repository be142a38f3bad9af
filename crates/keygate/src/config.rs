//! Configuration, declared once. Each setting is one row of [`SETTINGS`]: its key in the TOML file
//! (`cache.ttl_seconds`), its documentation, and how it is read from and written into the server's
//! configuration. Everything else is derived from that row:
//!
//! - the flag (`--cache-ttl-seconds`) and the environment variable (`KEYGATE_CACHE_TTL_SECONDS`), which
//!   clap reads (a flag wins over its variable);
//! - the file's accepted keys (anything else is refused, with a pointer to `keygate default-config`);
//! - `keygate default-config`, printed from the rows and the defaults;
//! - the `[default: …]` shown by `keygate serve --help`.
//!
//! Defaults live in one place, `ServerConfig::default()` in keygate-server (which tests use too).
//! Layering: defaults → TOML file (`--config`) → `KEYGATE_*` variables → flags. Out-of-range values are
//! refused with the range, never clamped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use keygate_server::ServerConfig;
use keygate_server::oauth::keys::KeyAlg;
use keygate_server::oauth::register::RegistrationMode;
use keygate_server::seal::MasterKeySource;
use toml::Value;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The resolved configuration: what the server runs with, plus what only the binary uses.
#[derive(Debug, Default)]
pub struct Resolved {
    pub server: ServerConfig,
    pub log_format: LogFormat,
    master_key_file: Option<PathBuf>,
}

/// One setting. See the module documentation for what is derived from it.
pub struct Setting {
    /// Key in the TOML file; a dot separates the `[section]`.
    pub key: &'static str,
    /// What it does (the first line is the flag's short help).
    pub doc: &'static str,
    /// For a setting that is unset by default: what happens then, and an example value (TOML).
    pub unset: Option<(&'static str, &'static str)>,
    /// Takes several values (repeat the flag, or separate them with commas).
    pub list: bool,
    /// An older flag name still accepted.
    pub alias: Option<&'static str>,
    get: fn(&Resolved) -> Option<Value>,
    set: fn(&mut Resolved, &str) -> Result<(), String>,
}

impl Setting {
    pub fn flag(&self) -> String {
        self.key.replace(['.', '_'], "-")
    }

    pub fn env(&self) -> String {
        format!("KEYGATE_{}", self.key.replace('.', "_").to_uppercase())
    }

    /// The default as written in the file, or `None` when unset by default.
    pub fn default_value(&self) -> Option<Value> {
        (self.get)(&Resolved::default())
    }
}

/// The initial access token of `oauth.registration = "token"` (environment only: it is a secret).
pub const REGISTRATION_TOKEN_ENV: &str = "KEYGATE_OAUTH_REGISTRATION_TOKEN";

fn s(v: impl Into<String>) -> Option<Value> {
    Some(Value::String(v.into()))
}

fn n(v: u64) -> Option<Value> {
    Some(Value::Integer(i64::try_from(v).unwrap_or(i64::MAX)))
}

fn num(v: &str, min: u64, max: u64) -> Result<u64, String> {
    let x: u64 = v.trim().parse().map_err(|_| "is not a whole number".to_string())?;
    if (min..=max).contains(&x) { Ok(x) } else { Err(format!("is out of range: it must be {min} to {max}")) }
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("must be true or false".into()),
    }
}

/// A list of host names (lower-cased), for domain allow and deny lists.
fn domains(v: &str) -> Result<Vec<String>, String> {
    v.split(',')
        .map(|d| d.trim().trim_start_matches("*.").to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .map(|d| {
            if d.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
                Ok(d)
            } else {
                Err(format!("{d:?} is not a host name"))
            }
        })
        .collect()
}

fn addr(v: &str) -> Result<SocketAddr, String> {
    v.trim().parse().map_err(|_| "is not an address: write IP:PORT, e.g. 127.0.0.1:8080".into())
}

/// Every setting, in the order `keygate default-config` prints them (top-level ones first).
pub static SETTINGS: &[Setting] = &[
    Setting {
        key: "listen",
        doc: "Address to listen on. With admin_listen set, it serves only what API consumers need.",
        unset: None,
        list: false,
        alias: None,
        get: |r| s(r.server.listen.to_string()),
        set: |r, v| {
            r.server.listen = addr(v)?;
            Ok(())
        },
    },
    Setting {
        key: "admin_listen",
        doc: "A second listener for the admin API (/v1/* except /v1/verify and /v1/auth), /metrics and the\n\
              docs. When set, `listen` serves only /v1/verify, /v1/auth, /oauth2/*, discovery, JWKS and\n\
              health. Production layout: listen on the public interface, admin_listen on a private one.",
        unset: Some(("one listener serves everything", "\"127.0.0.1:8081\"")),
        list: false,
        alias: None,
        get: |r| r.server.admin_listen.and_then(|a| s(a.to_string())),
        set: |r, v| {
            r.server.admin_listen = Some(addr(v)?);
            Ok(())
        },
    },
    Setting {
        key: "data_dir",
        doc: "Where the SQLite database lives (created 0700; its files 0600).",
        unset: None,
        list: false,
        alias: None,
        get: |r| s(r.server.data_dir.display().to_string()),
        set: |r, v| {
            r.server.data_dir = PathBuf::from(v);
            Ok(())
        },
    },
    Setting {
        key: "database_url",
        doc: "A PostgreSQL database for several Keygate nodes to share (postgres://USER:PASSWORD@HOST:PORT/DB;\n\
              the database must exist, Keygate creates its tables). Each node keeps its own data_dir, and every\n\
              node needs the same master key. Prefer the KEYGATE_DATABASE_URL variable to a file: it holds\n\
              a password.",
        unset: Some((
            "the embedded SQLite database in data_dir",
            "\"postgres://keygate:secret@db.internal:5432/keygate\"",
        )),
        list: false,
        alias: None,
        get: |r| r.server.database_url.as_ref().and_then(|u| s(u.expose())),
        set: |r, v| {
            r.server.database_url = Some(keygate_server::DatabaseUrl::parse(v)?);
            Ok(())
        },
    },
    Setting {
        key: "master_key_file",
        doc: "The master key that seals the JWT signing keys in the database (XChaCha20-Poly1305); created,\n\
              mode 0600, if missing. Keep it OUTSIDE the data directory and back it up apart from it: a\n\
              copy of the data directory alone then does not reveal the signing keys. KEYGATE_MASTER_KEY\n\
              (the key itself, base64 of 32 random bytes) takes precedence over the file.",
        unset: Some((
            "keygate.master-key beside the config file, or, without one, <data_dir>.master-key beside the data directory",
            "\"/etc/keygate/master.key\"",
        )),
        list: false,
        alias: None,
        get: |r| r.master_key_file.as_ref().and_then(|p| s(p.display().to_string())),
        set: |r, v| {
            r.master_key_file = Some(PathBuf::from(v));
            Ok(())
        },
    },
    Setting {
        key: "log_format",
        doc: "\"text\" or \"json\", on standard error. The level comes from KEYGATE_LOG (e.g. \"info\",\n\
              \"keygate_server=debug\"; \"info,keygate::access=warn\" drops the per-request line).",
        unset: None,
        list: false,
        alias: None,
        get: |r| s(if r.log_format == LogFormat::Json { "json" } else { "text" }),
        set: |r, v| {
            r.log_format = match v.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err("must be text or json".into()),
            };
            Ok(())
        },
    },
    Setting {
        key: "body_limit_bytes",
        doc: "Largest request body accepted, in bytes.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.body_limit as u64),
        set: |r, v| {
            r.server.body_limit = num(v, 1024, 64 << 20)? as usize;
            Ok(())
        },
    },
    Setting {
        key: "request_timeout_seconds",
        doc: "Longest a request may take before it is answered 503 request_timeout; also the longest a client\n\
              may take to send a request's headers, or leave a kept-alive connection idle.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.request_timeout.as_secs()),
        set: |r, v| {
            r.server.request_timeout = Duration::from_secs(num(v, 1, 3600)?);
            Ok(())
        },
    },
    Setting {
        key: "busy_timeout_ms",
        doc: "How long a write waits for the database lock before answering 503, in ms.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.busy_timeout.as_millis() as u64),
        set: |r, v| {
            r.server.busy_timeout = Duration::from_millis(num(v, 1, 600_000)?);
            Ok(())
        },
    },
    Setting {
        key: "trusted_proxies",
        doc: "Proxies (addresses or CIDR ranges) whose X-Forwarded-For / Forwarded headers name the real\n\
              client, e.g. [\"127.0.0.1\", \"10.0.0.0/8\"]. Empty: the peer address is the client.",
        unset: None,
        list: true,
        alias: Some("trusted-proxy"),
        get: |r| {
            Some(Value::Array(
                r.server.trusted_proxies.iter().map(|p| Value::String(p.to_string())).collect(),
            ))
        },
        set: |r, v| {
            let list: Vec<String> =
                v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            r.server.trusted_proxies =
                keygate_core::limits::parse_allowed_ips(&list).map_err(|e| e.to_string())?;
            Ok(())
        },
    },
    Setting {
        key: "failures_per_minute",
        doc: "Failed credential checks (malformed or unknown keys, failed admin logins) one address may make\n\
              per minute before it is answered 429. 0 turns this off.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.failures_per_minute),
        set: |r, v| {
            r.server.failures_per_minute = num(v, 0, 1_000_000)?;
            Ok(())
        },
    },
    Setting {
        key: "flush_interval_ms",
        doc: "How often usage counts, last-used times and quota state are written to the database, in ms.\n\
              A crash loses at most this much of them; a graceful stop loses nothing.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.flush_interval.as_millis() as u64),
        set: |r, v| {
            r.server.flush_interval = Duration::from_millis(num(v, 10, 60_000)?);
            Ok(())
        },
    },
    Setting {
        key: "metrics_auth",
        doc: "Require a credential with the keygate:metrics permission (admin keys have it) to read /metrics.",
        unset: Some(("on, unless the listener serving /metrics is on a loopback address", "true")),
        list: false,
        alias: None,
        get: |r| r.server.metrics_auth.map(Value::Boolean),
        set: |r, v| {
            r.server.metrics_auth = Some(boolean(v)?);
            Ok(())
        },
    },
    Setting {
        key: "unique_consumer_names",
        doc: "Refuse a consumer name that another consumer already has.",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.unique_consumer_names)),
        set: |r, v| {
            r.server.unique_consumer_names = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "issuer",
        doc: "The OAuth issuer URL: what clients use to reach this server, and the \"iss\" of its tokens.",
        unset: Some(("http://<the address it listens on>", "\"https://auth.example.com\"")),
        list: false,
        alias: None,
        get: |r| r.server.issuer.as_ref().and_then(|i| s(i.clone())),
        set: |r, v| {
            let v = v.trim();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err("must be an http:// or https:// URL".into());
            }
            r.server.issuer = Some(v.trim_end_matches('/').to_string());
            Ok(())
        },
    },
    Setting {
        key: "oauth.signing_alg",
        doc: "JWT signing algorithm for new keys: \"EdDSA\" (Ed25519), \"ES256\" or \"RS256\" (RSA 2048, for\n\
              gateways that accept only RSA).",
        unset: None,
        list: false,
        alias: None,
        get: |r| s(r.server.signing_alg.as_str()),
        set: |r, v| {
            r.server.signing_alg = KeyAlg::parse(v.trim()).ok_or("must be EdDSA, ES256 or RS256")?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.key_publish_ahead_seconds",
        doc: "A new signing key is published this long before it signs, so verifiers caching the JWKS have it.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.key_publish_ahead.as_secs()),
        set: |r, v| {
            r.server.key_publish_ahead = Duration::from_secs(num(v, 0, 7 * 86_400)?);
            Ok(())
        },
    },
    Setting {
        key: "oauth.key_rotation_days",
        doc: "Rotate the signing key automatically this often; 0 turns it off.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.key_rotation_interval.as_secs() / 86_400),
        set: |r, v| {
            r.server.key_rotation_interval = Duration::from_secs(num(v, 0, 3660)? * 86_400);
            Ok(())
        },
    },
    Setting {
        key: "oauth.publish_scopes",
        doc: "List every client's scopes in the discovery document's scopes_supported. Turn off to keep one\n\
              tenant's scopes from being visible to everyone.",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.publish_scopes)),
        set: |r, v| {
            r.server.publish_scopes = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.refresh_grace_seconds",
        doc: "Concurrent retries of one refresh token within this many seconds get the same new tokens\n\
              instead of being treated as reuse (which revokes every token of that authorization). 0 turns\n\
              the grace off.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.refresh_grace.as_secs()),
        set: |r, v| {
            r.server.refresh_grace = Duration::from_secs(num(v, 0, 60)?);
            Ok(())
        },
    },
    Setting {
        key: "oauth.device_poll_interval_seconds",
        doc: "How often a device may poll the token endpoint in the device flow (RFC 8628 `interval`).",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.device_poll_interval.as_secs()),
        set: |r, v| {
            r.server.device_poll_interval = Duration::from_secs(num(v, 1, 60)?);
            Ok(())
        },
    },
    Setting {
        key: "oauth.protected_resources",
        doc: "The APIs forward-auth guards, as resource URLs (e.g. [\"https://api.example.com/mcp\"]). For each,\n\
              Keygate serves RFC 9728 metadata at /.well-known/oauth-protected-resource/<path> (route it there\n\
              from the API's host), names it in 401/403 WWW-Authenticate, and accepts only tokens issued for\n\
              it (RFC 8707 audience) when /v1/auth is asked with ?resource= or the proxy's X-Forwarded-* headers.",
        unset: None,
        list: true,
        alias: None,
        get: |r| {
            Some(Value::Array(
                r.server.protected_resources.iter().map(|p| Value::String(p.clone())).collect(),
            ))
        },
        set: |r, v| {
            r.server.protected_resources = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(keygate_server::oauth::resource::check_resource)
                .collect::<Result<_, _>>()?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.resource_documentation",
        doc: "A page about the protected resources, listed in their metadata.",
        unset: Some(("not listed", "\"https://docs.example.com/api\"")),
        list: false,
        alias: None,
        get: |r| r.server.resource_documentation.as_ref().and_then(|d| s(d.clone())),
        set: |r, v| {
            let u = url::Url::parse(v.trim()).map_err(|e| format!("is not a URL: {e}"))?;
            r.server.resource_documentation = Some(u.to_string());
            Ok(())
        },
    },
    Setting {
        key: "oauth.registration",
        doc: "Dynamic client registration (RFC 7591) at /oauth2/register, for AI agents and other clients\n\
              nobody registers by hand: off, open (rate-limited per address), or token (clients present the\n\
              initial access token from KEYGATE_OAUTH_REGISTRATION_TOKEN).",
        unset: None,
        list: false,
        alias: None,
        get: |r| s(r.server.registration.mode.as_str()),
        set: |r, v| {
            r.server.registration.mode =
                RegistrationMode::parse(v.trim()).ok_or("must be off, open or token")?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.registration_scopes",
        doc: "The scopes a registered client may ask for (each gets all of them unless it asks for fewer).",
        unset: None,
        list: true,
        alias: None,
        get: |r| {
            Some(Value::Array(
                r.server.registration.scopes.iter().map(|p| Value::String(p.clone())).collect(),
            ))
        },
        set: |r, v| {
            let list: Vec<String> =
                v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            r.server.registration.scopes =
                keygate_core::scope::normalize_scopes(list).map_err(|e| e.to_string())?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.registrations_per_hour",
        doc: "Registrations one address may make per hour (0: no limit).",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.registration.per_hour),
        set: |r, v| {
            r.server.registration.per_hour = num(v, 0, 100_000)?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.client_metadata_documents",
        doc: "Accept clients whose client_id is an https URL of a Client ID Metadata Document (the MCP way for\n\
              agents to introduce themselves without registering). The document is fetched through the\n\
              webhook SSRF guard, checked, cached and shown with its host on the consent page.",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.metadata_docs.enabled)),
        set: |r, v| {
            r.server.metadata_docs.enabled = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.client_metadata_allow_domains",
        doc: "Only these hosts (and their subdomains) may describe clients; empty: any host not denied.",
        unset: None,
        list: true,
        alias: None,
        get: |r| {
            Some(Value::Array(
                r.server.metadata_docs.allow_domains.iter().map(|d| Value::String(d.clone())).collect(),
            ))
        },
        set: |r, v| {
            r.server.metadata_docs.allow_domains = domains(v)?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.client_metadata_deny_domains",
        doc: "Hosts (and their subdomains) whose client metadata documents are refused.",
        unset: None,
        list: true,
        alias: None,
        get: |r| {
            Some(Value::Array(
                r.server.metadata_docs.deny_domains.iter().map(|d| Value::String(d.clone())).collect(),
            ))
        },
        set: |r, v| {
            r.server.metadata_docs.deny_domains = domains(v)?;
            Ok(())
        },
    },
    Setting {
        key: "oauth.client_metadata_allow_private",
        doc: "Accept http:// and private addresses for client metadata documents (local testing only).",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.metadata_docs.allow_private)),
        set: |r, v| {
            r.server.metadata_docs.allow_private = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "rate_limits.redis_url",
        doc: "A Redis server (redis://[:PASSWORD@]HOST:PORT[/DB]) whose rate-limit cells every node shares, so\n\
              that a key's limit holds across all nodes. Unset: each node applies the limits to the requests it\n\
              serves. If Redis stops answering, nodes fall back to their own cells until it answers again.",
        unset: Some((
            "each node applies rate limits to the requests it serves",
            "\"redis://redis.internal:6379\"",
        )),
        list: false,
        alias: None,
        get: |r| r.server.rate_limits_redis_url.as_ref().and_then(|u| s(u.expose())),
        set: |r, v| {
            r.server.rate_limits_redis_url = Some(keygate_server::DatabaseUrl::parse_redis(v)?);
            Ok(())
        },
    },
    Setting {
        key: "portal.signup",
        doc: "Who may sign up at the developer portal (/portal/): closed (developers are made by an operator),\n\
              open (anyone), or invite (whoever holds an invitation: POST /v1/portal/invitations).",
        unset: None,
        list: false,
        alias: None,
        get: |r| s(r.server.portal.signup.as_str()),
        set: |r, v| {
            r.server.portal.signup = keygate_server::SignupMode::parse(v)
                .ok_or_else(|| "must be closed, open or invite".to_string())?;
            Ok(())
        },
    },
    Setting {
        key: "portal.verify_email",
        doc: "A developer proves their email address (a link by mail) before making applications.",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.portal.verify_email)),
        set: |r, v| {
            r.server.portal.verify_email = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "portal.authorization_code_clients",
        doc: "Developers may make OAuth clients for the authorization code flow (with redirect URIs), not only\n\
              client-credentials clients. Their users then see those clients' names on the consent page.",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.portal.authorization_code_clients)),
        set: |r, v| {
            r.server.portal.authorization_code_clients = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "mail.smtp_url",
        doc: "The SMTP server for the portal's mail (verification, password reset, invitations):\n\
              smtps://USER:PASSWORD@HOST:465 (TLS), or smtp://USER:PASSWORD@HOST:587?tls=required (STARTTLS).\n\
              Unset: the test mode, where each message, link included, is written to the server log.",
        unset: Some((
            "mail is written to the server log (test mode, for local use)",
            "\"smtps://keygate:PASSWORD@smtp.example.com:465\"",
        )),
        list: false,
        alias: None,
        get: |r| r.server.portal.smtp_url.as_ref().and_then(|u| s(u.expose())),
        set: |r, v| {
            let url = keygate_server::DatabaseUrl::parse_smtp(v)?;
            keygate_server::mail::Mailer::new(Some(&url), &r.server.portal.mail_from)?;
            r.server.portal.smtp_url = Some(url);
            Ok(())
        },
    },
    Setting {
        key: "mail.from",
        doc: "The sender of the portal's mail, e.g. \"Example API <api@example.com>\".",
        unset: None,
        list: false,
        alias: None,
        get: |r| s(r.server.portal.mail_from.clone()),
        set: |r, v| {
            keygate_server::mail::Mailer::new(None, v)?;
            r.server.portal.mail_from = v.to_string();
            Ok(())
        },
    },
    Setting {
        key: "usage.minute_retention_hours",
        doc: "How long per-minute usage buckets are kept, in hours.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.retention.minute.as_secs() / 3600),
        set: |r, v| {
            r.server.retention.minute = Duration::from_secs(num(v, 1, 24 * 366)? * 3600);
            Ok(())
        },
    },
    Setting {
        key: "usage.hour_retention_days",
        doc: "How long hourly usage buckets are kept, in days.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.retention.hour.as_secs() / 86_400),
        set: |r, v| {
            r.server.retention.hour = Duration::from_secs(num(v, 1, 3660)? * 86_400);
            Ok(())
        },
    },
    Setting {
        key: "usage.day_retention_days",
        doc: "How long daily usage buckets are kept, in days.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.retention.day.as_secs() / 86_400),
        set: |r, v| {
            r.server.retention.day = Duration::from_secs(num(v, 1, 36_600)? * 86_400);
            Ok(())
        },
    },
    Setting {
        key: "cache.capacity",
        doc: "Most credentials kept in the in-memory verify cache.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.cache.capacity),
        set: |r, v| {
            r.server.cache.capacity = num(v, 1, 1_000_000_000)?;
            Ok(())
        },
    },
    Setting {
        key: "cache.ttl_seconds",
        doc: "Longest a cached credential lives before it is read again (changes made through this server\n\
              take effect at once regardless).",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.cache.ttl.as_secs()),
        set: |r, v| {
            r.server.cache.ttl = Duration::from_secs(num(v, 1, 86_400)?);
            Ok(())
        },
    },
    Setting {
        key: "cache.negative_ttl_seconds",
        doc: "Longest a \"no such credential\" answer is remembered.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.cache.negative_ttl.as_secs()),
        set: |r, v| {
            r.server.cache.negative_ttl = Duration::from_secs(num(v, 1, 86_400)?);
            Ok(())
        },
    },
    Setting {
        key: "tokens.pat_max_lifetime_days",
        doc: "Longest lifetime of a personal access token, in days; every token needs an expiry within it.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.pat_max_lifetime.as_secs() / 86_400),
        set: |r, v| {
            r.server.pat_max_lifetime = Duration::from_secs(num(v, 1, 3660)? * 86_400);
            Ok(())
        },
    },
    Setting {
        key: "tokens.pat_allow_no_expiry",
        doc: "Allow personal access tokens that never expire (`\"expires\": \"never\"`).",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.pat_allow_no_expiry)),
        set: |r, v| {
            r.server.pat_allow_no_expiry = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "webhooks.allow_private",
        doc: "Let webhooks use http:// and reach loopback, private and link-local addresses. For local\n\
              testing only: in production a webhook URL could otherwise probe your internal network.",
        unset: None,
        list: false,
        alias: None,
        get: |r| Some(Value::Boolean(r.server.webhooks.allow_private)),
        set: |r, v| {
            r.server.webhooks.allow_private = boolean(v)?;
            Ok(())
        },
    },
    Setting {
        key: "webhooks.allow_networks",
        doc: "Private networks (addresses or CIDR ranges) webhooks may reach anyway, e.g. [\"10.20.0.0/16\"]\n\
              for a receiver inside your network. Everything else private stays refused.",
        unset: None,
        list: true,
        alias: None,
        get: |r| {
            Some(Value::Array(
                r.server.webhooks.allow_networks.iter().map(|p| Value::String(p.to_string())).collect(),
            ))
        },
        set: |r, v| {
            let list: Vec<String> =
                v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            r.server.webhooks.allow_networks =
                keygate_core::limits::parse_allowed_ips(&list).map_err(|e| e.to_string())?;
            Ok(())
        },
    },
    Setting {
        key: "webhooks.first_retry_seconds",
        doc: "Delay before a failed delivery's first retry; each next retry waits four times longer (at\n\
              most 6 hours), with 20 % jitter.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.webhooks.first_retry.as_secs()),
        set: |r, v| {
            r.server.webhooks.first_retry = Duration::from_secs(num(v, 1, 3600)?);
            Ok(())
        },
    },
    Setting {
        key: "webhooks.retry_hours",
        doc: "How long a delivery is retried before it is given up (each attempt is kept and listed).",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.webhooks.retry_for.as_secs() / 3600),
        set: |r, v| {
            r.server.webhooks.retry_for = Duration::from_secs(num(v, 1, 168)? * 3600);
            Ok(())
        },
    },
    Setting {
        key: "webhooks.disable_after_days",
        doc: "An endpoint whose every delivery has failed for this many days is disabled, and the\n\
              `webhook.disabled` event and a warning in the log say so. 0 disables it at its first failure.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.webhooks.disable_after.as_secs() / 86_400),
        set: |r, v| {
            r.server.webhooks.disable_after = Duration::from_secs(num(v, 0, 90)? * 86_400);
            Ok(())
        },
    },
    Setting {
        key: "webhooks.timeout_seconds",
        doc: "How long a receiver has to answer a delivery.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.webhooks.timeout.as_secs()),
        set: |r, v| {
            r.server.webhooks.timeout = Duration::from_secs(num(v, 1, 60)?);
            Ok(())
        },
    },
    Setting {
        key: "webhooks.quota_low_percent",
        doc: "`quota.low` is sent when a refilling quota falls to this percentage of its refill amount.",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.webhooks.quota_low_percent),
        set: |r, v| {
            r.server.webhooks.quota_low_percent = num(v, 1, 99)?;
            Ok(())
        },
    },
    Setting {
        key: "webhooks.quota_low_remaining",
        doc: "`quota.low` for a quota that does not refill: sent when this many uses are left (0: never).",
        unset: None,
        list: false,
        alias: None,
        get: |r| n(r.server.webhooks.quota_low_remaining),
        set: |r, v| {
            r.server.webhooks.quota_low_remaining = num(v, 0, 1_000_000_000)?;
            Ok(())
        },
    },
    Setting {
        key: "leaks.reporter_keys_file",
        doc: "Turns on the leaked-secret receiver (POST /v1/leaks): a JSON file with the public keys of the\n\
              secret-scanning partners allowed to report, in GitHub's form {\"public_keys\": [{\n\
              \"key_identifier\": ..., \"key\": PEM}]} (save https://api.github.com/meta/public_keys/secret_scanning).",
        unset: Some(("leak reports are refused", "\"/etc/keygate/secret-scanning-keys.json\"")),
        list: false,
        alias: None,
        get: |r| r.server.leak_reporter_keys.as_ref().and_then(|p| s(p.display().to_string())),
        set: |r, v| {
            r.server.leak_reporter_keys = Some(PathBuf::from(v));
            Ok(())
        },
    },
    Setting {
        key: "gateway.listen",
        doc: "Address of the gateway: Keygate in front of your API. Requests that match a route in\n\
              gateway.routes are checked and forwarded upstream; others are 404.",
        unset: Some(("no gateway", "\"0.0.0.0:8000\"")),
        list: false,
        alias: None,
        get: |r| r.server.gateway_listen.and_then(|a| s(a.to_string())),
        set: |r, v| {
            r.server.gateway_listen = Some(addr(v)?);
            Ok(())
        },
    },
    Setting {
        key: "gateway.routes",
        doc: "The gateway's routes file (TOML; check it with `keygate routes check FILE`). It reloads on\n\
              SIGHUP and when it changes; a file that does not check is refused and the old routes stay.",
        unset: Some(("no gateway", "\"/etc/keygate/routes.toml\"")),
        list: false,
        alias: None,
        get: |r| r.server.gateway_routes.as_ref().and_then(|p| s(p.display().to_string())),
        set: |r, v| {
            r.server.gateway_routes = Some(PathBuf::from(v));
            Ok(())
        },
    },
    Setting {
        key: "login.trusted_header",
        doc: "For sites with their own single sign-on: a header a front proxy sets to the username it has\n\
              already authenticated (e.g. \"x-remote-user\"). Believed only from trusted_proxies, and only for\n\
              an existing, enabled user; such a user skips the login page.",
        unset: Some(("off: users log in on the login page", "\"x-remote-user\"")),
        list: false,
        alias: None,
        get: |r| r.server.login_trusted_header.as_ref().and_then(|h| s(h.clone())),
        set: |r, v| {
            let name = v.trim().to_ascii_lowercase();
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || ["authorization", "cookie", "host", "x-forwarded-for", "forwarded"]
                    .contains(&name.as_str())
            {
                return Err("must be a header name of its own, e.g. x-remote-user".into());
            }
            r.server.login_trusted_header = Some(name);
            Ok(())
        },
    },
];

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    Flag,
    Env,
    File(PathBuf),
}

/// What the command line and environment said, as clap parsed it: `--config`, and each setting given.
/// `serve` takes every setting; `init` and `admin-key` take only `--config` and `--data-dir`
/// ([`DataDirArgs`]).
#[derive(Debug, Clone, Default)]
pub struct ServerArgs {
    pub config: Option<PathBuf>,
    given: BTreeMap<&'static str, (String, Origin)>,
}

impl ServerArgs {
    /// For tests and callers that build arguments in code: `key = value` as if given as a flag.
    #[cfg(test)]
    pub fn with(mut self, key: &'static str, value: &str) -> Self {
        self.given.insert(key, (value.to_string(), Origin::Flag));
        self
    }
}

const CONFIG_ARG: &str = "config";

fn augment(mut cmd: Command, only: Option<&[&str]>) -> Command {
    cmd = cmd.arg(
        Arg::new(CONFIG_ARG)
            .long("config")
            .env("KEYGATE_CONFIG")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help("TOML configuration file (see `keygate default-config`)."),
    );
    for setting in SETTINGS.iter().filter(|s| only.is_none_or(|o| o.contains(&s.key))) {
        let default = match (setting.default_value(), setting.unset) {
            (_, Some((when_unset, _))) => when_unset.to_string(),
            (Some(Value::String(s)), None) => s,
            (Some(v), None) => v.to_string(),
            (None, None) => "none".into(),
        };
        let short = setting.doc.lines().next().unwrap_or_default();
        let mut arg = Arg::new(setting.key)
            .long(setting.flag())
            .env(setting.env())
            .value_name(if setting.list { "LIST" } else { "VALUE" })
            .help(format!("{short} [default: {default}]"))
            .long_help(format!("{} [default: {default}]", setting.doc.replace('\n', " ")));
        if let Some(alias) = setting.alias {
            arg = arg.alias(alias);
        }
        arg = if setting.list {
            arg.action(ArgAction::Append).value_delimiter(',')
        } else {
            arg.action(ArgAction::Set)
        };
        cmd = cmd.arg(arg);
    }
    cmd
}

fn collect(m: &ArgMatches, only: Option<&[&str]>) -> ServerArgs {
    let mut given = BTreeMap::new();
    for setting in SETTINGS.iter().filter(|s| only.is_none_or(|o| o.contains(&s.key))) {
        let origin = match m.value_source(setting.key) {
            Some(ValueSource::CommandLine) => Origin::Flag,
            Some(ValueSource::EnvVariable) => Origin::Env,
            _ => continue,
        };
        if let Some(values) = m.get_many::<String>(setting.key) {
            let value = values.map(String::as_str).collect::<Vec<_>>().join(",");
            given.insert(setting.key, (value, origin));
        }
    }
    ServerArgs { config: m.get_one::<PathBuf>(CONFIG_ARG).cloned(), given }
}

impl clap::Args for ServerArgs {
    fn augment_args(cmd: Command) -> Command {
        augment(cmd, None)
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        augment(cmd, None)
    }
}

impl clap::FromArgMatches for ServerArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(collect(m, None))
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = collect(m, None);
        Ok(())
    }
}

/// The data directory, for commands that work on it directly (`init`, `admin-key`).
#[derive(Debug, Clone, Default)]
pub struct DataDirArgs(pub ServerArgs);

const DATA_DIR_ONLY: &[&str] = &["data_dir", "database_url", "master_key_file"];

impl clap::Args for DataDirArgs {
    fn augment_args(cmd: Command) -> Command {
        augment(cmd, Some(DATA_DIR_ONLY))
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        augment(cmd, Some(DATA_DIR_ONLY))
    }
}

impl clap::FromArgMatches for DataDirArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(DataDirArgs(collect(m, Some(DATA_DIR_ONLY))))
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = collect(m, Some(DATA_DIR_ONLY));
        Ok(())
    }
}

pub fn resolve(args: &ServerArgs) -> Result<Resolved, String> {
    let mut values: BTreeMap<&'static str, (String, Origin)> = match &args.config {
        Some(path) => read_file(path)?,
        None => BTreeMap::new(),
    };
    values.extend(args.given.iter().map(|(k, v)| (*k, v.clone())));
    let mut r = Resolved::default();
    for setting in SETTINGS {
        if let Some((value, origin)) = values.get(setting.key) {
            (setting.set)(&mut r, value).map_err(|e| {
                let from = match origin {
                    Origin::Flag => format!("--{}", setting.flag()),
                    Origin::Env => setting.env(),
                    Origin::File(p) => format!("{} in {}", setting.key, p.display()),
                };
                format!("{} = {value:?} ({from}) {e}", setting.key)
            })?;
        }
    }
    r.server.master_key = match std::env::var("KEYGATE_MASTER_KEY") {
        Ok(k) if !k.trim().is_empty() => MasterKeySource::Inline(k),
        _ => match (&r.master_key_file, &args.config) {
            (Some(p), _) => MasterKeySource::File(p.clone()),
            (None, Some(c)) => MasterKeySource::File(
                c.parent()
                    .map_or_else(|| PathBuf::from("keygate.master-key"), |d| d.join("keygate.master-key")),
            ),
            (None, None) => MasterKeySource::BesideDataDir,
        },
    };
    match (&r.server.gateway_listen, &r.server.gateway_routes) {
        (Some(_), None) => {
            return Err("gateway.listen needs gateway.routes: the routes file the gateway serves".into());
        }
        (None, Some(_)) => {
            return Err("gateway.routes needs gateway.listen: the address the gateway listens on".into());
        }
        _ => {}
    }
    if r.server.admin_listen.is_some_and(|a| a == r.server.listen && a.port() != 0) {
        return Err("admin_listen must differ from listen".into());
    }
    // A secret: from the environment only (flags show up in process lists, files get copied).
    r.server.registration.initial_token =
        std::env::var(REGISTRATION_TOKEN_ENV).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
    if r.server.registration.mode == RegistrationMode::Token
        && r.server.registration.initial_token.as_ref().is_none_or(|t| t.len() < 16)
    {
        return Err(format!(
            "oauth.registration = \"token\" needs the initial access token in {REGISTRATION_TOKEN_ENV} \
             (at least 16 characters; e.g. `openssl rand -hex 32`)"
        ));
    }
    Ok(r)
}

/// The file's settings as text, the way a flag or variable would give them. Unknown keys are refused.
fn read_file(path: &Path) -> Result<BTreeMap<&'static str, (String, Origin)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let bad = |e: String| {
        format!(
            "the config file {} is not valid: {e}\nrun `keygate default-config` for an example",
            path.display()
        )
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut flat = Vec::new();
    for (k, v) in table {
        match v {
            Value::Table(section) => flat.extend(section.into_iter().map(|(k2, v)| (format!("{k}.{k2}"), v))),
            v => flat.push((k, v)),
        }
    }
    let mut out = BTreeMap::new();
    for (key, value) in flat {
        let setting =
            SETTINGS.iter().find(|s| s.key == key).ok_or_else(|| bad(format!("unknown setting `{key}`")))?;
        let text = match value {
            Value::String(s) => s,
            Value::Integer(i) => i.to_string(),
            Value::Boolean(b) => b.to_string(),
            Value::Array(items) if setting.list => {
                let mut parts = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => parts.push(s),
                        other => return Err(bad(format!("`{key}` holds {other}, not a string"))),
                    }
                }
                parts.join(",")
            }
            other => {
                return Err(bad(format!(
                    "`{key}` = {other} is not a {}",
                    if setting.list { "list" } else { "value" }
                )));
            }
        };
        out.insert(setting.key, (text, Origin::File(path.to_path_buf())));
    }
    Ok(out)
}

/// `keygate default-config`: every setting, documented, with its default (commented out when unset by
/// default), grouped in sections.
pub fn default_config() -> String {
    let mut out = String::from(
        "# Keygate configuration. Every setting is optional; shown here with its default.\n\
         # Precedence: command-line flag > KEYGATE_* environment variable > this file > default.\n",
    );
    let mut section = "";
    for setting in SETTINGS {
        let (sec, name) = setting.key.split_once('.').unwrap_or(("", setting.key));
        if sec != section {
            out.push_str(&format!("\n[{sec}]\n"));
            section = sec;
        } else {
            out.push('\n');
        }
        for line in setting.doc.lines() {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!("# {}, --{}\n", setting.env(), setting.flag()));
        match (setting.unset, setting.default_value()) {
            (Some((when_unset, example)), _) => {
                out.push_str(&format!("# Default: {when_unset}.\n# {name} = {example}\n"));
            }
            (None, Some(v)) => out.push_str(&format!("{name} = {v}\n")),
            (None, None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn values(r: &Resolved) -> Vec<Option<Value>> {
        SETTINGS.iter().map(|s| (s.get)(r)).collect()
    }

    #[test]
    fn default_config_resolves_to_the_defaults() {
        let text = default_config();
        let (_d, path) = write(&text);
        let r = resolve(&ServerArgs { config: Some(path), ..ServerArgs::default() }).unwrap();
        assert_eq!(values(&r), values(&Resolved::default()));
        // Every setting is in the text, with its variable and flag.
        for s in SETTINGS {
            let name = s.key.rsplit('.').next().unwrap();
            assert!(text.contains(&format!("{name} = ")), "{} missing", s.key);
            assert!(text.contains(&s.env()) && text.contains(&format!("--{}", s.flag())), "{}", s.key);
        }
        // Top-level settings come before the first section, or the file would put them in it.
        let first_section = SETTINGS.iter().position(|s| s.key.contains('.')).unwrap();
        assert!(SETTINGS[first_section..].iter().all(|s| s.key.contains('.')));
    }

    #[test]
    fn every_setting_reads_back_what_it_writes() {
        for s in SETTINGS {
            let Some(v) = s.default_value().or_else(|| s.unset.map(|(_, ex)| ex.parse::<Value>().unwrap()))
            else {
                continue;
            };
            let text = match &v {
                Value::String(x) => x.clone(),
                Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","),
                other => other.to_string(),
            };
            let mut r = Resolved::default();
            (s.set)(&mut r, &text).unwrap_or_else(|e| panic!("{}: {e}", s.key));
            assert_eq!((s.get)(&r), Some(v), "{}", s.key);
        }
    }

    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        for s in SETTINGS {
            assert!(readme.contains(&s.env()), "README lacks {}", s.env());
            assert!(readme.contains(&format!("--{}", s.flag())), "README lacks --{}", s.flag());
        }
    }

    #[test]
    fn flags_win_over_file() {
        let (_d, path) =
            write("listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n[cache]\nttl_seconds = 7\n");
        let args =
            ServerArgs { config: Some(path), ..ServerArgs::default() }.with("listen", "127.0.0.1:9001");
        let r = resolve(&args).unwrap();
        assert_eq!(r.server.listen.port(), 9001);
        assert_eq!(r.server.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(r.server.cache.ttl, Duration::from_secs(7));
    }

    #[test]
    fn out_of_range_values_are_refused_not_clamped() {
        let err = resolve(&ServerArgs::default().with("flush_interval_ms", "5")).err().unwrap();
        assert!(err.contains("flush_interval_ms") && err.contains("10 to 60000"), "{err}");
        assert!(err.contains("--flush-interval-ms"), "says where the value came from: {err}");
        assert!(resolve(&ServerArgs::default().with("request_timeout_seconds", "0")).is_err());
        let (_d, path) = write("[cache]\nttl_seconds = 0\n");
        let err = resolve(&ServerArgs { config: Some(path), ..ServerArgs::default() }).err().unwrap();
        assert!(err.contains("cache.ttl_seconds") && err.contains("k.toml"), "{err}");
    }

    #[test]
    fn bad_file_says_what_to_do() {
        for text in ["lisen = 1\n", "[cache]\nsize = 3\n", "trusted_proxies = [1]\n", "listen = [\"a\"]\n"] {
            let (_d, path) = write(text);
            let err = resolve(&ServerArgs { config: Some(path), ..ServerArgs::default() }).err().unwrap();
            assert!(err.contains("default-config"), "{text}: {err}");
        }
    }

    #[test]
    fn command_line_and_environment_are_derived_from_the_table() {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: ServerArgs,
        }
        let m = <T as clap::CommandFactory>::command()
            .try_get_matches_from([
                "t",
                "--cache-ttl-seconds",
                "9",
                "--trusted-proxy",
                "10.0.0.0/8",
                "--trusted-proxies",
                "127.0.0.1,::1",
            ])
            .unwrap();
        let args = ServerArgs::from_arg_matches(&m).unwrap();
        let r = resolve(&args).unwrap();
        assert_eq!(r.server.cache.ttl, Duration::from_secs(9));
        assert_eq!(r.server.trusted_proxies.len(), 3);
    }
}
