//! Configuration layering: built-in defaults → TOML file (`--config`) → `KEYGATE_*` environment
//! variables → command-line flags. clap reads flags and environment (a flag wins over its variable);
//! this module lays them over the file and the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_server::ServerConfig;
use keygate_server::seal::MasterKeySource;
use serde::Deserialize;

/// The TOML file. Every field is optional; absent fields keep their defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub body_limit_bytes: Option<usize>,
    pub request_timeout_seconds: Option<u64>,
    pub busy_timeout_ms: Option<u64>,
    pub trusted_proxies: Option<Vec<String>>,
    pub failures_per_minute: Option<u64>,
    pub flush_interval_ms: Option<u64>,
    pub issuer: Option<String>,
    pub master_key_file: Option<PathBuf>,
    pub metrics_auth: Option<bool>,
    pub admin_listen: Option<SocketAddr>,
    pub unique_consumer_names: Option<bool>,
    pub oauth: Option<OAuthFile>,
    pub cache: Option<CacheFile>,
    pub usage: Option<UsageFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthFile {
    pub signing_alg: Option<String>,
    pub key_publish_ahead_seconds: Option<u64>,
    pub key_rotation_days: Option<u64>,
    pub publish_scopes: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageFile {
    pub minute_retention_hours: Option<u64>,
    pub hour_retention_days: Option<u64>,
    pub day_retention_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    pub capacity: Option<u64>,
    pub ttl_seconds: Option<u64>,
    pub negative_ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The data directory, for commands that work on it directly (`init`, `admin-key`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DataDirArgs {
    /// TOML configuration file (see `keygate default-config`); only its data_dir is used here.
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the database [default: ./keygate-data].
    #[arg(long, env = "KEYGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArgs {
    pub fn server_args(&self) -> ServerArgs {
        ServerArgs { config: self.config.clone(), data_dir: self.data_dir.clone(), ..ServerArgs::default() }
    }
}

/// What the command line and environment said (clap fills it).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// TOML configuration file (see `keygate default-config`).
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "KEYGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database [default: ./keygate-data].
    #[arg(long, env = "KEYGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format on standard error [default: text].
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Largest request body in bytes [default: 65536].
    #[arg(long, env = "KEYGATE_BODY_LIMIT_BYTES")]
    pub body_limit_bytes: Option<usize>,
    /// Longest a request may take, in seconds [default: 30].
    #[arg(long, env = "KEYGATE_REQUEST_TIMEOUT_SECONDS")]
    pub request_timeout_seconds: Option<u64>,
    /// How long a write waits for the database lock, in milliseconds [default: 5000].
    #[arg(long, env = "KEYGATE_BUSY_TIMEOUT_MS")]
    pub busy_timeout_ms: Option<u64>,
    /// Most credentials kept in the verify cache [default: 1000000].
    #[arg(long, env = "KEYGATE_CACHE_CAPACITY")]
    pub cache_capacity: Option<u64>,
    /// A proxy whose X-Forwarded-For is trusted: address or CIDR (repeatable; the variable takes a
    /// comma-separated list) [default: none].
    #[arg(long = "trusted-proxy", env = "KEYGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Failed credential checks per minute an address may make before it gets 429; 0 = no limit
    /// [default: 100].
    #[arg(long, env = "KEYGATE_FAILURES_PER_MINUTE")]
    pub failures_per_minute: Option<u64>,
    /// How often usage counts and quotas are written to the database, in ms [default: 1000].
    #[arg(long, env = "KEYGATE_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// The OAuth issuer URL, as clients reach this server [default: http://<listen address>].
    #[arg(long, env = "KEYGATE_ISSUER")]
    pub issuer: Option<String>,
    /// File holding the master key that seals JWT signing keys at rest; created (mode 0600) if missing.
    /// Keep it outside the data directory. KEYGATE_MASTER_KEY (base64 of 32 bytes) takes precedence
    /// [default: keygate.master-key beside --config, else <data-dir>.master-key beside the data directory].
    #[arg(long, env = "KEYGATE_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Require a credential with keygate:metrics (admin keys have it) for /metrics
    /// [default: true unless listening on loopback].
    #[arg(long, env = "KEYGATE_METRICS_AUTH")]
    pub metrics_auth: Option<bool>,
    /// A second address for the admin API, /metrics and the docs; the --listen address then serves
    /// only verify, forward-auth, OAuth and health [default: none, one listener serves everything].
    #[arg(long, env = "KEYGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Refuse a consumer name another consumer already has [default: false].
    #[arg(long, env = "KEYGATE_UNIQUE_CONSUMER_NAMES")]
    pub unique_consumer_names: Option<bool>,
}

pub struct Resolved {
    pub server: ServerConfig,
    pub log_format: LogFormat,
}

pub fn resolve(args: &ServerArgs) -> Result<Resolved, String> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    let mut server = ServerConfig::default();
    let cache = file.cache.unwrap_or_default();
    if let Some(v) = args.listen.or(file.listen) {
        server.listen = v;
    }
    if let Some(v) = args.data_dir.clone().or(file.data_dir) {
        server.data_dir = v;
    }
    if let Some(v) = args.body_limit_bytes.or(file.body_limit_bytes) {
        server.body_limit = v;
    }
    if let Some(v) = args.request_timeout_seconds.or(file.request_timeout_seconds) {
        server.request_timeout = Duration::from_secs(in_range("request_timeout_seconds", v, 1, 3600)?);
    }
    if let Some(v) = args.busy_timeout_ms.or(file.busy_timeout_ms) {
        server.busy_timeout = Duration::from_millis(v);
    }
    if let Some(v) = args.cache_capacity.or(cache.capacity) {
        server.cache.capacity = v;
    }
    if let Some(v) = cache.ttl_seconds {
        server.cache.ttl = Duration::from_secs(in_range("cache.ttl_seconds", v, 1, 86_400)?);
    }
    if let Some(v) = cache.negative_ttl_seconds {
        server.cache.negative_ttl =
            Duration::from_secs(in_range("cache.negative_ttl_seconds", v, 1, 86_400)?);
    }
    if let Some(list) = args.trusted_proxies.clone().or(file.trusted_proxies) {
        let list: Vec<String> =
            list.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        server.trusted_proxies =
            keygate_core::limits::parse_allowed_ips(&list).map_err(|e| format!("trusted proxies: {e}"))?;
    }
    if let Some(v) = args.failures_per_minute.or(file.failures_per_minute) {
        server.failures_per_minute = v;
    }
    if let Some(v) = args.flush_interval_ms.or(file.flush_interval_ms) {
        server.flush_interval = Duration::from_millis(in_range("flush_interval_ms", v, 10, 60_000)?);
    }
    if let Some(iss) = args.issuer.clone().or(file.issuer) {
        if !(iss.starts_with("http://") || iss.starts_with("https://")) {
            return Err(format!("issuer {iss:?} must be an http:// or https:// URL"));
        }
        server.issuer = Some(iss.trim_end_matches('/').to_string());
    }
    server.master_key =
        match std::env::var("KEYGATE_MASTER_KEY") {
            Ok(k) if !k.trim().is_empty() => MasterKeySource::Inline(k),
            _ => match args.master_key_file.clone().or(file.master_key_file) {
                Some(p) => MasterKeySource::File(p),
                None => match &args.config {
                    Some(c) => MasterKeySource::File(c.parent().map_or_else(
                        || PathBuf::from("keygate.master-key"),
                        |d| d.join("keygate.master-key"),
                    )),
                    None => MasterKeySource::BesideDataDir,
                },
            },
        };
    if let Some(m) = args.metrics_auth.or(file.metrics_auth) {
        server.metrics_auth = Some(m);
    }
    server.admin_listen = args.admin_listen.or(file.admin_listen);
    if server.admin_listen.is_some_and(|a| a == server.listen && a.port() != 0) {
        return Err("admin_listen must differ from listen".into());
    }
    if let Some(u) = args.unique_consumer_names.or(file.unique_consumer_names) {
        server.unique_consumer_names = u;
    }
    let oauth = file.oauth.unwrap_or_default();
    if let Some(p) = oauth.publish_scopes {
        server.publish_scopes = p;
    }
    if let Some(a) = oauth.signing_alg {
        server.signing_alg = keygate_server::oauth::keys::KeyAlg::parse(&a)
            .ok_or_else(|| format!("oauth.signing_alg {a:?} must be EdDSA, ES256 or RS256"))?;
    }
    if let Some(s) = oauth.key_publish_ahead_seconds {
        server.key_publish_ahead = Duration::from_secs(s);
    }
    if let Some(d) = oauth.key_rotation_days {
        server.key_rotation_interval = Duration::from_secs(d * 86_400);
    }
    let usage = file.usage.unwrap_or_default();
    if let Some(h) = usage.minute_retention_hours {
        server.retention.minute =
            Duration::from_secs(in_range("usage.minute_retention_hours", h, 1, 24 * 366)? * 3600);
    }
    if let Some(d) = usage.hour_retention_days {
        server.retention.hour =
            Duration::from_secs(in_range("usage.hour_retention_days", d, 1, 3660)? * 86_400);
    }
    if let Some(d) = usage.day_retention_days {
        server.retention.day =
            Duration::from_secs(in_range("usage.day_retention_days", d, 1, 36_600)? * 86_400);
    }
    Ok(Resolved { server, log_format: args.log_format.or(file.log_format).unwrap_or_default() })
}

/// A setting's value, refused (not clamped) when out of range.
fn in_range(name: &str, v: u64, min: u64, max: u64) -> Result<u64, String> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{name} = {v} is out of range: it must be {min} to {max}"))
    }
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        format!(
            "the config file {} is not valid: {e}\nrun `keygate default-config` for an example",
            path.display()
        )
    })
}

