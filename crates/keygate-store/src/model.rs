//! What the store keeps, as plain data.

use keygate_core::limits::{Quota, RateLimit};
use keygate_core::{Environment, SecretHash};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    pub id: String,
    pub name: String,
    pub metadata: Value,
    pub disabled: bool,
    /// Keygate's own consumer, which holds admin keys.
    pub system: bool,
    /// The plan: rate limits that keys without their own inherit.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// The API provider's own id for this account; unique when set.
    pub external_id: Option<String>,
    /// What Keygate does when one of this consumer's credentials is reported leaked.
    pub leak_policy: LeakPolicy,
    pub created_at: i64,
    pub updated_at: i64,
    /// The user (a developer of the portal) who owns this consumer, their "application".
    pub owner_id: Option<String>,
    /// The plan this consumer is on: its rate limits are then the plan's (`rate_limits` reads them).
    pub plan_id: Option<String>,
    /// Read only: the owner is disabled (suspended), which stops this consumer as if it were disabled.
    pub owner_disabled: bool,
}

impl Consumer {
    /// A consumer with the fields every consumer has: enabled, no plan, no owner, the default leak policy.
    pub fn new(id: String, name: String, metadata: Value, now: i64) -> Self {
        Consumer {
            id,
            name,
            metadata,
            disabled: false,
            system: false,
            rate_limits: None,
            external_id: None,
            leak_policy: LeakPolicy::default(),
            created_at: now,
            updated_at: now,
            owner_id: None,
            plan_id: None,
            owner_disabled: false,
        }
    }

    /// Does anything stop this consumer's credentials (disabled itself, or its owner suspended)?
    pub fn stopped(&self) -> bool {
        self.disabled || self.owner_disabled
    }
}

/// A named, reusable set of usage controls that consumers are put on: the operator's offer to the
/// portal's developers (and to anyone's consumers).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    /// Rate limits of every key (without its own) and client of the consumers on this plan.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// The quota each new key of a consumer on this plan starts with (with its refill).
    pub quota: Option<Quota>,
    /// The scopes keys and clients of its consumers may hold; `None`: any.
    pub allowed_scopes: Option<Vec<String>>,
    /// The longest a new key may live, in seconds; `None`: no cap.
    pub key_lifetime_seconds: Option<i64>,
    /// May portal developers choose it for an application?
    pub self_service: bool,
    /// The plan a new portal application gets when its developer chooses none (at most one plan).
    pub is_default: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A change to a plan. `Some(None)` clears an optional field.
#[derive(Debug, Clone, Default)]
pub struct PlanPatch {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub rate_limits: Option<Option<Vec<RateLimit>>>,
    pub quota: Option<Option<Quota>>,
    pub allowed_scopes: Option<Option<Vec<String>>>,
    pub key_lifetime_seconds: Option<Option<i64>>,
    pub self_service: Option<bool>,
    pub is_default: Option<bool>,
    pub updated_at: i64,
}

/// What Keygate does with a credential a secret-scanning partner reports as exposed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakPolicy {
    /// Revoke it at once, and report `credential.leaked` (the default: a public secret is a used secret).
    #[default]
    Revoke,
    /// Only report `credential.leaked`; the consumer's owner decides.
    Notify,
}

impl LeakPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakPolicy::Revoke => "revoke",
            LeakPolicy::Notify => "notify",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "revoke" => Some(LeakPolicy::Revoke),
            "notify" => Some(LeakPolicy::Notify),
            _ => None,
        }
    }
}

