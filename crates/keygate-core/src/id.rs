//! Identifiers: `<kind prefix>_<12 hex digits of milliseconds><12 base62 random>`.
//!
//! Ids sort by creation time, so listings can page with `after=<id>` and stay in creation order.
//! They are not secrets.

/// Makes a new id such as `key_0193a5b2c3d4Xy7…`.
pub fn new_id(prefix: &str, now_millis: i64) -> Result<String, getrandom::Error> {
    let random = crate::credential::random_base62(12)?;
    Ok(format!("{prefix}_{:012x}{random}", now_millis.max(0)))
}

/// Is this plausibly an id of the given kind? Used to answer 404 early for garbage.
pub fn looks_like(prefix: &str, id: &str) -> bool {
    id.len() == prefix.len() + 1 + 24
        && id.starts_with(prefix)
        && id.as_bytes().get(prefix.len()) == Some(&b'_')
        && id[prefix.len() + 1..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_validate() {
        let a = new_id("key", 1_000).unwrap();
        let b = new_id("key", 2_000).unwrap();
        assert!(a < b);
        assert!(looks_like("key", &a));
        assert!(!looks_like("cons", &a));
        assert!(!looks_like("key", "key_../../etc"));
    }
}
