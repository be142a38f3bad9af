//! Shared state of one running server, and how it is opened.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keygate_core::{PlainSecret, id, scope};
use keygate_store::{
    ApiKey, Backend, ConnectOptions, Consumer, Granularity, NewAudit, Store, StoreError, StoredSecret,
};

use crate::metrics::Metrics;
use crate::oauth::keys::KeyAlg;
use crate::oauth::tokens::OAuth;
use crate::peer::FailureThrottle;
use crate::routes::common::{KeySpec, SecretSource, new_key};
use crate::time::now_ms;
use crate::verify::{CacheConfig, Verifier};

/// Database file name inside the data directory.
pub const DB_FILE: &str = "keygate.db";

/// Everything a server needs to start, already resolved from defaults, file, environment and flags.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// A PostgreSQL database shared by every node; `None`: the embedded SQLite database in `data_dir`.
    pub database_url: Option<DatabaseUrl>,
    /// A Redis server whose rate-limit cells every node shares; `None`: each node applies limits to the
    /// requests it serves.
    pub rate_limits_redis_url: Option<DatabaseUrl>,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Longest time a request may take before it is answered 503.
    pub request_timeout: Duration,
    /// How long a write waits for SQLite's lock before answering 503.
    pub busy_timeout: Duration,
    pub cache: CacheConfig,
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Failed credential checks an address may make per minute before it gets 429 (0: no limit).
    pub failures_per_minute: u64,
    /// How often usage counts, last-used times and quotas are written to the database.
    pub flush_interval: Duration,
    pub retention: Retention,
    /// The OAuth issuer URL; `None`: `http://<the address actually listened on>`.
    pub issuer: Option<String>,
    pub signing_alg: KeyAlg,
    /// How long a new signing key is published before it signs.
    pub key_publish_ahead: Duration,
    /// Automatic signing-key rotation interval; zero turns it off.
    pub key_rotation_interval: Duration,
    /// The key that seals signing keys at rest (never stored in the data directory).
    pub master_key: crate::seal::MasterKeySource,
    /// Does `/metrics` need a credential with `keygate:metrics`? `None`: only when the listener serving
    /// it is not on loopback.
    pub metrics_auth: Option<bool>,
    /// List every client's scopes in discovery's `scopes_supported`.
    pub publish_scopes: bool,
    /// Refuse a consumer name that another consumer has.
    pub unique_consumer_names: bool,
    /// A second listener for the admin API, `/metrics` and the docs; the main listener then serves only
    /// verify, forward-auth, OAuth and health. `None`: one listener serves everything.
    pub admin_listen: Option<SocketAddr>,
    /// Concurrent retries of one refresh token within this period get the same successor instead of
    /// revoking the family as reuse.
    pub refresh_grace: Duration,
    /// A header a front proxy (in `trusted_proxies`) sets to the username it already authenticated;
    /// `None`: logins only through the login page.
    pub login_trusted_header: Option<String>,
    /// Longest lifetime of a personal access token.
    pub pat_max_lifetime: Duration,
    /// Whether a personal access token may be created without an expiry.
    pub pat_allow_no_expiry: bool,
    /// How often a device may poll the token endpoint (RFC 8628 `interval`).
    pub device_poll_interval: Duration,
    pub webhooks: crate::webhooks::WebhookConfig,
    /// A JSON file with the public keys of secret-scanning partners allowed to report leaks to
    /// `/v1/leaks` (GitHub's `{"public_keys": [{"key_identifier", "key"}]}` form); `None`: off.
    pub leak_reporter_keys: Option<PathBuf>,
    /// The gateway's listener (`gateway.listen`); it serves the routes of `gateway_routes`.
    pub gateway_listen: Option<SocketAddr>,
    /// The gateway's routes file.
    pub gateway_routes: Option<PathBuf>,
    /// Protected resources (RFC 9728) forward-auth guards: their metadata is served, refusals name it,
    /// and tokens must be issued for them (RFC 8707).
    pub protected_resources: Vec<String>,
    /// A page about the protected resources, for their metadata's `resource_documentation`.
    pub resource_documentation: Option<String>,
    /// Dynamic client registration (RFC 7591).
    pub registration: crate::oauth::register::RegistrationConfig,
    /// Client ID Metadata Documents (clients known by an https URL).
    pub metadata_docs: crate::oauth::metadata_doc::MetadataDocConfig,
    /// The developer portal (`/portal/`).
    pub portal: PortalConfig,
}

