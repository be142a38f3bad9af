//! Users and what they delegate: grants (remembered consent), authorization codes, token families and
//! rotating refresh tokens, and the descriptions of scopes shown on the consent page.
//!
//! Contracts the server relies on:
//! - A code is redeemed at most once: [`UserStore::redeem_codes`] marks it used, creates its family and
//!   writes the first refresh (and opaque access) token in one transaction; a second redemption revokes
//!   that family in the same transaction (RFC 6749 §4.1.2).
//! - A refresh token is rotated at most once: each rotation in [`UserStore::rotate_refreshes`] is a
//!   conditional update (`used_at IS NULL`, family not revoked) and the successor's insert; of two
//!   rotations of one token, even in the same batch, exactly one succeeds. A batch is one transaction
//!   (the server group-commits concurrent refreshes: one fsync for many).
//! - Revoking a family or a grant also marks the opaque access tokens issued under it revoked.

use async_trait::async_trait;
use keygate_core::SecretHash;

use crate::{AccessTokenRecord, NewAudit, Page, Result};

/// An end user of the API provider (not a consumer: consumers are applications and accounts).
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: String,
    pub username: String,
    pub email: Option<String>,
    pub display_name: Option<String>,
    /// Argon2id PHC string; `None`: the user cannot log in with a password (e.g. only through SSO).
    pub password_hash: Option<String>,
    /// What this user may ever grant; `None`: anything a client may request.
    pub allowed_scopes: Option<Vec<String>>,
    /// What the user may do in Keygate itself: `admin` signs in to the web console as an operator.
    pub roles: Vec<String>,
    pub disabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_login_at: Option<i64>,
    /// When the user proved they receive mail at `email` (the portal's verification link).
    pub email_verified_at: Option<i64>,
}

/// A change to a user. `Some(None)` clears an optional field.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub username: Option<String>,
    pub email: Option<Option<String>>,
    pub display_name: Option<Option<String>>,
    pub allowed_scopes: Option<Option<Vec<String>>>,
    pub roles: Option<Vec<String>>,
    pub disabled: Option<bool>,
    pub password_hash: Option<String>,
    /// `Some(None)`: the email address is no longer verified.
    pub email_verified_at: Option<Option<i64>>,
    pub updated_at: i64,
}

/// What a user consented to for one client.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub id: String,
    pub user_id: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub revoked_at: Option<i64>,
}

/// An authorization code as stored (the code itself only as SHA-256).
#[derive(Debug, Clone, PartialEq)]
pub struct AuthCode {
    pub hash: SecretHash,
    pub client_id: String,
    pub user_id: String,
    pub grant_id: String,
    pub redirect_uri: String,
    /// PKCE S256 challenge.
    pub code_challenge: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    /// The family its redemption created.
    pub family_id: Option<String>,
}

/// One authorization and every refresh token descended from it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenFamily {
    pub id: String,
    pub grant_id: String,
    pub client_id: String,
    pub user_id: String,
    pub created_at: i64,
    /// Absolute end of its refresh tokens.
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// DPoP (RFC 9449): the key thumbprint its refresh requests must prove, when it was issued with a proof.
    pub jkt: Option<String>,
}

/// A refresh token as stored (only as SHA-256).
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshRecord {
    pub hash: SecretHash,
    pub family_id: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub issued_at: i64,
    /// Expires unused at this time (the family's absolute end also applies).
    pub idle_expires_at: i64,
    /// Rotated at this time: presenting it again is reuse.
    pub used_at: Option<i64>,
}

/// A personal access token: a user's own long-lived, scoped token (`kgpat_`, SHA-256 at rest).
#[derive(Debug, Clone, PartialEq)]
pub struct PersonalToken {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// Resources the token may be used for (its `aud`); empty: any.
    pub audiences: Vec<String>,
    pub hash: SecretHash,
    pub start: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub last_used_ip: Option<String>,
    pub revoked_at: Option<i64>,
}

