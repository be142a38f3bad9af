//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::oauth;
use crate::routes::{audit, clients, consumers, import, keys, ops, usage, verify};

#[derive(OpenApi)]
#[openapi(
    info(title = "Keygate", description = "API keys and API tokens in one self-hosted server.\n\n\
Keygate's own permissions are scopes of Keygate keys: `keygate:admin` (every admin route; covers all \
`keygate:` scopes), `keygate:verify` (`POST /v1/verify`), `keygate:introspect` (introspect any client's \
tokens; a client may always introspect its own), `keygate:metrics` (`/metrics` when `metrics_auth` is on). \
Revoking another client's tokens needs `keygate:admin`."),
    paths(
        consumers::create_consumer, consumers::list_consumers, consumers::get_consumer, consumers::update_consumer,
        consumers::disable_consumer, consumers::enable_consumer,
        keys::create_key, keys::list_keys, keys::get_key, keys::update_key,
        keys::disable_key, keys::enable_key, keys::revoke_key, keys::rotate_key, keys::change_quota,
        import::import_keys, usage::key_usage, usage::consumer_usage,
        clients::create_client, clients::list_clients, clients::get_client, clients::update_client,
        clients::disable_client, clients::enable_client, clients::revoke_tokens, clients::delete_client,
        clients::rotate_secret, clients::list_signing_keys, clients::rotate_signing_key, clients::revoke_signing_key,
        oauth::token, oauth::introspect, oauth::revoke, oauth::discovery, oauth::jwks,
        audit::list_audit,
        verify::verify, verify::forward_auth,
        ops::healthz, ops::readyz, ops::metrics,
    ),
    modifiers(&Security),
    tags(
        (name = "consumers", description = "Applications or accounts that call the protected API"),
        (name = "keys", description = "API keys: create, rotate, disable, revoke"),
        (name = "verify", description = "Checking credentials"),
        (name = "clients", description = "OAuth 2 clients and JWT signing keys (tokens: /oauth2/*, see /.well-known/oauth-authorization-server)"),
        (name = "usage", description = "Verify counts per key and consumer over time"),
        (name = "audit", description = "Who changed what"),
        (name = "oauth2", description = "OAuth 2 authorization server endpoints (RFC 6749 error shapes)"),
        (name = "operations", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}
