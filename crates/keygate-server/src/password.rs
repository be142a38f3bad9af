//! User passwords: Argon2id with OWASP's parameters (19 MiB of memory, 2 passes, 1 lane: about 20-40 ms
//! of one core here), a minimum length, and a refusal of well-known passwords.
//!
//! Hashing and verifying are CPU-bound: callers run them with `tokio::task::spawn_blocking`. A login
//! for a username that does not exist verifies against a fixed dummy hash, so that its timing does not
//! tell whether the user exists.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

pub const MIN_LENGTH: usize = 10;
pub const MAX_LENGTH: usize = 256;

/// OWASP Password Storage Cheat Sheet (2023+): Argon2id, m = 19456 KiB, t = 2, p = 1.
fn hasher() -> Argon2<'static> {
    let params = Params::new(19_456, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Passwords found at the top of public breach corpora (length ≥ 10 ones: shorter ones fail the length
/// rule anyway), compared ignoring case.
const COMMON: &str = include_str!("common_passwords.txt");

/// Why a new password is refused (the message is shown to whoever sets it).
pub fn check_policy(password: &str, username: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < MIN_LENGTH {
        return Err(format!("must be at least {MIN_LENGTH} characters"));
    }
    if password.len() > MAX_LENGTH {
        return Err(format!("must be at most {MAX_LENGTH} bytes"));
    }
    let lower = password.to_lowercase();
    if COMMON.lines().any(|c| c.trim() == lower) {
        return Err("is one of the most common passwords; choose another".into());
    }
    if lower == username.to_lowercase() || lower.contains(&username.to_lowercase()) && username.len() >= 4 {
        return Err("must not contain the username".into());
    }
    let mut distinct: Vec<char> = password.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 4 {
        return Err("must use at least 4 different characters".into());
    }
    Ok(())
}

/// The PHC string of a new hash (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub fn hash(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("random source failed: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    hasher().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Does `password` match the stored hash? `None` (no user, or no password set) is checked against a
/// dummy hash and is always false. The comparison inside the library is constant-time.
pub fn verify(password: &str, stored: Option<&str>) -> bool {
    let (phc, real) = match stored {
        Some(s) => (s, true),
        None => (dummy(), false),
    };
    let Ok(parsed) = PasswordHash::new(phc) else { return false };
    hasher().verify_password(password.as_bytes(), &parsed).is_ok() && real
}

/// The hash unknown users are checked against: same parameters, fixed salt (it protects nothing), so it
/// never depends on the random source. `AppState` builds it at start so the first check is not slower.
pub fn dummy() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        SaltString::encode_b64(b"keygate-dummy-sa")
            .ok()
            .and_then(|salt| {
                hasher()
                    .hash_password(b"keygate dummy password for unknown users", &salt)
                    .ok()
                    .map(|h| h.to_string())
            })
            .unwrap_or_default()
    })
}

/// Why a password sign-in was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    /// Too many failures from this address or for this username lately.
    Throttled,
    /// The database could not be read.
    Unavailable,
    /// As many password checks as the server allows are running.
    Busy,
    /// Wrong username or password, or a disabled account (not told apart).
    Wrong,
}

/// A sign-in with a username and password, as every sign-in form does it: refused while the address or
/// the username is throttled (each form has its own count per username, so failures on the public login
/// page cannot lock an operator out of the console); at most a few Argon2 checks at once; an unknown username checked against
/// the dummy hash; a failure counted against both. The user, when the password is right and the account
/// enabled.
pub async fn login(
    state: &crate::state::AppState,
    usernames: &crate::peer::FailureThrottle<keygate_core::SecretHash>,
    client: crate::peer::Client,
    username: &str,
    password: String,
) -> Result<keygate_store::User, LoginRefusal> {
    let now = state.now();
    let account = keygate_core::SecretHash::of(&username.to_lowercase());
    if state.throttle.blocked(client.accountable, now).is_some()
        || usernames.blocked(Some(account), now).is_some()
    {
        return Err(LoginRefusal::Throttled);
    }
    let user = state.store.find_user(username).await.map_err(|_| LoginRefusal::Unavailable)?;
    let Ok(_permit) = state.oauth.flows.logins.try_acquire() else { return Err(LoginRefusal::Busy) };
    let stored = user.as_ref().and_then(|u| u.password_hash.clone());
    let ok = tokio::task::spawn_blocking(move || verify(&password, stored.as_deref())).await.unwrap_or(false);
    match user {
        Some(u) if ok && !u.disabled => Ok(u),
        _ => {
            state.throttle.record_failure(client.accountable, now);
            usernames.record_failure(Some(account), now);
            Err(LoginRefusal::Wrong)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let h = hash("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct horse battery", Some(&h)));
        assert!(!verify("correct horse batterz", Some(&h)));
        assert!(!verify("keygate dummy password for unknown users", None));
        assert_ne!(h, hash("correct horse battery").unwrap(), "salted");
    }

    #[test]
    fn weak_passwords_are_refused() {
        assert!(check_policy("short", "ann").is_err());
        assert!(check_policy("password123", "ann").is_err());
        assert!(check_policy("Password123", "ann").is_err(), "ignoring case");
        assert!(check_policy("aaaaaaaaaaaa", "ann").is_err());
        assert!(check_policy("alice-is-great", "alice").is_err());
        assert!(check_policy("correct horse battery", "ann").is_ok());
    }
}
