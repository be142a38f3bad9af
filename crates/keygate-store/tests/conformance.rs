//! The store's contracts, written once against the backend-neutral traits (`Backend`), so that every
//! backend runs the same suite: SQLite (a file in a temporary directory) and PostgreSQL (a fresh database
//! on a real server: `keygate_store::testing`). Each test says which contract it holds the backend to.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly on purpose")]

use std::collections::HashSet;
use std::sync::Arc;

use keygate_core::{Environment, SecretHash};
use keygate_store::{
    ApiKey, Attempt, AttemptOutcome, AuditFilter, Backend, ConnectOptions, Consumer, Granularity, KeyPatch,
    KeyTotal, KeyUsage, LeakReport, NewAudit, NewEvent, Page, Store, StoreError, StoredSecret, UsageQuery,
    WebhookEndpoint, WebhookPatch,
};
use serde_json::json;

/// A fresh SQLite backend in a temporary directory (kept alive by the returned guard), opened the way
/// the server opens it: through `connect` and its location.
async fn sqlite() -> (Arc<dyn Backend>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let location = format!("sqlite:{}", dir.path().join("k.db").display());
    (keygate_store::connect(&location, &ConnectOptions::default()).await.unwrap(), dir)
}

/// A fresh PostgreSQL backend: a new database on the test server, opened through `connect`.
async fn postgres() -> (Arc<dyn Backend>, ()) {
    let url = keygate_store::testing::postgres_database().await.unwrap();
    (keygate_store::connect(&url, &ConnectOptions::default()).await.unwrap(), ())
}

/// `connect` picks the backend by location: a path or `sqlite:` opens (and migrates) SQLite; an unknown
/// scheme is refused with a message that says what to give, and opens nothing.
#[tokio::test]
async fn connect_by_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.db");
    let store =
        keygate_store::connect(&path.display().to_string(), &ConnectOptions::default()).await.unwrap();
    assert!(!store.is_initialized().await.unwrap(), "migrated and empty");
    store.close().await;
    assert!(path.exists());
    for bad in ["mysql://db.example.com/keygate", ""] {
        let Err(e) = keygate_store::connect(bad, &ConnectOptions::default()).await else {
            panic!("{bad} opened")
        };
        assert!(e.to_string().contains("sqlite:PATH") && e.to_string().contains("postgres://"), "{bad}: {e}");
    }
}

fn audit(id: &str, action: &str, target: &str, at: i64) -> NewAudit {
    NewAudit {
        id: id.into(),
        at,
        actor: "test".into(),
        action: action.into(),
        target_type: "consumer".into(),
        target_id: target.into(),
        ip: None,
        details: json!({}),
    }
}

fn consumer(id: &str) -> Consumer {
    Consumer::new(id.into(), id.into(), json!({}), 1)
}

fn endpoint(id: &str, events: &[&str], enabled: bool) -> WebhookEndpoint {
    WebhookEndpoint {
        id: id.into(),
        url: format!("https://hooks.example.com/{id}"),
        events: events.iter().map(|e| e.to_string()).collect(),
        description: None,
        enabled,
        secret_sealed: vec![1, 2, 3],
        previous_secret_until: None,
        failing_since: None,
        disabled_reason: None,
        created_at: 1,
        updated_at: 1,
    }
}

fn event(id: &str, dedup: &str, at: i64) -> NewEvent {
    NewEvent {
        id: id.into(),
        event_type: "key.expiring".into(),
        at,
        payload: "{}".into(),
        dedup: dedup.into(),
    }
}

/// Contract: an audited change that reports an event writes the event and a delivery for every endpoint
/// whose filter takes it, in the change's transaction; only enabled endpoints' deliveries are claimed,
/// and a disabled endpoint's wait for it.
async fn outbox_is_written_with_the_change(store: Arc<dyn Backend>) {
    store
        .insert_webhook(
            &endpoint("whk_a", &["consumer.created"], true),
            &audit("evt_w1", "webhook.create", "whk_a", 1),
        )
        .await
        .unwrap();
    store
        .insert_webhook(&endpoint("whk_b", &["*"], false), &audit("evt_w2", "webhook.create", "whk_b", 1))
        .await
        .unwrap();
    store
        .insert_webhook(
            &endpoint("whk_c", &["key.revoked"], true),
            &audit("evt_w3", "webhook.create", "whk_c", 1),
        )
        .await
        .unwrap();
    store
        .insert_consumer(&consumer("cons_1"), &audit("evt_c1", "consumer.create", "cons_1", 10))
        .await
        .unwrap();
    let events = store.list_events(None, 10).await.unwrap();
    assert_eq!(events.len(), 1, "webhook changes report no event; the consumer's does");
    assert_eq!((events[0].id.as_str(), events[0].event_type.as_str()), ("evt_c1", "consumer.created"));
    let claimed = store.claim_deliveries(100, 1_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].endpoint_id.as_str(), claimed[0].event_id.as_str()), ("whk_a", "evt_c1"));
    let patch = WebhookPatch { enabled: Some(true), updated_at: 20, ..WebhookPatch::default() };
    store.update_webhook("whk_b", &patch, &audit("evt_w4", "webhook.update", "whk_b", 20)).await.unwrap();
    let waited = store.claim_deliveries(100, 1_000, 10).await.unwrap();
    assert_eq!(waited.len(), 1, "the disabled endpoint's delivery waited for it");
    assert_eq!(waited[0].endpoint_id, "whk_b");
}

