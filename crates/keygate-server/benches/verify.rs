//! In-process micro-benchmarks of the verify hot path. Run: `cargo bench -p keygate-server --bench verify`.
//!
//! `sha256_secret` and `hashmap_lookup` are the baselines: the least any verify must do is hash the
//! secret and probe a table. Compare the other rows with them (docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark set-up fails loudly")]

use std::collections::HashMap;

use divan::{Bencher, black_box};
use keygate_core::credential::parse;
use keygate_core::limits::{Quota, RateLimit};
use keygate_core::{Environment, PlainSecret, SecretHash, SecretKind, scope};
use keygate_server::verify::{CacheConfig, Context, Lookup, Verifier};
use keygate_server::{ServerConfig, bootstrap, open_store};
use keygate_store::{ApiKey, NewAudit, StoredSecret};

fn main() {
    divan::main();
}

struct Fixture {
    verifier: Verifier,
    valid: String,
    /// A key with two rate limits and a quota, none of which run out during the benchmark.
    limited: String,
    unknown: String,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig { data_dir: dir.path().to_path_buf(), ..ServerConfig::default() };
        let store = open_store(&config).await.unwrap();
        let admin = bootstrap(store.as_ref()).await.unwrap().unwrap();
        let limited = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
        let consumer = store.system_consumer_id().await.unwrap().unwrap();
        let mut key = ApiKey::new(
            "key_limited".into(),
            consumer,
            "limited".into(),
            Environment::Live,
            vec![scope::VERIFY.into()],
            serde_json::json!({}),
            None,
            limited.visible_start(),
            0,
        );
        key.rate_limits = Some(vec![
            RateLimit { name: "per_second".into(), limit: 1_000_000_000, window_seconds: 1 },
            RateLimit { name: "per_day".into(), limit: 1_000_000_000, window_seconds: 86_400 },
        ]);
        key.quota = Some(Quota { remaining: 1_000_000_000, refill: None });
        let secret = StoredSecret::new(limited.hash(), &key.id, &key.start, 0);
        let audit = NewAudit {
            id: "evt_bench".into(),
            at: 0,
            actor: "bench".into(),
            action: "key.create".into(),
            target_type: "key".into(),
            target_id: key.id.clone(),
            ip: None,
            details: serde_json::json!({}),
        };
        store.insert_key(&key, &secret, &audit).await.unwrap();
        let verifier = Verifier::new(store.clone(), &CacheConfig::default());
        verifier.known.follow(store.as_ref()).await.unwrap();
        assert!(
            verifier.verify(limited.expose(), &[scope::VERIFY], Context::at(0)).await.unwrap().is_valid()
        );
        let unknown = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
        // Warm both caches, as a running server would be.
        assert!(verifier.verify(admin.expose(), &[scope::VERIFY], Context::at(0)).await.unwrap().is_valid());
        verifier.verify(unknown.expose(), &[] as &[&str], Context::at(0)).await.unwrap();
        Fixture {
            verifier,
            valid: admin.expose().to_string(),
            limited: limited.expose().to_string(),
            unknown: unknown.expose().to_string(),
            _dir: dir,
        }
    })
}

struct JwtFixture {
    oauth: keygate_server::oauth::tokens::OAuth,
    client: keygate_store::OAuthClient,
    token: String,
    rt: tokio::runtime::Runtime,
    store: std::sync::Arc<dyn keygate_store::Backend>,
    _dir: tempfile::TempDir,
}

