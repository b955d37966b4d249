//! The event log contract, held against the memory store and Redis alike: events are
//! appended only with the record write that caused them, read in order after an id,
//! waited for, bounded, and readers keep cursors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callfleet_core::adapters::{MemoryStore, RedisStore};
use callfleet_core::ports::store::CasOutcome;
use callfleet_core::ports::{EventId, EventLog, Store};

use crate::harness::{cleanup_redis, redis_url, unique_prefix};

fn ev(n: usize) -> Bytes {
    Bytes::from(format!("{{\"n\":{n}}}"))
}

fn data(events: &[callfleet_core::ports::LoggedEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect()
}

pub async fn appended_with_their_write_and_never_on_a_conflict(
    store: Arc<dyn Store>,
    log: Arc<dyn EventLog>,
) {
    assert_eq!(log.bounds().await.expect("bounds"), None);
    assert!(store
        .create_record(
            "c1",
            Bytes::from_static(b"v1"),
            Some(1),
            None,
            &[ev(1), ev(2)]
        )
        .await
        .expect("create"));
    // A create that finds the record appends nothing.
    assert!(!store
        .create_record("c1", Bytes::from_static(b"x"), Some(1), None, &[ev(99)])
        .await
        .expect("create again"));
    assert_eq!(
        store
            .update_record("c1", 1, Bytes::from_static(b"v2"), &[ev(3)])
            .await
            .expect("cas"),
        CasOutcome::Updated(2)
    );
    assert_eq!(
        store
            .update_record("c1", 1, Bytes::from_static(b"stale"), &[ev(98)])
            .await
            .expect("cas"),
        CasOutcome::Conflict
    );
    let all = log.read(None, 100, None).await.expect("read");
    assert_eq!(data(&all), vec!["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids ascend");
    // Exclusive of `after`, bounded by `limit`.
    let after = log.read(Some(all[0].id), 1, None).await.expect("read");
    assert_eq!(data(&after), vec!["{\"n\":2}"]);
    assert!(log
        .read(Some(all[2].id), 10, None)
        .await
        .expect("read")
        .is_empty());
    assert_eq!(
        log.bounds().await.expect("bounds"),
        Some((all[0].id, all[2].id))
    );
    // Ids print and parse as the stream's Last-Event-ID.
    assert_eq!(EventId::parse(&all[1].id.to_string()), Some(all[1].id));
}

pub async fn a_blocked_read_wakes_on_the_next_append(
    store: Arc<dyn Store>,
    log: Arc<dyn EventLog>,
) {
    store
        .create_record("w", Bytes::new(), None, None, &[ev(1)])
        .await
        .expect("create");
    let last = log.bounds().await.expect("bounds").map(|(_, l)| l);
    // Nothing new: waits the whole block, answers empty.
    let started = Instant::now();
    let none = log
        .read(last, 10, Some(Duration::from_millis(300)))
        .await
        .expect("read");
    assert!(none.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));
    let reader = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let started = Instant::now();
            let got = log
                .read(last, 10, Some(Duration::from_secs(10)))
                .await
                .expect("read");
            (got, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    store
        .update_record("w", 1, Bytes::from_static(b"2"), &[ev(2)])
        .await
        .expect("cas");
    let (got, took) = reader.await.expect("reader");
    assert_eq!(data(&got), vec!["{\"n\":2}"]);
    assert!(took < Duration::from_secs(5), "woke after {took:?}");
}

pub async fn cursors_are_kept_per_reader(log: Arc<dyn EventLog>) {
    assert_eq!(log.cursor("a").await.expect("cursor"), None);
    let at = EventId { ms: 5, seq: 2 };
    log.set_cursor("a", at).await.expect("set");
    assert_eq!(log.cursor("a").await.expect("cursor"), Some(at));
    assert_eq!(log.cursor("b").await.expect("cursor"), None);
}

pub async fn the_log_keeps_a_bounded_history(store: Arc<dyn Store>, log: Arc<dyn EventLog>) {
    store
        .create_record("r", Bytes::new(), None, None, &[])
        .await
        .expect("create");
    for version in 1..=1_000u64 {
        store
            .update_record(
                "r",
                version,
                Bytes::from(version.to_string()),
                &[ev(version as usize)],
            )
            .await
            .expect("cas");
    }
    let mut kept = 0;
    let mut after = None;
    loop {
        let page = log.read(after, 500, None).await.expect("read");
        if page.is_empty() {
            break;
        }
        kept += page.len();
        after = page.last().map(|e| e.id);
    }
    // About 100 kept (Redis trims approximately, a node at a time); the newest always.
    assert!((100..1_000).contains(&kept), "kept {kept}");
    let newest = log.read(None, 1_000, None).await.expect("read");
    assert_eq!(
        newest.last().map(|e| e.data.clone()),
        Some(ev(1_000)),
        "the newest event is kept"
    );
}

fn memory() -> (Arc<dyn Store>, Arc<dyn EventLog>) {
    let store = MemoryStore::new().with_event_retention(100);
    let log = Arc::new(store.events());
    (Arc::new(store), log)
}

async fn redis(prefix: &str) -> (Arc<dyn Store>, Arc<dyn EventLog>) {
    let store = RedisStore::connect(&redis_url(), prefix, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("Redis must be reachable at {}: {e}", redis_url()))
        .with_event_retention(100);
    let log = Arc::new(store.events());
    (Arc::new(store), log)
}

#[tokio::test]
async fn memory_event_log_meets_the_contract() {
    let (store, log) = memory();
    appended_with_their_write_and_never_on_a_conflict(store, log).await;
    let (store, log) = memory();
    a_blocked_read_wakes_on_the_next_append(store, log).await;
    let (_, log) = memory();
    cursors_are_kept_per_reader(log).await;
    let (store, log) = memory();
    the_log_keeps_a_bounded_history(store, log).await;
}

#[tokio::test]
async fn redis_event_log_meets_the_contract() {
    for check in 0..4 {
        let prefix = unique_prefix("eventlog");
        let (store, log) = redis(&prefix).await;
        match check {
            0 => appended_with_their_write_and_never_on_a_conflict(store, log).await,
            1 => a_blocked_read_wakes_on_the_next_append(store, log).await,
            2 => cursors_are_kept_per_reader(log).await,
            _ => the_log_keeps_a_bounded_history(store, log).await,
        }
        cleanup_redis(&prefix).await;
    }
}
