//! `keygate serve`, `keygate init` and `keygate admin-key`: the commands that work on a data directory.

use std::process::ExitCode;

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::Path;

use keygate_core::PlainSecret;
use keygate_server::state::DB_FILE;
use keygate_server::{AppState, ServerConfig, bootstrap, launch_all, open_store};
use tracing_subscriber::EnvFilter;

use crate::config::{DataDirArgs, LogFormat, ServerArgs, resolve};

/// The lock file inside a data directory: held by the one server that uses the directory.
const LOCK_FILE: &str = "keygate.lock";

/// An exclusive advisory lock on a data directory, held while the process lives. Its file names the
/// holder (`pid …`) and where it serves (`admin http://…`), for whoever finds it locked.
struct DataDirLock {
    file: std::fs::File,
}

enum Locked {
    Acquired(DataDirLock),
    /// Someone else holds it: what its lock file says.
    Held(String),
}

impl DataDirLock {
    fn acquire(dir: &Path) -> Result<Locked, String> {
        keygate_server::fsmode::make_private_dir(dir)
            .map_err(|e| format!("cannot create or secure the data directory {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = writeln!(file, "pid {}", std::process::id());
                let _ = file.flush();
                Ok(Locked::Acquired(DataDirLock { file }))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                Ok(Locked::Held(holder))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
        }
    }

    /// Records where the admin API answers, for `keygate admin-key`.
    fn record_admin_url(&mut self, url: &str) {
        let _ = self.file.seek(std::io::SeekFrom::End(0));
        let _ = writeln!(self.file, "admin {url}");
        let _ = self.file.flush();
    }
}

fn holder_pid(holder: &str) -> &str {
    holder.lines().find_map(|l| l.strip_prefix("pid ")).unwrap_or("unknown")
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEYGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Prints to stdout, ignoring a closed stdout: a server must not die because nobody reads its banner.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(1)
}

pub async fn serve(args: &ServerArgs) -> ExitCode {
    let resolved = match resolve(args) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    init_logging(resolved.log_format);
    let config = resolved.server;
    let mut lock = match DataDirLock::acquire(&config.data_dir) {
        Ok(Locked::Acquired(lock)) => lock,
        Ok(Locked::Held(holder)) => {
            return fail(format!(
                "another Keygate server (process {}) is using {}; one data directory serves one process.\n\
                 stop it first, or, to run several nodes, give each its own data directory on PostgreSQL \
                 (see the README's operations section)",
                holder_pid(&holder),
                config.data_dir.display()
            ));
        }
        Err(e) => return fail(e),
    };
    let store = match open_store(&config).await {
        Ok(s) => s,
        Err(e) => {
            let hint = if config.database_url.is_some() {
                "check that the PostgreSQL server is reachable, the database exists and the user may create tables in it"
            } else {
                "check that --data-dir points to a writable directory"
            };
            return fail(format!("{e}\n{hint}"));
        }
    };
    match bootstrap(store.as_ref()).await {
        Ok(Some(secret)) => print_bootstrap(&config, &secret),
        Ok(None) => {}
        Err(e) => return fail(e),
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            return fail(format!(
                "cannot listen on {}: {e}\npass another address with --listen HOST:PORT (or KEYGATE_LISTEN)",
                config.listen
            ));
        }
    };
    let addr = listener.local_addr().unwrap_or(config.listen);
    let admin = match config.admin_listen {
        None => None,
        Some(a) => match tokio::net::TcpListener::bind(a).await {
            Ok(l) => Some(l),
            Err(e) => {
                return fail(format!(
                    "cannot listen on {a} (admin): {e}\npass another address with --admin-listen HOST:PORT"
                ));
            }
        },
    };
    let gateway = match (config.gateway_listen, &config.gateway_routes) {
        (Some(a), Some(file)) => {
            let routes = match keygate_server::gateway::Gateway::open(file.clone()) {
                Ok(g) => g,
                Err(e) => {
                    return fail(format!("{e}\ncheck it with `keygate routes check {}`", file.display()));
                }
            };
            match tokio::net::TcpListener::bind(a).await {
                Ok(l) => Some((l, routes)),
                Err(e) => {
                    return fail(format!(
                        "cannot listen on {a} (gateway): {e}\npass another address with --gateway-listen HOST:PORT"
                    ));
                }
            }
        }
        _ => None,
    };
    say!("Keygate listening on http://{addr} (data in {})", data_location(&config));
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok()).unwrap_or(addr);
    if admin.is_some() {
        say!("Admin API listening on http://{admin_addr}");
    }
    if let Some((l, g)) = &gateway {
        let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        say!(
            "Gateway listening on http://{at} ({} routes from {}; reloads on SIGHUP or when the file changes)",
            g.current().routes.routes.len(),
            g.path().display()
        );
    }
    say!("API docs: http://{admin_addr}/docs");
    say!("Web console: http://{admin_addr}/console/ (sign in with an admin key)");
    lock.record_admin_url(&format!("http://{}", loopback_if_unspecified(admin_addr)));
    tracing::info!(%addr, %admin_addr, data = %data_location(&config), "keygate started");
    let state = AppState::new(store.clone(), ServerConfig { listen: addr, ..config });
    let result = launch_all(state, listener, admin, gateway, shutdown_signal()).await;
    drop(lock);
    store.close().await;
    match result {
        Ok(()) => {
            tracing::info!("keygate stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("the server stopped with an error: {e}")),
    }
}

/// Where the data is, for people: the data directory, or the PostgreSQL database (without its password).
fn data_location(config: &ServerConfig) -> String {
    match &config.database_url {
        Some(url) => format!("PostgreSQL {url}"),
        None => config.data_dir.display().to_string(),
    }
}

fn print_bootstrap(config: &ServerConfig, secret: &PlainSecret) {
    // The one time the bootstrap secret is shown. It goes to standard output, never to the log.
    say!(
        "\nKeygate initialised {dir}.\n\
         Bootstrap admin key (shown only this once; store it now):\n\n    {key}\n\n\
         Use it with the CLI:   export KEYGATE_ADMIN_KEY={key}\n\
         \x20                      keygate consumers create --name my-app\n\
         or with curl:          curl -H 'Authorization: Bearer {key}' http://{listen}/v1/consumers\n",
        dir = data_location(config),
        key = secret.expose(),
        listen = config.listen,
    );
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn loopback_if_unspecified(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        _ => a,
    }
}

pub async fn init(args: &DataDirArgs, json: bool) -> ExitCode {
    let config = match resolve(&args.0) {
        Ok(r) => r.server,
        Err(e) => return fail(e),
    };
    let db = config.data_dir.join(DB_FILE);
    if (db.exists() || config.database_url.is_some()) && already_initialized(&config).await {
        return fail(format!(
            "{} is already initialised; nothing was changed.\n\
             start it with `keygate serve --data-dir {}`; if the admin key is lost, \
             `keygate admin-key --data-dir {}` makes a new one",
            config.data_dir.display(),
            config.data_dir.display(),
            config.data_dir.display()
        ));
    }
    let store = match open_store(&config).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let result = bootstrap(store.as_ref()).await;
    store.close().await;
    match result {
        Ok(Some(secret)) => {
            if json {
                say!("{}", serde_json::json!({"admin_key": secret.expose()}));
            } else {
                say!("Initialised {}.", config.data_dir.display());
                say!(
                    "Bootstrap admin key (shown only this once; store it now):\n\n    {}\n",
                    secret.expose()
                );
                say!("Start the server with `keygate serve --data-dir {}`.", config.data_dir.display());
            }
            ExitCode::SUCCESS
        }
        Ok(None) => {
            fail(format!("{} was initialised by another process just now", config.data_dir.display()))
        }
        Err(e) => fail(e),
    }
}

async fn already_initialized(config: &ServerConfig) -> bool {
    match open_store(config).await {
        Ok(store) => {
            let r = store.is_initialized().await.unwrap_or(true);
            store.close().await;
            r
        }
        Err(_) => true,
    }
}

/// `keygate admin-key`: a new admin key written straight into the database, for when every admin key
/// is lost. Needs file access to the data directory, which is the trust boundary here.
pub async fn admin_key(args: &DataDirArgs, name: &str, json: bool) -> ExitCode {
    let config = match resolve(&args.0) {
        Ok(r) => r.server,
        Err(e) => return fail(e),
    };
    if config.database_url.is_none() && !config.data_dir.join(DB_FILE).exists() {
        return fail(format!(
            "{} holds no Keygate database; run `keygate init --data-dir {}` first",
            config.data_dir.display(),
            config.data_dir.display()
        ));
    }
    let store = match open_store(&config).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // With a server running on this directory, the key is written here and that server picks it up
    // (it follows new secrets every second): wait until it accepts the key, so that the key this
    // command prints works at once.
    let running = match DataDirLock::acquire(&config.data_dir) {
        Ok(Locked::Held(holder)) => Some(holder),
        _ => None,
    };
    let result = keygate_server::state::create_local_admin_key(store.as_ref(), name).await;
    store.close().await;
    if let (Ok((_, secret)), Some(holder)) = (&result, &running) {
        let url = holder.lines().find_map(|l| l.strip_prefix("admin ")).map(str::trim);
        match url {
            Some(url) if wait_until_accepted(url, secret).await => {}
            _ => eprintln!(
                "warning: a server (process {}) is running on this directory; the new key works there within \
                 a few seconds",
                holder_pid(holder)
            ),
        }
    }
    match result {
        Ok((id, secret)) => {
            if json {
                say!("{}", serde_json::json!({"id": id, "admin_key": secret.expose()}));
            } else {
                say!("New admin key {id} (shown only this once):\n\n    {}\n", secret.expose());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Asks the running server until it accepts `secret` as an admin key (at most ~5 s).
async fn wait_until_accepted(url: &str, secret: &PlainSecret) -> bool {
    let Ok(http) = reqwest::Client::builder().timeout(std::time::Duration::from_millis(500)).build() else {
        return false;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let resp = http.get(format!("{url}/v1/signing-keys")).bearer_auth(secret.expose()).send().await;
        if resp.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// `keygate migrate-to-postgres --from DATA_DIR --to URL`.
pub async fn migrate_to_postgres(from: &Path, to: &str, json: bool) -> ExitCode {
    let url = match keygate_server::DatabaseUrl::parse(to) {
        Ok(u) => u,
        Err(e) => return fail(format!("--to {e}")),
    };
    let db = from.join(DB_FILE);
    if !db.exists() {
        return fail(format!(
            "{} holds no Keygate database; give the data directory with --from",
            from.display()
        ));
    }
    // Nothing may write to it while it is copied.
    let _lock = match DataDirLock::acquire(from) {
        Ok(Locked::Acquired(lock)) => lock,
        Ok(Locked::Held(holder)) => {
            return fail(format!(
                "a Keygate server (process {}) is using {}; stop it first, so that nothing changes while it is copied",
                holder_pid(&holder),
                from.display()
            ));
        }
        Err(e) => return fail(e),
    };
    let sqlite = match keygate_store::SqliteStore::open(&db, &keygate_store::SqliteOptions::default()).await {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot open {}: {e}", db.display())),
    };
    if let Err(e) = keygate_store::Store::migrate(&sqlite).await {
        return fail(format!("cannot bring {} up to date: {e}", db.display()));
    }
    let pg = match keygate_store::PgStore::open(url.expose(), &keygate_store::PgOptions::default()).await {
        Ok(p) => p,
        Err(e) => {
            return fail(format!(
                "cannot open the PostgreSQL database {url}: {e}\ncheck that it is reachable and exists (create it with `createdb`)"
            ));
        }
    };
    if let Err(e) = keygate_store::Store::migrate(&pg).await {
        return fail(format!("cannot create Keygate's tables in {url}: {e}"));
    }
    let result = keygate_store::copy::sqlite_to_postgres(&sqlite, &pg, |table, done, total| {
        if json {
            return;
        }
        eprint!("\r{table}: {done}/{total}      ");
        if done == total {
            eprintln!();
        }
    })
    .await;
    keygate_store::Store::close(&sqlite).await;
    keygate_store::Store::close(&pg).await;
    let counts = match result {
        Ok(c) => c,
        Err(e) => return fail(format!("the copy failed, and nothing was kept in {url}: {e}")),
    };
    let master = keygate_server::seal::default_key_path(from);
    if json {
        say!("{}", serde_json::json!({"tables": counts, "database": url.redacted()}));
    } else {
        let rows: u64 = counts.iter().map(|c| c.postgres).sum();
        say!("Copied {rows} rows in {} tables into {url}; every table's count matches.", counts.len());
        say!(
            "Start every node with KEYGATE_DATABASE_URL set and the master key of this installation \
             (by default {}, as KEYGATE_MASTER_KEY_FILE or its content as KEYGATE_MASTER_KEY): it opens the signing keys.",
            master.display()
        );
    }
    ExitCode::SUCCESS
}
