//! The credential parser: never panics; whatever parses has the documented shape.
#![no_main]
use keygate_core::credential;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = credential::parse(s) {
        assert!(s.starts_with(p.kind.prefix()));
        assert_eq!(s.len(), p.kind.prefix().len() + credential::RANDOM_LEN + credential::CHECKSUM_LEN);
    }
    let start = credential::visible_start(s);
    assert!(s.starts_with(&start));
});
