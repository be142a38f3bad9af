//! Access tokens: issuing them (JWT per RFC 9068, or opaque), and deciding about presented ones.
//!
//! Policy:
//! - A JWT verifies with no I/O: signature against a published key, `typ: at+jwt`, algorithm pinned by
//!   the key (so `alg: none` or a switched algorithm never verifies), issuer, expiry and not-before, then
//!   the in-memory revocation state: revoked `jti`s (kept until the token would have expired anyway), the
//!   client's "revoked before" time, and whether the client is disabled or deleted.
//! - An opaque token (`kgat_…`) is stored as SHA-256 with its claims and looked up (cached).
//! - Revocation takes effect on the next request on this node.
//! - A client's tokens live under its consumer: a disabled consumer's clients cannot authenticate and
//!   their tokens answer `DISABLED`; the consumer's plan (rate limits) applies to them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::Validation;
use keygate_core::limits::RateLimit;
pub use keygate_core::oauth::{AtClaims, Source};
use keygate_core::{DecisionCode, PlainSecret, SecretHash, SecretKind, scope};
use keygate_store::{AccessTokenRecord, Backend, Consumer, OAuthClient, OAuthStore, StoreError, TokenFormat};
use moka::sync::Cache;
use serde_json::Value;

use super::keys::{KeyAlg, SigningKeys};
use crate::cache::GuardedCache;

/// What the verify path needs to know about a client without I/O.
#[derive(Debug, Clone)]
pub struct ClientState {
    pub consumer_id: String,
    pub disabled: bool,
    pub tokens_revoked_before: Option<i64>,
    /// Tokens issued before the client existed belong to an earlier client with the same id (a client
    /// known by its metadata document's URL, deleted and made again): they never verify.
    pub created_at: i64,
}

/// What the token path needs to know about a consumer that holds clients.
#[derive(Debug, Clone)]
pub struct ConsumerState {
    pub disabled: bool,
    /// When the consumer last changed: an older snapshot never overwrites a newer one.
    pub updated_at: i64,
    /// The consumer's plan; its clients' tokens count against it (one cell set per client).
    pub limits: Arc<Vec<RateLimit>>,
}

impl From<&Consumer> for ConsumerState {
    fn from(c: &Consumer) -> Self {
        ConsumerState {
            // A suspended owner stops their consumers' clients as disabling the consumer would.
            disabled: c.stopped(),
            updated_at: c.updated_at,
            limits: Arc::new(c.rate_limits.clone().unwrap_or_default()),
        }
    }
}

/// What kind of token a [`TokenInfo`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An OAuth access token (JWT or `kgat_`).
    Access,
    /// A user's personal access token (`kgpat_`); its id is the `jti`.
    Personal,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Access => "access_token",
            TokenKind::Personal => "personal_access_token",
        }
    }
}

/// A presented access token that verified (before the scope check).
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub kind: TokenKind,
    pub format: TokenFormat,
    pub jti: String,
    pub client_id: String,
    pub consumer_id: String,
    pub subject: String,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub issued_at: i64,
    pub expires_at: i64,
    /// For a token issued on a user's behalf: the user (also its `sub`) and the token family.
    pub user_id: Option<String>,
    pub family_id: Option<String>,
    /// For an exchanged token (RFC 8693): the credential it came from, checked on every use.
    pub source: Option<Source>,
    /// For an exchanged token: the client acting for the subject (`act.sub`).
    pub actor: Option<String>,
    /// For a DPoP-bound token: the thumbprint of the key every use must prove.
    pub jkt: Option<String>,
}

/// An issued token. (No `Debug`: it holds the token.)
#[derive(Clone)]
pub struct Issued {
    /// `Bearer`, or `DPoP` for a token bound to the client's key.
    pub token_type: &'static str,
    pub access_token: String,
    pub expires_in: i64,
    pub scope: String,
}

/// What the token path needs to know about a user.
#[derive(Debug, Clone)]
pub struct UserState {
    pub disabled: bool,
    pub allowed_scopes: Option<Vec<String>>,
}

/// On whose behalf a token is minted.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// The client itself (client credentials).
    Client,
    /// A user, within a token family.
    User { user_id: &'a str, family_id: &'a str },
    /// An exchanged credential (RFC 8693): its subject, user and family if any, where it came from, and
    /// the latest it may expire (the subject's own expiry).
    Exchanged { sub: &'a str, family_id: Option<&'a str>, source: &'a Source, not_after: i64 },
}