/// Who may sign up at the developer portal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SignupMode {
    /// Nobody: developers are made by an operator (the portal still signs them in).
    #[default]
    Closed,
    /// Anyone.
    Open,
    /// Whoever holds an invitation an operator made (`POST /v1/portal/invitations`).
    Invite,
}

impl SignupMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "closed" => Some(SignupMode::Closed),
            "open" => Some(SignupMode::Open),
            "invite" => Some(SignupMode::Invite),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SignupMode::Closed => "closed",
            SignupMode::Open => "open",
            SignupMode::Invite => "invite",
        }
    }
}

/// The developer portal's settings.
#[derive(Debug, Clone)]
pub struct PortalConfig {
    pub signup: SignupMode,
    /// A developer proves their address (a link by mail) before making applications.
    pub verify_email: bool,
    /// The SMTP server for the portal's mail; `None`: the test mode (mail written to the log).
    pub smtp_url: Option<DatabaseUrl>,
    /// The sender of the portal's mail.
    pub mail_from: String,
    /// Developers may make authorization-code clients (with redirect URIs) as well as
    /// client-credentials ones.
    pub authorization_code_clients: bool,
}

impl Default for PortalConfig {
    fn default() -> Self {
        PortalConfig {
            signup: SignupMode::Closed,
            verify_email: true,
            smtp_url: None,
            mail_from: "Keygate <keygate@localhost>".into(),
            authorization_code_clients: false,
        }
    }
}

/// A database URL. It may hold a password, so it is shown (in `Debug`, errors and logs) without one.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// A `postgres://` or `postgresql://` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        Self::with_scheme(
            url,
            &["postgres", "postgresql"],
            "a PostgreSQL URL: postgres://USER:PASSWORD@HOST:PORT/DATABASE",
        )
    }

    /// An SMTP URL (`smtp://`, `smtps://`), for the portal's mail.
    pub fn parse_smtp(url: &str) -> Result<Self, String> {
        Self::with_scheme(
            url,
            &["smtp", "smtps"],
            "an SMTP URL: smtps://USER:PASSWORD@HOST:465 (TLS) or smtp://USER:PASSWORD@HOST:587?tls=required (STARTTLS)",
        )
    }

    /// A `redis://` URL (for shared rate limits).
    pub fn parse_redis(url: &str) -> Result<Self, String> {
        // (No rediss://: this build has no TLS for Redis; put it on a private network.)
        Self::with_scheme(
            url,
            &["redis"],
            "a Redis URL: redis://[:PASSWORD@]HOST:PORT[/DB] (TLS is not supported)",
        )
    }

    fn with_scheme(url: &str, schemes: &[&str], what: &str) -> Result<Self, String> {
        let url = url.trim();
        match url.split_once("://") {
            Some((scheme, _)) if schemes.contains(&scheme) => Ok(DatabaseUrl(url.to_string())),
            _ => Err(format!("must be {what}")),
        }
    }

    /// The URL itself, to connect with. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without anything that could be a password: the user's name (never the password),
    /// host, port and database; no query (it may hold `password=`).
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else { return "***".into() };
        let rest = rest.split('?').next().unwrap_or("");
        // The last '@' ends the user information (a password may hold '@', '/' or ':').
        let (userinfo, hostpath) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let shown = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, _)) => format!("{user}:***@"),
                None => format!("{u}@"),
            },
            None => String::new(),
        };
        format!("{scheme}://{shown}{hostpath}")
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// How long usage buckets of each size are kept.
#[derive(Debug, Clone)]
pub struct Retention {
    pub minute: Duration,
    pub hour: Duration,
    pub day: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            minute: Duration::from_secs(48 * 3600),
            hour: Duration::from_secs(90 * 86_400),
            day: Duration::from_secs(2 * 365 * 86_400),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("keygate-data"),
            database_url: None,
            rate_limits_redis_url: None,
            body_limit: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            busy_timeout: Duration::from_secs(5),
            cache: CacheConfig::default(),
            trusted_proxies: Vec::new(),
            failures_per_minute: 100,
            flush_interval: Duration::from_secs(1),
            retention: Retention::default(),
            issuer: None,
            signing_alg: KeyAlg::EdDsa,
            key_publish_ahead: Duration::from_secs(600),
            key_rotation_interval: Duration::from_secs(30 * 86_400),
            master_key: crate::seal::MasterKeySource::default(),
            metrics_auth: None,
            publish_scopes: true,
            unique_consumer_names: false,
            admin_listen: None,
            refresh_grace: Duration::from_secs(10),
            login_trusted_header: None,
            pat_max_lifetime: Duration::from_secs(90 * 86_400),
            pat_allow_no_expiry: false,
            device_poll_interval: Duration::from_secs(5),
            webhooks: crate::webhooks::WebhookConfig::default(),
            leak_reporter_keys: None,
            gateway_listen: None,
            gateway_routes: None,
            protected_resources: Vec::new(),
            resource_documentation: None,
            registration: crate::oauth::register::RegistrationConfig::default(),
            metadata_docs: crate::oauth::metadata_doc::MetadataDocConfig::default(),
            portal: PortalConfig::default(),
        }
    }
}

