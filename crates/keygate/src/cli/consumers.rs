//! `keygate consumers …`

use std::process::ExitCode;

use clap::Subcommand;
use keygate_core::limits::RateLimit;
use keygate_server::routes::consumers::{CreateConsumer, UpdateConsumer};
use keygate_store::LeakPolicy;
use reqwest::Method;
use serde_json::Value;

use super::CliResult;
use super::args::{self, PageArgs};
use super::http::Api;
use super::output::{emit, field, output, print_next, print_object, table};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a consumer.
    Create {
        /// A name people recognise, up to 200 characters.
        #[arg(long)]
        name: String,
        /// Free-form JSON object returned with every verify, e.g. '{"plan":"pro"}'.
        #[arg(long, value_parser = args::metadata)]
        metadata: Option<Value>,
        /// The plan: a rate limit NAME:LIMIT/WINDOW (e.g. per_minute:600/1m) that keys without their own
        /// inherit (repeatable).
        #[arg(long = "rate-limit", value_name = "NAME:LIMIT/WINDOW", value_parser = args::rate_limit)]
        rate_limits: Vec<RateLimit>,
        /// Your own id for this account (unique), to find it again with `consumers show --external-id`.
        #[arg(long)]
        external_id: Option<String>,
        /// When a secret-scanning partner reports one of its credentials leaked: revoke it (default) or
        /// only notify (the `credential.leaked` event).
        #[arg(long, value_parser = args::leak_policy)]
        leak_policy: Option<LeakPolicy>,
        /// Put it on a plan (plan_…; `keygate plans list`): its rate limits replace --rate-limit.
        #[arg(long, conflicts_with = "rate_limits")]
        plan: Option<String>,
        /// The user who owns it (usr_…).
        #[arg(long)]
        owner: Option<String>,
    },
    /// List consumers, oldest first.
    List {
        #[command(flatten)]
        page: PageArgs,
        /// Only the applications of this developer (usr_…).
        #[arg(long, conflicts_with = "plan")]
        owner: Option<String>,
        /// Only consumers on this plan (plan_…).
        #[arg(long)]
        plan: Option<String>,
    },
    /// Show one consumer, by id or by --external-id.
    Show {
        /// The consumer's id (cons_…).
        #[arg(value_parser = args::Quiet(args::consumer_id), required_unless_present = "external_id")]
        id: Option<String>,
        /// Find the consumer by your own id instead.
        #[arg(long, conflicts_with = "id")]
        external_id: Option<String>,
    },
    /// Change a consumer's name, metadata, plan or external id.
    Update {
        /// The consumer's id (cons_…).
        #[arg(value_parser = args::Quiet(args::consumer_id))]
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New metadata (a JSON object; replaces the old one).
        #[arg(long, value_parser = args::metadata)]
        metadata: Option<Value>,
        /// Replace the plan's rate limits, NAME:LIMIT/WINDOW (repeatable).
        #[arg(long = "rate-limit", value_name = "NAME:LIMIT/WINDOW", value_parser = args::rate_limit)]
        rate_limits: Vec<RateLimit>,
        /// Remove the plan's rate limits.
        #[arg(long, conflicts_with = "rate_limits")]
        no_rate_limits: bool,
        /// New external id.
        #[arg(long, conflicts_with = "no_external_id")]
        external_id: Option<String>,
        /// Remove the external id.
        #[arg(long)]
        no_external_id: bool,
        /// revoke or notify: what happens when one of its credentials is reported leaked.
        #[arg(long, value_parser = args::leak_policy)]
        leak_policy: Option<LeakPolicy>,
        /// Put it on a plan (plan_…).
        #[arg(long, conflicts_with = "no_plan")]
        plan: Option<String>,
        /// Take it off its plan (its own rate limits apply again).
        #[arg(long)]
        no_plan: bool,
    },
    /// Disable a consumer: its keys, clients and tokens stop working until it is enabled.
    Disable {
        /// The consumer's id (cons_…).
        #[arg(value_parser = args::Quiet(args::consumer_id))]
        id: String,
    },
    /// Enable a disabled consumer.
    Enable {
        /// The consumer's id (cons_…).
        #[arg(value_parser = args::Quiet(args::consumer_id))]
        id: String,
    },
}