fn jwt_fixture(alg: keygate_server::oauth::keys::KeyAlg) -> JwtFixture {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (oauth, store) = rt.block_on(async {
        let config = ServerConfig { data_dir: dir.path().to_path_buf(), ..ServerConfig::default() };
        let store = open_store(&config).await.unwrap();
        let oauth = keygate_server::oauth::tokens::OAuth::new(
            "http://127.0.0.1:8080".into(),
            alg,
            std::time::Duration::from_secs(10),
        );
        let master =
            keygate_server::seal::MasterKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                .unwrap();
        oauth.load(store.as_ref(), std::sync::Arc::new(master), 0).await.unwrap();
        (oauth, store)
    });
    let client = keygate_store::OAuthClient {
        id: "kgc_bench".into(),
        consumer_id: "cons_bench".into(),
        name: "bench".into(),
        grant_types: vec![keygate_store::GrantType::ClientCredentials],
        scopes: vec!["articles:read".into()],
        audiences: vec!["https://api.example.com".into()],
        token_format: keygate_store::TokenFormat::Jwt,
        token_lifetime_seconds: 3600,
        confidential: true,
        disabled: false,
        tokens_revoked_before: None,
        secret_start: None,
        auth_method: "client_secret".into(),
        jwks: None,
        redirect_uris: Vec::new(),
        refresh_idle_seconds: 2_592_000,
        refresh_absolute_seconds: 7_776_000,
        created_at: 0,
        updated_at: 0,
    };
    oauth.consumer_changed(&keygate_store::Consumer::new(
        "cons_bench".into(),
        "bench".into(),
        serde_json::json!({}),
        0,
    ));
    oauth.client_changed(&client);
    let now = keygate_server::time::now_ms();
    let token = rt
        .block_on(oauth.issue(store.as_ref(), &client, &client.scopes, &client.audiences, None, now))
        .unwrap()
        .access_token;
    JwtFixture { oauth, client, token, rt, store, _dir: dir }
}

/// Issue (sign) an EdDSA access token, as the token endpoint does after authenticating the client.
#[divan::bench]
fn jwt_sign_eddsa(b: Bencher) {
    let f = jwt_fixture(keygate_server::oauth::keys::KeyAlg::EdDsa);
    let now = keygate_server::time::now_ms();
    b.bench(|| {
        f.rt.block_on(f.oauth.issue(
            f.store.as_ref(),
            &f.client,
            &f.client.scopes,
            &f.client.audiences,
            None,
            now,
        ))
        .unwrap()
        .access_token
        .len()
    });
}

/// Verify an EdDSA access token offline (signature, typ, issuer, times), the goal is ≤ 50 µs.
#[divan::bench]
fn jwt_verify_eddsa(b: Bencher) {
    let f = jwt_fixture(keygate_server::oauth::keys::KeyAlg::EdDsa);
    let now = keygate_server::time::now_ms();
    b.bench(|| f.oauth.verify_jwt(black_box(&f.token), now).is_ok());
}

#[divan::bench]
fn jwt_verify_es256(b: Bencher) {
    let f = jwt_fixture(keygate_server::oauth::keys::KeyAlg::Es256);
    let now = keygate_server::time::now_ms();
    b.bench(|| f.oauth.verify_jwt(black_box(&f.token), now).is_ok());
}

#[divan::bench]
fn sha256_secret(b: Bencher) {
    let s = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
    b.bench(|| SecretHash::of(black_box(s.expose())));
}

#[divan::bench]
fn hashmap_lookup(b: Bencher) {
    let s = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
    let map: HashMap<SecretHash, u64> =
        (0..1000u64).map(|i| (SecretHash::of(&format!("{i}")), i)).chain([(s.hash(), 7)]).collect();
    b.bench(|| map.get(&SecretHash::of(black_box(s.expose()))).copied());
}

#[divan::bench]
fn parse_and_checksum(b: Bencher) {
    let s = PlainSecret::generate(SecretKind::ApiKey(Environment::Live)).unwrap();
    b.bench(|| parse(black_box(s.expose())).is_ok());
}

#[divan::bench]
fn scope_check(b: Bencher) {
    let granted: Vec<String> = ["articles:*", "users:read", "billing:read"].map(String::from).to_vec();
    b.bench(|| scope::satisfies(black_box(&granted), black_box(&["articles:read", "users:read"])));
}

