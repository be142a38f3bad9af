//! The events Keygate reports to webhooks: one catalogue, and which audited change reports which event.
//!
//! Every change Keygate audits that a receiver would care about becomes an event *in the same
//! transaction* as the change (the store looks the action up in [`event_for_action`]); the rest
//! (`key.expiring`, quota and rate-limit events) are written by the server where it learns of them.

/// Every event type, with what it reports. Webhook filters may name only these (or `*`).
pub const EVENT_TYPES: &[(&str, &str)] = &[
    ("consumer.created", "a consumer was created"),
    ("consumer.updated", "a consumer's name, metadata, limits or policy changed"),
    ("consumer.disabled", "a consumer was disabled: its keys, clients and tokens stop working"),
    ("consumer.enabled", "a consumer was enabled again"),
    ("key.created", "an API key was created or imported"),
    ("key.updated", "an API key's settings or quota changed"),
    ("key.rotated", "an API key got a new secret; the old one works until the overlap ends"),
    ("key.disabled", "an API key was disabled"),
    ("key.enabled", "an API key was enabled again"),
    ("key.revoked", "an API key was revoked for good"),
    ("key.expiring", "an API key expires within 7 days"),
    ("client.created", "an OAuth client was created"),
    ("client.updated", "an OAuth client's settings changed"),
    ("client.rotated", "an OAuth client got a new secret"),
    ("client.disabled", "an OAuth client was disabled"),
    ("client.enabled", "an OAuth client was enabled again"),
    ("client.deleted", "an OAuth client was deleted"),
    ("user.created", "a user was created"),
    ("user.updated", "a user's profile, scopes or password changed"),
    ("user.disabled", "a user was disabled: their tokens and grants stop working"),
    ("user.enabled", "a user was enabled again"),
    ("user.deleted", "a user was deleted"),
    ("token.created", "a personal access token was created"),
    ("token.rotated", "a personal access token was rotated"),
    ("token.revoked", "tokens were revoked: a personal access token, a grant or all of a client's"),
    ("quota.low", "a key's quota fell to the low threshold (a share of its refill, or uses left)"),
    ("quota.exhausted", "a key's quota reached zero"),
    ("rate_limit.exceeded", "a key was refused for its rate limit (at most one event per key per minute)"),
    ("credential.leaked", "a secret-scanning partner reported a credential as exposed"),
    ("signing_key.rotated", "a new JWT signing key was made (on schedule or by an admin)"),
    ("signing_key.revoked", "a JWT signing key was revoked in an emergency"),
    ("webhook.disabled", "a webhook endpoint was disabled after failing for too long"),
];

/// The audited actions that report an event, and the event each reports.
const ACTION_EVENTS: &[(&str, &str)] = &[
    ("consumer.create", "consumer.created"),
    ("consumer.update", "consumer.updated"),
    ("consumer.disable", "consumer.disabled"),
    ("consumer.enable", "consumer.enabled"),
    ("key.create", "key.created"),
    ("key.import", "key.created"),
    ("key.create_local_admin", "key.created"),
    ("key.update", "key.updated"),
    ("key.quota", "key.updated"),
    ("key.rotate", "key.rotated"),
    ("key.disable", "key.disabled"),
    ("key.enable", "key.enabled"),
    ("key.revoke", "key.revoked"),
    ("client.create", "client.created"),
    ("client.update", "client.updated"),
    ("client.rotate_secret", "client.rotated"),
    ("client.disable", "client.disabled"),
    ("client.enable", "client.enabled"),
    ("client.delete", "client.deleted"),
    ("client.revoke_tokens", "token.revoked"),
    ("user.create", "user.created"),
    ("user.update", "user.updated"),
    ("user.set_password", "user.updated"),
    ("user.disable", "user.disabled"),
    ("user.enable", "user.enabled"),
    ("user.delete", "user.deleted"),
    ("pat.create", "token.created"),
    ("pat.rotate", "token.rotated"),
    ("pat.revoke", "token.revoked"),
    ("grant.revoke", "token.revoked"),
    ("token.revoke", "token.revoked"),
    ("credential.leak", "credential.leaked"),
    ("signing_key.rotate", "signing_key.rotated"),
    ("signing_key.revoke", "signing_key.revoked"),
    ("webhook.auto_disable", "webhook.disabled"),
];

/// The event an audited action reports, if any.
pub fn event_for_action(action: &str) -> Option<&'static str> {
    ACTION_EVENTS.iter().find(|(a, _)| *a == action).map(|(_, e)| *e)
}

/// Whether `name` is an event type (or `*`, every event), for webhook filters.
pub fn is_event_filter(name: &str) -> bool {
    name == "*" || EVENT_TYPES.iter().any(|(t, _)| *t == name)
}

/// The body receivers get, in the Standard Webhooks shape: `{"type", "timestamp", "data"}`. `data`
/// never holds a secret (it is built from audit details and ids).
pub fn payload(event_type: &str, at_ms: i64, data: serde_json::Value) -> String {
    let timestamp = chrono::DateTime::from_timestamp_millis(at_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({"type": event_type, "timestamp": timestamp, "data": data}).to_string()
}

/// The `data` of an event that reports an audited change.
pub fn audit_data(
    target_type: &str,
    target_id: &str,
    actor: &str,
    details: &serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({"object": target_type, "id": target_id, "actor": actor, "details": details})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_reports_a_catalogued_event_and_every_event_is_unique() {
        for (action, event) in ACTION_EVENTS {
            assert!(is_event_filter(event), "{action} reports {event}, which is not in EVENT_TYPES");
        }
        let mut names: Vec<_> = EVENT_TYPES.iter().map(|(t, _)| *t).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EVENT_TYPES.len());
        assert_eq!(event_for_action("key.revoke"), Some("key.revoked"));
        assert_eq!(event_for_action("scope.describe"), None);
        assert!(!is_event_filter("key.*") && !is_event_filter("") && is_event_filter("*"));
    }
}