pub struct OAuth {
    pub keys: SigningKeys,
    pub alg: KeyAlg,
    /// Settled when the state is built (from `issuer`, or the address actually listened on).
    issuer: String,
    clients: RwLock<HashMap<String, ClientState>>,
    /// Consumers that hold clients.
    consumers: RwLock<HashMap<String, ConsumerState>>,
    revoked: RwLock<HashMap<String, i64>>,
    opaque: GuardedCache<SecretHash, Arc<AccessTokenRecord>>,
    /// JWTs whose signature verified, by SHA-256 of the token: a client presents the same token many
    /// times, and the signature check is the only expensive step. Expiry, revocation and client state
    /// are still checked on every request.
    verified_jwts: GuardedCache<SecretHash, Arc<TokenInfo>>,
    /// Client secret hash → client and the secret's expiry.
    secrets: GuardedCache<SecretHash, Arc<(OAuthClient, Option<i64>)>>,
    writer: GroupCommit<AccessTokenRecord, ()>,
    /// Refresh-token rotations, group-committed like opaque tokens.
    rotations: GroupCommit<keygate_store::Rotation, bool>,
    /// Code redemptions, group-committed too.
    redemptions: GroupCommit<keygate_store::Redemption, keygate_store::Redeemed>,
    /// Discovery metadata, built on first request and dropped on every client change; with the count of
    /// client changes it was built after (a build that raced a change is not kept).
    discovery: RwLock<(u64, Option<Arc<Value>>)>,
    /// Ids of client assertions already used (`private_key_jwt`).
    replay: super::assertion::ReplayGuard,
    /// Users by id (`None`: no such user), for the token path; dropped on every user change.
    users: GuardedCache<String, Arc<Option<UserState>>>,
    /// Revoked token families, with their absolute ends (their access tokens stop at once).
    revoked_families: RwLock<HashMap<String, i64>>,
    /// Authorization requests, sessions and in-flight refreshes of the user-facing flows.
    pub flows: super::flows::Flows,
    /// DPoP proofs: their checks and the replay cache.
    pub dpop: super::dpop::Dpop,
    /// Personal access tokens by hash (`None`: no such token), dropped on every change to one or to a
    /// user.
    pats: GuardedCache<SecretHash, Arc<Option<keygate_store::PersonalToken>>>,
    /// Last use of personal access tokens since the last flush: id → (time, address).
    pat_uses: std::sync::Mutex<HashMap<String, (i64, Option<std::net::IpAddr>)>>,
    /// Held while uses are written: a flush that finds nothing to take waits for one in progress, so a
    /// listing after it shows every use noted before it.
    pat_flush: tokio::sync::Mutex<()>,
}

type Reply<R> = tokio::sync::oneshot::Sender<Result<R, StoreError>>;
type Queue<J, R> = tokio::sync::mpsc::UnboundedSender<(J, Reply<R>)>;
type BatchFuture<'a, R> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<R>, StoreError>> + Send + 'a>>;
/// Writes a batch in one transaction; one result per job, in order.
type BatchFn<J, R> = for<'a> fn(&'a dyn OAuthStore, Vec<J>) -> BatchFuture<'a, R>;

/// Group commit: each request waits until its write is durable, but the writes of concurrent requests
/// share one transaction (and one fsync). One at a time, a request waits for a whole commit of its own;
/// with `synchronous=FULL` that capped opaque issuance and refresh rotation at a few hundred to a few
/// thousand per second, whatever the number of connections.
struct GroupCommit<J, R> {
    queue: std::sync::Mutex<Option<Queue<J, R>>>,
    run: BatchFn<J, R>,
}

impl<J: Send + Clone + 'static, R: Send + Clone + 'static> GroupCommit<J, R> {
    fn new(run: BatchFn<J, R>) -> Self {
        GroupCommit { queue: std::sync::Mutex::new(None), run }
    }

    async fn submit(&self, store: &dyn OAuthStore, job: J) -> Result<R, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sender = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let direct = match sender {
            Some(s) => match s.send((job, tx)) {
                Ok(()) => {
                    return rx.await.unwrap_or_else(|_| {
                        Err(StoreError::Unavailable("the group-commit writer stopped".into()))
                    });
                }
                Err(tokio::sync::mpsc::error::SendError((job, _))) => job,
            },
            // Not started (e.g. in benchmarks): write directly.
            None => job,
        };
        let mut out = (self.run)(store, vec![direct]).await?;
        out.pop().ok_or_else(|| StoreError::Corrupt("a batch write returned no result".into()))
    }

    /// Starts the writer task for a store that lives as long as the server.
    fn start(&self, store: Arc<dyn OAuthStore>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(J, Reply<R>)>();
        *self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        let run = self.run;
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 1000 {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let jobs: Vec<J> = batch.iter().map(|(j, _)| j.clone()).collect();
                let result = run(store.as_ref(), jobs).await;
                for (i, (_, reply)) in batch.into_iter().enumerate() {
                    let r = match &result {
                        Ok(results) => results.get(i).cloned().ok_or_else(|| {
                            StoreError::Corrupt("a batch write returned too few results".into())
                        }),
                        Err(e) => Err(StoreError::Unavailable(e.to_string())),
                    };
                    let _ = reply.send(r);
                }
            }
        });
    }
}

fn write_access_tokens<'a>(
    store: &'a dyn OAuthStore,
    records: Vec<AccessTokenRecord>,
) -> BatchFuture<'a, ()> {
    Box::pin(async move { store.insert_access_tokens(&records).await.map(|()| vec![(); records.len()]) })
}

fn write_redemptions<'a>(
    store: &'a dyn OAuthStore,
    r: Vec<keygate_store::Redemption>,
) -> BatchFuture<'a, keygate_store::Redeemed> {
    Box::pin(async move { store.redeem_codes(&r).await })
}

fn write_rotations<'a>(
    store: &'a dyn OAuthStore,
    rotations: Vec<keygate_store::Rotation>,
) -> BatchFuture<'a, bool> {
    Box::pin(async move { store.rotate_refreshes(&rotations).await })
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The user of an opaque token: its subject, when it was issued for a user (a family, or exchanged
/// from a personal access token).
fn opaque_user(record: &AccessTokenRecord, source: Option<&Source>) -> Option<String> {
    let from_pat = matches!(source, Some(Source::PersonalToken { .. }));
    (record.family_id.is_some() || from_pat).then(|| record.subject.clone())
}

/// Does this string look like a JWT (three base64url segments, a JSON header)?
pub fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.bytes().filter(|b| *b == b'.').count() == 2
}