pub async fn run(c: &Api, cmd: Cmd) -> CliResult {
    match cmd {
        Cmd::Create { name, metadata, rate_limits, external_id, leak_policy, plan, owner } => {
            let body = CreateConsumer {
                name,
                metadata,
                rate_limits: (!rate_limits.is_empty()).then_some(rate_limits),
                external_id,
                leak_policy,
                plan_id: plan,
                owner_id: owner,
            };
            let v = c.send(Method::POST, &["v1", "consumers"], &body).await?;
            output(c, &v, |v| {
                emit(format!(
                    "Created consumer {} ({})",
                    v["id"].as_str().unwrap_or("?"),
                    v["name"].as_str().unwrap_or("")
                ));
                emit(format!(
                    "Give it a key:  keygate keys create --consumer {} --name production",
                    v["id"].as_str().unwrap_or("?")
                ));
            });
        }
        Cmd::List { page, owner, plan } => {
            let mut q = page.query();
            q.extend(owner.map(|o| ("owner_id", o)));
            q.extend(plan.map(|p| ("plan_id", p)));
            let v = c.call(Method::GET, &["v1", "consumers"], &q, None).await?;
            output(c, &v, |v| {
                table(
                    super::output::items(v),
                    &[
                        ("ID", &field("id")),
                        ("NAME", &field("name")),
                        ("EXTERNAL ID", &field("external_id")),
                        ("DISABLED", &field("disabled")),
                        ("CREATED", &field("created_at")),
                    ],
                );
                print_next(v);
            });
        }
        Cmd::Show { id, external_id } => {
            let v = match (id, external_id) {
                (Some(id), _) => c.call(Method::GET, &["v1", "consumers", &id], &[], None).await?,
                (None, Some(e)) => {
                    let list = c
                        .call(Method::GET, &["v1", "consumers"], &[("external_id", e.clone())], None)
                        .await?;
                    match super::output::items(&list).first() {
                        Some(found) => found.clone(),
                        None => {
                            return Err(super::Failure::new(format!(
                                "no consumer has the external id {e:?}"
                            )));
                        }
                    }
                }
                (None, None) => return Err(super::Failure::usage("give a consumer id or --external-id")),
            };
            output(c, &v, print_object);
        }
        Cmd::Update {
            id,
            name,
            metadata,
            rate_limits,
            no_rate_limits,
            external_id,
            no_external_id,
            leak_policy,
            plan,
            no_plan,
        } => {
            let body = UpdateConsumer {
                name,
                metadata,
                rate_limits: if no_rate_limits {
                    Some(None)
                } else {
                    (!rate_limits.is_empty()).then_some(Some(rate_limits))
                },
                external_id: if no_external_id { Some(None) } else { external_id.map(Some) },
                leak_policy,
                plan_id: if no_plan { Some(None) } else { plan.map(Some) },
                owner_id: None,
            };
            let v = c.send(Method::PATCH, &["v1", "consumers", &id], &body).await?;
            output(c, &v, |v| {
                emit(format!("Updated consumer {id}"));
                print_object(v);
            });
        }
        Cmd::Disable { id } => {
            let v = c.call(Method::POST, &["v1", "consumers", &id, "disable"], &[], None).await?;
            output(c, &v, |_| {
                emit(format!("Disabled consumer {id}: its keys, clients and tokens stop working"))
            });
        }
        Cmd::Enable { id } => {
            let v = c.call(Method::POST, &["v1", "consumers", &id, "enable"], &[], None).await?;
            output(c, &v, |_| emit(format!("Enabled consumer {id}")));
        }
    }
    Ok(ExitCode::SUCCESS)
}