/// A device authorization (RFC 8628) as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceAuth {
    pub hash: SecretHash,
    /// Without the dash, upper case.
    pub user_code: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub interval_ms: i64,
    pub last_polled_at: Option<i64>,
    /// `pending`, `approved`, `denied` or `used`.
    pub status: String,
    pub user_id: Option<String>,
    pub grant_id: Option<String>,
    /// What the user approved.
    pub granted_scopes: Option<Vec<String>>,
}

/// One code redemption: the family it creates, with its first tokens.
#[derive(Debug, Clone)]
pub struct Redemption {
    pub hash: SecretHash,
    pub at: i64,
    pub family: TokenFamily,
    pub refresh: Option<RefreshRecord>,
    pub access: Option<AccessTokenRecord>,
}

/// One refresh-token rotation.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub old: SecretHash,
    pub at: i64,
    pub successor: RefreshRecord,
    pub access: Option<AccessTokenRecord>,
}

/// What redeeming a code did.
#[derive(Debug, Clone, PartialEq)]
pub enum Redeemed {
    /// First use: the family and its first tokens are written.
    Issued,
    /// Used before: the family it created (if any) is now revoked.
    Replayed { family_id: Option<String> },
    /// No such code (or it expired and was cleaned up), or its grant was revoked meanwhile (the code is
    /// then spent).
    Unknown,
}