/// Contract: a claim leases; concurrent claims (several nodes) never hand one delivery to two callers;
/// one claimer (a node's worker) never holds more than 16 leases of one endpoint at once. (Across
/// nodes the cap is per node.)
async fn claims_are_exclusive_and_capped(store: Arc<dyn Backend>) {
    store
        .insert_webhook(&endpoint("whk_a", &["*"], true), &audit("evt_w1", "webhook.create", "whk_a", 1))
        .await
        .unwrap();
    let events: Vec<NewEvent> =
        (0..50).map(|i| event(&format!("evt_{i:03}"), &format!("d{i}"), 10)).collect();
    assert_eq!(store.insert_events(&events).await.unwrap(), 50);
    let mut handles = Vec::new();
    for _ in 0..8 {
        let s = store.clone();
        handles.push(tokio::spawn(async move { s.claim_deliveries(100, 10_000, 10).await.unwrap() }));
    }
    let mut seen = HashSet::new();
    for h in handles {
        for d in h.await.unwrap() {
            assert!(seen.insert(d.id), "delivery {} handed out twice", d.id);
        }
    }
    assert!(!seen.is_empty());
    // One claimer, later (every lease above still held): only what is left of the endpoint's cap.
    let later = store.claim_deliveries(200, 10_000, 50).await.unwrap();
    assert!(later.len() <= 16usize.saturating_sub(seen.len()), "{} leased, then {}", seen.len(), later.len());
    assert!(later.iter().all(|d| !seen.contains(&d.id)));
    // A fresh endpoint: one claimer gets at most 16 of its deliveries at once.
    store
        .insert_webhook(
            &endpoint("whk_b", &["key.revoked"], true),
            &audit("evt_w2", "webhook.create", "whk_b", 1),
        )
        .await
        .unwrap();
    let revoked: Vec<NewEvent> = (0..30)
        .map(|i| NewEvent {
            event_type: "key.revoked".into(),
            ..event(&format!("evt_r{i:03}"), &format!("r{i}"), 10)
        })
        .collect();
    store.insert_events(&revoked).await.unwrap();
    let of_b =
        |v: Vec<keygate_store::DueDelivery>| v.into_iter().filter(|d| d.endpoint_id == "whk_b").count();
    assert_eq!(of_b(store.claim_deliveries(300, 10_000, 50).await.unwrap()), 16);
    assert_eq!(of_b(store.claim_deliveries(300, 10_000, 50).await.unwrap()), 0);
}

/// Contract: an attempt counts only under the lease it was claimed with; a finisher whose lease ran out
/// (and whose delivery was leased again) changes nothing.
async fn late_finishers_change_nothing(store: Arc<dyn Backend>) {
    store
        .insert_webhook(&endpoint("whk_a", &["*"], true), &audit("evt_w1", "webhook.create", "whk_a", 1))
        .await
        .unwrap();
    store.insert_events(&[event("evt_1", "d1", 10)]).await.unwrap();
    let first = store.claim_deliveries(100, 200, 10).await.unwrap().remove(0);
    let second = store.claim_deliveries(300, 400, 10).await.unwrap().remove(0);
    assert_eq!(first.id, second.id, "the lease ran out: claimed again");
    let attempt = Attempt { at: 350, status_code: Some(500), latency_ms: 3, error: Some("boom".into()) };
    assert_eq!(
        store.finish_attempt(&first, &attempt, AttemptOutcome::Retry(9_000), 1_000).await.unwrap(),
        None
    );
    let ok = Attempt { at: 360, status_code: Some(204), latency_ms: 2, error: None };
    assert_eq!(
        store.finish_attempt(&second, &ok, AttemptOutcome::Delivered, 1_000).await.unwrap(),
        Some(None)
    );
    let listed = store.list_deliveries("whk_a", None, 10).await.unwrap();
    assert_eq!(listed[0].status, "delivered");
    assert_eq!(listed[0].attempts, vec![ok], "only the current lease's attempt is kept");
}

/// Contract: events apart from changes are written once per dedup key.
async fn dedup_keys_write_once(store: Arc<dyn Backend>) {
    assert_eq!(store.insert_events(&[event("evt_1", "k", 1), event("evt_2", "k", 2)]).await.unwrap(), 1);
    assert_eq!(store.insert_events(&[event("evt_3", "k", 3)]).await.unwrap(), 0);
    assert_eq!(store.list_events(None, 10).await.unwrap().len(), 1);
}

/// Contract: failures make a run (a failure long after the previous one starts a new run), a success
/// ends it, and Keygate's disable applies only to the run it saw, once.
async fn failure_runs_and_conditional_disable(store: Arc<dyn Backend>) {
    store
        .insert_webhook(&endpoint("whk_a", &["*"], true), &audit("evt_w1", "webhook.create", "whk_a", 1))
        .await
        .unwrap();
    let fail = |at| Attempt { at, status_code: Some(500), latency_ms: 1, error: Some("x".into()) };
    let mut since = None;
    for (i, at) in [100i64, 1_000, 100_000].into_iter().enumerate() {
        store.insert_events(&[event(&format!("evt_{i}"), &format!("d{i}"), at)]).await.unwrap();
        let d = store.claim_deliveries(at, at + 50, 1).await.unwrap().remove(0);
        since = store.finish_attempt(&d, &fail(at), AttemptOutcome::Failed, 10_000).await.unwrap().unwrap();
        let expected = if at == 100_000 { 100_000 } else { 100 };
        assert_eq!(since, Some(expected), "after the failure at {at}");
    }
    let since = since.unwrap();
    let a = audit("evt_d1", "webhook.auto_disable", "whk_a", 200_000);
    assert!(!store.disable_failing_webhook("whk_a", 100, "old run", &a).await.unwrap());
    assert!(store.disable_failing_webhook("whk_a", since, "failing", &a).await.unwrap());
    let a2 = audit("evt_d2", "webhook.auto_disable", "whk_a", 200_001);
    assert!(!store.disable_failing_webhook("whk_a", since, "failing", &a2).await.unwrap(), "once");
    let e = store.get_webhook("whk_a").await.unwrap().unwrap();
    assert!(!e.enabled && e.disabled_reason.as_deref() == Some("failing"));
}

