//! Admin API: users (the API provider's end users, who delegate access to applications), their grants,
//! and the descriptions of scopes shown on the consent page. Every route needs `keygate:admin`; every
//! change is audited. Disabling or deleting a user ends their sessions and stops their tokens at the
//! next request; revoking a grant revokes every token issued under it.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use keygate_core::{PlainSecret, SecretKind};
use keygate_store::{Grant, PersonalToken, User, UserPatch};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::AdminCaller;
use crate::error::ApiPath;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, ErrorCode};
use crate::routes::common::*;
use crate::state::AppState;
use crate::time::rfc3339;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create_user, list_users))
        .routes(routes!(get_user, update_user, delete_user))
        .routes(routes!(disable_user))
        .routes(routes!(enable_user))
        .routes(routes!(set_password))
        .routes(routes!(list_grants))
        .routes(routes!(revoke_grant))
        .routes(routes!(create_pat, list_pats))
        .routes(routes!(revoke_pat))
        .routes(routes!(rotate_pat))
        .routes(routes!(expiring_pats))
        .routes(routes!(list_scopes))
        .routes(routes!(set_scope, delete_scope))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub email: Option<String>,
    pub display_name: Option<String>,
    /// What this user may ever grant; `null`: anything a client may request.
    pub allowed_scopes: Option<Vec<String>>,
    /// Roles in Keygate itself (`admin`: signs in to the web console).
    pub roles: Vec<String>,
    pub disabled: bool,
    /// Whether a password is set (never the password or its hash).
    pub has_password: bool,
    pub created_at: String,
    pub updated_at: String,
    pub last_login_at: Option<String>,
    /// When the user proved they receive mail at `email` (the developer portal's verification link).
    pub email_verified_at: Option<String>,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            id: u.id,
            username: u.username,
            email: u.email,
            display_name: u.display_name,
            allowed_scopes: u.allowed_scopes,
            roles: u.roles,
            disabled: u.disabled,
            has_password: u.password_hash.is_some(),
            created_at: rfc3339(u.created_at),
            updated_at: rfc3339(u.updated_at),
            last_login_at: u.last_login_at.map(rfc3339),
            email_verified_at: u.email_verified_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    pub items: Vec<UserView>,
    pub next_after: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Unique ignoring case; 1–128 characters, no spaces or control characters.
    pub username: String,
    /// At least 10 characters, not a well-known password. Without one the user cannot log in with a
    /// password (e.g. only through `login.trusted_header`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_scopes: Option<Vec<String>>,
    /// Roles in Keygate itself: `admin` signs in to the web console as an operator, `developer` to the
    /// developer portal. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// `null` removes it.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
    /// `null` removes it.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub display_name: Option<Option<String>>,
    /// `null`: anything a client may request.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_scopes: Option<Option<Vec<String>>>,
    /// Replaces the user's roles (`[]` removes them all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GrantView {
    pub id: String,
    pub user_id: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Grant> for GrantView {
    fn from(g: Grant) -> Self {
        GrantView {
            id: g.id,
            user_id: g.user_id,
            client_id: g.client_id,
            scopes: g.scopes,
            created_at: rfc3339(g.created_at),
            updated_at: rfc3339(g.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GrantList {
    pub items: Vec<GrantView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeView {
    pub scope: String,
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeList {
    pub items: Vec<ScopeView>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetScope {
    /// Shown to users on the consent page, e.g. "Read your articles". 1–200 characters.
    pub description: String,
}

fn check_username(u: &str) -> ApiResult<()> {
    if u.is_empty() || u.chars().count() > 128 || u.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(
            "username",
            "must be 1 to 128 characters without spaces or control characters",
        ));
    }
    Ok(())
}

fn check_optional_text(field: &str, v: &Option<String>, max: usize) -> ApiResult<()> {
    if let Some(s) = v
        && (s.is_empty() || s.chars().count() > max || s.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {max} characters without control characters"),
        ));
    }
    Ok(())
}

pub(crate) fn check_email(v: &Option<String>) -> ApiResult<()> {
    check_optional_text("email", v, 254)?;
    if v.as_ref().is_some_and(|e| !e.contains('@') || e.contains(char::is_whitespace)) {
        return Err(ApiError::invalid("email", "must be an email address"));
    }
    Ok(())
}

/// Hashes a new password after the policy check (Argon2id runs off the async threads).
pub(crate) async fn new_password_hash(password: String, username: &str) -> ApiResult<String> {
    crate::password::check_policy(&password, username).map_err(|m| ApiError::invalid("password", m))?;
    tokio::task::spawn_blocking(move || crate::password::hash(&password))
        .await
        .map_err(|e| ApiError::internal("password hashing stopped", e))?
        .map_err(|e| ApiError::internal("password hashing failed", e))
}

fn username_taken(e: keygate_store::StoreError) -> ApiError {
    match e {
        keygate_store::StoreError::Conflict(_) => ApiError {
            field: Some("username".into()),
            ..ApiError::new(ErrorCode::Conflict, "another user has this username (usernames ignore case)")
        },
        other => other.into(),
    }
}

async fn load_user(state: &AppState, id: &str) -> ApiResult<User> {
    state.store.get_user(id).await?.ok_or_else(|| ApiError::not_found("user", id))
}

/// Everything that caches a user forgets it: their tokens and sessions see the change at once.
fn user_changed(state: &AppState, user: &str, ended: bool) {
    state.oauth.user_changed(user);
    if ended {
        state.oauth.flows.end_sessions_of(user);
    }
}

/// Create a user.
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = CreateUser,
    responses((status = 201, body = UserView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_user(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    let user = insert_new_user(&state, Some(&actor), req, None).await?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// The one way a user is made (the admin API, the CLI, the console and the portal's sign-up): checked,
/// the password hashed, written with its audit event. `email_verified_at`: when the address was proved.
/// Without an actor the user made themselves (the portal's sign-up): they are the audit event's actor.
pub(crate) async fn insert_new_user(
    state: &AppState,
    actor: Option<&crate::auth::Actor>,
    req: CreateUser,
    email_verified_at: Option<i64>,
) -> ApiResult<User> {
    check_username(&req.username)?;
    check_email(&req.email)?;
    check_optional_text("display_name", &req.display_name, 200)?;
    let allowed_scopes = req.allowed_scopes.map(check_scopes).transpose()?;
    let roles = check_roles(req.roles.unwrap_or_default())?;
    let password_hash = match req.password {
        Some(p) => Some(new_password_hash(p, &req.username).await?),
        None => None,
    };
    let now = state.now();
    let user = User {
        id: new_id("usr", now)?,
        username: req.username,
        email: req.email,
        display_name: req.display_name,
        password_hash,
        allowed_scopes,
        roles,
        disabled: false,
        created_at: now,
        updated_at: now,
        last_login_at: None,
        email_verified_at,
    };
    let details =
        json!({"username": user.username, "allowed_scopes": user.allowed_scopes, "roles": user.roles});
    let own = crate::auth::Actor { key_id: user.id.clone(), ip: None };
    let audit = audit(actor.unwrap_or(&own), now, "user.create", "user", &user.id, details)?;
    state.store.insert_user(&user, &audit).await.map_err(username_taken)?;
    Ok(user)
}

/// List users in creation order.
#[utoipa::path(get, path = "/v1/users", tag = "users", params(PageQuery),
    responses((status = 200, body = UserList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_users(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<UserList>> {
    let page = searched_page(q.after, q.limit, q.q)?;
    let items = state.store.list_users(&page).await?;
    let next_after = next_cursor(&items, page.limit, |u| &u.id);
    Ok(Json(UserList { items: items.into_iter().map(Into::into).collect(), next_after }))
}

/// Get one user (by id, or by username with `username:NAME`).
#[utoipa::path(get, path = "/v1/users/{id}", tag = "users", params(("id" = String, Path, description = "usr_… or username:NAME")),
    responses((status = 200, body = UserView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_user(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<UserView>> {
    if let Some(name) = id.strip_prefix("username:") {
        let user = state.store.find_user(name).await?.ok_or_else(|| ApiError::not_found("user", &id))?;
        return Ok(Json(user.into()));
    }
    Ok(Json(load_user(&state, &id).await?.into()))
}

async fn patch_user(
    state: &AppState,
    actor: &crate::auth::Actor,
    id: &str,
    action: &str,
    patch: UserPatch,
    details: serde_json::Value,
) -> ApiResult<User> {
    let audit = audit(actor, patch.updated_at, action, "user", id, details)?;
    let user = state
        .store
        .update_user(id, &patch, &audit)
        .await
        .map_err(username_taken)?
        .ok_or_else(|| ApiError::not_found("user", id))?;
    user_changed(state, id, user.disabled);
    if patch.disabled.is_some() {
        // Their applications stop (or work again) at once.
        crate::routes::consumers::owner_changed_here(state, id).await;
    }
    Ok(user)
}

/// Roles a user can have in Keygate itself: `admin` signs in to the console as an operator,
/// `developer` to the developer portal (sign-up gives it).
pub const ROLES: &[&str] = &["admin", "developer"];

/// Known roles, each once, sorted.
fn check_roles(mut roles: Vec<String>) -> ApiResult<Vec<String>> {
    if let Some(r) = roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
        return Err(ApiError::invalid(
            "roles",
            format!("unknown role '{r}'; the roles are: {}", ROLES.join(", ")),
        ));
    }
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// Change a user's username, email, display name, allowed scopes or roles.
#[utoipa::path(patch, path = "/v1/users/{id}", tag = "users", params(("id" = String, Path)), request_body = UpdateUser,
    responses((status = 200, body = UserView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_user(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> ApiResult<Json<UserView>> {
    if let Some(u) = &req.username {
        check_username(u)?;
    }
    if let Some(e) = &req.email {
        check_email(e)?;
    }
    if let Some(d) = &req.display_name {
        check_optional_text("display_name", d, 200)?;
    }
    let allowed_scopes = match req.allowed_scopes {
        Some(Some(s)) => Some(Some(check_scopes(s)?)),
        other => other,
    };
    let roles = req.roles.map(check_roles).transpose()?;
    let details = json!({"username": req.username, "allowed_scopes": allowed_scopes, "roles": roles});
    let patch = UserPatch {
        username: req.username,
        // A new address is not verified.
        email_verified_at: req.email.as_ref().map(|_| None),
        email: req.email,
        display_name: req.display_name,
        allowed_scopes,
        roles,
        updated_at: state.now(),
        ..UserPatch::default()
    };
    Ok(Json(patch_user(&state, &actor, &id, "user.update", patch, details).await?.into()))
}

/// Disable a user: they cannot log in, their sessions end, and their tokens stop at the next request.
#[utoipa::path(post, path = "/v1/users/{id}/disable", tag = "users", params(("id" = String, Path)),
    responses((status = 200, body = UserView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn disable_user(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<UserView>> {
    let patch = UserPatch { disabled: Some(true), updated_at: state.now(), ..UserPatch::default() };
    Ok(Json(patch_user(&state, &actor, &id, "user.disable", patch, json!({})).await?.into()))
}

/// Enable a disabled user again (their unexpired tokens work again).
#[utoipa::path(post, path = "/v1/users/{id}/enable", tag = "users", params(("id" = String, Path)),
    responses((status = 200, body = UserView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enable_user(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<UserView>> {
    let patch = UserPatch { disabled: Some(false), updated_at: state.now(), ..UserPatch::default() };
    Ok(Json(patch_user(&state, &actor, &id, "user.enable", patch, json!({})).await?.into()))
}

/// Set a user's password (their sessions end; their tokens stay).
#[utoipa::path(post, path = "/v1/users/{id}/password", tag = "users", params(("id" = String, Path)), request_body = SetPassword,
    responses((status = 200, body = UserView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_password(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SetPassword>,
) -> ApiResult<Json<UserView>> {
    let user = load_user(&state, &id).await?;
    let hash = new_password_hash(req.password, &user.username).await?;
    let patch = UserPatch { password_hash: Some(hash), updated_at: state.now(), ..UserPatch::default() };
    let user = patch_user(&state, &actor, &id, "user.set_password", patch, json!({})).await?;
    state.oauth.flows.end_sessions_of(&id);
    Ok(Json(user.into()))
}

/// Delete a user with their grants; their tokens stop at the next request.
#[utoipa::path(delete, path = "/v1/users/{id}", tag = "users", params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_user(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let now = state.now();
    let audit = audit(&actor, now, "user.delete", "user", &id, json!({}))?;
    // Their applications are disabled with the deletion (keeping the owner's id, for the record).
    if !state.store.delete_user(&id, &audit).await? {
        return Err(ApiError::not_found("user", &id));
    }
    user_changed(&state, &id, true);
    crate::routes::consumers::owner_changed_here(&state, &id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A user's live grants: what they consented to, per client.
#[utoipa::path(get, path = "/v1/users/{id}/grants", tag = "users", params(("id" = String, Path)),
    responses((status = 200, body = GrantList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_grants(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<GrantList>> {
    load_user(&state, &id).await?;
    let items = state.store.list_grants(&id).await?;
    Ok(Json(GrantList { items: items.into_iter().map(Into::into).collect() }))
}

/// Revoke a grant: every token issued under it stops at the next request, and the client must ask the
/// user's consent again.
#[utoipa::path(delete, path = "/v1/users/{id}/grants/{grant_id}", tag = "users",
    params(("id" = String, Path), ("grant_id" = String, Path)),
    responses((status = 204, description = "revoked"), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_grant(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath((id, grant_id)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let now = state.now();
    let audit = audit(&actor, now, "grant.revoke", "grant", &grant_id, json!({"user_id": id}))?;
    let families = state
        .store
        .revoke_grant(&id, &grant_id, now, &audit)
        .await?
        .ok_or_else(|| ApiError::not_found("grant", &grant_id))?;
    state.oauth.families_revoked(&families);
    Ok(StatusCode::NO_CONTENT)
}

/// Scope descriptions, as the consent page shows them.
#[utoipa::path(get, path = "/v1/scopes", tag = "users",
    responses((status = 200, body = ScopeList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_scopes(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
) -> ApiResult<Json<ScopeList>> {
    let items = state.store.scope_descriptions().await?;
    Ok(Json(ScopeList {
        items: items.into_iter().map(|(scope, description)| ScopeView { scope, description }).collect(),
    }))
}

/// Set the description of a scope, shown to users on the consent page.
#[utoipa::path(put, path = "/v1/scopes/{scope}", tag = "users", params(("scope" = String, Path)), request_body = SetScope,
    responses((status = 200, body = ScopeView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_scope(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(scope): ApiPath<String>,
    ApiJson(req): ApiJson<SetScope>,
) -> ApiResult<Json<ScopeView>> {
    let scope =
        check_scopes(vec![scope]).map_err(|e| ApiError { field: Some("scope".into()), ..e })?.remove(0);
    check_optional_text("description", &Some(req.description.clone()), 200)?;
    let now = state.now();
    let audit =
        audit(&actor, now, "scope.describe", "scope", &scope, json!({"description": req.description}))?;
    state.store.set_scope_description(&scope, Some(&req.description), now, &audit).await?;
    Ok(Json(ScopeView { scope, description: req.description }))
}

/// Remove the description of a scope.
#[utoipa::path(delete, path = "/v1/scopes/{scope}", tag = "users", params(("scope" = String, Path)),
    responses((status = 204, description = "removed"), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_scope(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(scope): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let now = state.now();
    let audit = audit(&actor, now, "scope.undescribe", "scope", &scope, json!({}))?;
    state.store.set_scope_description(&scope, None, now, &audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PatView {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// Resources it may be used for; empty: any.
    pub audiences: Vec<String>,
    /// The first characters, e.g. `kgpat_3xAb`.
    pub start: String,
    /// `active`, `expired` or `revoked`.
    pub status: &'static str,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    pub last_used_ip: Option<String>,
    pub revoked_at: Option<String>,
}

impl PatView {
    fn of(p: PersonalToken, now: i64) -> Self {
        let status = if p.revoked_at.is_some() {
            "revoked"
        } else if p.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        };
        PatView {
            id: p.id,
            user_id: p.user_id,
            name: p.name,
            scopes: p.scopes,
            audiences: p.audiences,
            start: p.start,
            status,
            created_at: rfc3339(p.created_at),
            expires_at: p.expires_at.map(rfc3339),
            last_used_at: p.last_used_at.map(rfc3339),
            last_used_ip: p.last_used_ip,
            revoked_at: p.revoked_at.map(rfc3339),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PatWithSecret {
    /// Shown this once; Keygate keeps only its SHA-256.
    pub token: String,
    #[serde(flatten)]
    pub pat: PatView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PatList {
    pub items: Vec<PatView>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePat {
    /// What it is for, e.g. "laptop CLI"; 1–200 characters.
    pub name: String,
    /// At least one; each within what the user may grant.
    pub scopes: Vec<String>,
    /// When it expires: RFC 3339, or `"never"` where the operator allows it (`tokens.pat_allow_no_expiry`).
    /// Required; at most `tokens.pat_max_lifetime_days` (90) ahead. Give this or `expires_in_seconds`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
    /// Resources (audiences) it may be used for; default: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExpiringQuery {
    /// Tokens expiring within this many days (1–90, default 7).
    pub within_days: Option<u32>,
}

/// When a new personal access token expires, by the operator's rules.
fn pat_expiry(state: &AppState, req: &CreatePat, now: i64) -> ApiResult<Option<i64>> {
    let max_ms = i64::try_from(state.config.pat_max_lifetime.as_millis()).unwrap_or(i64::MAX);
    let max_days = state.config.pat_max_lifetime.as_secs() / 86_400;
    let at = match (&req.expires_at, req.expires_in_seconds) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("expires_at", "give expires_at or expires_in_seconds, not both"));
        }
        (Some(never), None) if never == "never" => {
            if !state.config.pat_allow_no_expiry {
                return Err(ApiError::invalid(
                    "expires_at",
                    format!(
                        "this installation requires an expiry of at most {max_days} days (tokens.pat_allow_no_expiry is off)"
                    ),
                ));
            }
            return Ok(None);
        }
        (Some(t), None) => {
            check_expiry(t, now).map_err(|e| ApiError { field: Some("expires_at".into()), ..e })?
        }
        (None, Some(s)) => now.saturating_add(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)),
        (None, None) => {
            return Err(ApiError::invalid(
                "expires_at",
                format!(
                    "a personal access token needs an expiry (expires_at or expires_in_seconds), at most {max_days} days ahead"
                ),
            ));
        }
    };
    if at <= now || at - now > max_ms {
        return Err(ApiError::invalid(
            "expires_at",
            format!("must be in the future and at most {max_days} days ahead"),
        ));
    }
    Ok(Some(at))
}

/// Create a personal access token for a user. The `token` is in the response this one time only.
#[utoipa::path(post, path = "/v1/users/{id}/tokens", tag = "users", params(("id" = String, Path)), request_body = CreatePat,
    responses((status = 201, body = PatWithSecret), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_pat(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CreatePat>,
) -> ApiResult<(StatusCode, Json<PatWithSecret>)> {
    check_name(&req.name)?;
    let now = state.now();
    let user = load_user(&state, &id).await?;
    if user.disabled {
        return Err(ApiError::new(ErrorCode::Conflict, "the user is disabled; enable them first"));
    }
    if req.scopes.is_empty() {
        return Err(ApiError::invalid("scopes", "give at least one scope"));
    }
    let scopes = check_scopes(req.scopes.clone())?;
    if let Some(allowed) = &user.allowed_scopes
        && let Some(s) = scopes.iter().find(|s| !allowed.iter().any(|a| keygate_core::scope::covers(a, s)))
    {
        return Err(ApiError::invalid("scopes", format!("the user may not grant {s}")));
    }
    if req.audiences.len() > 20
        || req.audiences.iter().any(|a| a.is_empty() || a.len() > 512 || a.chars().any(char::is_control))
    {
        return Err(ApiError::invalid("audiences", "at most 20 non-empty URIs of up to 512 characters"));
    }
    let expires_at = pat_expiry(&state, &req, now)?;
    let secret = PlainSecret::generate(SecretKind::PersonalToken)
        .map_err(|e| ApiError::internal("random source failed", e))?;
    let pat = PersonalToken {
        id: new_id("pat", now)?,
        user_id: user.id,
        name: req.name,
        scopes,
        audiences: req.audiences,
        hash: secret.hash(),
        start: secret.visible_start(),
        created_at: now,
        updated_at: now,
        expires_at,
        last_used_at: None,
        last_used_ip: None,
        revoked_at: None,
    };
    let details = json!({"user_id": pat.user_id, "name": pat.name, "scopes": pat.scopes, "start": pat.start,
        "expires_at": pat.expires_at.map(rfc3339)});
    let audit = audit(&actor, now, "pat.create", "personal_token", &pat.id, details)?;
    state.store.insert_pat(&pat, &audit).await?;
    state.oauth.pats_changed();
    Ok((
        StatusCode::CREATED,
        Json(PatWithSecret { token: secret.expose().to_string(), pat: PatView::of(pat, now) }),
    ))
}

/// A user's personal access tokens (never the tokens themselves), with their last use.
#[utoipa::path(get, path = "/v1/users/{id}/tokens", tag = "users", params(("id" = String, Path)),
    responses((status = 200, body = PatList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_pats(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<PatList>> {
    load_user(&state, &id).await?;
    // Uses not yet flushed are written first, so the list shows them.
    if let Err(e) = state.oauth.flush_pat_uses(state.store.as_ref()).await {
        tracing::warn!(error = %e, "writing token uses failed; listing without the newest");
    }
    let now = state.now();
    let items = state.store.list_pats(&id).await?;
    Ok(Json(PatList { items: items.into_iter().map(|p| PatView::of(p, now)).collect() }))
}

async fn load_pat(state: &AppState, user: &str, id: &str) -> ApiResult<PersonalToken> {
    match state.store.get_pat(id).await? {
        Some(p) if p.user_id == user => Ok(p),
        _ => Err(ApiError::not_found("personal access token", id)),
    }
}

/// Revoke a personal access token: it stops at the next request.
#[utoipa::path(delete, path = "/v1/users/{id}/tokens/{token_id}", tag = "users",
    params(("id" = String, Path), ("token_id" = String, Path)),
    responses((status = 200, body = PatView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_pat(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath((id, token_id)): ApiPath<(String, String)>,
) -> ApiResult<Json<PatView>> {
    let pat = load_pat(&state, &id, &token_id).await?;
    let now = state.now();
    if pat.revoked_at.is_some() {
        return Ok(Json(PatView::of(pat, now)));
    }
    let audit = audit(&actor, now, "pat.revoke", "personal_token", &token_id, json!({"user_id": id}))?;
    let pat = state
        .store
        .revoke_pat(&token_id, now, &audit)
        .await?
        .ok_or_else(|| ApiError::not_found("personal access token", &token_id))?;
    state.oauth.pats_changed();
    Ok(Json(PatView::of(pat, now)))
}

/// Rotate a personal access token: a new secret (shown once) with the same name, scopes and expiry;
/// the old one stops at once.
#[utoipa::path(post, path = "/v1/users/{id}/tokens/{token_id}/rotate", tag = "users",
    params(("id" = String, Path), ("token_id" = String, Path)),
    responses((status = 200, body = PatWithSecret), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_pat(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath((id, token_id)): ApiPath<(String, String)>,
) -> ApiResult<Json<PatWithSecret>> {
    let pat = load_pat(&state, &id, &token_id).await?;
    if pat.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::Conflict, "the token is revoked; create a new one"));
    }
    let now = state.now();
    let secret = PlainSecret::generate(SecretKind::PersonalToken)
        .map_err(|e| ApiError::internal("random source failed", e))?;
    let audit = audit(
        &actor,
        now,
        "pat.rotate",
        "personal_token",
        &token_id,
        json!({"user_id": id, "start": secret.visible_start()}),
    )?;
    let pat = state
        .store
        .rotate_pat(&token_id, &secret.hash(), &secret.visible_start(), now, &audit)
        .await?
        .ok_or_else(|| ApiError::not_found("personal access token", &token_id))?;
    state.oauth.pats_changed();
    Ok(Json(PatWithSecret { token: secret.expose().to_string(), pat: PatView::of(pat, now) }))
}

/// Personal access tokens that expire soon (default: within 7 days), soonest first: whom to remind.
#[utoipa::path(get, path = "/v1/tokens/expiring", tag = "users", params(ExpiringQuery),
    responses((status = 200, body = PatList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn expiring_pats(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<ExpiringQuery>,
) -> ApiResult<Json<PatList>> {
    let days = q.within_days.unwrap_or(7);
    if !(1..=90).contains(&days) {
        return Err(ApiError::invalid("within_days", "must be 1 to 90"));
    }
    let now = state.now();
    let items = state.store.expiring_pats(now, now + i64::from(days) * 86_400_000, 1000).await?;
    Ok(Json(PatList { items: items.into_iter().map(|p| PatView::of(p, now)).collect() }))
}
