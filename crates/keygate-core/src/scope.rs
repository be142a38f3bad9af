//! Scopes: permission strings such as `articles:read`.
//!
//! Policy:
//! - A scope is 1–128 characters from RFC 6749's `scope-token` alphabet (printable ASCII without
//!   space, `"` and `\`), narrowed further: no `,`. RFC 6749 allows commas, but forward-auth writes
//!   scopes into comma-separated headers (`X-Keygate-Scopes`, `X-Keygate-Required-Scopes`, `?scope=`), and
//!   an upstream that splits on commas would read `articles:x,admin` as two scopes, one of them `admin`.
//!   Scopes stored before this rule are ignored at verify time ([`usable`]): they grant nothing and are
//!   never written into a header.
//! - A granted scope ending in `:*` covers every scope that starts with the part before the `*`
//!   (`articles:*` covers `articles:read` and `articles:comments:write`). `*` is only a wildcard there.
//! - Keygate's own permissions live under `keygate:`. `keygate:admin` covers every `keygate:` scope,
//!   so an admin key may also call verify.

pub const ADMIN: &str = "keygate:admin";
pub const VERIFY: &str = "keygate:verify";
/// Introspect any client's access tokens (`/oauth2/introspect`); a client may always introspect its own.
pub const INTROSPECT: &str = "keygate:introspect";
/// Read `/metrics` when `metrics_auth` is on.
pub const METRICS: &str = "keygate:metrics";

pub const MAX_SCOPE_LEN: usize = 128;
pub const MAX_SCOPES: usize = 100;

/// Why a scope string is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope must not be empty")]
    Empty,
    #[error("scope is longer than {MAX_SCOPE_LEN} characters")]
    TooLong,
    #[error(
        "scope {0:?} contains a character Keygate does not accept in a scope (no spaces, quotes, backslashes or commas)"
    )]
    BadCharacter(String),
    #[error("at most {MAX_SCOPES} scopes are allowed")]
    TooMany,
}

pub fn validate_scope(scope: &str) -> Result<(), ScopeError> {
    if scope.is_empty() {
        return Err(ScopeError::Empty);
    }
    if scope.len() > MAX_SCOPE_LEN {
        return Err(ScopeError::TooLong);
    }
    if !scope.bytes().all(is_scope_byte) {
        return Err(ScopeError::BadCharacter(scope.chars().take(MAX_SCOPE_LEN).collect()));
    }
    Ok(())
}

/// RFC 6749's scope-token bytes (%x21 / %x23-5B / %x5D-7E) without `,` (see the module's policy).
fn is_scope_byte(b: u8) -> bool {
    b != b',' && (b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// Is a stored or presented scope one Keygate will act on? Scopes written before the comma rule are not.
pub fn usable(scope: &str) -> bool {
    validate_scope(scope).is_ok()
}

/// The granted scopes Keygate acts on: stored scopes that break today's rules are dropped (they grant
/// nothing and never reach a header).
pub fn usable_only(scopes: &[String]) -> Vec<String> {
    scopes.iter().filter(|s| usable(s)).cloned().collect()
}

/// Validates a list, and returns it sorted with duplicates removed.
pub fn normalize_scopes(scopes: Vec<String>) -> Result<Vec<String>, ScopeError> {
    if scopes.len() > MAX_SCOPES {
        return Err(ScopeError::TooMany);
    }
    for s in &scopes {
        validate_scope(s)?;
    }
    let mut scopes = scopes;
    scopes.sort_unstable();
    scopes.dedup();
    Ok(scopes)
}

/// Does one granted scope cover a required one?
pub fn covers(granted: &str, required: &str) -> bool {
    if granted == required {
        return true;
    }
    if granted == ADMIN && required.starts_with("keygate:") {
        return true;
    }
    match granted.strip_suffix('*') {
        Some(stem) if stem.ends_with(':') => required.starts_with(stem) && required.len() > stem.len(),
        _ => false,
    }
}

/// Do the granted scopes cover every required scope?
pub fn satisfies<S: AsRef<str>>(granted: &[String], required: &[S]) -> bool {
    required.iter().all(|r| granted.iter().any(|g| covers(g, r.as_ref())))
}

/// The required scopes that the granted ones do not cover.
pub fn missing<'a, S: AsRef<str>>(granted: &[String], required: &'a [S]) -> Vec<&'a str> {
    required.iter().map(AsRef::as_ref).filter(|r| !granted.iter().any(|g| covers(g, r))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_matching() {
        let granted = vec!["articles:*".to_string(), "users:read".to_string()];
        assert!(satisfies(&granted, &["articles:read", "articles:comments:write"]));
        assert!(satisfies(&granted, &["users:read"]));
        assert!(!satisfies(&granted, &["users:write"]));
        assert!(!satisfies(&granted, &["articles:"]));
        assert!(!satisfies(&granted, &["articlesx"]));
        assert!(satisfies::<&str>(&granted, &[]));
        assert_eq!(missing(&granted, &["users:write", "articles:x"]), vec!["users:write"]);
    }

    #[test]
    fn admin_covers_keygate_scopes_only() {
        let granted = vec![ADMIN.to_string()];
        assert!(satisfies(&granted, &[VERIFY]));
        assert!(!satisfies(&granted, &["articles:read"]));
        // A bare star is not a wildcard.
        assert!(!covers("*", "articles:read"));
    }

    #[test]
    fn validation() {
        assert_eq!(validate_scope(""), Err(ScopeError::Empty));
        assert!(matches!(validate_scope("a b"), Err(ScopeError::BadCharacter(_))));
        assert!(matches!(validate_scope("a\"b"), Err(ScopeError::BadCharacter(_))));
        assert_eq!(validate_scope(&"a".repeat(129)), Err(ScopeError::TooLong));
        assert!(validate_scope("articles:read/x-1.2_~").is_ok());
        assert!(matches!(validate_scope("articles:x,admin"), Err(ScopeError::BadCharacter(_))));
        assert_eq!(usable_only(&["a,b".into(), "c".into()]), vec!["c".to_string()]);
        let n = normalize_scopes(vec!["b".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(n, vec!["a", "b"]);
        assert_eq!(normalize_scopes(vec!["a".into(); 101]), Err(ScopeError::TooMany));
    }
}
