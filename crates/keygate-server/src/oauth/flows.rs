//! In-memory state of the user-facing flows: pending authorization requests (between the authorization
//! endpoint and the login and consent forms), login sessions, and refreshes in flight.
//!
//! Everything here is bounded (capacity and time) and per node. A pending request lives 10 minutes; a
//! session 30 minutes idle and 12 hours at most; a refresh result only for the refresh grace period.
//! With several nodes, a browser's login and consent must reach the node that rendered the form (sticky
//! sessions), and a concurrent retry of a refresh on another node within the grace period is refused
//! without revoking anything (see `grants.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate_core::SecretHash;
use moka::sync::Cache;
use serde_json::Value;

/// How long a rendered login or consent form stays usable.
pub const REQUEST_TTL: Duration = Duration::from_secs(600);
/// A login session ends after this long without use…
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// …and at the latest this long after the login.
pub const SESSION_ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// The cookies of the pages: the login session, and the browser that opened a request. Over https they
/// carry the `__Host-` prefix (Secure, Path=/, no Domain: a sibling subdomain cannot set them).
pub struct CookieNames {
    pub session: &'static str,
    pub browser: &'static str,
    pub path: &'static str,
    pub secure: bool,
}

pub fn cookie_names(https: bool) -> CookieNames {
    if https {
        CookieNames { session: "__Host-kg_session", browser: "__Host-kg_browser", path: "/", secure: true }
    } else {
        CookieNames { session: "kg_session", browser: "kg_browser", path: "/oauth2/", secure: false }
    }
}

/// A validated authorization request waiting for the user to log in and consent. (No `Debug`: it holds
/// the CSRF token.)
pub struct AuthRequest {
    pub client_id: String,
    pub client_name: String,
    pub redirect_uri: String,
    pub state: Option<String>,
    /// Requested ∩ allowed to the client (the user's own limit is applied once the user is known).
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    pub code_challenge: String,
    /// The anti-CSRF token every form of this request carries.
    pub csrf: String,
    /// The browser that opened the request (hash of its `kg_browser` cookie): the forms are accepted
    /// only from it, so a cross-site page cannot log a victim's browser into the attacker's account.
    pub browser: SecretHash,
    /// Always show the consent page, even with consent remembered: a public client whose redirect URI
    /// is not https (a native app's custom scheme or loopback) could be impersonated by another app.
    pub always_ask: bool,
    /// The session that logged in for this request (set by the login form).
    pub session: Mutex<Option<SecretHash>>,
    /// For a device authorization (RFC 8628): its user code. The answer then goes to the device (via
    /// the store), and the browser gets a page instead of a redirect.
    pub device: Option<String>,
}

/// A logged-in browser.
#[derive(Debug)]
pub struct Session {
    pub user_id: String,
    pub created_at: i64,
}

/// The outcome of one refresh, shared by concurrent retries of the same refresh token. (No `Debug`:
/// it holds tokens.)
#[derive(Clone)]
pub struct Refreshed {
    pub client_id: String,
    pub response: Value,
    /// When the rotation happened (server clock): after the grace period the result is not handed out.
    pub at: i64,
    /// The key the family is bound to (DPoP): a retry must prove it too.
    pub jkt: Option<String>,
}

pub struct Flows {
    pub requests: Cache<String, Arc<AuthRequest>>,
    pub sessions: Cache<SecretHash, Arc<Session>>,
    /// Refresh token hash → the one rotation every concurrent presentation of it waits for.
    pub refreshing: Cache<SecretHash, Arc<tokio::sync::OnceCell<Refreshed>>>,
    /// Password checks in progress: Argon2id takes 19 MiB and tens of ms of a core each, so at most
    /// two per core run at once; more get "busy, try again" instead of exhausting memory and threads.
    pub logins: tokio::sync::Semaphore,
}

impl Flows {
    pub fn new(refresh_grace: Duration) -> Self {
        Flows {
            requests: Cache::builder().max_capacity(100_000).time_to_live(REQUEST_TTL).build(),
            sessions: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(SESSION_IDLE)
                .time_to_live(SESSION_ABSOLUTE)
                .build(),
            refreshing: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(refresh_grace.max(Duration::from_millis(1)))
                .build(),
            logins: tokio::sync::Semaphore::new(
                2 * std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(2),
            ),
        }
    }

    /// The user of a session cookie, if the session is live.
    pub fn session_user(&self, cookie: Option<&str>) -> Option<(SecretHash, String)> {
        let hash = SecretHash::of(cookie?);
        self.sessions.get(&hash).map(|s| (hash, s.user_id.clone()))
    }

    /// Ends every session of a user (disabled or deleted).
    pub fn end_sessions_of(&self, user_id: &str) {
        let user_id = user_id.to_string();
        // moka's predicate invalidation needs a builder option; the sessions are few enough to scan.
        let doomed: Vec<SecretHash> =
            self.sessions.iter().filter(|(_, s)| s.user_id == user_id).map(|(k, _)| *k).collect();
        for k in doomed {
            self.sessions.invalidate(&k);
        }
    }
}
