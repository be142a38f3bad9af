//! `keygate serve`, `keygate init` and `keygate admin-key`: the commands that work on a data directory.

use std::process::ExitCode;

use keygate_core::PlainSecret;
use keygate_server::state::DB_FILE;
use keygate_server::{AppState, ServerConfig, bootstrap, launch, open_store};
use keygate_store::Store;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, ServerArgs, resolve};

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEYGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
    let store = match open_store(&config).await {
        Ok(s) => s,
        Err(e) => {
            return fail(format!("{e}\ncheck that --data-dir points to a writable directory"));
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
    say!("Keygate listening on http://{addr} (data in {})", config.data_dir.display());
    say!("API docs: http://{addr}/docs");
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "keygate started");
    let state = AppState::new(store.clone(), config);
    let result = launch(state, listener, shutdown_signal()).await;
    store.close().await;
    match result {
        Ok(()) => {
            tracing::info!("keygate stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("the server stopped with an error: {e}")),
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
        dir = config.data_dir.display(),
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

pub async fn init(args: &ServerArgs, json: bool) -> ExitCode {
    let config = match resolve(args) {
        Ok(r) => r.server,
        Err(e) => return fail(e),
    };
    let db = config.data_dir.join(DB_FILE);
    if db.exists() && already_initialized(&config).await {
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
pub async fn admin_key(args: &ServerArgs, name: &str, json: bool) -> ExitCode {
    let config = match resolve(args) {
        Ok(r) => r.server,
        Err(e) => return fail(e),
    };
    if !config.data_dir.join(DB_FILE).exists() {
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
    let result = keygate_server::state::create_local_admin_key(store.as_ref(), name).await;
    store.close().await;
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
