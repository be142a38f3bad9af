//! Webhook endpoints, the event outbox and delivery attempts.
//!
//! Contracts the server relies on:
//! - An audited change that reports an event (see `keygate_core::events::event_for_action`) writes the
//!   event, and one pending delivery per enabled endpoint whose filter takes it, **in the transaction of
//!   the change**: a change is never committed without its event, nor an event without its change.
//! - Events written apart from a change ([`EventStore::insert_events`]) carry a `dedup` key: a second
//!   event with the same key is ignored, so a sweep that runs again reports nothing twice.
//! - Deliveries are queued for every endpoint whose filter takes the event, enabled or not; only enabled
//!   endpoints' deliveries are claimed, so a disabled endpoint's wait until it is enabled (or expire).
//! - [`EventStore::claim_deliveries`] leases due deliveries (their next attempt moves to the lease's
//!   end), so a node that dies while delivering leaves them due again when the lease runs out: every
//!   event is delivered at least once, with the same id each time. A claim leaves an endpoint at most 16
//!   leases at once (1 while it is failing), so one dead receiver cannot hold every slot; the count is
//!   read before the lease is taken, so concurrent claimers (several nodes) may together exceed it, but
//!   never share a delivery.
//! - [`EventStore::finish_attempt`] applies only while the caller still holds the lease: a late finisher
//!   whose lease ran out (and whose delivery was leased again) changes nothing.

use crate::{NewAudit, Page, Result};
use async_trait::async_trait;

/// Where events are sent.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEndpoint {
    pub id: String,
    pub url: String,
    /// Event types this endpoint takes (`*`: all).
    pub events: Vec<String>,
    pub description: Option<String>,
    pub enabled: bool,
    /// The signing secret, sealed under the master key (never stored in clear).
    pub secret_sealed: Vec<u8>,
    /// After a rotation with an overlap: the previous secret signs too, until this time.
    pub previous_secret_until: Option<i64>,
    /// When the current run of failed attempts began; `None` after a success.
    pub failing_since: Option<i64>,
    /// Why Keygate disabled the endpoint, if it did.
    pub disabled_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Default)]
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    /// `Some(None)` removes the description.
    pub description: Option<Option<String>>,
    pub enabled: Option<bool>,
    /// Set with `enabled: Some(false)` when Keygate disables it; cleared whenever it is enabled.
    pub disabled_reason: Option<String>,
    /// A new signing secret; the current one keeps signing too until `previous_until` (if given).
    pub secret_sealed: Option<Vec<u8>>,
    pub previous_until: Option<i64>,
    pub updated_at: i64,
}

/// An event written apart from an audited change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// `evt_…`; also the deliveries' `webhook-id`.
    pub id: String,
    pub event_type: String,
    pub at: i64,
    /// The exact body sent to receivers (JSON).
    pub payload: String,
    /// Events with the same key are written once.
    pub dedup: String,
}

/// A delivery whose attempt is due, leased to the caller.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: i64,
    pub endpoint_id: String,
    pub url: String,
    pub secret_sealed: Vec<u8>,
    /// The previous secret while its overlap lasts: deliveries carry both signatures.
    pub previous_secret_sealed: Option<Vec<u8>>,
    pub event_id: String,
    pub event_type: String,
    pub event_at: i64,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
    pub created_at: i64,
    /// The lease this claim holds (see [`EventStore::finish_attempt`]).
    pub leased_until: i64,
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub at: i64,
    /// The receiver's status code, if it answered.
    pub status_code: Option<u16>,
    pub latency_ms: i64,
    /// Why it failed, if it did (never a secret or a response body).
    pub error: Option<String>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Failed; try again at this time.
    Retry(i64),
    /// Failed for the last time.
    Failed,
}

impl AttemptOutcome {
    pub fn status(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retry(_) => "pending",
            AttemptOutcome::Failed => "failed",
        }
    }
}

/// A delivery as the API shows it, with its attempts (oldest first).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: i64,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub next_attempt_at: Option<i64>,
    pub created_at: i64,
    pub attempts: Vec<Attempt>,
}

