//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

#[derive(OpenApi)]
#[openapi(
    info(title = "Keygate", description = "API keys and API tokens in one self-hosted server.\n\n\
Keygate's own permissions are scopes of Keygate keys: `keygate:admin` (every admin route; covers all \
`keygate:` scopes), `keygate:verify` (`POST /v1/verify`), `keygate:introspect` (introspect any client's \
tokens; a client may always introspect its own), `keygate:metrics` (`/metrics` when `metrics_auth` is on). \
Revoking another client's tokens needs `keygate:admin`."),
    modifiers(&Security),
    tags(
        (name = "consumers", description = "Applications or accounts that call the protected API"),
        (name = "plans", description = "Named usage controls consumers are put on, and what the developer portal offers"),
        (name = "keys", description = "API keys: create, rotate, disable, revoke"),
        (name = "verify", description = "Checking credentials"),
        (name = "clients", description = "OAuth 2 clients and JWT signing keys (tokens: /oauth2/*, see /.well-known/oauth-authorization-server)"),
        (name = "users", description = "End users who delegate access to applications (authorization code flow), their grants, and scope descriptions"),
        (name = "usage", description = "Verify counts per key and consumer over time"),
        (name = "audit", description = "Who changed what"),
        (name = "oauth2", description = "OAuth 2 authorization server endpoints (RFC 6749 error shapes)"),
        (name = "operations", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

/// The whole document: the header above plus every route as registered (`lib.rs` registers each route
/// with its operation, so a route cannot be served and left out of the document).
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, api) = OpenApiRouter::<std::sync::Arc<crate::AppState>>::with_openapi(ApiDoc::openapi())
        .merge(crate::public_routes())
        .merge(crate::admin_routes())
        .merge(crate::routes::ops::router())
        .split_for_parts();
    api
}

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
