//! `keygate webhooks …` and `keygate leaks`

use std::process::ExitCode;

use clap::Subcommand;
use keygate_server::routes::webhooks::{CreateWebhook, RotateWebhookSecret, UpdateWebhook};
use reqwest::Method;
use serde_json::Value;

use super::CliResult;
use super::args::{self, PageArgs};
use super::http::Api;
use super::output::{cell, emit, field, items, output, print_next, print_object, print_secret, table};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Register an endpoint; its signing secret (whsec_…) is printed once.
    /// (The URL is an argument, not `--url`: that global option names the Keygate server.)
    Create {
        /// Where events are POSTed (https; http only with webhooks.allow_private).
        #[arg(value_name = "URL")]
        endpoint: String,
        /// An event type to send (repeatable), or * for all; `keygate webhooks event-types` lists them.
        #[arg(long = "event", value_name = "TYPE", required = true)]
        events: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List endpoints.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one endpoint.
    Show {
        #[arg(value_parser = args::Quiet(args::webhook_id))]
        id: String,
    },
    /// Change an endpoint's URL, events or description.
    Update {
        #[arg(value_parser = args::Quiet(args::webhook_id))]
        id: String,
        /// A new URL for the endpoint.
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// Replace the event types (repeatable).
        #[arg(long = "event", value_name = "TYPE")]
        events: Vec<String>,
        #[arg(long, conflicts_with = "no_description")]
        description: Option<String>,
        /// Remove the description.
        #[arg(long)]
        no_description: bool,
    },
    /// Stop sending to an endpoint (deliveries wait until it is enabled).
    Disable {
        #[arg(value_parser = args::Quiet(args::webhook_id))]
        id: String,
    },
    /// Send to an endpoint again (also after Keygate disabled it for failing).
    Enable {
        #[arg(value_parser = args::Quiet(args::webhook_id))]
        id: String,
    },
    /// Delete an endpoint and its pending deliveries.
    Delete {
        #[arg(value_parser = args::Quiet(args::webhook_id))]
        id: String,
    },
    /// Replace the signing secret (printed once). With --overlap, deliveries are signed with both
    /// secrets until it ends, so the receiver can switch without a gap.
    RotateSecret {
        #[arg(value_parser = args::Quiet(args::webhook_id))]
        id: String,
        /// How long the old secret keeps signing too, e.g. 1h or 1d (at most 7d).
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs, default_value = "0")]
        overlap: u64,
    },
    /// An endpoint's deliveries, newest first, with each attempt's status code, latency and error.
    Deliveries {
        #[arg(value_parser = args::Quiet(args::webhook_id))]
        id: String,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Continue with deliveries older than this one (printed at the end of the previous page).
        #[arg(long)]
        before: Option<i64>,
    },
    /// The event types an endpoint can take.
    EventTypes,
}

fn print_webhook_with_secret(v: &Value, what: &str) {
    emit(format!("{what} webhook {} -> {}", cell(&v["id"]), cell(&v["url"])));
    print_secret("Signing secret", &v["secret"]);
    emit("Verify each delivery's webhook-signature with it (any Standard Webhooks library does).");
}