pub const DEFAULT_CONFIG: &str = r#"# Keygate configuration. Every setting is optional; shown here with its default.
# Precedence: command-line flag > KEYGATE_* environment variable > this file > default.

# Address to listen on. KEYGATE_LISTEN, --listen
listen = "127.0.0.1:8080"

# Where the SQLite database lives. KEYGATE_DATA_DIR, --data-dir
data_dir = "keygate-data"

# "text" or "json", on standard error. KEYGATE_LOG_FORMAT, --log-format
# The log level comes from KEYGATE_LOG (e.g. "info", "keygate_server=debug").
log_format = "text"

# Largest request body accepted, in bytes. KEYGATE_BODY_LIMIT_BYTES
body_limit_bytes = 65536

# Longest a request may take before it is answered 503. KEYGATE_REQUEST_TIMEOUT_SECONDS
request_timeout_seconds = 30

# How long a write waits for the database lock before answering 503. KEYGATE_BUSY_TIMEOUT_MS
busy_timeout_ms = 5000

# Proxies (addresses or CIDR ranges) whose X-Forwarded-For / Forwarded headers name the real client,
# e.g. ["127.0.0.1", "10.0.0.0/8"]. Empty: the peer address is the client. KEYGATE_TRUSTED_PROXIES
trusted_proxies = []