/// How to find one consumer other than by id.
#[derive(Debug, Clone, Copy)]
pub enum ConsumerLookup<'a> {
    ExternalId(&'a str),
    /// The oldest consumer with exactly this name.
    Name(&'a str),
}

/// Which consumers to list besides all of them.
#[derive(Debug, Clone, Copy)]
pub enum ConsumersOf<'a> {
    /// Owned by this user.
    Owner(&'a str),
    /// On this plan.
    Plan(&'a str),
}

#[derive(Debug, Clone, Default)]
pub struct ConsumerPatch {
    pub name: Option<String>,
    pub metadata: Option<Value>,
    pub disabled: Option<bool>,
    /// `Some(None)` removes the plan's rate limits.
    pub rate_limits: Option<Option<Vec<RateLimit>>>,
    /// `Some(None)` removes the external id.
    pub external_id: Option<Option<String>>,
    pub leak_policy: Option<LeakPolicy>,
    /// `Some(None)` takes the consumer off its plan.
    pub plan_id: Option<Option<String>>,
    /// `Some(None)`: no owner.
    pub owner_id: Option<Option<String>>,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub consumer_id: String,
    pub name: String,
    pub environment: Environment,
    pub scopes: Vec<String>,
    pub metadata: Value,
    pub expires_at: Option<i64>,
    pub disabled: bool,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Visible start of the newest secret, e.g. `kg_live_3xAb`.
    pub start: String,
    /// `None`: inherit the consumer's rate limits. `Some([])`: no limits.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// CIDR ranges the key may be used from; `None`: anywhere.
    pub allowed_ips: Option<Vec<String>>,
    /// As last flushed; the running server's in-memory count is newer.
    pub quota: Option<Quota>,
    pub quota_refilled_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub last_used_ip: Option<String>,
    /// Brought in by import rather than generated by Keygate.
    pub imported: bool,
}

impl ApiKey {
    /// A key with the fields every key has, and no usage controls.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        consumer_id: String,
        name: String,
        environment: Environment,
        scopes: Vec<String>,
        metadata: Value,
        expires_at: Option<i64>,
        start: String,
        now: i64,
    ) -> Self {
        ApiKey {
            id,
            consumer_id,
            name,
            environment,
            scopes,
            metadata,
            expires_at,
            disabled: false,
            revoked_at: None,
            created_at: now,
            updated_at: now,
            start,
            rate_limits: None,
            allowed_ips: None,
            quota: None,
            quota_refilled_at: None,
            last_used_at: None,
            last_used_ip: None,
            imported: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub metadata: Option<Value>,
    /// `Some(None)` clears the expiry.
    pub expires_at: Option<Option<i64>>,
    pub disabled: Option<bool>,
    /// Revokes the key at this time. Irreversible.
    pub revoked_at: Option<i64>,
    /// `Some(None)`: inherit the consumer's limits again.
    pub rate_limits: Option<Option<Vec<RateLimit>>>,
    /// `Some(None)`: usable from anywhere again.
    pub allowed_ips: Option<Option<Vec<String>>>,
    /// `Some(None)`: no quota. Setting a quota also sets its refill clock, to `quota_refilled_at` or
    /// else `updated_at`.
    pub quota: Option<Option<Quota>>,
    pub quota_refilled_at: Option<i64>,
    pub updated_at: i64,
}

/// One stored secret (its hash) of an API key or an OAuth client. An owner has one secret, or several
/// during a rotation's overlap window.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSecret {
    pub hash: SecretHash,
    /// The key's or client's id.
    pub owner_id: String,
    pub start: String,
    pub created_at: i64,
    /// When this secret stops working (end of a rotation's overlap window).
    pub expires_at: Option<i64>,
}

impl StoredSecret {
    /// A live secret of `owner_id` (a key or client id), shown to people as `start`.
    pub fn new(hash: SecretHash, owner_id: &str, start: &str, now: i64) -> Self {
        StoredSecret {
            hash,
            owner_id: owner_id.to_string(),
            start: start.to_string(),
            created_at: now,
            expires_at: None,
        }
    }
}

/// What the verify path needs to decide about one presented secret.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretRecord {
    pub hash: SecretHash,
    pub secret_expires_at: Option<i64>,
    pub key: ApiKey,
    pub consumer_disabled: bool,
    pub consumer_rate_limits: Option<Vec<RateLimit>>,
}

/// Time-bucket size of usage counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }

    pub fn millis(self) -> i64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }

    /// Start of the bucket holding `ms`.
    pub fn bucket(self, ms: i64) -> i64 {
        ms - ms.rem_euclid(self.millis())
    }
}

/// What the flusher writes for one key: counts since the last flush, and the newest in-memory state.
#[derive(Debug, Clone)]
pub struct KeyUsage {
    pub key_id: String,
    pub consumer_id: String,
    /// The time the counts are attributed to (the flush time; at most one flush interval off).
    pub at: i64,
    /// Decision code and count.
    pub counts: Vec<(&'static str, u64)>,
    pub last_used: Option<(i64, Option<String>)>,
    /// Quota remaining and its refill clock.
    pub quota: Option<(u64, i64)>,
    /// How much each refill adds (for the `quota.low` threshold), if the quota refills.
    pub quota_refill: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub key_id: Option<String>,
    pub consumer_id: Option<String>,
    pub granularity: Granularity,
    pub from: i64,
    pub to: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub bucket_start: i64,
    pub code: String,
    pub count: i64,
}

/// An audit event to write along with a change.
#[derive(Debug, Clone)]
pub struct NewAudit {
    pub id: String,
    pub at: i64,
    /// Id of the credential that made the change, or `system`.
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub ip: Option<String>,
    /// What changed. Never a secret.
    pub details: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub id: String,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub ip: Option<String>,
    pub details: Value,
    /// The name of the actor's key, if the actor is a key that still exists.
    pub actor_name: Option<String>,
}

/// One audited change, as the nodes sharing a database follow them ([`crate::Store::changes_after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Change number, assigned in commit order.
    pub seq: i64,
    /// The audit action, e.g. `key.revoke`.
    pub action: String,
    pub target_id: String,
    /// Made by this node (through this store): its caches already reflect it.
    pub local: bool,
}

/// Quota a node took from a key's shared pool to admit on its own ([`crate::Store::lease_quota`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaLease {
    /// Units taken (0: the pool cannot give the minimum asked for).
    pub granted: u64,
    /// What is left in the pool after this lease.
    pub pool_left: u64,
    /// Start of the refill period the units belong to (they are void once the next refill is due).
    pub refilled_at: i64,
    /// Changes when the pool is set, reset or refilled: units of an older epoch are never given back.
    pub epoch: i64,
}

/// An admin change of a quota's remaining uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaChange {
    Set(u64),
    Add(u64),
    /// Back to the refill amount, the period starting now.
    Reset,
}
