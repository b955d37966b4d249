//! One store contract, two adapters: every case runs against the in-memory store and Redis.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use callfleet_core::ports::store::{CasOutcome, RateDecision};
use callfleet_core::ports::Store;

pub async fn records_create_read_cas(store: Arc<dyn Store>) {
    assert!(store
        .create_record("call_1", Bytes::from_static(b"v1"), Some(10), None, &[])
        .await
        .expect("create"));
    assert!(
        !store
            .create_record("call_1", Bytes::from_static(b"other"), Some(10), None, &[])
            .await
            .expect("create again"),
        "create-if-absent"
    );
    let rec = store
        .get_record("call_1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!((rec.version, rec.data.as_ref()), (1, &b"v1"[..]));
    assert_eq!(
        store
            .update_record("call_1", 1, Bytes::from_static(b"v2"), &[])
            .await
            .expect("cas"),
        CasOutcome::Updated(2)
    );
    assert_eq!(
        store
            .update_record("call_1", 1, Bytes::from_static(b"stale"), &[])
            .await
            .expect("cas"),
        CasOutcome::Conflict
    );
    assert_eq!(
        store
            .get_record("call_1")
            .await
            .expect("get")
            .expect("exists")
            .data
            .as_ref(),
        b"v2"
    );
    assert_eq!(
        store
            .update_record("missing", 1, Bytes::new(), &[])
            .await
            .expect("cas"),
        CasOutcome::Conflict
    );
    assert!(store.get_record("missing").await.expect("get").is_none());
}

pub async fn concurrent_writers_lose_no_update(store: Arc<dyn Store>) {
    store
        .create_record("counter", Bytes::from_static(b"0"), None, None, &[])
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let rec = store
                        .get_record("counter")
                        .await
                        .expect("get")
                        .expect("exists");
                    let n: u64 = std::str::from_utf8(&rec.data)
                        .expect("utf8")
                        .parse()
                        .expect("number");
                    let next = Bytes::from((n + 1).to_string());
                    if let CasOutcome::Updated(_) = store
                        .update_record("counter", rec.version, next, &[])
                        .await
                        .expect("cas")
                    {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let rec = store
        .get_record("counter")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(rec.data.as_ref(), b"80", "every increment survived");
    assert_eq!(rec.version, 81);
}

pub async fn index_lists_newest_first_with_cursor(store: Arc<dyn Store>) {
    for i in 0..7 {
        store
            .create_record(&format!("r{i}"), Bytes::new(), Some(1_000 + i), None, &[])
            .await
            .expect("create");
    }
    let page1 = store.list_index(None, 3).await.expect("page 1");
    assert_eq!(page1.ids, ["r6", "r5", "r4"]);
    let page2 = store
        .list_index(page1.next.as_deref(), 3)
        .await
        .expect("page 2");
    assert_eq!(page2.ids, ["r3", "r2", "r1"]);
    let page3 = store
        .list_index(page2.next.as_deref(), 3)
        .await
        .expect("page 3");
    assert_eq!(page3.ids, ["r0"]);
    assert_eq!(page3.next, None);
}

pub async fn idempotency_keys_and_event_dedupe(store: Arc<dyn Store>) {
    assert_eq!(
        store
            .claim_key("idem-1", "call_a", Duration::from_secs(60))
            .await
            .expect("claim"),
        None
    );
    assert_eq!(
        store
            .claim_key("idem-1", "call_b", Duration::from_secs(60))
            .await
            .expect("claim"),
        Some("call_a".into())
    );
    assert_eq!(
        store.get_key("idem-1").await.expect("get"),
        Some("call_a".into())
    );
    store.delete_key("idem-1").await.expect("delete");
    assert_eq!(store.get_key("idem-1").await.expect("get"), None);

    assert!(store
        .first_seen("EV_1", Duration::from_millis(300))
        .await
        .expect("seen"));
    assert!(
        !store
            .first_seen("EV_1", Duration::from_millis(300))
            .await
            .expect("seen"),
        "duplicate detected"
    );
    // The dedupe window expires.
    crate::harness::eventually("the dedupe mark to expire", Duration::from_secs(5), || {
        let store = Arc::clone(&store);
        async move {
            store
                .first_seen("EV_1", Duration::from_secs(60))
                .await
                .expect("seen")
                .then_some(())
        }
    })
    .await;
}

pub async fn locks_have_owners_ttl_and_cad_release(store: Arc<dyn Store>) {
    let token = store
        .try_lock("room-1", Duration::from_millis(300))
        .await
        .expect("lock")
        .expect("acquired");
    assert!(
        store
            .try_lock("room-1", Duration::from_secs(5))
            .await
            .expect("lock")
            .is_none(),
        "held"
    );
    assert!(store
        .extend_lock("room-1", &token, Duration::from_millis(400))
        .await
        .expect("extend"));
    let stranger = callfleet_core::ports::store::LockToken("not-the-owner".into());
    assert!(
        !store.unlock("room-1", &stranger).await.expect("unlock"),
        "compare-and-delete refuses a stranger"
    );
    assert!(!store
        .extend_lock("room-1", &stranger, Duration::from_secs(5))
        .await
        .expect("extend"));
    assert!(store.unlock("room-1", &token).await.expect("unlock"));
    assert!(!store.unlock("room-1", &token).await.expect("unlock twice"));
    // An expired lock can be taken by someone else, and the old owner can no longer release it.
    let old = store
        .try_lock("room-2", Duration::from_millis(100))
        .await
        .expect("lock")
        .expect("acquired");
    let new = crate::harness::eventually("the lock to expire", Duration::from_secs(5), || {
        let store = Arc::clone(&store);
        async move {
            store
                .try_lock("room-2", Duration::from_secs(5))
                .await
                .expect("lock")
        }
    })
    .await;
    assert!(
        !store.unlock("room-2", &old).await.expect("unlock"),
        "expired owner cannot release the new holder's lock"
    );
    assert!(store.unlock("room-2", &new).await.expect("unlock"));
}

pub async fn rate_limit_is_shared_and_bounded(store: Arc<dyn Store>) {
    let mut allowed = 0;
    let mut waits = Vec::new();
    for _ in 0..10 {
        match store.rate_limit("trunk-a", 5.0, 2).await.expect("rate") {
            RateDecision::Allowed => allowed += 1,
            RateDecision::RetryAfter(d) => waits.push(d),
        }
    }
    assert_eq!(allowed, 2, "burst of 2 at once");
    assert!(
        waits
            .iter()
            .all(|d| *d > Duration::ZERO && *d <= Duration::from_millis(400)),
        "{waits:?}"
    );
    // After the advertised wait, a slot is free again.
    let wait = waits[0];
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    assert_eq!(
        store.rate_limit("trunk-a", 5.0, 2).await.expect("rate"),
        RateDecision::Allowed
    );
    // Another key is independent.
    assert_eq!(
        store.rate_limit("trunk-b", 5.0, 1).await.expect("rate"),
        RateDecision::Allowed
    );
}

pub async fn leases_bound_concurrency_and_expire(store: Arc<dyn Store>) {
    let ttl = Duration::from_millis(300);
    assert!(store
        .acquire_lease("trunk", "call-1", 2, ttl)
        .await
        .expect("lease"));
    assert!(store
        .acquire_lease("trunk", "call-2", 2, ttl)
        .await
        .expect("lease"));
    assert!(
        !store
            .acquire_lease("trunk", "call-3", 2, ttl)
            .await
            .expect("lease"),
        "at most 2"
    );
    assert!(
        store
            .acquire_lease("trunk", "call-1", 2, Duration::from_secs(60))
            .await
            .expect("renew"),
        "holder renews"
    );
    assert_eq!(store.live_leases("trunk").await.expect("live"), 2);
    assert!(store
        .release_lease("trunk", "call-1")
        .await
        .expect("release"));
    assert!(store
        .acquire_lease("trunk", "call-3", 2, Duration::from_secs(60))
        .await
        .expect("lease"));
    // call-2's holder "died": its lease expires and frees the slot.
    crate::harness::eventually("call-2's lease to expire", Duration::from_secs(5), || {
        let store = Arc::clone(&store);
        async move {
            store
                .acquire_lease("trunk", "call-4", 2, Duration::from_secs(60))
                .await
                .expect("lease")
                .then_some(())
        }
    })
    .await;
    assert_eq!(store.live_leases("trunk").await.expect("live"), 2);
}

pub async fn many_concurrent_lease_takers_never_exceed_the_limit(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .acquire_lease("pool", &format!("h{i}"), 7, Duration::from_secs(30))
                .await
                .expect("lease")
        }));
    }
    let mut granted = 0;
    for t in tasks {
        if t.await.expect("task") {
            granted += 1;
        }
    }
    assert_eq!(granted, 7);
    assert_eq!(store.live_leases("pool").await.expect("live"), 7);
}