pub struct AppState {
    pub store: Arc<dyn Backend>,
    /// Where this server reads the time ([`AppState::now`]).
    pub clock: Arc<dyn crate::time::Clock>,
    /// Admin changes that could take away the last admin access, one at a time.
    pub admin_changes: tokio::sync::Mutex<()>,
    pub verifier: Verifier,
    pub oauth: OAuth,
    pub metrics: Metrics,
    pub throttle: FailureThrottle,
    /// Failed logins per username (by the hash of its lower-cased form).
    pub login_throttle: FailureThrottle<keygate_core::SecretHash>,
    pub webhooks: crate::webhooks::Webhooks,
    /// Dynamic registrations per address.
    pub registrations: FailureThrottle,
    pub metadata_docs: crate::oauth::metadata_doc::MetadataDocs,
    /// Every key's usage totals per range, for the usage boards (`/v1/usage/leaders`), kept 30 seconds.
    pub usage_boards: moka::sync::Cache<(&'static str, i64, i64), Arc<Vec<keygate_store::KeyTotal>>>,
    /// The same for ranges of whole days that have ended (they no longer change), kept an hour.
    pub usage_boards_days: moka::sync::Cache<(i64, i64), Arc<Vec<keygate_store::KeyTotal>>>,
    /// Failed console sign-ins per username (apart from the public login page's).
    pub console_login_throttle: FailureThrottle<keygate_core::SecretHash>,
    /// The web console's signed-in sessions.
    pub console: crate::console::Sessions,
    /// The developer portal's signed-in sessions (apart from the console's: a developer's cookie never
    /// opens the console).
    pub portal: crate::console::Sessions,
    /// Failed portal sign-ins per username, and sign-ups and mail requests per address.
    pub portal_throttle: FailureThrottle<keygate_core::SecretHash>,
    pub mailer: crate::mail::Mailer,
    /// One portal change at a time per developer (by user id; only signed-in developers get one, and
    /// idle ones are dropped).
    pub portal_locks: moka::sync::Cache<String, Arc<tokio::sync::Mutex<()>>>,
    /// Following the other nodes on a shared database.
    pub cluster: crate::cluster::ClusterStatus,
    pub config: ServerConfig,
}

impl ServerConfig {
    /// Whether `/metrics` needs a credential, after the default: on unless the listener that serves it
    /// (the admin listener, when there is one) is on loopback.
    pub fn metrics_need_auth(&self) -> bool {
        self.metrics_auth.unwrap_or(!self.admin_listen.unwrap_or(self.listen).ip().is_loopback())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "cannot create or secure the data directory {path}: {source}\n\
         it must be a directory this account owns; Keygate keeps it private (mode 0700)"
    )]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open the database in {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error("cannot open the PostgreSQL database {url}: {source}")]
    Postgres { url: DatabaseUrl, source: StoreError },
    #[error("cannot read random bytes from the operating system: {0}")]
    Random(getrandom::Error),
    #[error("cannot make the admin key: {0}")]
    Key(String),
}

