//! Command-line interface. `serve`, `init` and `admin-key` work on a data directory; every other
//! command talks to a running server over HTTP (`KEYGATE_URL`, `KEYGATE_ADMIN_KEY`), and `--json` prints
//! the server's JSON for scripts.
//!
//! Exit codes: 0 success (for `verify`: the credential is valid); 1 error (the message says what to
//! do); 2 bad usage; 3 the server cannot be reached; 4 `verify` answered that the credential is not valid.
//!
//! Layout: `args` (shared arguments and value parsers: ids, durations, times, rate limits), `http` (the
//! admin client: URL handling, encoded path segments, error mapping), `output` (stdout that survives a
//! closed pipe, tables, confirmations), and one module per command group.

mod args;
mod clients;
mod consumers;
mod http;
mod keys;
mod output;
mod plans;
mod reports;
mod signing_keys;
mod users;
mod verify;
mod webhooks;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{DataDirArgs, ServerArgs, default_config};

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_INVALID: u8 = 4;

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "API keys and API tokens in one self-hosted server")]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts, before or after the command's name.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// URL of the Keygate server, with its scheme (http:// or https://).
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// Admin key. Prefer the KEYGATE_ADMIN_KEY variable (flags show up in process lists), or `-` to read
    /// it from standard input.
    #[arg(long, env = "KEYGATE_ADMIN_KEY", hide_env_values = true, global = true)]
    pub admin_key: Option<String>,
    /// Print JSON instead of tables and sentences (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (creates and initialises the data directory on first start).
    Serve(ServerArgs),
    /// Create and initialise a data directory without serving; prints the bootstrap admin key.
    Init(DataDirArgs),
    /// Write a new admin key straight into a data directory (when every admin key is lost). With a
    /// server running on it, waits until that server accepts the new key.
    AdminKey {
        #[command(flatten)]
        dir: DataDirArgs,
        /// Name of the new key.
        #[arg(long, default_value = "local admin")]
        name: String,
    },
    /// Copy an SQLite installation (a stopped server's data directory) into an empty PostgreSQL
    /// database, with progress, and compare every table's rows at the end. All or nothing: on any error
    /// the PostgreSQL database is left as it was.
    MigrateToPostgres {
        /// The data directory to copy from (no server may be running on it).
        #[arg(long, value_name = "DATA_DIR")]
        from: std::path::PathBuf,
        /// The PostgreSQL database to copy into (created tables, no data): postgres://USER:PASSWORD@HOST/DB.
        #[arg(long, value_name = "URL", env = "KEYGATE_DATABASE_URL", hide_env_values = true)]
        to: String,
    },
    /// Print an example configuration file with every setting and its default.
    DefaultConfig,
    /// The gateway's routes file.
    Routes {
        #[command(subcommand)]
        command: RoutesCmd,
    },
    #[command(flatten)]
    Remote(Remote),
}

#[derive(Debug, Subcommand)]
enum RoutesCmd {
    /// Check a routes file as the gateway would load it, and show its routes in matching order (most
    /// specific first). Exit code 1 if it does not check.
    Check {
        /// The routes file (default: gateway.routes, from KEYGATE_GATEWAY_ROUTES).
        #[arg(env = "KEYGATE_GATEWAY_ROUTES")]
        file: std::path::PathBuf,
    },
}

