//! Credential formats and hashing.
//!
//! A secret is `<prefix><32 base62 chars of CSPRNG output><6 base62 chars of CRC32>`, e.g.
//! `kg_live_3xAbQ…`. The prefix says what the secret is (so secret scanners can find leaked ones),
//! and the checksum lets [`parse`] reject garbage and typos without any I/O.
//!
//! Policy:
//! - 32 base62 characters carry ~190 bits of entropy from the OS CSPRNG. With that much entropy a
//!   slow password hash adds nothing; at rest we keep only `SHA-256(secret)` ([`SecretHash`]).
//! - A [`PlainSecret`] never prints itself: its `Debug` is redacted, it has no `Display`, and the
//!   only way to read it is [`PlainSecret::expose`], which is easy to grep for.
//! - Never change an existing prefix: secrets already handed out must keep parsing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Number of random base62 characters in a secret's body (≈190 bits).
pub const RANDOM_LEN: usize = 32;
/// Number of base62 characters of the CRC32 checksum (62^6 > 2^32).
pub const CHECKSUM_LEN: usize = 6;
/// How many characters after the prefix are kept visible so people can recognise a secret.
pub const VISIBLE_LEN: usize = 4;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The environment an API key belongs to; it is part of the key's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }
}

/// What kind of secret a prefix announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecretKind {
    ApiKey(Environment),
    /// An opaque OAuth access token (`kgat_`).
    AccessToken,
    /// An OAuth client secret (`kgcs_`).
    ClientSecret,
    /// An OAuth refresh token (`kgrt_`).
    RefreshToken,
    /// An OAuth authorization code (`kgac_`): single use, valid for 60 seconds.
    AuthCode,
    /// A user's personal access token (`kgpat_`).
    PersonalToken,
    /// A device code (`kgdc_`, RFC 8628): what a device polls the token endpoint with.
    DeviceCode,
}

impl SecretKind {
    /// Every prefix Keygate issues. Order matters only for readability: no prefix is a prefix of another.
    const ALL: [(SecretKind, &'static str); 8] = [
        (SecretKind::ApiKey(Environment::Live), "kg_live_"),
        (SecretKind::ApiKey(Environment::Test), "kg_test_"),
        (SecretKind::AccessToken, "kgat_"),
        (SecretKind::ClientSecret, "kgcs_"),
        (SecretKind::RefreshToken, "kgrt_"),
        (SecretKind::AuthCode, "kgac_"),
        (SecretKind::PersonalToken, "kgpat_"),
        (SecretKind::DeviceCode, "kgdc_"),
    ];

    /// Every kind of secret Keygate issues.
    pub fn all() -> impl Iterator<Item = SecretKind> {
        Self::ALL.into_iter().map(|(k, _)| k)
    }

    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::ApiKey(Environment::Live) => "kg_live_",
            SecretKind::ApiKey(Environment::Test) => "kg_test_",
            SecretKind::AccessToken => "kgat_",
            SecretKind::ClientSecret => "kgcs_",
            SecretKind::RefreshToken => "kgrt_",
            SecretKind::AuthCode => "kgac_",
            SecretKind::PersonalToken => "kgpat_",
            SecretKind::DeviceCode => "kgdc_",
        }
    }
}

/// Regular expressions for secret scanners (GitHub secret scanning, GitLab, trufflehog…): one per kind
/// of secret Keygate issues, each matching exactly that kind and nothing else (the 38 characters after
/// the prefix are 32 random and 6 checksum base62 characters; a scanner can confirm a match with the
/// checksum, see `docs/SECRET_FORMATS.md`). The same list is printed there; a test keeps them equal.
pub const SCANNER_PATTERNS: &[(&str, &str)] = &[
    ("keygate_api_key_live", r"\bkg_live_[0-9A-Za-z]{38}\b"),
    ("keygate_api_key_test", r"\bkg_test_[0-9A-Za-z]{38}\b"),
    ("keygate_access_token", r"\bkgat_[0-9A-Za-z]{38}\b"),
    ("keygate_client_secret", r"\bkgcs_[0-9A-Za-z]{38}\b"),
    ("keygate_refresh_token", r"\bkgrt_[0-9A-Za-z]{38}\b"),
    ("keygate_authorization_code", r"\bkgac_[0-9A-Za-z]{38}\b"),
    ("keygate_personal_access_token", r"\bkgpat_[0-9A-Za-z]{38}\b"),
    ("keygate_device_code", r"\bkgdc_[0-9A-Za-z]{38}\b"),
];