impl OAuth {
    pub fn new(issuer: String, alg: KeyAlg, refresh_grace: Duration) -> Self {
        OAuth {
            keys: SigningKeys::default(),
            alg,
            issuer,
            clients: RwLock::new(HashMap::new()),
            consumers: RwLock::new(HashMap::new()),
            revoked: RwLock::new(HashMap::new()),
            opaque: GuardedCache::new(
                Cache::builder().max_capacity(1_000_000).time_to_live(Duration::from_secs(300)).build(),
            ),
            secrets: GuardedCache::new(
                Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(300)).build(),
            ),
            verified_jwts: GuardedCache::new(
                Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(300)).build(),
            ),
            writer: GroupCommit::new(write_access_tokens),
            rotations: GroupCommit::new(write_rotations),
            redemptions: GroupCommit::new(write_redemptions),
            discovery: RwLock::new((0, None)),
            replay: super::assertion::ReplayGuard::default(),
            users: GuardedCache::new(
                Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(300)).build(),
            ),
            revoked_families: RwLock::new(HashMap::new()),
            flows: super::flows::Flows::new(refresh_grace),
            pats: GuardedCache::new(
                Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(300)).build(),
            ),
            pat_uses: std::sync::Mutex::new(HashMap::new()),
            pat_flush: tokio::sync::Mutex::new(()),
            dpop: super::dpop::Dpop::default(),
        }
    }

    /// Starts background work (the token group-commit writer); call once, inside the runtime.
    pub fn start(&self, store: Arc<dyn OAuthStore>) {
        self.writer.start(store.clone());
        self.rotations.start(store.clone());
        self.redemptions.start(store);
    }

    pub fn issuer(&self) -> String {
        self.issuer.clone()
    }

    /// Loads signing keys (opening them with the master key), clients, their consumers and revoked
    /// token ids at start.
    pub async fn load(
        &self,
        store: &dyn Backend,
        master: Arc<crate::seal::MasterKey>,
        now: i64,
    ) -> Result<(), super::keys::KeyError> {
        self.keys.set_master(master);
        self.keys.load(store, self.alg, now).await?;
        for c in all_clients(store).await? {
            if !lock_read(&self.consumers).contains_key(&c.consumer_id)
                && let Some(consumer) = store.get_consumer(&c.consumer_id).await?
            {
                self.consumer_changed(&consumer);
            }
            self.client_changed(&c);
        }
        let ids = store.revoked_jtis(now).await?;
        lock_write(&self.revoked).extend(ids);
        let families = store.revoked_families(now).await?;
        lock_write(&self.revoked_families).extend(families);
        Ok(())
    }

    /// A user changed (disabled, enabled, allowed scopes, deleted): the token path reads them again.
    pub fn user_changed(&self, _id: &str) {
        self.users.invalidate_all();
        self.pats.invalidate_all();
    }

    /// A personal access token was created, rotated or revoked.
    pub fn pats_changed(&self) {
        self.pats.invalidate_all();
    }

    /// Notes a valid use of a personal access token (written at the next flush).
    pub fn pat_used(&self, id: &str, at: i64, ip: Option<std::net::IpAddr>) {
        let mut uses = self.pat_uses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        uses.insert(id.to_string(), (at, ip));
    }

    /// Writes the last uses of personal access tokens; on failure they are kept for the next flush.
    pub async fn flush_pat_uses(&self, store: &dyn OAuthStore) -> Result<usize, StoreError> {
        let _writing = self.pat_flush.lock().await;
        let taken: Vec<(String, i64, Option<String>)> = {
            let mut uses = self.pat_uses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut taken: Vec<_> =
                uses.drain().map(|(id, (at, ip))| (id, at, ip.map(|i| i.to_string()))).collect();
            // In id order, as every node writes them: concurrent flushes wait for each other, never deadlock.
            taken.sort();
            taken
        };
        if taken.is_empty() {
            return Ok(0);
        }
        if let Err(e) = store.touch_pats(&taken).await {
            let mut uses = self.pat_uses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (id, at, ip) in taken {
                let ip = ip.and_then(|s| s.parse().ok());
                uses.entry(id).or_insert((at, ip));
            }
            return Err(e);
        }
        Ok(taken.len())
    }

    /// Decides about a personal access token: known, not revoked, not expired, its user enabled.
    async fn verify_pat(
        &self,
        store: &dyn OAuthStore,
        token: &str,
        audience: Option<&str>,
        now: i64,
    ) -> Result<Result<Arc<TokenInfo>, DecisionCode>, StoreError> {
        if !matches!(keygate_core::credential::parse(token).map(|p| p.kind), Ok(SecretKind::PersonalToken)) {
            return Ok(Err(DecisionCode::Malformed));
        }
        let hash = SecretHash::of(token);
        let found = match self.pats.get(&hash) {
            Some(f) => f,
            None => {
                let ticket = self.pats.ticket();
                let f = Arc::new(store.find_pat(&hash).await?);
                self.pats.insert_if_current(ticket, hash, f.clone());
                f
            }
        };
        let Some(pat) = found.as_ref() else { return Ok(Err(DecisionCode::NotFound)) };
        if pat.revoked_at.is_some() {
            return Ok(Err(DecisionCode::Revoked));
        }
        if pat.expires_at.is_some_and(|e| e <= now) {
            return Ok(Err(DecisionCode::Expired));
        }
        let user = match self.user(store, &pat.user_id).await? {
            None => return Ok(Err(DecisionCode::Revoked)),
            Some(u) if u.disabled => return Ok(Err(DecisionCode::Disabled)),
            Some(u) => u,
        };
        if let Some(aud) = audience
            && !pat.audiences.is_empty()
            && !pat.audiences.iter().any(|a| a == aud)
        {
            return Ok(Err(DecisionCode::NotFound));
        }
        Ok(Ok(Arc::new(TokenInfo {
            kind: TokenKind::Personal,
            format: TokenFormat::Opaque,
            jti: pat.id.clone(),
            client_id: String::new(),
            consumer_id: String::new(),
            subject: pat.user_id.clone(),
            // Within what the user may grant now (an admin may have narrowed it since).
            scopes: super::authorize::within_user_limit(
                &scope::usable_only(&pat.scopes),
                user.allowed_scopes.as_deref(),
            ),
            audiences: pat.audiences.clone(),
            issued_at: pat.updated_at,
            expires_at: pat.expires_at.unwrap_or(i64::MAX),
            user_id: Some(pat.user_id.clone()),
            family_id: None,
            source: None,
            actor: None,
            jkt: None,
        })))
    }

    /// Reads the revoked token ids and token families again (another node revoked some) and forgets
    /// cached opaque tokens.
    pub async fn reload_revocations(&self, store: &dyn OAuthStore, now: i64) -> Result<(), StoreError> {
        let ids = store.revoked_jtis(now).await?;
        let families = store.revoked_families(now).await?;
        lock_write(&self.revoked).extend(ids);
        self.families_revoked(&families);
        self.pats.invalidate_all();
        Ok(())
    }

    /// Token families were revoked (reuse detected, grant revoked, user deleted): their access tokens
    /// stop verifying at once.
    pub fn families_revoked(&self, families: &[(String, i64)]) {
        lock_write(&self.revoked_families).extend(families.iter().cloned());
        self.opaque.invalidate_all();
    }

    /// The state of a user, cached; `None` if there is no such user.
    pub async fn user(&self, store: &dyn OAuthStore, id: &str) -> Result<Option<UserState>, StoreError> {
        if let Some(u) = self.users.get(&id.to_string()) {
            return Ok(Option::clone(&u));
        }
        let ticket = self.users.ticket();
        let state = store
            .get_user(id)
            .await?
            .map(|u| UserState { disabled: u.disabled, allowed_scopes: u.allowed_scopes });
        self.users.insert_if_current(ticket, id.to_string(), Arc::new(state.clone()));
        Ok(state)
    }

    pub fn family_revoked(&self, id: &str) -> bool {
        lock_read(&self.revoked_families).contains_key(id)
    }

    /// Keeps the consumer state of the token path in step with an admin change (disable, enable, plan).
    /// Only consumers that hold clients matter here, but recording any is harmless and keeps callers
    /// simple.
    pub fn consumer_changed(&self, c: &Consumer) {
        {
            let mut consumers = lock_write(&self.consumers);
            if consumers.get(&c.id).is_some_and(|known| known.updated_at > c.updated_at) {
                return;
            }
            consumers.insert(c.id.clone(), ConsumerState::from(c));
        }
        self.secrets.invalidate_all();
    }

    /// The state of a client's consumer; `None` if unknown (then its tokens do not verify).
    pub fn consumer(&self, consumer_id: &str) -> Option<ConsumerState> {
        lock_read(&self.consumers).get(consumer_id).cloned()
    }

    /// Keeps the in-memory client state in step with an admin change.
    pub fn client_changed(&self, c: &OAuthClient) {
        lock_write(&self.clients).insert(
            c.id.clone(),
            ClientState {
                consumer_id: c.consumer_id.clone(),
                disabled: c.disabled,
                tokens_revoked_before: c.tokens_revoked_before,
                created_at: c.created_at,
            },
        );
        self.secrets.invalidate_all();
        self.opaque.invalidate_all();
        {
            let mut d = lock_write(&self.discovery);
            *d = (d.0 + 1, None);
        }
    }

    pub fn client_deleted(&self, id: &str) {
        lock_write(&self.clients).remove(id);
        self.verified_jwts.invalidate_all();
        self.secrets.invalidate_all();
        self.opaque.invalidate_all();
        {
            let mut d = lock_write(&self.discovery);
            *d = (d.0 + 1, None);
        }
    }

    /// The cached discovery document, or the generation to pass to [`OAuth::keep_discovery`] after
    /// building one.
    pub fn discovery(&self) -> Result<Arc<Value>, u64> {
        let d = lock_read(&self.discovery);
        d.1.clone().ok_or(d.0)
    }

    /// Keeps a discovery document built from what the store said at `generation`, unless a client
    /// changed since.
    pub fn keep_discovery(&self, generation: u64, doc: Arc<Value>) {
        let mut d = lock_write(&self.discovery);
        if d.0 == generation {
            d.1 = Some(doc);
        }
    }

    /// A signing key was revoked: forget every verified JWT (those it signed must be checked again).
    pub fn signing_key_revoked(&self) {
        self.verified_jwts.invalidate_all();
    }

    /// Authenticates a client by id and secret. `None` for any failure, without saying which.
    pub async fn authenticate_client(
        &self,
        store: &dyn OAuthStore,
        client_id: &str,
        secret: &str,
        now: i64,
    ) -> Result<Option<OAuthClient>, StoreError> {
        if !matches!(keygate_core::credential::parse(secret).map(|p| p.kind), Ok(SecretKind::ClientSecret)) {
            return Ok(None);
        }
        let hash = SecretHash::of(secret);
        let found = match self.secrets.get(&hash) {
            Some(f) => Some(f),
            None => {
                let ticket = self.secrets.ticket();
                match store.find_client_secret(&hash).await? {
                    Some(f) => {
                        let f = Arc::new(f);
                        self.secrets.insert_if_current(ticket, hash, f.clone());
                        Some(f)
                    }
                    None => None,
                }
            }
        };
        Ok(found.and_then(|f| {
            let (client, expires) = &*f;
            let consumer_enabled = self.consumer(&client.consumer_id).is_some_and(|c| !c.disabled);
            let ok = client.id.as_bytes() == client_id.as_bytes()
                && !client.disabled
                && consumer_enabled
                && expires.is_none_or(|t| t > now);
            ok.then(|| client.clone())
        }))
    }

    /// A public client (no secret: `token_endpoint_auth_method` `none`) by its id; `None` unless it is
    /// a usable public client.
    pub async fn authenticate_public(
        &self,
        store: &dyn OAuthStore,
        client_id: &str,
    ) -> Result<Option<OAuthClient>, StoreError> {
        // Client ids are `kgc_…`, or the URL of a client metadata document (at most 255 characters).
        if client_id.is_empty() || client_id.len() > 255 {
            return Ok(None);
        }
        let Some(client) = store.get_client(client_id).await? else { return Ok(None) };
        let usable = !client.confidential
            && !client.disabled
            && self.consumer(&client.consumer_id).is_some_and(|c| !c.disabled);
        Ok(usable.then_some(client))
    }

    /// Authenticates a `private_key_jwt` client by its signed assertion (RFC 7523). `None` for any
    /// failure, without saying which (the reason goes to the debug log).
    pub async fn authenticate_assertion(
        &self,
        store: &dyn OAuthStore,
        assertion: &str,
        client_id: Option<&str>,
        now: i64,
    ) -> Result<Option<OAuthClient>, StoreError> {
        let Some(claimed) = super::assertion::claimed_client(assertion) else { return Ok(None) };
        if client_id.is_some_and(|c| c != claimed) {
            return Ok(None);
        }
        let Some(client) = store.get_client(&claimed).await? else { return Ok(None) };
        let usable = client.auth_method == crate::routes::clients::PRIVATE_KEY_JWT
            && !client.disabled
            && self.consumer(&client.consumer_id).is_some_and(|c| !c.disabled);
        let (true, Some(jwks)) = (usable, &client.jwks) else { return Ok(None) };
        let issuer = self.issuer();
        let audiences = [format!("{issuer}/oauth2/token"), issuer];
        match super::assertion::verify(assertion, &client.id, jwks, &audiences, &self.replay, now) {
            Ok(()) => Ok(Some(client)),
            Err(why) => {
                tracing::debug!(client = %client.id, why, "client assertion refused");
                Ok(None)
            }
        }
    }

    /// Issues an access token for a client (client credentials: the subject is the client). An opaque
    /// token is durable before this returns (group commit).
    pub async fn issue(
        &self,
        store: &dyn OAuthStore,
        client: &OAuthClient,
        scopes: &[String],
        audiences: &[String],
        jkt: Option<&str>,
        now: i64,
    ) -> Result<Issued, IssueError> {
        let (issued, record) = self.mint(client, Subject::Client, scopes, audiences, jkt, now)?;
        if let Some(record) = record {
            self.store_opaque(store, record).await.map_err(IssueError::Store)?;
        }
        Ok(issued)
    }

    /// Mints an access token. For an opaque token, the record to store comes back: the caller writes it
    /// (in the same transaction as whatever else the grant writes) and then calls
    /// [`OAuth::opaque_issued`].
    pub fn mint(
        &self,
        client: &OAuthClient,
        subject: Subject<'_>,
        scopes: &[String],
        audiences: &[String],
        jkt: Option<&str>,
        now: i64,
    ) -> Result<(Issued, Option<AccessTokenRecord>), IssueError> {
        let token_type = if jkt.is_some() { "DPoP" } else { "Bearer" };
        let mut lifetime = client.token_lifetime_seconds.clamp(1, super::keys::MAX_TOKEN_LIFETIME_SECONDS);
        if let Subject::Exchanged { not_after, .. } = subject {
            lifetime = lifetime.min((not_after - now) / 1000).max(1);
        }
        let expires_at = now + lifetime * 1000;
        let jti =
            keygate_core::credential::random_base62(22).map_err(|e| IssueError::Internal(e.to_string()))?;
        let scope = scopes.join(" ");
        // An exchanged token's user is its subject (`sub`); only the family and source need carrying.
        let (sub, family, source) = match subject {
            Subject::Client => (client.id.clone(), None, None),
            Subject::User { user_id, family_id } => (user_id.to_string(), Some(family_id.to_string()), None),
            Subject::Exchanged { sub, family_id, source, .. } => {
                (sub.to_string(), family_id.map(str::to_owned), Some(source.clone()))
            }
        };
        let act = source.as_ref().map(|_| serde_json::json!({"sub": client.id}));
        if client.token_format == TokenFormat::Opaque {
            let secret = PlainSecret::generate(SecretKind::AccessToken)
                .map_err(|e| IssueError::Internal(e.to_string()))?;
            let record = AccessTokenRecord {
                hash: secret.hash(),
                jti,
                client_id: client.id.clone(),
                subject: sub,
                scopes: scopes.to_vec(),
                audiences: audiences.to_vec(),
                issued_at: now,
                expires_at,
                revoked_at: None,
                family_id: family,
                source: source.as_ref().and_then(|s| serde_json::to_string(s).ok()),
                jkt: jkt.map(str::to_owned),
            };
            let issued =
                Issued { token_type, access_token: secret.expose().to_string(), expires_in: lifetime, scope };
            return Ok((issued, Some(record)));
        }
        let key =
            self.keys.signer(now).ok_or_else(|| IssueError::Internal("no signing key is active".into()))?;
        let aud = match audiences {
            [one] => Value::String(one.clone()),
            many => Value::Array(many.iter().cloned().map(Value::String).collect()),
        };
        let claims = AtClaims {
            iss: self.issuer(),
            sub,
            aud,
            exp: expires_at / 1000,
            iat: now.div_euclid(1000),
            nbf: now.div_euclid(1000),
            jti,
            client_id: client.id.clone(),
            consumer_id: Some(client.consumer_id.clone()),
            scope: scope.clone(),
            kg_iat: Some(now),
            kg_fam: family,
            act,
            kg_src: source,
            cnf: jkt.map(|j| serde_json::json!({"jkt": j})),
        };
        let access_token = key.sign_jwt(&claims).map_err(|e| IssueError::Internal(e.to_string()))?;
        Ok((Issued { token_type, access_token, expires_in: lifetime, scope }, None))
    }

    /// Rotates a refresh token (group-committed with concurrent rotations): false if it was already
    /// used or its family revoked.
    pub async fn rotate_refresh(
        &self,
        store: &dyn OAuthStore,
        rotation: keygate_store::Rotation,
    ) -> Result<bool, StoreError> {
        self.rotations.submit(store, rotation).await
    }

    /// Redeems a code (group-committed with concurrent redemptions).
    pub async fn redeem_code(
        &self,
        store: &dyn OAuthStore,
        redemption: keygate_store::Redemption,
    ) -> Result<keygate_store::Redeemed, StoreError> {
        self.redemptions.submit(store, redemption).await
    }

    /// Writes an opaque token's record (group-committed) and remembers it.
    pub async fn store_opaque(
        &self,
        store: &dyn OAuthStore,
        record: AccessTokenRecord,
    ) -> Result<(), StoreError> {
        self.writer.submit(store, record.clone()).await?;
        self.opaque_issued(record);
        Ok(())
    }

    /// An opaque token's record is durable: remember it, so that its first verification needs no read.
    pub fn opaque_issued(&self, record: AccessTokenRecord) {
        self.opaque.insert_new(record.hash, Arc::new(record));
    }

    /// Decides about a presented token. `Err` only for store trouble; every rejection is a code.
    pub async fn verify(
        &self,
        store: &dyn OAuthStore,
        token: &str,
        audience: Option<&str>,
        now: i64,
    ) -> Result<Result<Arc<TokenInfo>, DecisionCode>, StoreError> {
        if token.starts_with(SecretKind::PersonalToken.prefix()) {
            return self.verify_pat(store, token, audience, now).await;
        }
        let info = if looks_like_jwt(token) {
            let hash = SecretHash::of(token);
            let info = match self.verified_jwts.get(&hash) {
                Some(info) => info,
                None => {
                    let ticket = self.verified_jwts.ticket();
                    match self.verify_jwt(token, now) {
                        Ok(i) => {
                            let i = Arc::new(i);
                            self.verified_jwts.insert_if_current(ticket, hash, i.clone());
                            i
                        }
                        Err(code) => return Ok(Err(code)),
                    }
                }
            };
            if info.expires_at <= now {
                return Ok(Err(DecisionCode::Expired));
            }
            TokenInfo::clone(&info)
        } else {
            match keygate_core::credential::parse(token).map(|p| p.kind) {
                Ok(SecretKind::AccessToken) => {}
                _ => return Ok(Err(DecisionCode::Malformed)),
            }
            let hash = SecretHash::of(token);
            let record = match self.opaque.get(&hash) {
                Some(r) => r,
                None => {
                    let ticket = self.opaque.ticket();
                    match store.find_access_token(&hash).await? {
                        Some(r) => {
                            let r = Arc::new(r);
                            self.opaque.insert_if_current(ticket, hash, r.clone());
                            r
                        }
                        None => return Ok(Err(DecisionCode::NotFound)),
                    }
                }
            };
            if record.revoked_at.is_some() {
                return Ok(Err(DecisionCode::Revoked));
            }
            if record.expires_at <= now {
                return Ok(Err(DecisionCode::Expired));
            }
            // A source that does not parse fails closed.
            let source = match record.source.as_deref().map(serde_json::from_str::<Source>) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(_)) => return Ok(Err(DecisionCode::Revoked)),
            };
            TokenInfo {
                kind: TokenKind::Access,
                format: TokenFormat::Opaque,
                jti: record.jti.clone(),
                client_id: record.client_id.clone(),
                consumer_id: String::new(),
                subject: record.subject.clone(),
                scopes: scope::usable_only(&record.scopes),
                audiences: record.audiences.clone(),
                issued_at: record.issued_at,
                expires_at: record.expires_at,
                user_id: opaque_user(&record, source.as_ref()),
                family_id: record.family_id.clone(),
                actor: source.as_ref().map(|_| record.client_id.clone()),
                source,
                jkt: record.jkt.clone(),
            }
        };
        // Client state: disabled or deleted clients' tokens stop working; "revoke all" cut-off.
        let mut info = info;
        {
            let clients = lock_read(&self.clients);
            let Some(client) = clients.get(&info.client_id) else { return Ok(Err(DecisionCode::Revoked)) };
            if client.disabled || self.consumer(&client.consumer_id).is_none_or(|c| c.disabled) {
                return Ok(Err(DecisionCode::Disabled));
            }
            // Revoked by "revoke all", or issued to an earlier client with the same id.
            if client.tokens_revoked_before.is_some_and(|t| info.issued_at < t)
                || info.issued_at < client.created_at
            {
                return Ok(Err(DecisionCode::Revoked));
            }
            info.consumer_id = client.consumer_id.clone();
        }
        if lock_read(&self.revoked).contains_key(&info.jti) {
            return Ok(Err(DecisionCode::Revoked));
        }
        // A user's token: its family (one authorization) and the user themselves.
        if let (Some(family), Some(user)) = (&info.family_id, &info.user_id) {
            if self.family_revoked(family) {
                return Ok(Err(DecisionCode::Revoked));
            }
            match self.user(store, user).await? {
                None => return Ok(Err(DecisionCode::Revoked)),
                Some(u) if u.disabled => return Ok(Err(DecisionCode::Disabled)),
                Some(_) => {}
            }
        }
        if let Some(aud) = audience
            && !info.audiences.iter().any(|a| a == aud)
        {
            // A real token at the wrong place: not a guess, so not a failed check for the throttle.
            return Ok(Err(DecisionCode::WrongAudience));
        }
        Ok(Ok(Arc::new(info)))
    }

    /// Signature, header and time checks of a JWT access token: no I/O.
    pub fn verify_jwt(&self, token: &str, now: i64) -> Result<TokenInfo, DecisionCode> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| DecisionCode::Malformed)?;
        if header.typ.as_deref().map(str::to_ascii_lowercase).as_deref() != Some("at+jwt") {
            return Err(DecisionCode::Malformed);
        }
        let kid = header.kid.ok_or(DecisionCode::Malformed)?;
        let key = self.keys.by_kid(&kid, now).ok_or(DecisionCode::NotFound)?;
        // The algorithm comes from our key, never from the token.
        let mut validation = Validation::new(key.alg.algorithm());
        validation.set_issuer(&[self.issuer()]);
        validation.validate_aud = false;
        // Times are checked below against the server's clock, not the library's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iss", "sub", "iat", "jti", "aud", "nbf"]);
        let data = jsonwebtoken::decode::<AtClaims>(token, &key.decoding, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => DecisionCode::Expired,
                ErrorKind::ImmatureSignature => DecisionCode::NotFound,
                _ => DecisionCode::Malformed,
            }
        })?;
        let c = data.claims;
        if c.nbf.saturating_mul(1000) > now {
            return Err(DecisionCode::NotFound);
        }
        if c.exp.saturating_mul(1000) <= now {
            return Err(DecisionCode::Expired);
        }
        Ok(TokenInfo {
            kind: TokenKind::Access,
            format: TokenFormat::Jwt,
            scopes: c.scopes(),
            audiences: c.audiences(),
            issued_at: c.issued_at_ms(),
            expires_at: c.exp.saturating_mul(1000),
            jti: c.jti,
            client_id: c.client_id,
            consumer_id: String::new(),
            user_id: (c.kg_fam.is_some() || matches!(c.kg_src, Some(Source::PersonalToken { .. })))
                .then(|| c.sub.clone()),
            family_id: c.kg_fam,
            actor: c.act.as_ref().and_then(|a| a.get("sub")).and_then(Value::as_str).map(str::to_owned),
            source: c.kg_src,
            jkt: c.cnf.as_ref().and_then(|v| v.get("jkt")).and_then(Value::as_str).map(str::to_owned),
            subject: c.sub,
        })
    }

    /// Revokes a presented token if it is one of ours and (when `client_id` is given) that client's.
    /// Unknown and malformed tokens are ignored, as RFC 7009 asks. `actor` and `reason` go into the
    /// audit record (and the `token.revoked` event) written with the revocation.
    pub async fn revoke(
        &self,
        store: &dyn OAuthStore,
        token: &str,
        client_id: Option<&str>,
        now: i64,
        actor: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        if looks_like_jwt(token) {
            // Only tokens we signed: a forged one must not fill the revocation list.
            let Ok(info) = self.verify_jwt(token, now) else { return Ok(false) };
            if client_id.is_some_and(|c| c != info.client_id) {
                return Ok(false);
            }
            let details = serde_json::json!({"client_id": info.client_id, "format": "jwt", "reason": reason});
            let audit = token_audit(now, actor, "access_token", &info.jti, details)?;
            store.revoke_jti(&info.jti, &info.client_id, info.expires_at, now, Some(&audit)).await?;
            lock_write(&self.revoked).insert(info.jti, info.expires_at);
            return Ok(true);
        }
        if matches!(keygate_core::credential::parse(token).map(|p| p.kind), Ok(SecretKind::PersonalToken)) {
            // A user's own token: only Keygate's admins revoke it here (clients never own one).
            if client_id.is_some() {
                return Ok(false);
            }
            let Some(pat) = store.find_pat(&SecretHash::of(token)).await? else { return Ok(false) };
            let details = serde_json::json!({"user_id": pat.user_id, "reason": reason});
            let audit = keygate_store::NewAudit {
                action: "pat.revoke".into(),
                ..token_audit(now, actor, "personal_token", &pat.id, details)?
            };
            let revoked = store.revoke_pat(&pat.id, now, &audit).await?.is_some();
            self.pats_changed();
            return Ok(revoked);
        }
        if matches!(keygate_core::credential::parse(token).map(|p| p.kind), Ok(SecretKind::RefreshToken)) {
            // Revoking a refresh token revokes its family: every token of that authorization (RFC 7009 §2.1).
            let Some((_, family)) = store.find_refresh(&SecretHash::of(token)).await? else {
                return Ok(false);
            };
            if client_id.is_some_and(|c| c != family.client_id) {
                return Ok(false);
            }
            let details = serde_json::json!({"client_id": family.client_id, "user_id": family.user_id, "reason": reason});
            let audit = token_audit(now, actor, "token_family", &family.id, details)?;
            let revoked = store.revoke_family(&family.id, now, Some(&audit)).await?;
            self.families_revoked(&[(family.id, family.expires_at)]);
            return Ok(revoked);
        }
        if !matches!(keygate_core::credential::parse(token).map(|p| p.kind), Ok(SecretKind::AccessToken)) {
            return Ok(false);
        }
        let hash = SecretHash::of(token);
        let Some(record) = store.find_access_token(&hash).await? else { return Ok(false) };
        if client_id.is_some_and(|cid| record.client_id != cid) {
            return Ok(false);
        }
        let details =
            serde_json::json!({"client_id": record.client_id, "format": "opaque", "reason": reason});
        let audit = token_audit(now, actor, "access_token", &record.jti, details)?;
        let revoked = store.revoke_access_token(&hash, now, Some(&audit)).await?.is_some();
        self.opaque.invalidate([&hash]);
        Ok(revoked)
    }

    /// Is a client (and its consumer) enabled, with no "revoke all" cut-off after `issued_at`?
    pub fn client_ok(&self, client_id: &str, issued_at: i64) -> bool {
        let clients = lock_read(&self.clients);
        clients.get(client_id).is_some_and(|c| {
            !c.disabled
                && self.consumer(&c.consumer_id).is_some_and(|s| !s.disabled)
                && c.tokens_revoked_before.is_none_or(|t| issued_at >= t)
                && issued_at >= c.created_at
        })
    }

    /// Is the source of an exchanged token still good? (API keys are checked by the caller, which has
    /// the key verifier.)
    pub async fn source_alive(
        &self,
        store: &dyn OAuthStore,
        source: &Source,
        now: i64,
    ) -> Result<bool, StoreError> {
        let hash = |h: &str| SecretHash::from_hex(h);
        Ok(match source {
            Source::ApiKey { .. } => false,
            Source::Jwt { jti, client_id, iat } => {
                !lock_read(&self.revoked).contains_key(jti) && self.client_ok(client_id, *iat)
            }
            Source::OpaqueToken { h } => {
                let Some(hash) = hash(h) else { return Ok(false) };
                let record = match self.opaque.get(&hash) {
                    Some(r) => Some(r),
                    None => store.find_access_token(&hash).await?.map(Arc::new),
                };
                record.is_some_and(|r| {
                    r.revoked_at.is_none()
                        && r.expires_at > now
                        && self.client_ok(&r.client_id, r.issued_at)
                        && r.family_id.as_ref().is_none_or(|f| !self.family_revoked(f))
                })
            }
            Source::PersonalToken { h } => {
                let Some(hash) = hash(h) else { return Ok(false) };
                let pat = match self.pats.get(&hash) {
                    Some(p) => Option::clone(&p),
                    None => store.find_pat(&hash).await?,
                };
                match pat {
                    Some(p) if p.revoked_at.is_none() && p.expires_at.is_none_or(|e| e > now) => {
                        matches!(self.user(store, &p.user_id).await?, Some(u) if !u.disabled)
                    }
                    _ => false,
                }
            }
        })
    }

    /// Forgets revoked ids of tokens that have expired anyway.
    pub fn prune(&self, now: i64) {
        lock_write(&self.revoked).retain(|_, exp| *exp > now);
        // A family's access tokens live at most a day past its end.
        lock_write(&self.revoked_families).retain(|_, end| end.saturating_add(86_400_000) > now);
    }

    /// Granted scopes: requested ∩ allowed, or all allowed when none are requested.
    pub fn grant_scopes(client: &OAuthClient, requested: Option<&str>) -> Result<Vec<String>, String> {
        let Some(requested) = requested.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(client.scopes.clone());
        };
        let mut granted = Vec::new();
        for s in requested.split(' ').filter(|s| !s.is_empty()) {
            if scope::validate_scope(s).is_err() || !client.scopes.iter().any(|a| scope::covers(a, s)) {
                return Err(format!("the client may not have the scope {s:?}"));
            }
            if !granted.iter().any(|g| g == s) {
                granted.push(s.to_string());
            }
        }
        Ok(granted)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Internal(String),
}

/// Every registered client, page by page.
pub async fn all_clients(store: &dyn OAuthStore) -> Result<Vec<OAuthClient>, StoreError> {
    const PAGE: u32 = 1000;
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_clients(&keygate_store::Page { after: after.clone(), limit: PAGE, search: None })
            .await?;
        let full = page.len() == PAGE as usize;
        after = page.last().map(|c| c.id.clone());
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// The audit record of a token revocation (`token.revoke`, reported as `token.revoked`).
pub fn token_audit(
    now: i64,
    actor: &str,
    target_type: &str,
    target_id: &str,
    details: serde_json::Value,
) -> Result<keygate_store::NewAudit, StoreError> {
    Ok(keygate_store::NewAudit {
        id: keygate_core::id::new_id("evt", now).map_err(|e| StoreError::Unavailable(e.to_string()))?,
        at: now,
        actor: actor.into(),
        action: "token.revoke".into(),
        target_type: target_type.into(),
        target_id: target_id.into(),
        ip: None,
        details,
    })
}
