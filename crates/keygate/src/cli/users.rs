//! `keygate users …` and `keygate scopes …`: end users who delegate access to applications, their
//! grants, and the descriptions the consent page shows for scopes.

use std::process::ExitCode;

use clap::Subcommand;
use keygate_server::routes::users::{CreatePat, CreateUser, SetPassword, SetScope, UpdateUser};
use reqwest::Method;
use serde_json::Value;

use super::args::PageArgs;
use super::http::Api;
use super::output::{emit, field, output, print_next, print_object, table};
use super::{CliResult, Failure};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a user. The password is read from standard input with --password-stdin.
    Create {
        /// Unique, ignoring case.
        #[arg(long)]
        username: String,
        /// Read the password from the first line of standard input (at least 10 characters).
        #[arg(long)]
        password_stdin: bool,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        display_name: Option<String>,
        /// A scope this user may grant (repeatable); default: anything a client may request.
        #[arg(long = "allowed-scope", value_name = "SCOPE")]
        allowed_scopes: Vec<String>,
        /// A role in Keygate itself (repeatable): `admin` signs in to the web console as an operator.
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
    },
    /// List users, oldest first.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one user (by id usr_… or username).
    Show { user: String },
    /// Invite someone to the developer portal (for portal.signup = "invite"): prints the sign-up link.
    Invite {
        /// The address the account will have.
        #[arg(long)]
        email: String,
        /// How long the link works, in days (1-90).
        #[arg(long, default_value_t = 7)]
        days: i64,
        /// Also mail the link (through mail.smtp_url, or the server log in its test mode).
        #[arg(long)]
        send: bool,
    },
    /// Change a user's username, email, display name or allowed scopes.
    Update {
        user: String,
        #[arg(long)]
        username: Option<String>,
        #[arg(long, conflicts_with = "no_email")]
        email: Option<String>,
        #[arg(long)]
        no_email: bool,
        #[arg(long, conflicts_with = "no_display_name")]
        display_name: Option<String>,
        #[arg(long)]
        no_display_name: bool,
        /// Replace the scopes this user may grant (repeatable).
        #[arg(long = "allowed-scope", value_name = "SCOPE", conflicts_with = "any_scope")]
        allowed_scopes: Vec<String>,
        /// Let the user grant anything a client may request.
        #[arg(long)]
        any_scope: bool,
        /// Replace the user's roles in Keygate itself (repeatable): `admin` signs in to the web console.
        #[arg(long = "role", value_name = "ROLE", conflicts_with = "no_roles")]
        roles: Vec<String>,
        /// Take all of the user's roles away.
        #[arg(long)]
        no_roles: bool,
    },
    /// Disable a user: they cannot log in, and their tokens stop at the next request.
    Disable { user: String },
    /// Enable a disabled user.
    Enable { user: String },
    /// Delete a user with their grants; their tokens stop at the next request.
    Delete { user: String },
    /// Set a user's password, read from the first line of standard input.
    SetPassword { user: String },
    /// List the applications a user has granted access to.
    Grants { user: String },
    /// Revoke a grant: every token issued under it stops, and the application must ask again.
    RevokeGrant {
        user: String,
        /// The grant's id (grt_…), from `keygate users grants`.
        grant: String,
    },
    /// Personal access tokens of a user.
    Tokens {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Personal access tokens (of every user) that expire soon, soonest first.
    ExpiringTokens {
        /// How far ahead, e.g. 7d (1d to 90d).
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = super::args::duration_secs)]
        within: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a personal access token; it is printed this once.
    Create {
        user: String,
        /// What it is for, e.g. "laptop CLI".
        #[arg(long)]
        name: String,
        /// A scope (repeatable; at least one).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// When it expires: a duration (30d) or a time; `never` where the operator allows it.
        #[arg(long, value_name = "DURATION|TIME|never")]
        expires: String,
        /// A resource it may be used for (repeatable) [default: any].
        #[arg(long = "audience")]
        audiences: Vec<String>,
    },
    /// List a user's tokens, with their last use.
    List { user: String },
    /// Rotate a token: a new secret, printed once; the old one stops at once.
    Rotate { user: String, token: String },
    /// Revoke a token.
    Revoke { user: String, token: String },
}

#[derive(Debug, Subcommand)]
pub enum ScopeCmd {
    /// List scope descriptions.
    List,
    /// Describe a scope for the consent page, e.g. `keygate scopes describe articles:read "Read your articles"`.
    Describe { scope: String, description: String },
    /// Remove a scope's description.
    Remove { scope: String },
}

