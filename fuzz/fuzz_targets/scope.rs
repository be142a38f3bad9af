//! The scope parser and coverage: never panic; valid scopes carry no header separator.
#![no_main]
use keygate_core::scope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let parts: Vec<String> = s.split(' ').map(str::to_owned).collect();
    if let Ok(normal) = scope::normalize_scopes(parts.clone()) {
        for p in &normal {
            assert!(!p.contains([',', ' ', '"', '\\']));
            assert!(scope::covers(p, p));
        }
        let _ = scope::missing(&normal, &parts);
    }
    if let [a, b, ..] = parts.as_slice() {
        let _ = scope::covers(a, b);
    }
});
