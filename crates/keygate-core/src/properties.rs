//! Property tests: laws the hand-written examples elsewhere only sample.

use proptest::prelude::*;

use crate::credential::{self, Environment, PlainSecret, SecretKind};
use crate::forwarded;
use crate::scope;

fn kind() -> impl Strategy<Value = SecretKind> {
    prop_oneof![
        Just(SecretKind::ApiKey(Environment::Live)),
        Just(SecretKind::ApiKey(Environment::Test)),
        Just(SecretKind::AccessToken),
        Just(SecretKind::ClientSecret),
        Just(SecretKind::RefreshToken),
        Just(SecretKind::AuthCode),
        Just(SecretKind::PersonalToken),
        Just(SecretKind::DeviceCode),
    ]
}

/// Scope-like strings from a small alphabet, so that coverage relations actually occur.
fn scope_str() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ab]{1,2}(:[ab]{1,2}){0,2}",
        "[ab]{1,2}(:[ab]{1,2}){0,1}:\\*",
        Just("keygate:admin".to_string()),
        Just("keygate:verify".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// format → parse: every generated secret parses as its own kind.
    #[test]
    fn generated_secrets_round_trip(kind in kind()) {
        let s = PlainSecret::generate(kind).unwrap();
        prop_assert_eq!(credential::parse(s.expose()).map(|p| p.kind), Ok(kind));
    }

    /// Any single-character change after the prefix is rejected by the format checks.
    #[test]
    fn single_character_changes_are_rejected(kind in kind(), pos in any::<prop::sample::Index>(), c in any::<char>()) {
        let s = PlainSecret::generate(kind).unwrap();
        let s = s.expose();
        let prefix = kind.prefix().len();
        let i = prefix + pos.index(s.len() - prefix);
        let original = s.as_bytes()[i] as char;
        prop_assume!(c != original);
        let mut changed: String = s[..i].to_string();
        changed.push(c);
        changed.push_str(&s[i + 1..]);
        prop_assert!(credential::parse(&changed).is_err());
    }

    /// Parsing never panics, whatever the input.
    #[test]
    fn parse_never_panics(s in "\\PC{0,80}") {
        let _ = credential::parse(&s);
        let _ = credential::visible_start(&s);
        let _ = credential::classify_import(&s);
    }

    /// A visible start is a true start of the secret and never more than a quarter of an imported one.
    #[test]
    fn visible_start_is_short(s in "[!-~]{16,80}") {
        let v = credential::visible_start(&s);
        prop_assert!(s.starts_with(&v));
        if credential::parse(&s).is_err() {
            prop_assert!(v.len() * 4 <= s.len());
        }
    }

    /// Coverage is a preorder: reflexive and transitive.
    #[test]
    fn coverage_is_reflexive_and_transitive(a in scope_str(), b in scope_str(), c in scope_str()) {
        prop_assert!(scope::covers(&a, &a));
        if scope::covers(&a, &b) && scope::covers(&b, &c) {
            prop_assert!(scope::covers(&a, &c), "{a} covers {b} covers {c}");
        }
    }

    /// Coverage is antisymmetric on distinct scopes: two different scopes never cover each other.
    #[test]
    fn coverage_is_antisymmetric(a in scope_str(), b in scope_str()) {
        if a != b {
            prop_assert!(!(scope::covers(&a, &b) && scope::covers(&b, &a)), "{a} <-> {b}");
        }
    }

    /// Whatever a valid scope is, it has no separator a header could split it on.
    #[test]
    fn valid_scopes_have_no_separators(s in "\\PC{1,40}") {
        if scope::validate_scope(&s).is_ok() {
            prop_assert!(!s.contains([',', ' ', '"', '\\']));
        }
    }

    /// The forwarding parser never panics and only ever answers the peer or an address from the headers.
    #[test]
    fn client_address_comes_from_the_request(xff in "[0-9a-f:.,\\[\\] _]{0,60}", fwd in "[0-9a-zA-Z:.,;=\"\\[\\] _]{0,60}") {
        let peer: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let got = forwarded::client_address(peer, [xff.as_str()], [fwd.as_str()], &trusted).accountable();
        let named: Vec<forwarded::Hop> =
            forwarded::parse_x_forwarded_for(&xff).into_iter().chain(forwarded::parse_forwarded(&fwd)).collect();
        prop_assert!(got == peer || named.contains(&forwarded::Hop::Ip(got)), "{got} from {xff:?} / {fwd:?}");
    }
}
