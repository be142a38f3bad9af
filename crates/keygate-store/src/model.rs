//! What the store keeps, as plain data.

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
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ConsumerPatch {
    pub name: Option<String>,
    pub metadata: Option<Value>,
    pub disabled: Option<bool>,
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
    pub updated_at: i64,
}

/// One secret of a key. A key has one secret, or several during a rotation's overlap window.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySecret {
    pub hash: SecretHash,
    pub key_id: String,
    pub start: String,
    pub created_at: i64,
    /// When this secret stops working (end of a rotation's overlap window).
    pub expires_at: Option<i64>,
}

/// What the verify path needs to decide about one presented secret.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretRecord {
    pub hash: SecretHash,
    pub secret_expires_at: Option<i64>,
    pub key: ApiKey,
    pub consumer_disabled: bool,
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
}