/// The sweeper's watch list: due ids earliest first, a new due time replaces the old,
/// unwatched ids are gone, and a record created with a watch is on the list at once.
pub async fn watch_list_orders_replaces_and_forgets(store: Arc<dyn Store>) {
    store.watch("c", 300).await.expect("watch");
    store.watch("a", 100).await.expect("watch");
    store.watch("b", 200).await.expect("watch");
    store.watch("late", 10_000).await.expect("watch");
    assert_eq!(store.due_watches(250, 10).await.expect("due"), ["a", "b"]);
    assert_eq!(store.due_watches(1_000, 2).await.expect("due"), ["a", "b"]);
    store.watch("a", 400).await.expect("move a");
    store.unwatch("b").await.expect("unwatch");
    assert_eq!(store.due_watches(1_000, 10).await.expect("due"), ["c", "a"]);
    let created = store
        .create_record("d", Bytes::from_static(b"{}"), None, Some(50), &[])
        .await
        .expect("create");
    assert!(created);
    assert_eq!(store.due_watches(60, 10).await.expect("due"), ["d"]);
    // A record that already exists is not created, and its watch is not touched.
    let again = store
        .create_record("d", Bytes::from_static(b"{}"), None, Some(5_000), &[])
        .await
        .expect("create again");
    assert!(!again);
    assert_eq!(store.due_watches(60, 10).await.expect("due"), ["d"]);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::harness::memory_store()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let prefix = crate::harness::unique_prefix(stringify!($name));
                    let _clean = crate::harness::CleanOnDrop(prefix.clone());
                    super::$name(crate::harness::redis_store_at(&prefix).await).await;
                }
            )*
        }
    };
}

conformance!(
    records_create_read_cas,
    concurrent_writers_lose_no_update,
    index_lists_newest_first_with_cursor,
    idempotency_keys_and_event_dedupe,
    locks_have_owners_ttl_and_cad_release,
    rate_limit_is_shared_and_bounded,
    leases_bound_concurrency_and_expire,
    many_concurrent_lease_takers_never_exceed_the_limit,
    watch_list_orders_replaces_and_forgets,
);

#[tokio::test]
async fn redis_unreachable_fails_fast() {
    let started = std::time::Instant::now();
    let result = callfleet_core::adapters::RedisStore::connect(
        "redis://127.0.0.1:1",
        "x",
        Duration::from_secs(1),
    )
    .await;
    assert!(result.is_err());
    assert!(started.elapsed() < Duration::from_secs(4));
}