/// Opens the store and applies migrations: the PostgreSQL database of `database_url`, or else (creating
/// it if needed) the SQLite database in the data directory. The data directory is made private (0700)
/// either way (it holds the process lock, and by default the master key sits beside it), and SQLite's
/// files 0600, before SQLite creates any of them.
pub async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Backend>, OpenError> {
    let dir_err = |source| OpenError::DataDir { path: config.data_dir.clone(), source };
    if let Some(old) = crate::fsmode::make_private_dir(&config.data_dir).map_err(dir_err)? {
        tracing::warn!(dir = %config.data_dir.display(), old_mode = format!("{old:o}"),
            "the data directory was readable by other accounts; its mode is now 700");
    }
    let options = ConnectOptions { busy_timeout: config.busy_timeout, ..ConnectOptions::default() };
    if let Some(url) = &config.database_url {
        return keygate_store::connect(url.expose(), &options)
            .await
            .map_err(|source| OpenError::Postgres { url: url.clone(), source });
    }
    let path = config.data_dir.join(DB_FILE);
    for (file, old) in crate::fsmode::prepare_database_files(&path).map_err(dir_err)? {
        tracing::warn!(%file, old_mode = format!("{old:o}"), "a database file was readable by other accounts; its mode is now 600");
    }
    let location = path.to_string_lossy();
    keygate_store::connect(&location, &options)
        .await
        .map_err(|source| OpenError::Store { path: path.clone(), source })
}

impl AppState {
    /// Builds the state. `config.listen` must be the address actually listened on (bind first, then set
    /// it): without an `issuer`, the OAuth issuer is `http://<that address>`.
    pub fn new(store: Arc<dyn Backend>, config: ServerConfig) -> Arc<Self> {
        Self::with_clock(store, config, Arc::new(crate::time::SystemClock))
    }

    /// [`AppState::new`] with a clock of the caller's (tests move time with a `ManualClock`).
    pub fn with_clock(
        store: Arc<dyn Backend>,
        config: ServerConfig,
        clock: Arc<dyn crate::time::Clock>,
    ) -> Arc<Self> {
        let verifier = Verifier::new(store.clone(), &config.cache);
        let throttle = FailureThrottle::new(config.failures_per_minute);
        // Built now, so that the first login of an unknown username is not slower than the others.
        let _ = crate::password::dummy();
        let issuer = config.issuer.clone().unwrap_or_else(|| format!("http://{}", config.listen));
        let oauth =
            OAuth::new(issuer.trim_end_matches('/').to_string(), config.signing_alg, config.refresh_grace);
        let mailer = crate::mail::Mailer::new(config.portal.smtp_url.as_ref(), &config.portal.mail_from)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "the portal's mail settings do not work; no mail will be sent");
                crate::mail::Mailer::Broken(e)
            });
        Arc::new(AppState {
            store,
            clock,
            admin_changes: tokio::sync::Mutex::new(()),
            verifier,
            oauth,
            metrics: Metrics::new(),
            throttle,
            login_throttle: FailureThrottle::quiet(config.failures_per_minute),
            webhooks: crate::webhooks::Webhooks::default(),
            registrations: FailureThrottle::per_window(config.registration.per_hour, 3600),
            metadata_docs: crate::oauth::metadata_doc::MetadataDocs::default(),
            // Weighed by rows (one per key with usage in the range): at most ~500,000 rows, tens of MB.
            usage_boards: moka::sync::Cache::builder()
                .weigher(|_, v: &Arc<Vec<keygate_store::KeyTotal>>| {
                    u32::try_from(v.len()).unwrap_or(u32::MAX)
                })
                .max_capacity(500_000)
                .time_to_live(std::time::Duration::from_secs(30))
                .build(),
            usage_boards_days: moka::sync::Cache::builder()
                .weigher(|_, v: &Arc<Vec<keygate_store::KeyTotal>>| {
                    u32::try_from(v.len()).unwrap_or(u32::MAX)
                })
                .max_capacity(500_000)
                .time_to_live(std::time::Duration::from_secs(3600))
                .build(),
            console_login_throttle: FailureThrottle::quiet(config.failures_per_minute),
            console: crate::console::Sessions::default(),
            portal: crate::console::Sessions::default(),
            portal_throttle: FailureThrottle::quiet(config.failures_per_minute),
            mailer,
            portal_locks: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(std::time::Duration::from_secs(600))
                .build(),
            cluster: crate::cluster::ClusterStatus::default(),
            config,
        })
    }

    /// Now, in ms since the epoch, by this server's clock.
    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Writes pending usage counts, last-used times and quotas now.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let pats = self.oauth.flush_pat_uses(self.store.as_ref()).await?;
        Ok(self.verifier.runtimes.flush(self.store.as_ref(), self.now(), &self.config.webhooks).await? + pats)
    }

    /// Deletes usage buckets older than the retention of their size.
    pub async fn expire_usage(&self, now: i64) -> Result<u64, StoreError> {
        let r = &self.config.retention;
        let before = [
            (Granularity::Minute, now - r.minute.as_millis() as i64),
            (Granularity::Hour, now - r.hour.as_millis() as i64),
            (Granularity::Day, now - r.day.as_millis() as i64),
        ];
        self.store.expire_usage(&before).await
    }
}

