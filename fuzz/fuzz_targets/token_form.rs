//! The token endpoint's form-body parser: never panics; single-valued parameters are single.
#![no_main]
use keygate_core::oauth::Form;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let form = Form::parse(data);
    for name in ["grant_type", "scope", "client_id", "client_secret", "token", "code_verifier"] {
        if let Ok(Some(v)) = form.one(name) {
            assert!(!v.is_empty());
        }
    }
    let _ = form.all("resource");
});