#[divan::bench]
fn verify_cached_valid(b: Bencher) {
    let f = fixture();
    let required = [scope::VERIFY];
    b.bench(|| match f.verifier.verify_cached(black_box(&f.valid), &required, Context::at(0)) {
        Lookup::Decided(d) => d.body().len(),
        Lookup::Miss(_) => panic!("not cached"),
    });
}

/// Rate limits, quota and usage counting on: the issue's goal is within 10% of `verify_cached_valid`.
#[divan::bench]
fn verify_cached_limited(b: Bencher) {
    let f = fixture();
    let required = [scope::VERIFY];
    b.bench(|| match f.verifier.verify_cached(black_box(&f.limited), &required, Context::at(1)) {
        Lookup::Decided(d) => d.body().len(),
        Lookup::Miss(_) => panic!("not cached"),
    });
}

#[divan::bench]
fn verify_cached_unknown(b: Bencher) {
    let f = fixture();
    b.bench(|| match f.verifier.verify_cached(black_box(&f.unknown), &[] as &[&str], Context::at(0)) {
        Lookup::Decided(d) => d.body().len(),
        Lookup::Miss(_) => panic!("not cached"),
    });
}

#[divan::bench]
fn verify_malformed(b: Bencher) {
    let f = fixture();
    // Right prefix and length, wrong checksum: the most work a malformed key can cause.
    let mut garbage = f.valid.clone().into_bytes();
    garbage[10] = if garbage[10] == b'a' { b'b' } else { b'a' };
    let garbage = String::from_utf8(garbage).unwrap();
    b.bench(|| match f.verifier.verify_cached(black_box(&garbage), &[] as &[&str], Context::at(0)) {
        Lookup::Decided(d) => d.body().len(),
        Lookup::Miss(_) => panic!("garbage reached the store"),
    });
}

/// One login's password check: Argon2id with OWASP's parameters (19 MiB, t = 2, p = 1). Not on the
/// verify path; this is what each login (and each failed guess) costs one core.
#[divan::bench(sample_count = 20, sample_size = 1)]
fn argon2id_login(bencher: Bencher) {
    let hash = keygate_server::password::hash("correct horse battery").unwrap();
    bencher.bench(|| keygate_server::password::verify(black_box("correct horse battery"), Some(&hash)));
}

/// PKCE S256 check at the token endpoint.
#[divan::bench]
fn pkce_s256() -> bool {
    keygate_core::oauth::pkce_s256_matches(
        black_box("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
        black_box("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"),
    )
}

/// A DPoP proof check (RFC 9449): what a DPoP-bound token costs on top of a bearer token's verify
/// (`jwt_verify_*`). Each iteration checks a fresh proof (unique `jti`; building it is not timed).
#[divan::bench(sample_count = 50, sample_size = 20)]
fn dpop_proof_check(bencher: Bencher) {
    use base64::Engine;
    use p256::ecdsa::signature::Signer;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let point = key.verifying_key().to_encoded_point(false);
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())});
    let header =
        b64(serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}).to_string().as_bytes());
    let token = "eyJhbGciOiJFZERTQSJ9.e30.sig";
    let ath = keygate_server::oauth::dpop::ath(token);
    let dpop = keygate_server::oauth::dpop::Dpop::default();
    let now = 1_800_000_000_000_i64;
    let counter = std::sync::atomic::AtomicU64::new(0);
    bencher
        .with_inputs(|| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let claims = serde_json::json!({"jti": format!("j{n}"), "htm": "GET", "htu": "https://api.example.com/x",
                "iat": now / 1000, "ath": ath});
            let input = format!("{header}.{}", b64(claims.to_string().as_bytes()));
            let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
            format!("{input}.{}", b64(&sig.to_bytes()))
        })
        .bench_refs(|proof| {
            let check = keygate_server::oauth::dpop::ProofCheck {
                proof,
                method: "GET",
                url: "https://api.example.com/x",
                access_token: Some(token),
            };
            dpop.verify(&check, now).unwrap()
        });
}