/// `keygate routes check FILE`.
fn routes_check(file: &std::path::Path, json: bool) -> ExitCode {
    let routes = match keygate_server::gateway::routes::Routes::load(file) {
        Ok(r) => r,
        Err(e) => {
            if json {
                output::emit(serde_json::json!({"valid": false, "error": e}));
            } else {
                eprintln!("error: {e}");
            }
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let rows: Vec<serde_json::Value> = routes.routes.iter().map(|r| r.describe()).collect();
    let warnings = routes.warnings();
    if json {
        output::emit(serde_json::json!({"valid": true, "routes": rows, "warnings": warnings}));
        return ExitCode::SUCCESS;
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    output::emit(format!("{}: {} routes, in matching order", file.display(), rows.len()));
    let policy = |r: &serde_json::Value| {
        if r["public"].as_bool() == Some(true) {
            return "public".to_string();
        }
        let mut p = output::cell(&r["accept"]);
        if let Some(s) = r["scopes"].as_array().filter(|s| !s.is_empty()) {
            p.push_str(&format!("; scopes {}", output::cell(&serde_json::Value::Array(s.clone()))));
        }
        if let Some(m) = r["method_scopes"].as_object() {
            for (method, s) in m {
                p.push_str(&format!("; {method} {}", output::cell(s)));
            }
        }
        p
    };
    output::table(
        &rows,
        &[
            ("NAME", &output::field("name")),
            ("HOST", &output::field("host")),
            ("PATH", &output::field("path")),
            ("METHODS", &output::field("methods")),
            ("UPSTREAM", &output::field("upstreams")),
            ("POLICY", &policy),
        ],
    );
    ExitCode::SUCCESS
}

/// The commands that talk to a running server.
#[derive(Debug, Subcommand)]
pub enum Remote {
    /// Manage consumers: the applications or accounts that call your API.
    Consumers {
        #[command(subcommand)]
        command: consumers::Cmd,
    },
    /// Manage plans: named rate limits, quota, scopes and key lifetime that consumers are put on, and
    /// what the developer portal offers.
    Plans {
        #[command(subcommand)]
        command: plans::Cmd,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: keys::Cmd,
    },
    /// Manage OAuth 2 clients: applications that obtain access tokens.
    Clients {
        #[command(subcommand)]
        command: clients::Cmd,
    },
    /// Manage users: the people who let applications act on their behalf (authorization code flow).
    Users {
        #[command(subcommand)]
        command: users::Cmd,
    },
    /// Describe scopes for the consent page.
    Scopes {
        #[command(subcommand)]
        command: users::ScopeCmd,
    },
    /// List, rotate or revoke the JWT signing keys.
    SigningKeys {
        #[command(subcommand)]
        command: signing_keys::Cmd,
    },
    /// Send events to your own endpoints: signed webhooks (Standard Webhooks), delivered at least once.
    Webhooks {
        #[command(subcommand)]
        command: webhooks::Cmd,
    },
    /// Reports of leaked credentials received from secret-scanning partners, newest first.
    Leaks(webhooks::LeaksArgs),
    /// Verify a credential, as your API would. Exit code 0 if valid, 4 if not.
    Verify(verify::VerifyArgs),
    /// Get an access token with the client credentials grant, as an application would.
    Token(verify::TokenArgs),
    /// Show verify counts of a key (or with --consumer, of a consumer) as a small chart.
    Usage(reports::UsageArgs),
    /// Show the audit log, newest first.
    Audit(reports::AuditArgs),
}

pub async fn run(cli: Cli) -> ExitCode {
    let Cli { global, command } = cli;
    match command {
        Command::Serve(args) => crate::server::serve(&args).await,
        Command::Init(dir) => crate::server::init(&dir, global.json).await,
        Command::AdminKey { dir, name } => crate::server::admin_key(&dir, &name, global.json).await,
        Command::Routes { command: RoutesCmd::Check { file } } => routes_check(&file, global.json),
        Command::MigrateToPostgres { from, to } => {
            crate::server::migrate_to_postgres(&from, &to, global.json).await
        }
        Command::DefaultConfig => {
            output::emit(default_config().trim_end());
            ExitCode::SUCCESS
        }
        Command::Remote(remote) => match run_remote(global, remote).await {
            Ok(code) => code,
            Err(f) => {
                eprintln!("error: {}", f.message);
                ExitCode::from(f.code)
            }
        },
    }
}

async fn run_remote(global: GlobalArgs, remote: Remote) -> Result<ExitCode, Failure> {
    let c = http::Api::new(global)?;
    match remote {
        Remote::Consumers { command } => consumers::run(&c, command).await,
        Remote::Plans { command } => plans::run(&c, command).await,
        Remote::Keys { command } => keys::run(&c, command).await,
        Remote::Clients { command } => clients::run(&c, command).await,
        Remote::SigningKeys { command } => signing_keys::run(&c, command).await,
        Remote::Users { command } => users::run(&c, command).await,
        Remote::Scopes { command } => users::run_scopes(&c, command).await,
        Remote::Webhooks { command } => webhooks::run(&c, command).await,
        Remote::Leaks(a) => webhooks::leaks(&c, a).await,
        Remote::Verify(a) => verify::verify(&c, a).await,
        Remote::Token(a) => verify::token(&c, a).await,
        Remote::Usage(a) => reports::usage(&c, a).await,
        Remote::Audit(a) => reports::audit(&c, a).await,
    }
}

/// What went wrong, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Failure { code: EXIT_ERROR, message: message.into() }
    }

    /// Bad usage (exit code 2): the command line itself is wrong.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure { code: EXIT_USAGE, message: message.into() }
    }
}

pub type CliResult = Result<ExitCode, Failure>;
