//! `keygate plans …`

use std::process::ExitCode;

use clap::Subcommand;
use keygate_core::limits::RateLimit;
use keygate_server::routes::plans::{CreatePlan, UpdatePlan};
use reqwest::Method;

use super::CliResult;
use super::args::{self, QuotaArgs, show_quota};
use super::http::Api;
use super::output::{emit, field, output, print_object, table};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a plan: named rate limits, quota, scopes and key lifetime that consumers are put on.
    Create {
        /// Unique name (ignoring case), e.g. free or pro.
        #[arg(long)]
        name: String,
        /// What the plan gives, shown to developers in the portal.
        #[arg(long)]
        description: Option<String>,
        /// A rate limit NAME:LIMIT/WINDOW of every key and client of its consumers (repeatable).
        #[arg(long = "rate-limit", value_name = "NAME:LIMIT/WINDOW", value_parser = args::rate_limit)]
        rate_limits: Vec<RateLimit>,
        #[command(flatten)]
        quota: QuotaArgs,
        /// A scope keys and clients on the plan may hold (repeatable); none given: any.
        #[arg(long = "allow-scope", value_name = "SCOPE")]
        allowed_scopes: Vec<String>,
        /// The longest a new key may live, e.g. 90d.
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
        key_lifetime: Option<u64>,
        /// Offer it to the developer portal's developers.
        #[arg(long)]
        self_service: bool,
        /// Make it what a new portal application gets (implies --self-service).
        #[arg(long)]
        default: bool,
    },
    /// List plans.
    List,
    /// Show one plan, by id or name.
    Show {
        /// plan_… or the plan's name.
        plan: String,
    },
    /// Change a plan (its rate limits reach every consumer on it at once).
    Update {
        /// plan_… or the plan's name.
        plan: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Replace the rate limits, NAME:LIMIT/WINDOW (repeatable).
        #[arg(long = "rate-limit", value_name = "NAME:LIMIT/WINDOW", value_parser = args::rate_limit)]
        rate_limits: Vec<RateLimit>,
        /// Remove the rate limits.
        #[arg(long, conflicts_with = "rate_limits")]
        no_rate_limits: bool,
        #[command(flatten)]
        quota: QuotaArgs,
        /// Remove the quota new keys start with.
        #[arg(long, conflicts_with = "quota")]
        no_quota: bool,
        /// Replace the allowed scopes (repeatable).
        #[arg(long = "allow-scope", value_name = "SCOPE")]
        allowed_scopes: Vec<String>,
        /// Allow any scope.
        #[arg(long, conflicts_with = "allowed_scopes")]
        any_scope: bool,
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
        key_lifetime: Option<u64>,
        /// Remove the key lifetime cap.
        #[arg(long, conflicts_with = "key_lifetime")]
        no_key_lifetime: bool,
        /// Offer it in the portal (true) or stop offering it (false).
        #[arg(long)]
        self_service: Option<bool>,
        /// Make it the portal's default plan.
        #[arg(long)]
        default: bool,
    },
    /// Delete a plan no consumer is on.
    Delete {
        /// plan_… or the plan's name.
        plan: String,
    },
}

/// A plan's id, given its id or its name.
async fn plan_id(c: &Api, plan: &str) -> Result<String, super::Failure> {
    if plan.starts_with("plan_") {
        return Ok(plan.to_string());
    }
    let v = c.call(Method::GET, &["v1", "plans", &format!("name:{plan}")], &[], None).await?;
    Ok(v["id"].as_str().unwrap_or(plan).to_string())
}

fn lifetime(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX)
}

pub async fn run(c: &Api, cmd: Cmd) -> CliResult {
    match cmd {
        Cmd::Create {
            name,
            description,
            rate_limits,
            quota,
            allowed_scopes,
            key_lifetime,
            self_service,
            default,
        } => {
            let body = CreatePlan {
                name,
                description,
                rate_limits: (!rate_limits.is_empty()).then_some(rate_limits),
                quota: quota.quota()?,
                allowed_scopes: (!allowed_scopes.is_empty()).then_some(allowed_scopes),
                key_lifetime_seconds: key_lifetime.map(lifetime),
                self_service,
                is_default: default,
            };
            let v = c.send(Method::POST, &["v1", "plans"], &body).await?;
            output(c, &v, |v| {
                emit(format!(
                    "Created plan {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or("?")
                ));
                emit(format!(
                    "Put a consumer on it:  keygate consumers update <cons_…> --plan {}",
                    v["id"].as_str().unwrap_or("?")
                ));
            });
        }
        Cmd::List => {
            let v = c.call(Method::GET, &["v1", "plans"], &[], None).await?;
            output(c, &v, |v| {
                let limits = |p: &serde_json::Value| match p["rate_limits"].as_array() {
                    Some(l) if !l.is_empty() => {
                        l.iter().map(args::show_rate_limit).collect::<Vec<_>>().join(", ")
                    }
                    _ => "-".into(),
                };
                let quota = |p: &serde_json::Value| show_quota(&p["quota"]);
                table(
                    super::output::items(v),
                    &[
                        ("ID", &field("id")),
                        ("NAME", &field("name")),
                        ("RATE LIMITS", &limits),
                        ("QUOTA", &quota),
                        ("SELF-SERVICE", &field("self_service")),
                        ("DEFAULT", &field("is_default")),
                    ],
                );
            });
        }
        Cmd::Show { plan } => {
            let id = plan_id(c, &plan).await?;
            let v = c.call(Method::GET, &["v1", "plans", &id], &[], None).await?;
            output(c, &v, print_object);
        }
        Cmd::Update {
            plan,
            name,
            description,
            rate_limits,
            no_rate_limits,
            quota,
            no_quota,
            allowed_scopes,
            any_scope,
            key_lifetime,
            no_key_lifetime,
            self_service,
            default,
        } => {
            let id = plan_id(c, &plan).await?;
            let body = UpdatePlan {
                name,
                description: description.map(Some),
                rate_limits: if no_rate_limits {
                    Some(None)
                } else {
                    (!rate_limits.is_empty()).then_some(Some(rate_limits))
                },
                quota: if no_quota { Some(None) } else { quota.quota()?.map(Some) },
                allowed_scopes: if any_scope {
                    Some(None)
                } else {
                    (!allowed_scopes.is_empty()).then_some(Some(allowed_scopes))
                },
                key_lifetime_seconds: if no_key_lifetime {
                    Some(None)
                } else {
                    key_lifetime.map(|s| Some(lifetime(s)))
                },
                self_service,
                is_default: default.then_some(true),
            };
            let v = c.send(Method::PATCH, &["v1", "plans", &id], &body).await?;
            output(c, &v, |v| {
                emit(format!("Updated plan {id}"));
                print_object(v);
            });
        }
        Cmd::Delete { plan } => {
            let id = plan_id(c, &plan).await?;
            let v = c.call(Method::DELETE, &["v1", "plans", &id], &[], None).await?;
            output(c, &v, |_| emit(format!("Deleted plan {id}")));
        }
    }
    Ok(ExitCode::SUCCESS)
}