pub async fn run(c: &Api, cmd: Cmd) -> CliResult {
    match cmd {
        Cmd::Create { endpoint, events, description, disabled } => {
            let body =
                CreateWebhook { url: endpoint, events, description, enabled: disabled.then_some(false) };
            let v = c.send(Method::POST, &["v1", "webhooks"], &body).await?;
            output(c, &v, |v| print_webhook_with_secret(v, "Created"));
        }
        Cmd::List { page } => {
            let v = c.call(Method::GET, &["v1", "webhooks"], &page.query(), None).await?;
            output(c, &v, |v| {
                table(
                    items(v),
                    &[
                        ("ID", &field("id")),
                        ("URL", &field("url")),
                        ("EVENTS", &|w: &Value| {
                            w["events"]
                                .as_array()
                                .map(|a| a.iter().map(cell).collect::<Vec<_>>().join(","))
                                .unwrap_or_default()
                        }),
                        ("ENABLED", &field("enabled")),
                        ("FAILING SINCE", &field("failing_since")),
                    ],
                );
                print_next(v);
            });
        }
        Cmd::Show { id } => {
            let v = c.call(Method::GET, &["v1", "webhooks", &id], &[], None).await?;
            output(c, &v, print_object);
        }
        Cmd::Update { id, endpoint, events, description, no_description } => {
            if endpoint.is_none() && events.is_empty() && description.is_none() && !no_description {
                return Err(super::Failure::usage(
                    "nothing to change: give --endpoint, --event, --description or --no-description",
                ));
            }
            let body = UpdateWebhook {
                url: endpoint,
                events: (!events.is_empty()).then_some(events),
                description: if no_description { Some(None) } else { description.map(Some) },
                enabled: None,
            };
            let v = c.send(Method::PATCH, &["v1", "webhooks", &id], &body).await?;
            output(c, &v, print_object);
        }
        Cmd::Disable { id } => {
            let body = UpdateWebhook { enabled: Some(false), ..UpdateWebhook::default() };
            let v = c.send(Method::PATCH, &["v1", "webhooks", &id], &body).await?;
            output(c, &v, |_| {
                emit(format!("Disabled webhook {id}; its deliveries wait until it is enabled"))
            });
        }
        Cmd::Enable { id } => {
            let body = UpdateWebhook { enabled: Some(true), ..UpdateWebhook::default() };
            let v = c.send(Method::PATCH, &["v1", "webhooks", &id], &body).await?;
            output(c, &v, |_| emit(format!("Enabled webhook {id}")));
        }
        Cmd::Delete { id } => {
            c.call(Method::DELETE, &["v1", "webhooks", &id], &[], None).await?;
            if c.json {
                println!("{}", serde_json::json!({"deleted": id}));
            } else {
                emit(format!("Deleted webhook {id}"));
            }
        }
        Cmd::RotateSecret { id, overlap } => {
            let body = RotateWebhookSecret { overlap_seconds: overlap };
            let v = c.send(Method::POST, &["v1", "webhooks", &id, "rotate-secret"], &body).await?;
            output(c, &v, |v| print_webhook_with_secret(v, "Rotated the secret of"));
        }
        Cmd::Deliveries { id, limit, before } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(before.map(|b| ("before", b.to_string())));
            let v = c.call(Method::GET, &["v1", "webhooks", &id, "deliveries"], &q, None).await?;
            output(c, &v, |v| {
                table(
                    items(v),
                    &[
                        ("EVENT", &field("event_id")),
                        ("TYPE", &field("event_type")),
                        ("STATUS", &field("status")),
                        ("ATTEMPTS", &|d: &Value| d["attempts"].as_array().map_or(0, Vec::len).to_string()),
                        ("LAST", &|d: &Value| {
                            let last = d["attempts"].as_array().and_then(|a| a.last());
                            last.map(|a| {
                                let code =
                                    a["status_code"].as_u64().map_or("-".to_string(), |c| c.to_string());
                                let err = a["error"].as_str().unwrap_or("");
                                format!("{code} {}ms {err}", cell(&a["latency_ms"]))
                            })
                            .unwrap_or_default()
                        }),
                        ("NEXT ATTEMPT", &field("next_attempt_at")),
                    ],
                );
                if let Some(b) = v["next_before"].as_i64() {
                    emit(format!("More: --before {b}"));
                }
            });
        }
        Cmd::EventTypes => {
            let v = c.call(Method::GET, &["v1", "event-types"], &[], None).await?;
            output(c, &v, |v| {
                table(
                    v.as_array().map(Vec::as_slice).unwrap_or(&[]),
                    &[("TYPE", &field("type")), ("WHAT", &field("description"))],
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct LeaksArgs {
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Continue with reports older than this one (printed at the end of the previous page).
    #[arg(long)]
    before: Option<String>,
}

/// `keygate leaks`: reports of leaked credentials received from secret-scanning partners.
pub async fn leaks(c: &Api, a: LeaksArgs) -> CliResult {
    let mut q = vec![("limit", a.limit.to_string())];
    q.extend(a.before.map(|b| ("before", b)));
    let v = c.call(Method::GET, &["v1", "leaks"], &q, None).await?;
    output(c, &v, |v| {
        table(
            items(v),
            &[
                ("AT", &field("at")),
                ("LABEL", &field("label")),
                ("CREDENTIAL", &|r: &Value| {
                    format!("{} {}", cell(&r["credential_type"]), cell(&r["credential_id"]))
                }),
                ("ACTION", &field("action")),
                ("FOUND AT", &field("url")),
            ],
        );
        if let Some(b) = v["next_before"].as_str() {
            emit(format!("More: --before {b}"));
        }
    });
    Ok(ExitCode::SUCCESS)
}