/// Contract: registration access tokens and leak reports are kept and found.
async fn registrations_and_leak_reports(store: Arc<dyn Backend>) {
    assert!(store.registration_token("kgc_x").await.unwrap().is_none());
    let report = LeakReport {
        id: "leak_1".into(),
        at: 1,
        reporter: "gh".into(),
        token_hash: "ab".into(),
        token_type: "t".into(),
        url: Some("https://x".into()),
        source: None,
        label: "true_positive".into(),
        credential: Some(("key".into(), "key_1".into())),
        action: "revoked".into(),
    };
    assert!(!store.leak_reported("ab", Some("https://x")).await.unwrap());
    store.insert_leak_report(&report, None).await.unwrap();
    assert!(store.leak_reported("ab", Some("https://x")).await.unwrap());
    assert!(!store.leak_reported("ab", Some("https://elsewhere")).await.unwrap());
    assert_eq!(store.list_leak_reports(None, 10).await.unwrap(), vec![report]);
}

/// Consumer `cons_1` with key `key_1`, whose secret hashes to `hash`.
async fn consumer_with_key(store: &Arc<dyn Backend>, hash: SecretHash) {
    store
        .insert_consumer(&consumer("cons_1"), &audit("evt_001", "consumer.create", "cons_1", 1))
        .await
        .unwrap();
    let key = ApiKey::new(
        "key_1".into(),
        "cons_1".into(),
        "k".into(),
        Environment::Live,
        vec!["a".into()],
        json!({}),
        None,
        "kg_live_ab".into(),
        2,
    );
    let secret = StoredSecret::new(hash, "key_1", "kg_live_ab", 2);
    store.insert_key(&key, &secret, &audit("evt_002", "key.create", "key_1", 2)).await.unwrap();
}

/// Contract: a key's lifecycle is readable through the verify path's one read, every change has its
/// audit record (newest first), and a revoked key stays revoked.
async fn key_lifecycle_with_audit(store: Arc<dyn Backend>) {
    let hash = SecretHash::of("kg_live_secret-for-the-suite");
    consumer_with_key(&store, hash).await;
    let found = store.find_secret(&hash).await.unwrap().unwrap();
    assert_eq!((found.key.id.as_str(), found.consumer_disabled), ("key_1", false));
    let patch = KeyPatch { revoked_at: Some(3), updated_at: 3, ..KeyPatch::default() };
    store.update_key("key_1", &patch, &audit("evt_003", "key.revoke", "key_1", 3)).await.unwrap().unwrap();
    assert_eq!(store.find_secret(&hash).await.unwrap().unwrap().key.revoked_at, Some(3));
    let again = KeyPatch { name: Some("x".into()), updated_at: 4, ..KeyPatch::default() };
    assert!(
        store
            .update_key("key_1", &again, &audit("evt_004", "key.update", "key_1", 4))
            .await
            .unwrap()
            .is_none(),
        "revoked keys do not change"
    );
    let log = store.list_audit(&AuditFilter { limit: 10, ..AuditFilter::default() }).await.unwrap();
    let ids: Vec<&str> = log.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        ["evt_003", "evt_002", "evt_001"],
        "no audit record for the refused change; newest first"
    );
}

/// Contract: listings page in id order; a unique rule broken is `Conflict`, not another error.
async fn paging_order_and_conflicts(store: Arc<dyn Backend>) {
    for i in [3, 1, 2, 5, 4] {
        let id = format!("cons_{i}");
        store
            .insert_consumer(&consumer(&id), &audit(&format!("evt_{i}"), "consumer.create", &id, i))
            .await
            .unwrap();
    }
    let first = store.list_consumers(&Page { after: None, limit: 2, search: None }).await.unwrap();
    let next =
        store.list_consumers(&Page { after: Some("cons_2".into()), limit: 2, search: None }).await.unwrap();
    let ids = |v: &[Consumer]| v.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        (ids(&first), ids(&next)),
        (vec!["cons_1".to_string(), "cons_2".into()], vec!["cons_3".to_string(), "cons_4".into()])
    );
    let twice =
        store.insert_consumer(&consumer("cons_1"), &audit("evt_dup", "consumer.create", "cons_1", 9)).await;
    assert!(matches!(twice, Err(StoreError::Conflict(_))), "{twice:?}");
    assert!(
        store
            .list_audit(&AuditFilter {
                target_id: Some("cons_1".into()),
                limit: 10,
                ..AuditFilter::default()
            })
            .await
            .unwrap()
            .len()
            == 1,
        "the refused insert wrote no audit record"
    );
}

/// Contract: usage counts of one bucket add up across flushes.
async fn usage_upserts_add_up(store: Arc<dyn Backend>) {
    consumer_with_key(&store, SecretHash::of("s")).await;
    let usage = |n| KeyUsage {
        key_id: "key_1".into(),
        consumer_id: "cons_1".into(),
        at: 120_000,
        counts: vec![("VALID", n)],
        last_used: None,
        quota: None,
        quota_refill: None,
    };
    store.flush_usage(&[usage(3)], &[]).await.unwrap();
    store.flush_usage(&[usage(4)], &[]).await.unwrap();
    let rows = store
        .usage(&UsageQuery {
            key_id: Some("key_1".into()),
            consumer_id: None,
            granularity: Granularity::Minute,
            from: 0,
            to: 600_000,
        })
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|r| r.count).sum::<i64>(), 7, "{rows:?}");
}