/// A stored event (the outbox), for listings.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: String,
    pub event_type: String,
    pub at: i64,
    pub payload: String,
}

/// A report of an exposed secret, as received (never the secret: its hash prefix at most).
#[derive(Debug, Clone, PartialEq)]
pub struct LeakReport {
    pub id: String,
    pub at: i64,
    /// The reporter's key identifier (whose signature was checked).
    pub reporter: String,
    /// SHA-256 of the reported token, hex.
    pub token_hash: String,
    pub token_type: String,
    pub url: Option<String>,
    pub source: Option<String>,
    /// `true_positive` or `false_positive`.
    pub label: String,
    /// The credential it matched (`key`, `personal_token`, …) and its id, if any.
    pub credential: Option<(String, String)>,
    /// What Keygate did: `revoked`, `notified` or `none`.
    pub action: String,
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    async fn insert_webhook(&self, endpoint: &WebhookEndpoint, audit: &NewAudit) -> Result<()>;
    async fn get_webhook(&self, id: &str) -> Result<Option<WebhookEndpoint>>;
    async fn list_webhooks(&self, page: &Page) -> Result<Vec<WebhookEndpoint>>;
    /// `None` if there is no such endpoint.
    async fn update_webhook(
        &self,
        id: &str,
        patch: &WebhookPatch,
        audit: &NewAudit,
    ) -> Result<Option<WebhookEndpoint>>;
    /// Deletes an endpoint and its pending deliveries. False if there was none.
    async fn delete_webhook(&self, id: &str, audit: &NewAudit) -> Result<bool>;

    /// Writes an audit record (and its event) that goes with no other change.
    async fn record_audit(&self, audit: &NewAudit) -> Result<()>;
    /// Writes events apart from a change, each once per `dedup` key, with their deliveries. Returns how
    /// many were new.
    async fn insert_events(&self, events: &[NewEvent]) -> Result<u64>;
    /// Events, newest first (continue with `before`).
    async fn list_events(&self, before: Option<&str>, limit: u32) -> Result<Vec<StoredEvent>>;

    /// Up to `limit` deliveries due at `now` to enabled endpoints, each leased until `lease_until`.
    async fn claim_deliveries(&self, now: i64, lease_until: i64, limit: u32) -> Result<Vec<DueDelivery>>;
    /// Records an attempt and what follows from it, if the caller still holds the delivery's lease
    /// (`None` otherwise, changing nothing). On failure the endpoint's failure run goes on, or starts
    /// now when its previous failure is more than `new_run_after` ms old; on success it ends. Returns
    /// `Some(failing_since)` afterwards.
    async fn finish_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: &Attempt,
        outcome: AttemptOutcome,
        new_run_after: i64,
    ) -> Result<Option<Option<i64>>>;
    /// Disables an endpoint Keygate found failing since `failing_since`, with `audit`, only if it is still
    /// enabled and still in that failure run (an admin's change in between wins). True if it did.
    async fn disable_failing_webhook(
        &self,
        id: &str,
        failing_since: i64,
        reason: &str,
        audit: &NewAudit,
    ) -> Result<bool>;
    /// An endpoint's deliveries, newest first (continue with `before`, a delivery id).
    async fn list_deliveries(
        &self,
        endpoint_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Delivery>>;
    /// Deletes finished deliveries (and their attempts) and events created before `before`; pending
    /// deliveries that old (their endpoint stayed disabled) are given up first.
    async fn expire_events(&self, before: i64) -> Result<u64>;

    /// Keeps a leak report (and the audit record of what was done about it) in one transaction.
    async fn insert_leak_report(&self, report: &LeakReport, audit: Option<&NewAudit>) -> Result<()>;
    async fn list_leak_reports(&self, before: Option<&str>, limit: u32) -> Result<Vec<LeakReport>>;
    /// Whether a token with this hash was reported before as found at `url` (a partner's retry, or a
    /// replay).
    async fn leak_reported(&self, token_hash: &str, url: Option<&str>) -> Result<bool>;
}