/// Why a presented string is not a Keygate secret. Every variant maps to the `MALFORMED` decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the credential does not start with a known Keygate prefix")]
    UnknownPrefix,
    #[error("the credential has the wrong length")]
    BadLength,
    #[error("the credential contains characters outside base62")]
    BadCharacter,
    #[error("the credential's checksum does not match; it was mistyped or truncated")]
    BadChecksum,
}

/// A secret in plain text, as shown to its owner exactly once.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainSecret(String);

impl PlainSecret {
    /// Generates a new secret of `kind` from the OS CSPRNG.
    pub fn generate(kind: SecretKind) -> Result<Self, getrandom::Error> {
        let prefix = kind.prefix();
        let mut s = String::with_capacity(prefix.len() + RANDOM_LEN + CHECKSUM_LEN);
        s.push_str(prefix);
        push_random_base62(&mut s, RANDOM_LEN)?;
        let crc = crc32fast::hash(s.as_bytes());
        push_checksum(&mut s, crc);
        Ok(PlainSecret(s))
    }

    /// The secret itself. Call only to hand it to its owner or to hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }

    /// The part of the secret that stays visible in listings: the prefix and a few characters.
    pub fn visible_start(&self) -> String {
        visible_start(&self.0)
    }
}

impl std::fmt::Debug for PlainSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlainSecret(<redacted>)")
    }
}

/// Longest visible start of a secret that is not in Keygate's format (an imported key).
pub const FOREIGN_VISIBLE_MAX: usize = 8;

/// The visible start of any secret string, for people to recognise it in listings and audit events.
///
/// - A Keygate secret shows its prefix and [`VISIBLE_LEN`] characters: the prefix is public, and 4 of
///   its 32 random characters leave ~166 bits unknown.
/// - Any other (imported) secret shows at most [`FOREIGN_VISIBLE_MAX`] characters, or its vendor prefix
///   (the longest start ending in `_` within those characters, e.g. `sk_live_`) if that is shorter, and
///   never more than a quarter of the secret.
pub fn visible_start(secret: &str) -> String {
    if let Ok(p) = parse(secret) {
        return secret[..p.kind.prefix().len() + VISIBLE_LEN].to_string();
    }
    let vendor =
        secret.char_indices().take(FOREIGN_VISIBLE_MAX).filter(|(_, c)| *c == '_').map(|(i, _)| i + 1).last();
    let shown = vendor.unwrap_or(FOREIGN_VISIBLE_MAX).min(secret.chars().count() / 4);
    secret.chars().take(shown).collect()
}

/// Shortest plaintext key accepted for import: shorter secrets are guessable.
pub const MIN_IMPORT_LEN: usize = 16;
/// Longest plaintext key accepted for import.
pub const MAX_IMPORT_LEN: usize = 512;

/// Why a plaintext key cannot be imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ImportKeyError {
    #[error("must be {MIN_IMPORT_LEN} to {MAX_IMPORT_LEN} characters")]
    Length,
    #[error("must be printable ASCII without spaces")]
    Character,
    #[error("starts with a Keygate prefix but is not a well-formed Keygate key ({0}); it could never verify")]
    BrokenKeygateKey(CredentialError),
    #[error("this is a Keygate access token or client secret, not an API key")]
    NotAnApiKey,
}