fn password_from_stdin() -> Result<String, Failure> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Failure::new(format!("cannot read the password from standard input: {e}")))?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        return Err(Failure::usage("standard input held no password"));
    }
    Ok(p)
}

/// A user id, or the id of the user with this username.
async fn resolve(c: &Api, user: &str) -> Result<String, Failure> {
    if keygate_core::id::looks_like("usr", user) {
        return Ok(user.to_string());
    }
    let v = c.call(Method::GET, &["v1", "users", &format!("username:{user}")], &[], None).await?;
    v["id"].as_str().map(str::to_owned).ok_or_else(|| Failure::new("the server's answer had no user id"))
}

pub async fn run(c: &Api, cmd: Cmd) -> CliResult {
    match cmd {
        Cmd::Create { username, password_stdin, email, display_name, allowed_scopes, roles } => {
            let password = if password_stdin { Some(password_from_stdin()?) } else { None };
            let body = CreateUser {
                username,
                password,
                email,
                display_name,
                allowed_scopes: (!allowed_scopes.is_empty()).then_some(allowed_scopes),
                roles: (!roles.is_empty()).then_some(roles),
            };
            let v = c.send(Method::POST, &["v1", "users"], &body).await?;
            output(c, &v, |v| {
                emit(format!(
                    "Created user {} ({})",
                    v["id"].as_str().unwrap_or("?"),
                    v["username"].as_str().unwrap_or("")
                ));
                if v["has_password"] != Value::Bool(true) {
                    emit("No password set: `keygate users set-password USER < password-file` sets one.");
                }
            });
        }
        Cmd::List { page } => {
            let v = c.call(Method::GET, &["v1", "users"], &page.query(), None).await?;
            output(c, &v, |v| {
                table(
                    super::output::items(v),
                    &[
                        ("ID", &field("id")),
                        ("USERNAME", &field("username")),
                        ("EMAIL", &field("email")),
                        ("DISABLED", &field("disabled")),
                        ("LAST LOGIN", &field("last_login_at")),
                    ],
                );
                print_next(v);
            });
        }
        Cmd::Invite { email, days, send } => {
            let body = keygate_server::routes::invitations::CreateInvitation {
                email,
                expires_in_days: Some(days),
                send,
            };
            let v = c.send(Method::POST, &["v1", "portal", "invitations"], &body).await?;
            output(c, &v, |v| {
                emit(format!(
                    "Invitation for {} (works until {}{}):",
                    v["email"].as_str().unwrap_or(""),
                    v["expires_at"].as_str().unwrap_or(""),
                    if v["sent"] == true { "; mailed" } else { "" }
                ));
                emit(v["url"].as_str().unwrap_or("").to_string());
            });
        }
        Cmd::Show { user } => {
            let id = resolve(c, &user).await?;
            let v = c.call(Method::GET, &["v1", "users", &id], &[], None).await?;
            output(c, &v, print_object);
        }
        Cmd::Update {
            user,
            username,
            email,
            no_email,
            display_name,
            no_display_name,
            allowed_scopes,
            any_scope,
            roles,
            no_roles,
        } => {
            let id = resolve(c, &user).await?;
            let body = UpdateUser {
                username,
                email: if no_email { Some(None) } else { email.map(Some) },
                display_name: if no_display_name { Some(None) } else { display_name.map(Some) },
                allowed_scopes: if any_scope {
                    Some(None)
                } else {
                    (!allowed_scopes.is_empty()).then_some(Some(allowed_scopes))
                },
                roles: if no_roles { Some(Vec::new()) } else { (!roles.is_empty()).then_some(roles) },
            };
            let v = c.send(Method::PATCH, &["v1", "users", &id], &body).await?;
            output(c, &v, |v| {
                emit(format!("Updated user {id}"));
                print_object(v);
            });
        }
        Cmd::Disable { user } => {
            let id = resolve(c, &user).await?;
            let v = c.call(Method::POST, &["v1", "users", &id, "disable"], &[], None).await?;
            output(c, &v, |_| {
                emit(format!("Disabled user {id}: they cannot log in and their tokens stop working"))
            });
        }
        Cmd::Enable { user } => {
            let id = resolve(c, &user).await?;
            let v = c.call(Method::POST, &["v1", "users", &id, "enable"], &[], None).await?;
            output(c, &v, |_| emit(format!("Enabled user {id}")));
        }
        Cmd::Delete { user } => {
            let id = resolve(c, &user).await?;
            c.call(Method::DELETE, &["v1", "users", &id], &[], None).await?;
            output(c, &serde_json::json!({"deleted": id}), |_| {
                emit(format!("Deleted user {id} and their grants"))
            });
        }
        Cmd::SetPassword { user } => {
            let id = resolve(c, &user).await?;
            let body = SetPassword { password: password_from_stdin()? };
            let v = c.send(Method::POST, &["v1", "users", &id, "password"], &body).await?;
            output(c, &v, |_| emit(format!("Set the password of user {id}; their sessions ended")));
        }
        Cmd::Grants { user } => {
            let id = resolve(c, &user).await?;
            let v = c.call(Method::GET, &["v1", "users", &id, "grants"], &[], None).await?;
            output(c, &v, |v| {
                table(
                    super::output::items(v),
                    &[
                        ("GRANT", &field("id")),
                        ("CLIENT", &field("client_id")),
                        ("SCOPES", &field("scopes")),
                        ("SINCE", &field("created_at")),
                    ],
                );
            });
        }
        Cmd::Tokens { command } => return run_tokens(c, command).await,
        Cmd::ExpiringTokens { within } => {
            let days = within.div_ceil(86_400).max(1);
            let v = c
                .call(Method::GET, &["v1", "tokens", "expiring"], &[("within_days", days.to_string())], None)
                .await?;
            output(c, &v, pat_table);
        }
        Cmd::RevokeGrant { user, grant } => {
            let id = resolve(c, &user).await?;
            c.call(Method::DELETE, &["v1", "users", &id, "grants", &grant], &[], None).await?;
            output(c, &serde_json::json!({"revoked": grant}), |_| {
                emit(format!("Revoked grant {grant}: its tokens stop working"))
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn pat_table(v: &Value) {
    table(
        super::output::items(v),
        &[
            ("TOKEN", &field("id")),
            ("USER", &field("user_id")),
            ("NAME", &field("name")),
            ("START", &field("start")),
            ("STATUS", &field("status")),
            ("EXPIRES", &field("expires_at")),
            ("LAST USED", &field("last_used_at")),
            ("FROM", &field("last_used_ip")),
        ],
    );
}

async fn run_tokens(c: &Api, cmd: TokenCmd) -> CliResult {
    match cmd {
        TokenCmd::Create { user, name, scopes, expires, audiences } => {
            let id = resolve(c, &user).await?;
            let (expires_at, expires_in_seconds) = if expires == "never" {
                (Some("never".to_string()), None)
            } else if let Ok(secs) = super::args::duration_secs(&expires) {
                (None, Some(secs))
            } else {
                (Some(super::args::time(&expires).map_err(Failure::usage)?), None)
            };
            let body = CreatePat { name, scopes, expires_at, expires_in_seconds, audiences };
            let v = c.send(Method::POST, &["v1", "users", &id, "tokens"], &body).await?;
            output(c, &v, |v| {
                emit(format!(
                    "Created personal access token {} ({}; expires {})",
                    v["id"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or(""),
                    v["expires_at"].as_str().unwrap_or("never")
                ));
                super::output::print_secret("Token", &v["token"]);
            });
        }
        TokenCmd::List { user } => {
            let id = resolve(c, &user).await?;
            let v = c.call(Method::GET, &["v1", "users", &id, "tokens"], &[], None).await?;
            output(c, &v, pat_table);
        }
        TokenCmd::Rotate { user, token } => {
            let id = resolve(c, &user).await?;
            let v =
                c.call(Method::POST, &["v1", "users", &id, "tokens", &token, "rotate"], &[], None).await?;
            output(c, &v, |v| {
                emit(format!("Rotated {token}: the old secret stopped working"));
                super::output::print_secret("Token", &v["token"]);
            });
        }
        TokenCmd::Revoke { user, token } => {
            let id = resolve(c, &user).await?;
            let v = c.call(Method::DELETE, &["v1", "users", &id, "tokens", &token], &[], None).await?;
            output(c, &v, |_| emit(format!("Revoked {token}: it stops working at once")));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_scopes(c: &Api, cmd: ScopeCmd) -> CliResult {
    match cmd {
        ScopeCmd::List => {
            let v = c.call(Method::GET, &["v1", "scopes"], &[], None).await?;
            output(c, &v, |v| {
                table(
                    super::output::items(v),
                    &[("SCOPE", &field("scope")), ("DESCRIPTION", &field("description"))],
                )
            });
        }
        ScopeCmd::Describe { scope, description } => {
            let v = c.send(Method::PUT, &["v1", "scopes", &scope], &SetScope { description }).await?;
            output(c, &v, |_| emit(format!("Described {scope}")));
        }
        ScopeCmd::Remove { scope } => {
            c.call(Method::DELETE, &["v1", "scopes", &scope], &[], None).await?;
            output(c, &serde_json::json!({"removed": scope}), |_| {
                emit(format!("Removed the description of {scope}"))
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
