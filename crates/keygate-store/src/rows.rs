//! Reading stored records back: one mapper per record shape, written once and stamped out for each
//! backend's row type by [`row_mappers!`], and the JSON helpers both backends write with. A column's
//! name and meaning are the same in every backend; only the row type differs.

use serde::Serialize;

use crate::{Result, StoreError};

/// A value as the JSON text Keygate stores.
pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
}

pub(crate) fn parse_json(s: &str, what: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn opt_json<T: Serialize>(v: &Option<T>) -> Result<Option<String>> {
    v.as_ref().map(to_json).transpose()
}

/// The record mappers for one row type (`sqlx::sqlite::SqliteRow`, `sqlx::postgres::PgRow`). Invoke it in
/// a module that has the backend's `map_err` in scope.
macro_rules! row_mappers {
    ($row:ty) => {
        use keygate_core::limits::Quota;
        use keygate_core::{Environment, SecretHash};
        use serde::de::DeserializeOwned;
        use sqlx::Row;

        use crate::events::{LeakReport, WebhookEndpoint};
        use crate::oauth::{AccessTokenRecord, GrantType, OAuthClient, SigningKey, TokenFormat};
        use crate::rows::parse_json;
        use crate::users::{AuthCode, DeviceAuth, Grant, PersonalToken, RefreshRecord, TokenFamily, User};
        use crate::{ApiKey, AuditEvent, Consumer, LeakPolicy, Result, StoreError};

        pub(crate) fn parse_opt<T: DeserializeOwned>(row: &$row, col: &str) -> Result<Option<T>> {
            let text: Option<&str> = row.try_get(col).map_err(map_err)?;
            text.map(|t| serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("{col}: {e}"))))
                .transpose()
        }

        pub(crate) fn consumer_from_row(row: &$row) -> Result<Consumer> {
            Ok(Consumer {
                id: row.try_get("id").map_err(map_err)?,
                name: row.try_get("name").map_err(map_err)?,
                metadata: parse_json(row.try_get("metadata").map_err(map_err)?, "consumer metadata")?,
                disabled: row.try_get("disabled").map_err(map_err)?,
                system: row.try_get("system").map_err(map_err)?,
                rate_limits: parse_opt(row, "rate_limits")?,
                external_id: row.try_get("external_id").map_err(map_err)?,
                leak_policy: {
                    let p: &str = row.try_get("leak_policy").map_err(map_err)?;
                    LeakPolicy::parse(p)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown leak policy {p:?}")))?
                },
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
                owner_id: row.try_get("owner_id").map_err(map_err)?,
                plan_id: row.try_get("plan_id").map_err(map_err)?,
                owner_disabled: row.try_get("owner_disabled").map_err(map_err)?,
            })
        }

        pub(crate) fn plan_from_row(row: &$row) -> Result<crate::Plan> {
            Ok(crate::Plan {
                id: row.try_get("id").map_err(map_err)?,
                name: row.try_get("name").map_err(map_err)?,
                description: row.try_get("description").map_err(map_err)?,
                rate_limits: parse_opt(row, "rate_limits")?,
                quota: parse_opt(row, "quota")?,
                allowed_scopes: parse_opt(row, "allowed_scopes")?,
                key_lifetime_seconds: row.try_get("key_lifetime_seconds").map_err(map_err)?,
                self_service: row.try_get("self_service").map_err(map_err)?,
                is_default: row.try_get("is_default").map_err(map_err)?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
            })
        }

        pub(crate) fn key_from_row(row: &$row) -> Result<ApiKey> {
            let env: &str = row.try_get("environment").map_err(map_err)?;
            let scopes: &str = row.try_get("scopes").map_err(map_err)?;
            Ok(ApiKey {
                id: row.try_get("id").map_err(map_err)?,
                consumer_id: row.try_get("consumer_id").map_err(map_err)?,
                name: row.try_get("name").map_err(map_err)?,
                environment: Environment::parse(env)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown environment {env:?}")))?,
                scopes: serde_json::from_str(scopes)
                    .map_err(|e| StoreError::Corrupt(format!("key scopes: {e}")))?,
                metadata: parse_json(row.try_get("metadata").map_err(map_err)?, "key metadata")?,
                expires_at: row.try_get("expires_at").map_err(map_err)?,
                disabled: row.try_get("disabled").map_err(map_err)?,
                revoked_at: row.try_get("revoked_at").map_err(map_err)?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
                start: row.try_get("start").map_err(map_err)?,
                rate_limits: parse_opt(row, "rate_limits")?,
                allowed_ips: parse_opt(row, "allowed_ips")?,
                quota: match row.try_get::<Option<i64>, _>("quota_remaining").map_err(map_err)? {
                    Some(remaining) => Some(Quota {
                        remaining: remaining.max(0) as u64,
                        refill: parse_opt(row, "quota_refill")?,
                    }),
                    None => None,
                },
                quota_refilled_at: row.try_get("quota_refilled_at").map_err(map_err)?,
                last_used_at: row.try_get("last_used_at").map_err(map_err)?,
                last_used_ip: row.try_get("last_used_ip").map_err(map_err)?,
                imported: row.try_get("imported").map_err(map_err)?,
            })
        }

        pub(crate) fn audit_from_row(row: &$row) -> Result<AuditEvent> {
            Ok(AuditEvent {
                id: row.try_get("id").map_err(map_err)?,
                at: row.try_get("at").map_err(map_err)?,
                actor: row.try_get("actor").map_err(map_err)?,
                action: row.try_get("action").map_err(map_err)?,
                target_type: row.try_get("target_type").map_err(map_err)?,
                target_id: row.try_get("target_id").map_err(map_err)?,
                ip: row.try_get("ip").map_err(map_err)?,
                details: parse_json(row.try_get("details").map_err(map_err)?, "audit details")?,
                actor_name: row.try_get("actor_name").map_err(map_err)?,
            })
        }

        pub(crate) fn hash_from_row(row: &$row) -> Result<SecretHash> {
            let bytes: &[u8] = row.try_get("hash").map_err(map_err)?;
            SecretHash::from_slice(bytes)
                .ok_or_else(|| StoreError::Corrupt("secret hash is not 32 bytes".into()))
        }

        pub(crate) fn json_list(row: &$row, col: &str) -> Result<Vec<String>> {
            let text: &str = row.try_get(col).map_err(map_err)?;
            serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
        }

        pub(crate) fn client_from_row(row: &$row) -> Result<OAuthClient> {
            Ok(OAuthClient {
                id: row.try_get("id").map_err(map_err)?,
                consumer_id: row.try_get("consumer_id").map_err(map_err)?,
                name: row.try_get("name").map_err(map_err)?,
                grant_types: json_list(row, "grant_types")?
                    .iter()
                    .map(|g| {
                        GrantType::parse(g).ok_or_else(|| StoreError::Corrupt(format!("grant type {g:?}")))
                    })
                    .collect::<Result<_>>()?,
                scopes: json_list(row, "scopes")?,
                audiences: json_list(row, "audiences")?,
                token_format: {
                    let f: &str = row.try_get("token_format").map_err(map_err)?;
                    TokenFormat::parse(f).ok_or_else(|| StoreError::Corrupt(format!("token format {f:?}")))?
                },
                token_lifetime_seconds: row.try_get("token_lifetime_seconds").map_err(map_err)?,
                confidential: row.try_get("confidential").map_err(map_err)?,
                disabled: row.try_get("disabled").map_err(map_err)?,
                tokens_revoked_before: row.try_get("tokens_revoked_before").map_err(map_err)?,
                secret_start: row.try_get("secret_start").map_err(map_err)?,
                auth_method: row.try_get("auth_method").map_err(map_err)?,
                jwks: match row.try_get::<Option<&str>, _>("jwks").map_err(map_err)? {
                    Some(s) => Some(
                        serde_json::from_str(s)
                            .map_err(|e| StoreError::Corrupt(format!("client jwks: {e}")))?,
                    ),
                    None => None,
                },
                redirect_uris: json_list(row, "redirect_uris")?,
                refresh_idle_seconds: row.try_get("refresh_idle_seconds").map_err(map_err)?,
                refresh_absolute_seconds: row.try_get("refresh_absolute_seconds").map_err(map_err)?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
            })
        }

        pub(crate) fn token_from_row(row: &$row) -> Result<AccessTokenRecord> {
            Ok(AccessTokenRecord {
                hash: hash_from_row(row)?,
                jti: row.try_get("jti").map_err(map_err)?,
                client_id: row.try_get("client_id").map_err(map_err)?,
                subject: row.try_get("subject").map_err(map_err)?,
                scopes: json_list(row, "scopes")?,
                audiences: json_list(row, "audiences")?,
                issued_at: row.try_get("issued_at").map_err(map_err)?,
                expires_at: row.try_get("expires_at").map_err(map_err)?,
                revoked_at: row.try_get("revoked_at").map_err(map_err)?,
                family_id: row.try_get("family_id").map_err(map_err)?,
                source: row.try_get("source").map_err(map_err)?,
                jkt: row.try_get("jkt").map_err(map_err)?,
            })
        }

        pub(crate) fn signing_key_from_row(row: &$row) -> Result<SigningKey> {
            let jwk: &str = row.try_get("public_jwk").map_err(map_err)?;
            Ok(SigningKey {
                kid: row.try_get("kid").map_err(map_err)?,
                alg: row.try_get("alg").map_err(map_err)?,
                private_der: row.try_get("private_der").map_err(map_err)?,
                public_jwk: serde_json::from_str(jwk)
                    .map_err(|e| StoreError::Corrupt(format!("public_jwk: {e}")))?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                active_from: row.try_get("active_from").map_err(map_err)?,
                retired_at: row.try_get("retired_at").map_err(map_err)?,
                publish_until: row.try_get("publish_until").map_err(map_err)?,
                revoked_at: row.try_get("revoked_at").map_err(map_err)?,
            })
        }

        pub(crate) fn user_from_row(row: &$row) -> Result<User> {
            Ok(User {
                id: row.try_get("id").map_err(map_err)?,
                username: row.try_get("username").map_err(map_err)?,
                email: row.try_get("email").map_err(map_err)?,
                display_name: row.try_get("display_name").map_err(map_err)?,
                password_hash: row.try_get("password_hash").map_err(map_err)?,
                allowed_scopes: parse_opt(row, "allowed_scopes")?,
                roles: json_list(row, "roles")?,
                disabled: row.try_get("disabled").map_err(map_err)?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
                last_login_at: row.try_get("last_login_at").map_err(map_err)?,
                email_verified_at: row.try_get("email_verified_at").map_err(map_err)?,
            })
        }

        pub(crate) fn grant_from_row(row: &$row) -> Result<Grant> {
            Ok(Grant {
                id: row.try_get("id").map_err(map_err)?,
                user_id: row.try_get("user_id").map_err(map_err)?,
                client_id: row.try_get("client_id").map_err(map_err)?,
                scopes: json_list(row, "scopes")?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
                revoked_at: row.try_get("revoked_at").map_err(map_err)?,
            })
        }

        pub(crate) fn code_from_row(row: &$row) -> Result<AuthCode> {
            Ok(AuthCode {
                hash: hash_from_row(row)?,
                client_id: row.try_get("client_id").map_err(map_err)?,
                user_id: row.try_get("user_id").map_err(map_err)?,
                grant_id: row.try_get("grant_id").map_err(map_err)?,
                redirect_uri: row.try_get("redirect_uri").map_err(map_err)?,
                code_challenge: row.try_get("code_challenge").map_err(map_err)?,
                scopes: json_list(row, "scopes")?,
                audiences: json_list(row, "audiences")?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                expires_at: row.try_get("expires_at").map_err(map_err)?,
                used_at: row.try_get("used_at").map_err(map_err)?,
                family_id: row.try_get("family_id").map_err(map_err)?,
            })
        }

        pub(crate) fn family_from_row(row: &$row) -> Result<TokenFamily> {
            Ok(TokenFamily {
                id: row.try_get("f_id").map_err(map_err)?,
                grant_id: row.try_get("f_grant_id").map_err(map_err)?,
                client_id: row.try_get("f_client_id").map_err(map_err)?,
                user_id: row.try_get("f_user_id").map_err(map_err)?,
                created_at: row.try_get("f_created_at").map_err(map_err)?,
                expires_at: row.try_get("f_expires_at").map_err(map_err)?,
                revoked_at: row.try_get("f_revoked_at").map_err(map_err)?,
                jkt: row.try_get("f_jkt").map_err(map_err)?,
            })
        }

        pub(crate) fn pat_from_row(row: &$row) -> Result<PersonalToken> {
            Ok(PersonalToken {
                id: row.try_get("id").map_err(map_err)?,
                user_id: row.try_get("user_id").map_err(map_err)?,
                name: row.try_get("name").map_err(map_err)?,
                scopes: json_list(row, "scopes")?,
                audiences: json_list(row, "audiences")?,
                hash: hash_from_row(row)?,
                start: row.try_get("start").map_err(map_err)?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
                expires_at: row.try_get("expires_at").map_err(map_err)?,
                last_used_at: row.try_get("last_used_at").map_err(map_err)?,
                last_used_ip: row.try_get("last_used_ip").map_err(map_err)?,
                revoked_at: row.try_get("revoked_at").map_err(map_err)?,
            })
        }

        pub(crate) fn device_from_row(row: &$row) -> Result<DeviceAuth> {
            Ok(DeviceAuth {
                hash: hash_from_row(row)?,
                user_code: row.try_get("user_code").map_err(map_err)?,
                client_id: row.try_get("client_id").map_err(map_err)?,
                scopes: json_list(row, "scopes")?,
                audiences: json_list(row, "audiences")?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                expires_at: row.try_get("expires_at").map_err(map_err)?,
                interval_ms: row.try_get("interval_ms").map_err(map_err)?,
                last_polled_at: row.try_get("last_polled_at").map_err(map_err)?,
                status: row.try_get("status").map_err(map_err)?,
                user_id: row.try_get("user_id").map_err(map_err)?,
                grant_id: row.try_get("grant_id").map_err(map_err)?,
                granted_scopes: parse_opt(row, "granted_scopes")?,
            })
        }

        pub(crate) fn refresh_from_row(row: &$row) -> Result<RefreshRecord> {
            Ok(RefreshRecord {
                hash: hash_from_row(row)?,
                family_id: row.try_get("family_id").map_err(map_err)?,
                scopes: json_list(row, "scopes")?,
                audiences: json_list(row, "audiences")?,
                issued_at: row.try_get("issued_at").map_err(map_err)?,
                idle_expires_at: row.try_get("idle_expires_at").map_err(map_err)?,
                used_at: row.try_get("used_at").map_err(map_err)?,
            })
        }

        pub(crate) fn endpoint_from_row(row: &$row) -> Result<WebhookEndpoint> {
            Ok(WebhookEndpoint {
                id: row.try_get("id").map_err(map_err)?,
                url: row.try_get("url").map_err(map_err)?,
                events: json_list(row, "events")?,
                description: row.try_get("description").map_err(map_err)?,
                enabled: row.try_get("enabled").map_err(map_err)?,
                secret_sealed: row.try_get("secret_sealed").map_err(map_err)?,
                previous_secret_until: row.try_get("previous_secret_until").map_err(map_err)?,
                failing_since: row.try_get("failing_since").map_err(map_err)?,
                disabled_reason: row.try_get("disabled_reason").map_err(map_err)?,
                created_at: row.try_get("created_at").map_err(map_err)?,
                updated_at: row.try_get("updated_at").map_err(map_err)?,
            })
        }

        pub(crate) fn leak_from_row(row: &$row) -> Result<LeakReport> {
            let ctype: Option<String> = row.try_get("credential_type").map_err(map_err)?;
            let cid: Option<String> = row.try_get("credential_id").map_err(map_err)?;
            Ok(LeakReport {
                id: row.try_get("id").map_err(map_err)?,
                at: row.try_get("at").map_err(map_err)?,
                reporter: row.try_get("reporter").map_err(map_err)?,
                token_hash: row.try_get("token_hash").map_err(map_err)?,
                token_type: row.try_get("token_type").map_err(map_err)?,
                url: row.try_get("url").map_err(map_err)?,
                source: row.try_get("source").map_err(map_err)?,
                label: row.try_get("label").map_err(map_err)?,
                credential: ctype.zip(cid),
                action: row.try_get("action").map_err(map_err)?,
            })
        }
    };
}
pub(crate) use row_mappers;
