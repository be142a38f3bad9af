//! The secret-scanner patterns (`credential::SCANNER_PATTERNS`): each matches every secret of its kind,
//! no secret of another kind, and nothing in a corpus of other vendors' sample formats; and
//! `docs/SECRET_FORMATS.md` prints exactly these patterns.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly on purpose")]

use keygate_core::PlainSecret;
use keygate_core::credential::{SCANNER_PATTERNS, SecretKind, parse};
use regex::Regex;

fn patterns() -> Vec<(&'static str, Regex)> {
    SCANNER_PATTERNS.iter().map(|(name, re)| (*name, Regex::new(re).unwrap())).collect()
}

#[test]
fn each_pattern_matches_exactly_its_own_kind() {
    let patterns = patterns();
    assert_eq!(patterns.len(), SecretKind::all().count(), "one pattern per kind of secret");
    for kind in SecretKind::all() {
        for _ in 0..200 {
            let secret = PlainSecret::generate(kind).unwrap();
            let s = secret.expose();
            assert!(parse(s).is_ok());
            let matching: Vec<&str> =
                patterns.iter().filter(|(_, re)| re.is_match(s)).map(|(n, _)| *n).collect();
            assert_eq!(matching.len(), 1, "{kind:?} matched {matching:?}");
            // Found inside text as a scanner sees it, and the match is the whole secret.
            for text in [format!("token = \"{s}\""), format!("export KEY={s}\n"), format!("{s},next")] {
                let re = &patterns.iter().find(|(n, _)| *n == matching[0]).unwrap().1;
                assert_eq!(re.find(&text).unwrap().as_str(), s, "{text}");
            }
        }
    }
}

#[test]
fn other_vendors_formats_and_near_misses_do_not_match() {
    let corpus = [
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a", // GitHub personal access token
        "github_pat_11ABCDEFG0abcdefghijklmnopqrstuvwxyz0123456789", // GitHub fine-grained
        "glpat-xxxxxxxxxxxxxxxxxxxx",               // GitLab
        "AKIAIOSFODNN7EXAMPLE",                     // AWS access key id
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",         // Stripe
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", // Slack
        "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe",  // Google API key
        "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", // SendGrid
        "unkey_3ZfcfvFuQcMYK8qLzq7yBdKM",           // Unkey
        // Near misses: wrong length, wrong alphabet, prefix glued to a word.
        "kg_live_tooShort",
        "kg_live_0123456789012345678901234567890123456789",
        "kg_live_0123456789012345678901234567-890123",
        "xkgat_01234567890123456789012345678901234567",
        "kg_prod_01234567890123456789012345678901234567",
    ];
    for (name, re) in patterns() {
        for sample in corpus {
            assert!(!re.is_match(sample), "{name} matched {sample}");
        }
    }
}

#[test]
fn the_documentation_prints_these_patterns() {
    let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/SECRET_FORMATS.md"));
    for (name, re) in SCANNER_PATTERNS {
        assert!(doc.contains(&format!("| `{name}` | `{re}` |")), "docs/SECRET_FORMATS.md lacks {name}");
    }
}
