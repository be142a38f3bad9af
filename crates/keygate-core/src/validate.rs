//! Input rules shared by the admin API and the CLI.

/// Longest name of a consumer or key, in characters.
pub const MAX_NAME_LEN: usize = 200;
/// Largest metadata object, as serialised JSON bytes.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("name must not be empty")]
    EmptyName,
    #[error("name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    #[error("name must not contain control characters")]
    NameControl,
    #[error("metadata must be a JSON object")]
    MetadataNotObject,
    #[error("metadata is larger than {MAX_METADATA_BYTES} bytes")]
    MetadataTooLarge,
}

pub fn validate_name(name: &str) -> Result<(), InputError> {
    if name.trim().is_empty() {
        return Err(InputError::EmptyName);
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(InputError::NameTooLong);
    }
    if name.chars().any(char::is_control) {
        return Err(InputError::NameControl);
    }
    Ok(())
}

/// Metadata is free-form, but it must be an object and small: it is cached and returned on every verify.
pub fn validate_metadata(metadata: &serde_json::Value) -> Result<(), InputError> {
    if !metadata.is_object() {
        return Err(InputError::MetadataNotObject);
    }
    if serde_json::to_vec(metadata).map_or(usize::MAX, |v| v.len()) > MAX_METADATA_BYTES {
        return Err(InputError::MetadataTooLarge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_metadata() {
        assert!(validate_name("billing service").is_ok());
        assert_eq!(validate_name("  "), Err(InputError::EmptyName));
        assert_eq!(validate_name("a\nb"), Err(InputError::NameControl));
        assert_eq!(validate_name(&"x".repeat(201)), Err(InputError::NameTooLong));
        assert!(validate_metadata(&json!({"plan": "pro"})).is_ok());
        assert_eq!(validate_metadata(&json!([1])), Err(InputError::MetadataNotObject));
        let big = json!({"x": "y".repeat(9000)});
        assert_eq!(validate_metadata(&big), Err(InputError::MetadataTooLarge));
    }
}