/// Contract: per-key totals cover exactly the range; roll-ups per consumer and for all keys add up to
/// the per-key buckets and expire with them; the lowest quotas come first; searches match a name (ignoring case) or an exact id, and page like listings.
async fn boards_quotas_and_search(store: Arc<dyn Backend>) {
    consumer_with_key(&store, SecretHash::of("one")).await;
    let mut second = ApiKey::new(
        "key_2".into(),
        "cons_1".into(),
        "Second Key".into(),
        Environment::Live,
        vec![],
        json!({}),
        None,
        "kg_live_cd".into(),
        3,
    );
    second.quota = Some(keygate_core::limits::Quota { remaining: 4, refill: None });
    let secret = StoredSecret::new(SecretHash::of("two"), "key_2", "kg_live_cd", 3);
    store.insert_key(&second, &secret, &audit("evt_k2", "key.create", "key_2", 3)).await.unwrap();
    let usage = |key: &str, counts: Vec<(&'static str, u64)>, at| KeyUsage {
        key_id: key.into(),
        consumer_id: "cons_1".into(),
        at,
        counts,
        last_used: None,
        quota: None,
        quota_refill: None,
    };
    store
        .flush_usage(
            &[
                usage("key_1", vec![("VALID", 10)], 60_000),
                usage("key_2", vec![("VALID", 2), ("RATE_LIMITED", 3)], 60_000),
                // Outside the range asked for below.
                usage("key_2", vec![("NOT_FOUND", 100)], 7_200_000),
            ],
            &[],
        )
        .await
        .unwrap();
    let q = UsageQuery {
        key_id: None,
        consumer_id: None,
        granularity: Granularity::Minute,
        from: 0,
        to: 3_600_000,
    };
    let totals = store.usage_by_key(&q).await.unwrap();
    let total = |key: &str, total, failures| KeyTotal {
        key_id: key.into(),
        consumer_id: "cons_1".into(),
        total,
        failures,
    };
    assert_eq!(totals, [total("key_1", 10, 0), total("key_2", 5, 3)], "the range only, per key");
    // The roll-ups: the consumer and all keys add up to the same, in and out of the range.
    let report = |consumer: Option<&str>, to| UsageQuery {
        key_id: None,
        consumer_id: consumer.map(String::from),
        granularity: Granularity::Hour,
        from: 0,
        to,
    };
    for consumer in [None, Some("cons_1")] {
        let rows = store.usage(&report(consumer, 3_600_000)).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.count).sum::<i64>(), 15, "{consumer:?}: {rows:?}");
        let rows = store.usage(&report(consumer, 36_000_000)).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.count).sum::<i64>(), 115, "{consumer:?}: {rows:?}");
    }
    assert_eq!(
        store
            .usage(&UsageQuery { consumer_id: Some("cons_9".into()), ..report(None, 36_000_000) })
            .await
            .unwrap(),
        []
    );
    store.expire_usage(&[(Granularity::Hour, 3_600_000)]).await.unwrap();
    let rows = store.usage(&report(None, 36_000_000)).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.count).sum::<i64>(), 100, "roll-ups expire with the buckets: {rows:?}");

    let low = store.keys_lowest_quota(0, 10).await.unwrap();
    assert_eq!(low.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["key_2"], "only keys with a quota");

    let search = |s: &str| Page { after: None, limit: 10, search: Some(s.into()) };
    let names = |v: Vec<ApiKey>| v.into_iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(names(store.list_keys(None, &search("second")).await.unwrap()), ["key_2"]);
    assert_eq!(names(store.list_keys(Some("cons_1"), &search("key_1")).await.unwrap()), ["key_1"]);
    assert_eq!(
        names(store.list_keys(Some("cons_9"), &search("second")).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        names(store.list_keys(None, &search("%")).await.unwrap()),
        Vec::<String>::new(),
        "no wildcards"
    );
    let found = store.list_consumers(&search("CONS_")).await.unwrap();
    assert_eq!(found.len(), 1, "names match ignoring case");
}

/// Contract: following key secrets by change number ("everything after the last number seen", over and
/// over) while many writers commit concurrently ends with every secret and never skips one; numbers only
/// grow and are never handed out twice.
async fn following_never_skips_under_concurrent_writers(store: Arc<dyn Backend>) {
    store
        .insert_consumer(&consumer("cons_1"), &audit("evt_c", "consumer.create", "cons_1", 0))
        .await
        .unwrap();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut hashes = Vec::new();
                for i in 0..40 {
                    let id = format!("key_{w}_{i}");
                    let hash = SecretHash::of(&id);
                    let key = ApiKey::new(
                        id.clone(),
                        "cons_1".into(),
                        "k".into(),
                        Environment::Live,
                        vec![],
                        json!({}),
                        None,
                        "s".into(),
                        0,
                    );
                    // Busy answers are part of concurrent life: retry them.
                    loop {
                        match store
                            .insert_key(
                                &key,
                                &StoredSecret::new(hash, &id, "s", 0),
                                &audit(&format!("evt_{id}"), "key.create", &id, 0),
                            )
                            .await
                        {
                            Ok(()) => break,
                            Err(StoreError::Unavailable(_)) => tokio::task::yield_now().await,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    hashes.push(hash);
                }
                hashes
            })
        })
        .collect();
    let mut seen: HashSet<SecretHash> = HashSet::new();
    let mut cursor = 0;
    let mut numbers = Vec::new();
    while writers.iter().any(|w| !w.is_finished()) {
        for (n, h) in store.secret_changes_after(cursor, 7).await.unwrap() {
            assert!(n > cursor, "change numbers only grow");
            numbers.push(n);
            cursor = n;
            seen.insert(h);
        }
    }
    let mut all = HashSet::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    loop {
        let rows = store.secret_changes_after(cursor, 7).await.unwrap();
        let Some(&(n, _)) = rows.last() else { break };
        seen.extend(rows.iter().map(|(_, h)| *h));
        cursor = n;
    }
    assert_eq!(all.len(), 320);
    assert_eq!(seen, all, "the follower saw every committed secret");
    let mut unique = numbers.clone();
    unique.dedup();
    assert_eq!(unique.len(), numbers.len(), "no change number was handed out twice");
}

