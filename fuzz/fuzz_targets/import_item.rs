//! An import item as the import route reads it: JSON, then the plaintext key or its SHA-256.
#![no_main]
use keygate_core::credential::{self, classify_import};
use keygate_core::SecretHash;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let item: serde_json::Value = match serde_json::from_slice(data) {
        Ok(v) => v,
        Err(_) => match std::str::from_utf8(data) {
            Ok(s) => serde_json::json!({"key": s}),
            Err(_) => return,
        },
    };
    if let Some(key) = item.get("key").and_then(|k| k.as_str())
        && classify_import(key).is_ok()
    {
        let start = credential::visible_start(key);
        assert!(key.starts_with(&start));
        if credential::parse(key).is_err() {
            assert!(start.len() * 4 <= key.len());
        }
    }
    if let Some(hex) = item.get("sha256").and_then(|k| k.as_str())
        && let Some(h) = SecretHash::from_hex(hex)
    {
        assert_eq!(h.to_hex(), hex.to_ascii_lowercase());
    }
});