#[async_trait]
pub trait UserStore: Send + Sync + 'static {
    /// Inserts a user with its audit event; `Conflict` if the username (ignoring case) is taken.
    async fn insert_user(&self, user: &User, audit: &NewAudit) -> Result<()>;
    async fn get_user(&self, id: &str) -> Result<Option<User>>;
    /// By username, ignoring case.
    async fn find_user(&self, username: &str) -> Result<Option<User>>;
    /// The oldest user with this email address, ignoring ASCII case.
    async fn find_user_by_email(&self, email: &str) -> Result<Option<User>>;
    async fn list_users(&self, page: &Page) -> Result<Vec<User>>;
    /// `Conflict` if a new username is taken.
    async fn update_user(&self, id: &str, patch: &UserPatch, audit: &NewAudit) -> Result<Option<User>>;
    /// Deletes a user with their grants, codes, families and refresh tokens, and revokes their opaque
    /// access tokens. False if there was none.
    async fn delete_user(&self, id: &str, audit: &NewAudit) -> Result<bool>;
    async fn record_login(&self, id: &str, at: i64) -> Result<()>;

    /// The live grant of a user for a client.
    async fn find_grant(&self, user_id: &str, client_id: &str) -> Result<Option<Grant>>;
    /// A user's live grants.
    async fn list_grants(&self, user_id: &str) -> Result<Vec<Grant>>;
    async fn get_grant(&self, id: &str) -> Result<Option<Grant>>;
    /// Revokes a grant and every family under it, with the audit event. Returns the revoked families'
    /// ids and absolute ends, or `None` if there is no such live grant of this user.
    async fn revoke_grant(
        &self,
        user_id: &str,
        grant_id: &str,
        at: i64,
        audit: &NewAudit,
    ) -> Result<Option<Vec<(String, i64)>>>;

    /// Writes a new authorization code in one transaction with what led to it. With `consent`
    /// (the id for a new grant), the user's live grant for the code's client is widened to include the
    /// code's scopes, or created with that id, and the code is bound to it (its `grant_id` is replaced).
    /// With `login_at`, the user's last login time. Returns the code's grant id.
    async fn issue_code(
        &self,
        code: &AuthCode,
        consent: Option<&str>,
        login_at: Option<i64>,
    ) -> Result<String>;
    async fn get_code(&self, hash: &SecretHash) -> Result<Option<AuthCode>>;
    /// Marks a code used without redeeming it (it was presented with a wrong binding). False if it was
    /// already used.
    async fn burn_code(&self, hash: &SecretHash, at: i64) -> Result<bool>;
    /// Redeems codes in one transaction (see the module documentation); one outcome per redemption.
    async fn redeem_codes(&self, redemptions: &[Redemption]) -> Result<Vec<Redeemed>>;

    /// A refresh token with its family.
    async fn find_refresh(&self, hash: &SecretHash) -> Result<Option<(RefreshRecord, TokenFamily)>>;
    /// Applies rotations in one transaction: for each, marks `old` used and writes its successor (and
    /// an opaque access token). Per rotation: false if `old` was already used or its family revoked.
    async fn rotate_refreshes(&self, rotations: &[Rotation]) -> Result<Vec<bool>>;
    /// Revokes a family (reuse detected, or the refresh token revoked), with `audit` in the same
    /// transaction. False if it was already.
    async fn revoke_family(&self, family_id: &str, at: i64, audit: Option<&NewAudit>) -> Result<bool>;
    /// Revoked families whose tokens may still be presented: (id, absolute end).
    async fn revoked_families(&self, now: i64) -> Result<Vec<(String, i64)>>;

    /// Inserts a personal access token with its audit event.
    async fn insert_pat(&self, token: &PersonalToken, audit: &NewAudit) -> Result<()>;
    async fn list_pats(&self, user_id: &str) -> Result<Vec<PersonalToken>>;
    async fn get_pat(&self, id: &str) -> Result<Option<PersonalToken>>;
    async fn find_pat(&self, hash: &SecretHash) -> Result<Option<PersonalToken>>;
    /// Replaces an unrevoked token's secret (the old one stops at once). `None` if there is none.
    async fn rotate_pat(
        &self,
        id: &str,
        hash: &SecretHash,
        start: &str,
        at: i64,
        audit: &NewAudit,
    ) -> Result<Option<PersonalToken>>;
    /// Revokes a token. `None` if there is no such unrevoked token.
    async fn revoke_pat(&self, id: &str, at: i64, audit: &NewAudit) -> Result<Option<PersonalToken>>;
    /// Records last use: (token id, time, address).
    async fn touch_pats(&self, uses: &[(String, i64, Option<String>)]) -> Result<()>;
    /// Unrevoked tokens expiring after `now` and at or before `before`, soonest first.
    async fn expiring_pats(&self, now: i64, before: i64, limit: u32) -> Result<Vec<PersonalToken>>;

    async fn insert_device(&self, device: &DeviceAuth) -> Result<()>;
    /// A pending, unexpired device authorization by its user code.
    async fn find_device(&self, user_code: &str, now: i64) -> Result<Option<DeviceAuth>>;
    /// The user's answer, in one transaction with their consent (`consent`: the id for a new grant,
    /// widened or created as for codes) when they approve. False if it was not pending any more.
    async fn answer_device(
        &self,
        user_code: &str,
        user_id: &str,
        approved: Option<(&str, &[String])>,
        at: i64,
    ) -> Result<bool>;
    async fn get_device(&self, hash: &SecretHash) -> Result<Option<DeviceAuth>>;
    /// Notes a poll's time; with `slow_down`, adds 5 s to the device's interval (RFC 8628 §3.5).
    async fn note_poll(&self, hash: &SecretHash, at: i64, slow_down: bool) -> Result<()>;
    /// Marks an approved device authorization used and creates its family and first tokens, in one
    /// transaction. False if it was not approved (or already used).
    async fn redeem_device(&self, hash: &SecretHash, redemption: &Redemption) -> Result<bool>;

    /// Sets (or with `None` removes) the description of a scope.
    async fn set_scope_description(
        &self,
        scope: &str,
        description: Option<&str>,
        at: i64,
        audit: &NewAudit,
    ) -> Result<()>;
    async fn scope_descriptions(&self) -> Result<Vec<(String, String)>>;
}