# Failed credential checks (malformed or unknown keys, failed admin logins) one address may make per
# minute before it is answered 429. 0 turns this off. KEYGATE_FAILURES_PER_MINUTE
failures_per_minute = 100

# How often usage counts, last-used times and quota state are written to the database, in ms.
# A crash loses at most this much of them; a graceful stop loses nothing. KEYGATE_FLUSH_INTERVAL_MS
flush_interval_ms = 1000

# The master key that seals the JWT signing keys in the database (XChaCha20-Poly1305). Created, mode
# 0600, if missing. Keep it OUTSIDE the data directory and back it up apart from it: a copy of the data
# directory alone then does not reveal the signing keys. KEYGATE_MASTER_KEY (base64 of 32 random bytes)
# takes precedence over the file. Default: keygate.master-key beside this file, or, without a config
# file, <data_dir>.master-key beside the data directory. KEYGATE_MASTER_KEY_FILE, --master-key-file
# master_key_file = "/etc/keygate/master.key"

# Require a credential with the keygate:metrics permission (admin keys have it) to read /metrics.
# Default: on, unless Keygate listens on a loopback address. KEYGATE_METRICS_AUTH, --metrics-auth
# metrics_auth = true

# A second listener for the admin API (/v1/* except /v1/verify and /v1/auth), /metrics and the docs.
# When set, `listen` serves only what API consumers need: /v1/verify, /v1/auth, /oauth2/*, discovery,
# JWKS and health. Production layout: listen on the public interface, admin_listen on a private one.
# KEYGATE_ADMIN_LISTEN, --admin-listen
# admin_listen = "127.0.0.1:8081"