/// Contract: a shared store numbers audited changes in commit order (as for secrets) and announces each
/// commit to its listeners; a store that is not shared keeps no change log.
async fn changes_are_numbered_and_announced(store: Arc<dyn Backend>) {
    if !store.shared() {
        store
            .insert_consumer(&consumer("cons_1"), &audit("evt_1", "consumer.create", "cons_1", 1))
            .await
            .unwrap();
        assert_eq!(store.changes_after(0, 10).await.unwrap(), vec![]);
        assert!(store.listen().await.unwrap().is_none());
        return;
    }
    let start = store.last_change().await.unwrap();
    let mut listener = store.listen().await.unwrap().expect("a shared store can be listened to");
    store
        .insert_consumer(&consumer("cons_1"), &audit("evt_1", "consumer.create", "cons_1", 1))
        .await
        .unwrap();
    let woke = tokio::time::timeout(std::time::Duration::from_secs(5), listener.next()).await;
    assert!(matches!(woke, Ok(Ok(true))), "the commit was announced: {woke:?}");
    let patch = keygate_store::ConsumerPatch { disabled: Some(true), updated_at: 2, ..Default::default() };
    store.update_consumer("cons_1", &patch, &audit("evt_2", "consumer.disable", "cons_1", 2)).await.unwrap();
    let changes = store.changes_after(start, 10).await.unwrap();
    let seen: Vec<(&str, &str)> = changes.iter().map(|c| (c.action.as_str(), c.target_id.as_str())).collect();
    assert_eq!(seen, [("consumer.create", "cons_1"), ("consumer.disable", "cons_1")]);
    assert!(changes[0].seq > start && changes[1].seq > changes[0].seq);
    assert_eq!(store.last_change().await.unwrap(), changes[1].seq);
    assert_eq!(store.changes_after(changes[1].seq, 10).await.unwrap(), vec![]);
    // A change that is rolled back (here: refused) takes no number and announces nothing.
    let dup =
        store.insert_consumer(&consumer("cons_1"), &audit("evt_3", "consumer.create", "cons_1", 3)).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert_eq!(store.last_change().await.unwrap(), changes[1].seq);
}

