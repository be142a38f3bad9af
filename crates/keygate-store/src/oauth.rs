//! OAuth 2 storage: clients and their secrets, signing keys, opaque access tokens and revoked JWT ids.

use async_trait::async_trait;
use keygate_core::SecretHash;
pub use keygate_core::oauth::{GrantType, TokenFormat};
use serde_json::Value;

use crate::{NewAudit, Page, Result, StoredSecret};

/// A registered application that obtains tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthClient {
    /// The `client_id`.
    pub id: String,
    pub consumer_id: String,
    pub name: String,
    pub grant_types: Vec<GrantType>,
    /// Scopes the client may be granted.
    pub scopes: Vec<String>,
    /// Resources (audiences) the client may ask tokens for.
    pub audiences: Vec<String>,
    pub token_format: TokenFormat,
    pub token_lifetime_seconds: i64,
    pub confidential: bool,
    pub disabled: bool,
    /// Tokens issued before this time (ms) are revoked ("revoke all tokens of a client").
    pub tokens_revoked_before: Option<i64>,
    /// Visible start of the newest client secret.
    pub secret_start: Option<String>,
    /// How the client authenticates: `client_secret` (HTTP Basic or form) or `private_key_jwt` (RFC 7523).
    pub auth_method: String,
    /// For `private_key_jwt`: the client's public keys, `{"keys": [...]}`.
    pub jwks: Option<Value>,
    /// Where the authorization endpoint may send the user back (exact string match).
    pub redirect_uris: Vec<String>,
    /// A refresh token unused this long expires.
    pub refresh_idle_seconds: i64,
    /// Every refresh token of one authorization expires this long after it.
    pub refresh_absolute_seconds: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ClientPatch {
    pub name: Option<String>,
    pub grant_types: Option<Vec<GrantType>>,
    pub scopes: Option<Vec<String>>,
    pub audiences: Option<Vec<String>>,
    pub token_format: Option<TokenFormat>,
    pub token_lifetime_seconds: Option<i64>,
    pub disabled: Option<bool>,
    pub tokens_revoked_before: Option<i64>,
    pub jwks: Option<Value>,
    pub redirect_uris: Option<Vec<String>>,
    pub refresh_idle_seconds: Option<i64>,
    pub refresh_absolute_seconds: Option<i64>,
    pub updated_at: i64,
}

/// A JWT signing key. The private key is stored sealed (encrypted by the server with its master key);
/// the store keeps whatever bytes it is given.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKey {
    pub kid: String,
    /// `EdDSA` or `ES256`.
    pub alg: String,
    /// The sealed private key (older databases: PKCS#8 DER in clear, sealed on the next start).
    pub private_der: Vec<u8>,
    /// The public key as a JWK (published in the JWKS).
    pub public_jwk: Value,
    pub created_at: i64,
    /// Signs from this time on; published before it, so verifiers have it before its first token.
    pub active_from: i64,
    /// Stops signing at this time (a newer key took over).
    pub retired_at: Option<i64>,
    /// Leaves the JWKS at this time, when every token it signed has expired.
    pub publish_until: Option<i64>,
    /// Emergency revocation: unpublished at once, and no token it signed verifies.
    pub revoked_at: Option<i64>,
}

/// An opaque access token as stored (its secret only as SHA-256).
#[derive(Debug, Clone, PartialEq)]
pub struct AccessTokenRecord {
    pub hash: SecretHash,
    pub jti: String,
    pub client_id: String,
    pub subject: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// For a token issued on a user's behalf: its token family (the subject is then the user id).
    pub family_id: Option<String>,
    /// For an exchanged token (RFC 8693): the credential it came from, as JSON (`keygate_core::oauth::Source`).
    pub source: Option<String>,
    /// RFC 9449: the thumbprint of the key the token is bound to (DPoP).
    pub jkt: Option<String>,
}

#[async_trait]
pub trait OAuthStore: crate::UserStore + Send + Sync + 'static {
    /// Inserts a client and (for confidential clients) its first secret, with the audit event.
    async fn insert_client(
        &self,
        client: &OAuthClient,
        secret: Option<&StoredSecret>,
        audit: &NewAudit,
    ) -> Result<()>;
    async fn get_client(&self, id: &str) -> Result<Option<OAuthClient>>;
    async fn list_clients(&self, page: &Page) -> Result<Vec<OAuthClient>>;
    async fn update_client(
        &self,
        id: &str,
        patch: &ClientPatch,
        audit: &NewAudit,
    ) -> Result<Option<OAuthClient>>;
    /// Deletes a client, its secrets and its opaque tokens. False if there was none.
    async fn delete_client(&self, id: &str, audit: &NewAudit) -> Result<bool>;
    /// Adds a secret and makes the others expire at `old_expires_at`. False if there is no such client.
    async fn rotate_client_secret(
        &self,
        id: &str,
        secret: &StoredSecret,
        old_expires_at: i64,
        audit: &NewAudit,
    ) -> Result<bool>;
    /// A client by one of its secrets' hashes, with that secret's expiry.
    async fn find_client_secret(&self, hash: &SecretHash) -> Result<Option<(OAuthClient, Option<i64>)>>;

    /// Inserts opaque tokens in one transaction (the token endpoint group-commits them).
    async fn insert_access_tokens(&self, tokens: &[AccessTokenRecord]) -> Result<()>;
    async fn find_access_token(&self, hash: &SecretHash) -> Result<Option<AccessTokenRecord>>;
    /// Marks an opaque token revoked; returns it if it was revoked now (not before), writing `audit` (and
    /// its `token.revoked` event) in the same transaction.
    async fn revoke_access_token(
        &self,
        hash: &SecretHash,
        at: i64,
        audit: Option<&NewAudit>,
    ) -> Result<Option<AccessTokenRecord>>;
    /// Remembers a revoked JWT id until its token expires (and writes `audit` if it is new).
    async fn revoke_jti(
        &self,
        jti: &str,
        client_id: &str,
        expires_at: i64,
        at: i64,
        audit: Option<&NewAudit>,
    ) -> Result<()>;
    /// Revoked JWT ids of tokens not yet expired at `now`.
    async fn revoked_jtis(&self, now: i64) -> Result<Vec<(String, i64)>>;
    /// Drops expired tokens and revoked ids. Returns how many rows went.
    async fn expire_tokens(&self, now: i64) -> Result<u64>;

    async fn insert_signing_key(&self, key: &SigningKey, audit: Option<&NewAudit>) -> Result<()>;
    /// Sets the registration access token (RFC 7592) of a client that registered itself.
    async fn set_registration_token(&self, client_id: &str, hash: &SecretHash, at: i64) -> Result<()>;
    /// The hash of a client's registration access token, if it registered itself.
    async fn registration_token(&self, client_id: &str) -> Result<Option<SecretHash>>;
    async fn list_signing_keys(&self) -> Result<Vec<SigningKey>>;
    async fn retire_signing_key(&self, kid: &str, retired_at: i64, publish_until: i64) -> Result<()>;
    /// Replaces a key's stored private key bytes (sealing keys stored in clear by older versions).
    async fn reseal_signing_key(&self, kid: &str, sealed: &[u8]) -> Result<()>;
    /// Emergency revocation of a key, with its audit event. False if there is no such unrevoked key.
    async fn revoke_signing_key(&self, kid: &str, at: i64, audit: &NewAudit) -> Result<bool>;
}