# Refuse a consumer name that another consumer already has. KEYGATE_UNIQUE_CONSUMER_NAMES
unique_consumer_names = false

# The OAuth issuer URL: what clients use to reach this server, and the "iss" of its tokens.
# Default: http://<the address it listens on>. KEYGATE_ISSUER, --issuer
# issuer = "https://auth.example.com"

[oauth]
# JWT signing algorithm for new keys: "EdDSA" (Ed25519), "ES256" or "RS256" (RSA 2048, for gateways that
# accept only RSA).
signing_alg = "EdDSA"
# A new signing key is published this long before it signs, so verifiers caching the JWKS have it.
key_publish_ahead_seconds = 600
# Rotate the signing key automatically this often; 0 turns it off.
key_rotation_days = 30
# List every client's scopes in the discovery document's scopes_supported. Turn off to keep one
# tenant's scopes from being visible to everyone.
publish_scopes = true

[usage]
# How long usage buckets are kept, per bucket size.
minute_retention_hours = 48
hour_retention_days = 90
day_retention_days = 730

[cache]
# Most credentials kept in the in-memory verify cache. KEYGATE_CACHE_CAPACITY
capacity = 1000000
# Longest a cached credential lives before it is read again (changes made through this
# server take effect at once regardless).
ttl_seconds = 300
# Longest a "no such credential" answer is remembered.
negative_ttl_seconds = 30
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_and_matches_defaults() {
        let file: FileConfig = toml::from_str(DEFAULT_CONFIG).unwrap();
        let d = ServerConfig::default();
        assert_eq!(file.listen, Some(d.listen));
        assert_eq!(file.data_dir, Some(d.data_dir));
        assert_eq!(file.body_limit_bytes, Some(d.body_limit));
        assert_eq!(file.cache.unwrap().capacity, Some(d.cache.capacity));
        assert_eq!(file.failures_per_minute, Some(d.failures_per_minute));
        assert_eq!(file.flush_interval_ms, Some(d.flush_interval.as_millis() as u64));
        assert_eq!(file.usage.unwrap().minute_retention_hours, Some(d.retention.minute.as_secs() / 3600));
        assert_eq!(file.oauth.unwrap().publish_scopes, Some(d.publish_scopes));
        assert_eq!(file.unique_consumer_names, Some(d.unique_consumer_names));
    }

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        let args = ServerArgs {
            config: Some(path),
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..ServerArgs::default()
        };
        let r = resolve(&args).unwrap();
        assert_eq!(r.server.listen.port(), 9001);
        assert_eq!(r.server.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn out_of_range_values_are_refused_not_clamped() {
        let args = ServerArgs { flush_interval_ms: Some(5), ..ServerArgs::default() };
        let err = resolve(&args).err().unwrap();
        assert!(err.contains("flush_interval_ms") && err.contains("10 to 60000"), "{err}");
        let args = ServerArgs { request_timeout_seconds: Some(0), ..ServerArgs::default() };
        assert!(resolve(&args).is_err());
    }

    #[test]
    fn bad_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "lisen = 1\n").unwrap();
        let err = resolve(&ServerArgs { config: Some(path), ..ServerArgs::default() }).err().unwrap();
        assert!(err.contains("default-config"), "{err}");
    }
}
