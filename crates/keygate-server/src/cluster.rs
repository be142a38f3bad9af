//! Several nodes on one shared database (PostgreSQL): each node follows the audited changes the others
//! commit and forgets what they make stale, as it does for its own changes.
//!
//! - Every change another node could hold a stale copy of (consumers, keys, clients, users, personal
//!   tokens, token and grant revocations, signing keys) is audited in its own transaction, and the
//!   audit record takes a change number in commit order and announces the commit (`NOTIFY`).
//! - A follower per node waits for an announcement, or one second at most, and reads every change after
//!   the last one it applied. A lost connection loses no change: the next read starts where the last
//!   one ended. While the notification connection is down, `/readyz` says so (and the one-second reads
//!   go on).
//! - Applying a change repeats the node-local invalidation the change made where it was served: the
//!   key's cache entries, the consumer's, a client's or user's state, the revoked-token lists, the
//!   signing keys. A node applies its own changes too, harmlessly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keygate_store::{Change, StoreError};

use crate::AppState;

/// How long a follower waits for an announcement before reading anyway.
const POLL: Duration = Duration::from_secs(1);

/// What the follower tells `/readyz`.
#[derive(Debug, Default)]
pub struct ClusterStatus {
    /// The notification connection is up (always true for a store that is not shared).
    pub listening: AtomicBool,
}

/// Starts listening for the other nodes' changes (before the node serves, so that `/readyz` is true
/// from the start) and then follows them until the task is dropped. Only for a shared store.
pub async fn start(state: Arc<AppState>, from: i64) -> tokio::task::JoinHandle<()> {
    let listener = match state.store.listen().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for other nodes' changes; reading them every second");
            None
        }
    };
    state.cluster.listening.store(listener.is_some(), Ordering::Release);
    tokio::spawn(follow(state, listener, from))
}

/// The change number to follow from: read before a node loads anything, so that a change committed
/// while it loads is applied after.
pub async fn starting_point(state: &AppState) -> i64 {
    match state.store.last_change().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the change log yet; following from its start");
            0
        }
    }
}

async fn follow(
    state: Arc<AppState>,
    mut listener: Option<Box<dyn keygate_store::ChangeListener>>,
    mut cursor: i64,
) {
    loop {
        if listener.is_none() {
            match state.store.listen().await {
                Ok(l) => {
                    listener = l;
                    state.cluster.listening.store(listener.is_some(), Ordering::Release);
                }
                Err(e) => {
                    state.cluster.listening.store(false, Ordering::Release);
                    tracing::warn!(error = %e, "cannot listen for other nodes' changes; reading them every second");
                }
            }
        }
        // Read first, then wait: whatever was committed before the listener started is read now.
        match apply_after(&state, cursor).await {
            Ok(n) => cursor = n,
            Err(e) => tracing::warn!(error = %e, "reading other nodes' changes failed; retrying"),
        }
        match listener.as_mut() {
            Some(l) => match tokio::time::timeout(POLL, l.next()).await {
                Ok(Ok(true)) | Err(_) => {}
                Ok(Ok(false)) => {
                    tracing::warn!("the change notification connection was lost and made again; catching up");
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the change notification connection is down; reconnecting");
                    state.cluster.listening.store(false, Ordering::Release);
                    listener = None;
                    tokio::time::sleep(POLL).await;
                }
            },
            None => tokio::time::sleep(POLL).await,
        }
    }
}

/// Applies every change after `cursor`; returns the new cursor.
async fn apply_after(state: &AppState, mut cursor: i64) -> Result<i64, StoreError> {
    loop {
        let changes = state.store.changes_after(cursor, 1000).await?;
        let Some(last) = changes.last().map(|c| c.seq) else { return Ok(cursor) };
        // This node's own changes were applied where they were made.
        for c in changes.iter().filter(|c| !c.local) {
            apply(state, c).await?;
        }
        cursor = last;
    }
}

/// Forgets, on this node, what one change made stale.
async fn apply(state: &AppState, change: &Change) -> Result<(), StoreError> {
    let (kind, _) = change.action.split_once('.').unwrap_or((change.action.as_str(), ""));
    let id = change.target_id.as_str();
    let now = state.now();
    match kind {
        "key" => {
            // New secrets (created, rotated, imported) become known; changed keys are read again.
            state.verifier.known.follow(state.store.as_ref()).await?;
            let hashes = state.store.key_secret_hashes(id).await?;
            state.verifier.invalidate(&hashes);
            // The quota may have been given, taken away, set or re-scheduled: this node's runtime takes
            // the stored settings (giving back what it leased, if that is still current).
            if matches!(change.action.as_str(), "key.quota" | "key.update")
                && let Some(rt) = state.verifier.runtimes.get(id)
                && let Some(key) = state.store.get_key(id).await?
            {
                let quota = key.quota.as_ref().map(|q| {
                    crate::runtime::QuotaState::from_config(
                        q,
                        key.quota_refilled_at.unwrap_or(key.created_at),
                    )
                });
                rt.replace_shared_quota(state.store.as_ref(), quota).await;
            }
        }
        "consumer" => {
            if let Some(c) = state.store.get_consumer(id).await? {
                crate::routes::consumers::consumer_changed(state, &c).await;
            }
        }
        "client" => match state.store.get_client(id).await? {
            Some(c) => state.oauth.client_changed(&c),
            None => state.oauth.client_deleted(id),
        },
        "user" => {
            state.oauth.user_changed(id);
            // A user disabled or deleted elsewhere: their sign-in sessions on this node end too, as on
            // the node that served the change.
            let password_changed =
                matches!(change.action.as_str(), "user.set_password" | "user.reset_password");
            if password_changed || state.store.get_user(id).await?.is_none_or(|u| u.disabled) {
                state.oauth.flows.end_sessions_of(id);
            }
            state.oauth.reload_revocations(state.store.as_ref(), now).await?;
            // Their applications stop (suspended, deleted) or work again.
            crate::routes::consumers::owner_changed(state, id).await?;
        }
        "plan" => crate::routes::plans::apply_plan_change(state, id).await?,
        "pat" => state.oauth.pats_changed(),
        "token" | "grant" => state.oauth.reload_revocations(state.store.as_ref(), now).await?,
        "signing_key" => {
            // The database unavailable: the change stays unapplied and the next read tries it again.
            // Anything else (a key this node cannot open) would fail every time: logged, and the key
            // tick keeps reloading.
            match state.oauth.keys.load(state.store.as_ref(), state.oauth.alg, now).await {
                Ok(()) => {}
                Err(crate::oauth::keys::KeyError::Store(e @ StoreError::Unavailable(_))) => return Err(e),
                Err(e) => tracing::error!(error = %e, "cannot load the signing keys another node changed"),
            }
            state.oauth.signing_key_revoked();
        }
        _ => {}
    }
    Ok(())
}