/// Contract: nodes leasing a shared quota concurrently never get more than the pool in total; units go
/// back only into the epoch they came from; a refill due is applied by the lease that finds it; an
/// admin change of the quota starts a new epoch. A store that is not shared leases nothing.
async fn quota_leases_never_exceed_the_pool(store: Arc<dyn Backend>) {
    store
        .insert_consumer(&consumer("cons_1"), &audit("evt_c", "consumer.create", "cons_1", 0))
        .await
        .unwrap();
    let mut key = ApiKey::new(
        "key_q".into(),
        "cons_1".into(),
        "k".into(),
        Environment::Live,
        vec![],
        json!({}),
        None,
        "s".into(),
        0,
    );
    key.quota = Some(keygate_core::limits::Quota { remaining: 100, refill: None });
    let hash = SecretHash::of("quota-key");
    store
        .insert_key(
            &key,
            &StoredSecret::new(hash, "key_q", "s", 0),
            &audit("evt_k", "key.create", "key_q", 0),
        )
        .await
        .unwrap();
    if !store.shared() {
        assert!(store.lease_quota("key_q", 1, 1).await.is_err(), "only shared stores lease");
        return;
    }
    let takers: Vec<_> = (0..12)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = 0;
                loop {
                    match store.lease_quota("key_q", 1, 1).await {
                        Ok(Some(l)) if l.granted == 0 => break got,
                        Ok(Some(l)) => got += l.granted,
                        Ok(None) => panic!("the key has a quota"),
                        Err(StoreError::Unavailable(_)) => tokio::task::yield_now().await,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for t in takers {
        total += t.await.unwrap();
    }
    assert_eq!(total, 100, "every unit leased exactly once");
    let lease = store.lease_quota("key_q", 1, 1).await.unwrap().unwrap();
    assert_eq!((lease.granted, lease.pool_left), (0, 0));
    store.return_quota("key_q", 5, lease.epoch).await.unwrap();
    store.return_quota("key_q", 7, lease.epoch + 1).await.unwrap();
    let again = store.lease_quota("key_q", 1, 1).await.unwrap().unwrap();
    assert_eq!(again.granted + again.pool_left, 5, "only the current epoch's units went back");
    assert!(
        store.lease_quota("key_q", 10, 1).await.unwrap().unwrap().granted == 0,
        "less than asked: nothing"
    );
    // An admin sets the quota: a new epoch, so older units cannot be given back.
    let patch = KeyPatch {
        quota: Some(Some(keygate_core::limits::Quota { remaining: 40, refill: None })),
        quota_refilled_at: Some(2),
        updated_at: 2,
        ..KeyPatch::default()
    };
    store.update_key("key_q", &patch, &audit("evt_q", "key.quota", "key_q", 2)).await.unwrap().unwrap();
    store.return_quota("key_q", 3, again.epoch).await.unwrap();
    let set = store.lease_quota("key_q", 1, 3).await.unwrap().unwrap();
    assert!(set.epoch > again.epoch);
    assert_eq!((set.granted, set.pool_left), (5, 35), "an eighth of the pool; the stale units stayed out");
    // A refill due is applied by the lease that finds it, in a new epoch.
    let refill = keygate_core::limits::Refill {
        amount: 16,
        interval_seconds: Some(60),
        schedule: None,
        day_of_month: None,
    };
    let patch = KeyPatch {
        quota: Some(Some(keygate_core::limits::Quota { remaining: 0, refill: Some(refill) })),
        quota_refilled_at: Some(1_000),
        updated_at: 4,
        ..KeyPatch::default()
    };
    store.update_key("key_q", &patch, &audit("evt_r", "key.quota", "key_q", 4)).await.unwrap().unwrap();
    assert_eq!(store.lease_quota("key_q", 1, 2_000).await.unwrap().unwrap().granted, 0, "not yet due");
    let refilled = store.lease_quota("key_q", 1, 61_000).await.unwrap().unwrap();
    assert_eq!((refilled.granted, refilled.pool_left, refilled.refilled_at), (2, 14, 61_000));
}

fn client(id: &str) -> keygate_store::OAuthClient {
    keygate_store::OAuthClient {
        id: id.into(),
        consumer_id: "cons_1".into(),
        name: id.into(),
        grant_types: vec![
            keygate_store::GrantType::AuthorizationCode,
            keygate_store::GrantType::RefreshToken,
        ],
        scopes: vec!["a".into()],
        audiences: vec![],
        token_format: keygate_store::TokenFormat::Opaque,
        token_lifetime_seconds: 600,
        confidential: false,
        disabled: false,
        tokens_revoked_before: None,
        secret_start: None,
        auth_method: "none".into(),
        jwks: None,
        redirect_uris: vec!["https://app.example.com/cb".into()],
        refresh_idle_seconds: 3600,
        refresh_absolute_seconds: 86_400,
        created_at: 1,
        updated_at: 1,
    }
}

fn access(jti: &str, family: Option<&str>) -> keygate_store::AccessTokenRecord {
    keygate_store::AccessTokenRecord {
        hash: SecretHash::of(jti),
        jti: jti.into(),
        client_id: "kgc_app".into(),
        subject: "usr_1".into(),
        scopes: vec!["a".into()],
        audiences: vec![],
        issued_at: 10,
        expires_at: 10_000,
        revoked_at: None,
        family_id: family.map(str::to_string),
        source: None,
        jkt: None,
    }
}

/// Contract: opaque tokens written in a batch (group commit) are found and revoked once; a code is
/// redeemed exactly once however many redemptions race (the others see a replay, which revokes the
/// family), and a refresh token rotates exactly once however many rotations race; revoking the grant
/// revokes its families and their opaque tokens.
async fn oauth_state_is_exactly_once(store: Arc<dyn Backend>) {
    store
        .insert_consumer(&consumer("cons_1"), &audit("evt_c", "consumer.create", "cons_1", 0))
        .await
        .unwrap();
    store
        .insert_client(&client("kgc_app"), None, &audit("evt_cl", "client.create", "kgc_app", 1))
        .await
        .unwrap();
    let tokens: Vec<_> = (0..20).map(|i| access(&format!("jti_{i}"), None)).collect();
    store.insert_access_tokens(&tokens).await.unwrap();
    assert_eq!(store.find_access_token(&SecretHash::of("jti_7")).await.unwrap().unwrap().jti, "jti_7");
    assert!(store.revoke_access_token(&SecretHash::of("jti_7"), 20, None).await.unwrap().is_some());
    assert!(store.revoke_access_token(&SecretHash::of("jti_7"), 21, None).await.unwrap().is_none(), "once");

    let user = keygate_store::User {
        id: "usr_1".into(),
        username: "ann".into(),
        email: None,
        display_name: None,
        password_hash: None,
        allowed_scopes: None,
        roles: vec![],
        disabled: false,
        created_at: 1,
        updated_at: 1,
        last_login_at: None,
        email_verified_at: None,
    };
    store.insert_user(&user, &audit("evt_u", "user.create", "usr_1", 1)).await.unwrap();
    let code = keygate_store::AuthCode {
        hash: SecretHash::of("code-1"),
        client_id: "kgc_app".into(),
        user_id: "usr_1".into(),
        grant_id: String::new(),
        redirect_uri: "https://app.example.com/cb".into(),
        code_challenge: "x".into(),
        scopes: vec!["a".into()],
        audiences: vec![],
        created_at: 30,
        expires_at: 10_000,
        used_at: None,
        family_id: None,
    };
    let grant = store.issue_code(&code, Some("grt_1"), Some(30)).await.unwrap();
    assert_eq!(grant, "grt_1");
    let redemption = |n: usize| keygate_store::Redemption {
        hash: SecretHash::of("code-1"),
        at: 40,
        family: keygate_store::TokenFamily {
            id: format!("fam_{n}"),
            grant_id: grant.clone(),
            client_id: "kgc_app".into(),
            user_id: "usr_1".into(),
            created_at: 40,
            expires_at: 100_000,
            revoked_at: None,
            jkt: None,
        },
        refresh: Some(keygate_store::RefreshRecord {
            hash: SecretHash::of(&format!("refresh-{n}")),
            family_id: format!("fam_{n}"),
            scopes: vec!["a".into()],
            audiences: vec![],
            issued_at: 40,
            idle_expires_at: 50_000,
            used_at: None,
        }),
        access: Some(access(&format!("code_access_{n}"), Some(&format!("fam_{n}")))),
    };
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let (store, r) = (store.clone(), redemption(n));
            tokio::spawn(async move {
                loop {
                    match store.redeem_codes(std::slice::from_ref(&r)).await {
                        Ok(mut v) => break (n, v.remove(0)),
                        Err(StoreError::Unavailable(_)) => tokio::task::yield_now().await,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for r in racers {
        outcomes.push(r.await.unwrap());
    }
    let issued: Vec<usize> =
        outcomes.iter().filter(|(_, o)| *o == keygate_store::Redeemed::Issued).map(|(n, _)| *n).collect();
    assert_eq!(issued.len(), 1, "redeemed exactly once: {outcomes:?}");
    assert!(outcomes.iter().all(|(_, o)| matches!(
        o,
        keygate_store::Redeemed::Issued | keygate_store::Redeemed::Replayed { .. }
    )));
    // The replays revoked the family the one redemption created.
    let family = format!("fam_{}", issued[0]);
    assert!(store.revoked_families(50).await.unwrap().iter().any(|(f, _)| *f == family));

    // A fresh family (a second code) and its refresh token, rotated by racing rotations.
    let code2 = keygate_store::AuthCode { hash: SecretHash::of("code-2"), ..code.clone() };
    store.issue_code(&code2, Some("grt_x"), None).await.unwrap();
    let r2 = keygate_store::Redemption { hash: SecretHash::of("code-2"), ..redemption(100) };
    assert_eq!(store.redeem_codes(&[r2]).await.unwrap(), vec![keygate_store::Redeemed::Issued]);
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            let rotation = keygate_store::Rotation {
                old: SecretHash::of("refresh-100"),
                at: 60,
                successor: keygate_store::RefreshRecord {
                    hash: SecretHash::of(&format!("successor-{n}")),
                    family_id: "fam_100".into(),
                    scopes: vec!["a".into()],
                    audiences: vec![],
                    issued_at: 60,
                    idle_expires_at: 50_000,
                    used_at: None,
                },
                access: None,
            };
            tokio::spawn(async move {
                loop {
                    match store.rotate_refreshes(std::slice::from_ref(&rotation)).await {
                        Ok(v) => break v[0],
                        Err(StoreError::Unavailable(_)) => tokio::task::yield_now().await,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.unwrap());
    }
    assert_eq!(won, 1, "rotated exactly once");
    // Revoking the grant revokes the family and its opaque access token.
    let revoked =
        store.revoke_grant("usr_1", "grt_1", 70, &audit("evt_g", "grant.revoke", "grt_1", 70)).await.unwrap();
    assert!(revoked.is_some());
    assert!(store.revoked_families(80).await.unwrap().iter().any(|(f, _)| f == "fam_100"));
    let token = store.find_access_token(&SecretHash::of("code_access_100")).await.unwrap().unwrap();
    assert!(token.revoked_at.is_some(), "the family's opaque token is revoked with it");
}

/// Contract: on a shared store, `exclusive` has one holder at a time for a name (across every node
/// sharing the database; here two callers), and dropping the guard lets the next one in.
async fn exclusive_locks_take_turns(store: Arc<dyn Backend>) {
    let first = store.exclusive("test").await.unwrap();
    let other = store.clone();
    let second = tokio::spawn(async move { other.exclusive("test").await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        second.is_finished(),
        !store.shared(),
        "a shared store makes the second wait; others lock nothing"
    );
    let unrelated = tokio::time::timeout(std::time::Duration::from_secs(5), store.exclusive("other")).await;
    assert!(matches!(unrelated, Ok(Ok(_))), "another name is not held");
    drop(first);
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), second).await;
    assert!(matches!(got, Ok(Ok(Ok(())))), "the second holder gets in once the first lets go");
}

fn plan(id: &str, name: &str, limit: u64) -> keygate_store::Plan {
    keygate_store::Plan {
        id: id.into(),
        name: name.into(),
        description: None,
        rate_limits: Some(vec![keygate_core::limits::RateLimit {
            name: "m".into(),
            limit,
            window_seconds: 60,
        }]),
        quota: None,
        allowed_scopes: Some(vec!["read".into()]),
        key_lifetime_seconds: None,
        self_service: true,
        is_default: false,
        created_at: 1,
        updated_at: 1,
    }
}

/// Contract: a consumer on a plan reads the plan's rate limits (a change to the plan reaches it at once,
/// also through the verify path's one read); a suspended owner stops the consumer's keys (and their
/// deletion disables it, keeping the owner's id); at most one plan is the default; names are unique
/// ignoring case; a plan in use cannot be deleted; consumers list by owner and by plan.
async fn plans_and_owners(store: Arc<dyn Backend>) {
    use keygate_store::{ConsumerPatch, ConsumersOf, PlanPatch, User};
    let free = plan("plan_free", "Free", 10);
    store.insert_plan(&free, &audit("evt_p1", "plan.create", "plan_free", 1)).await.unwrap();
    let dup = plan("plan_dup", "FREE", 1);
    assert!(matches!(
        store.insert_plan(&dup, &audit("evt_p2", "plan.create", "plan_dup", 1)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.find_plan("free").await.unwrap().unwrap().id, "plan_free");
    let pro = keygate_store::Plan { is_default: true, ..plan("plan_pro", "Pro", 1000) };
    store.insert_plan(&pro, &audit("evt_p3", "plan.create", "plan_pro", 1)).await.unwrap();
    let patch = PlanPatch { is_default: Some(true), updated_at: 2, ..PlanPatch::default() };
    store.update_plan("plan_free", &patch, &audit("evt_p4", "plan.update", "plan_free", 2)).await.unwrap();
    let plans = store.list_plans().await.unwrap();
    assert_eq!(
        plans.iter().map(|p| (p.name.as_str(), p.is_default)).collect::<Vec<_>>(),
        [("Free", true), ("Pro", false)]
    );

    let user = User {
        id: "usr_dev".into(),
        username: "dev".into(),
        email: Some("Dev@Example.com".into()),
        display_name: None,
        password_hash: None,
        allowed_scopes: None,
        roles: vec![],
        disabled: false,
        created_at: 1,
        updated_at: 1,
        last_login_at: None,
        email_verified_at: Some(1),
    };
    store.insert_user(&user, &audit("evt_u1", "user.create", "usr_dev", 1)).await.unwrap();
    assert_eq!(store.find_user_by_email("dev@example.COM").await.unwrap().unwrap().id, "usr_dev");
    assert!(store.find_user_by_email("other@example.com").await.unwrap().is_none());
    let app = Consumer {
        owner_id: Some("usr_dev".into()),
        plan_id: Some("plan_free".into()),
        rate_limits: Some(vec![]),
        ..consumer("cons_app")
    };
    store.insert_consumer(&app, &audit("evt_c1", "consumer.create", "cons_app", 1)).await.unwrap();
    store
        .insert_consumer(&consumer("cons_other"), &audit("evt_c2", "consumer.create", "cons_other", 1))
        .await
        .unwrap();
    let got = store.get_consumer("cons_app").await.unwrap().unwrap();
    assert_eq!(got.rate_limits.as_ref().unwrap()[0].limit, 10, "the plan's limits, not the consumer's own");
    assert!(!got.owner_disabled);
    let key = ApiKey::new(
        "key_app".into(),
        "cons_app".into(),
        "k".into(),
        Environment::Live,
        vec!["read".into()],
        json!({}),
        None,
        "kg_live_ap".into(),
        2,
    );
    let hash = SecretHash::of("app-secret");
    store
        .insert_key(
            &key,
            &StoredSecret::new(hash, "key_app", "kg_live_ap", 2),
            &audit("evt_k1", "key.create", "key_app", 2),
        )
        .await
        .unwrap();
    let rec = store.find_secret(&hash).await.unwrap().unwrap();
    assert!(!rec.consumer_disabled);
    assert_eq!(rec.consumer_rate_limits.unwrap()[0].limit, 10);

    let patch = PlanPatch {
        rate_limits: Some(Some(vec![keygate_core::limits::RateLimit {
            name: "m".into(),
            limit: 20,
            window_seconds: 60,
        }])),
        updated_at: 3,
        ..PlanPatch::default()
    };
    store.update_plan("plan_free", &patch, &audit("evt_p5", "plan.update", "plan_free", 3)).await.unwrap();
    assert_eq!(store.find_secret(&hash).await.unwrap().unwrap().consumer_rate_limits.unwrap()[0].limit, 20);

    let page = Page { after: None, limit: 10, search: None };
    let owned = store.consumers_where(ConsumersOf::Owner("usr_dev"), &page).await.unwrap();
    assert_eq!(owned.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["cons_app"]);
    let on_free = store.consumers_where(ConsumersOf::Plan("plan_free"), &page).await.unwrap();
    assert_eq!(on_free.len(), 1);
    assert!(matches!(
        store.delete_plan("plan_free", &audit("evt_p6", "plan.delete", "plan_free", 3)).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.delete_plan("plan_pro", &audit("evt_p7", "plan.delete", "plan_pro", 3)).await.unwrap());
    assert!(store.get_plan("plan_pro").await.unwrap().is_none());

    // The owner suspended: their consumer stops, through every read.
    let off = keygate_store::UserPatch { disabled: Some(true), updated_at: 4, ..Default::default() };
    store.update_user("usr_dev", &off, &audit("evt_u2", "user.disable", "usr_dev", 4)).await.unwrap();
    assert!(store.find_secret(&hash).await.unwrap().unwrap().consumer_disabled);
    assert!(store.get_consumer("cons_app").await.unwrap().unwrap().stopped());
    assert!(!store.get_consumer("cons_other").await.unwrap().unwrap().stopped());
    // Off the plan: the consumer's own limits again.
    let patch = ConsumerPatch { plan_id: Some(None), updated_at: 5, ..ConsumerPatch::default() };
    let c = store
        .update_consumer("cons_app", &patch, &audit("evt_c3", "consumer.update", "cons_app", 5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.rate_limits, Some(vec![]));
    assert!(c.owner_disabled, "the update's answer is read through the same view");
    // The verified address: cleared with a new address.
    let patch =
        keygate_store::UserPatch { email_verified_at: Some(None), updated_at: 6, ..Default::default() };
    let u = store
        .update_user("usr_dev", &patch, &audit("evt_u3", "user.update", "usr_dev", 6))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u.email_verified_at, None);
    // Deleted: the application is disabled, keeping its owner's id.
    assert!(store.delete_user("usr_dev", &audit("evt_u4", "user.delete", "usr_dev", 7)).await.unwrap());
    let c = store.get_consumer("cons_app").await.unwrap().unwrap();
    assert!(c.disabled && c.owner_id.as_deref() == Some("usr_dev"));
    assert!(store.find_secret(&hash).await.unwrap().unwrap().consumer_disabled);
    // A consumer whose owner does not exist (made while the owner was deleted) is stopped; one on a
    // plan that does not exist is not written.
    let orphan = Consumer { owner_id: Some("usr_gone".into()), ..consumer("cons_orphan") };
    store.insert_consumer(&orphan, &audit("evt_c4", "consumer.create", "cons_orphan", 8)).await.unwrap();
    assert!(store.get_consumer("cons_orphan").await.unwrap().unwrap().stopped());
    let lost = Consumer { plan_id: Some("plan_gone".into()), ..consumer("cons_lost") };
    assert!(matches!(
        store.insert_consumer(&lost, &audit("evt_c5", "consumer.create", "cons_lost", 8)).await,
        Err(StoreError::Conflict(_))
    ));
}

macro_rules! suite {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let (store, _guard) = super::$backend().await;
                    super::$test(store).await;
                }
            )*
        }
    };
}

suite!(sqlite:
    outbox_is_written_with_the_change,
    claims_are_exclusive_and_capped,
    late_finishers_change_nothing,
    dedup_keys_write_once,
    failure_runs_and_conditional_disable,
    registrations_and_leak_reports,
    key_lifecycle_with_audit,
    paging_order_and_conflicts,
    usage_upserts_add_up,
    boards_quotas_and_search,
    following_never_skips_under_concurrent_writers,
    changes_are_numbered_and_announced,
    quota_leases_never_exceed_the_pool,
    oauth_state_is_exactly_once,
    exclusive_locks_take_turns,
    plans_and_owners,
);

suite!(postgres:
    outbox_is_written_with_the_change,
    claims_are_exclusive_and_capped,
    late_finishers_change_nothing,
    dedup_keys_write_once,
    failure_runs_and_conditional_disable,
    registrations_and_leak_reports,
    key_lifecycle_with_audit,
    paging_order_and_conflicts,
    usage_upserts_add_up,
    boards_quotas_and_search,
    following_never_skips_under_concurrent_writers,
    changes_are_numbered_and_announced,
    quota_leases_never_exceed_the_pool,
    oauth_state_is_exactly_once,
    exclusive_locks_take_turns,
    plans_and_owners,
);

/// `Store` is one of the traits a backend implements (a compile-time check that the suite names them).
#[allow(dead_code)]
fn backend_is_a_store(b: &dyn Backend) -> &dyn Store {
    b
}