fn random<T>(r: Result<T, getrandom::Error>) -> Result<T, OpenError> {
    r.map_err(OpenError::Random)
}

/// A new admin key for the system consumer, with its secret (made by the one key constructor).
fn new_admin_key(
    consumer: &Consumer,
    name: &str,
    now: i64,
) -> Result<(ApiKey, StoredSecret, PlainSecret), OpenError> {
    let spec = KeySpec { name: name.into(), scopes: vec![scope::ADMIN.to_string()], ..KeySpec::default() };
    let made =
        new_key(spec, consumer, None, SecretSource::Generate, now).map_err(|e| OpenError::Key(e.message))?;
    let plain = made.plain.ok_or_else(|| OpenError::Key("a generated key has no secret".into()))?;
    Ok((made.key, made.secret, plain))
}

fn local_audit(action: &str, key: &ApiKey, now: i64) -> Result<NewAudit, OpenError> {
    Ok(NewAudit {
        id: random(id::new_id("evt", now))?,
        at: now,
        actor: "system".into(),
        action: action.into(),
        target_type: "key".into(),
        target_id: key.id.clone(),
        ip: None,
        details: serde_json::json!({"consumer_id": key.consumer_id, "name": key.name, "scopes": key.scopes}),
    })
}

fn store_err(source: StoreError) -> OpenError {
    OpenError::Store { path: PathBuf::from(DB_FILE), source }
}

/// Creates Keygate's own consumer and the first admin key, once. Returns the admin key's secret if
/// it was created now, `None` if the store was already initialised.
pub async fn bootstrap(store: &dyn Store) -> Result<Option<PlainSecret>, OpenError> {
    if store.is_initialized().await.map_err(store_err)? {
        return Ok(None);
    }
    let now = now_ms();
    let consumer = Consumer {
        system: true,
        ..Consumer::new(
            random(id::new_id("cons", now))?,
            "keygate".into(),
            serde_json::json!({"description": "Keygate's own consumer; holds admin keys"}),
            now,
        )
    };
    let (key, key_secret, secret) = new_admin_key(&consumer, "bootstrap admin", now)?;
    let audit = local_audit("keygate.initialize", &key, now)?;
    if store.initialize(&consumer, &key, &key_secret, &audit).await.map_err(store_err)? {
        Ok(Some(secret))
    } else {
        Ok(None)
    }
}

/// A new admin key made by someone with file access to the data directory (`keygate admin-key`),
/// for when every admin key is lost. Returns the key's id and secret.
pub async fn create_local_admin_key(
    store: &dyn Store,
    name: &str,
) -> Result<(String, PlainSecret), OpenError> {
    let never = || {
        store_err(StoreError::Corrupt("the data directory was never initialised; run `keygate init`".into()))
    };
    let consumer_id = store.system_consumer_id().await.map_err(store_err)?.ok_or_else(never)?;
    let consumer = store.get_consumer(&consumer_id).await.map_err(store_err)?.ok_or_else(never)?;
    let now = now_ms();
    let (key, key_secret, secret) = new_admin_key(&consumer, name, now)?;
    let audit = local_audit("key.create_local_admin", &key, now)?;
    store.insert_key(&key, &key_secret, &audit).await.map_err(store_err)?;
    Ok((key.id, secret))
}

#[cfg(test)]
mod tests {
    use super::DatabaseUrl;

    #[test]
    fn database_urls_are_shown_without_passwords() {
        for (url, shown) in [
            ("postgres://kg:s3cret@db:5432/keygate", "postgres://kg:***@db:5432/keygate"),
            ("postgres://kg:p@ss/w:rd@db/keygate", "postgres://kg:***@db/keygate"),
            ("postgres://kg@db/keygate?sslmode=require", "postgres://kg@db/keygate"),
            ("postgres://db/keygate?user=kg&password=s3cret", "postgres://db/keygate"),
            ("postgresql://db", "postgresql://db"),
        ] {
            let u = DatabaseUrl::parse(url).unwrap();
            assert_eq!(u.redacted(), shown, "{url}");
            assert_eq!(format!("{u:?}"), shown);
            assert!(!u.to_string().contains("s3cret") && !u.to_string().contains("rd@"));
        }
        assert!(DatabaseUrl::parse("mysql://db").is_err());
    }
}