/// Classifies a plaintext key offered for import: a Keygate API key (with its environment), or a
/// foreign key (`None`). A string with a Keygate prefix that fails the format checks is refused: it
/// would be parsed as `MALFORMED` on every verify and so could never work.
pub fn classify_import(key: &str) -> Result<Option<Environment>, ImportKeyError> {
    if key.len() < MIN_IMPORT_LEN || key.len() > MAX_IMPORT_LEN {
        return Err(ImportKeyError::Length);
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ImportKeyError::Character);
    }
    match parse(key) {
        Ok(ParsedSecret { kind: SecretKind::ApiKey(env) }) => Ok(Some(env)),
        Ok(_) => Err(ImportKeyError::NotAnApiKey),
        Err(CredentialError::UnknownPrefix) => Ok(None),
        Err(e) => Err(ImportKeyError::BrokenKeygateKey(e)),
    }
}

/// SHA-256 of a secret: the only form in which secrets are stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        SecretHash(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(SecretHash)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality, for any comparison of secret material.
    pub fn ct_eq(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0])?;
            let lo = hex_val(pair[1])?;
            out[i] = (hi << 4) | lo;
        }
        Some(SecretHash(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash is not a secret, but there is no reason to spread it around either.
        write!(f, "SecretHash({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// A presented string that passed the format checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedSecret {
    pub kind: SecretKind,
}

/// Checks prefix, length, alphabet and checksum. No I/O, no allocation.
pub fn parse(secret: &str) -> Result<ParsedSecret, CredentialError> {
    let (kind, prefix) = SecretKind::ALL
        .iter()
        .find(|(_, p)| secret.starts_with(p))
        .copied()
        .ok_or(CredentialError::UnknownPrefix)?;
    if secret.len() != prefix.len() + RANDOM_LEN + CHECKSUM_LEN {
        return Err(CredentialError::BadLength);
    }
    let bytes = secret.as_bytes();
    let (head, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if !head[prefix.len()..].iter().chain(checksum).all(u8::is_ascii_alphanumeric) {
        return Err(CredentialError::BadCharacter);
    }
    let mut expected = [0u8; CHECKSUM_LEN];
    encode_checksum(crc32fast::hash(head), &mut expected);
    if expected.ct_eq(checksum).into() {
        Ok(ParsedSecret { kind })
    } else {
        Err(CredentialError::BadChecksum)
    }
}

fn push_random_base62(s: &mut String, n: usize) -> Result<(), getrandom::Error> {
    // Rejection sampling keeps the distribution uniform: bytes >= 248 (= 4 * 62) are dropped.
    let mut buf = [0u8; 64];
    let mut pushed = 0;
    while pushed < n {
        getrandom::fill(&mut buf)?;
        for &b in &buf {
            if b < 248 && pushed < n {
                s.push(char::from(BASE62[usize::from(b % 62)]));
                pushed += 1;
            }
        }
    }
    Ok(())
}

fn encode_checksum(mut crc: u32, out: &mut [u8; CHECKSUM_LEN]) {
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
}

fn push_checksum(s: &mut String, crc: u32) {
    let mut out = [0u8; CHECKSUM_LEN];
    encode_checksum(crc, &mut out);
    for b in out {
        s.push(char::from(b));
    }
}

/// Random base62 string of `n` characters from the OS CSPRNG (used for identifiers too).
pub fn random_base62(n: usize) -> Result<String, getrandom::Error> {
    let mut s = String::with_capacity(n);
    push_random_base62(&mut s, n)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_parse_and_differ() {
        let a = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
        let b = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
        assert_ne!(a, b);
        assert!(a.expose().starts_with("kg_live_"));
        assert_eq!(a.expose().len(), 8 + RANDOM_LEN + CHECKSUM_LEN);
        assert_eq!(parse(a.expose()).unwrap().kind, SecretKind::ApiKey(Environment::Live));
        let t = PlainSecret::generate(SecretKind::ApiKey(Environment::Test)).unwrap();
        assert_eq!(parse(t.expose()).unwrap().kind, SecretKind::ApiKey(Environment::Test));
        for kind in [SecretKind::AccessToken, SecretKind::ClientSecret] {
            let s = PlainSecret::generate(kind).unwrap();
            assert!(s.expose().starts_with(kind.prefix()));
            assert_eq!(parse(s.expose()).unwrap().kind, kind);
        }
    }

    #[test]
    fn every_single_character_change_is_caught() {
        let s = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
        let s = s.expose();
        for i in 8..s.len() {
            let mut bytes = s.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert!(parse(&changed).is_err(), "change at {i} not caught");
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert_eq!(parse("hello"), Err(CredentialError::UnknownPrefix));
        assert_eq!(parse("kg_live_abc"), Err(CredentialError::BadLength));
        let s = format!("kg_live_{}", "!".repeat(RANDOM_LEN + CHECKSUM_LEN));
        assert_eq!(parse(&s), Err(CredentialError::BadCharacter));
        let s = format!("kg_live_{}", "a".repeat(RANDOM_LEN + CHECKSUM_LEN));
        assert_eq!(parse(&s), Err(CredentialError::BadChecksum));
        // Multi-byte characters must not panic on slicing.
        let s = format!("kg_live_{}", "é".repeat(19));
        assert!(parse(&s).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(&s.expose()[8..]));
    }

    #[test]
    fn hash_hex_roundtrip_and_ct_eq() {
        let h = SecretHash::of("kg_live_x");
        assert_eq!(SecretHash::from_hex(&h.to_hex()), Some(h));
        assert!(h.ct_eq(&SecretHash::of("kg_live_x")));
        assert!(!h.ct_eq(&SecretHash::of("kg_live_y")));
        assert_eq!(SecretHash::from_hex("zz"), None);
    }

    #[test]
    fn visible_start_keeps_prefix_and_four_chars() {
        let s = PlainSecret::generate(SecretKind::ApiKey(Environment::Test)).unwrap();
        let v = s.visible_start();
        assert_eq!(v.len(), 8 + VISIBLE_LEN);
        assert!(s.expose().starts_with(&v));
        assert_eq!(visible_start("é"), "");
    }

    #[test]
    fn imported_keys_show_a_short_start() {
        // The review's example: everything up to the last '_' used to be shown.
        assert_eq!(visible_start("9f8e7d6c5b4a39281706f5e4_v2"), "9f8e7d");
        assert_eq!(visible_start("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), "sk_live_");
        assert_eq!(visible_start("ghp_16C7e42F292c6912E7710c838347Ae178B4a"), "ghp_");
        assert_eq!(visible_start("0123456789abcdef"), "0123");
        for s in ["9f8e7d6c5b4a39281706f5e4_v2", "abcdefghijklmnopqrstuvwxyz", "a_b_c_d_e_f_g_h_i_j"] {
            assert!(visible_start(s).len() * 4 <= s.len(), "{s}");
        }
    }

    #[test]
    fn import_classification() {
        let k = PlainSecret::generate(SecretKind::ApiKey(Environment::Test)).unwrap();
        assert_eq!(classify_import(k.expose()), Ok(Some(Environment::Test)));
        assert_eq!(classify_import("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), Ok(None));
        assert_eq!(classify_import("short"), Err(ImportKeyError::Length));
        assert_eq!(classify_import("has a space in it ok"), Err(ImportKeyError::Character));
        let mut broken = k.expose().to_string();
        broken.pop();
        broken.push(if k.expose().ends_with('a') { 'b' } else { 'a' });
        assert!(matches!(classify_import(&broken), Err(ImportKeyError::BrokenKeygateKey(_))));
        let t = PlainSecret::generate(SecretKind::AccessToken).unwrap();
        assert_eq!(classify_import(t.expose()), Err(ImportKeyError::NotAnApiKey));
    }
}
