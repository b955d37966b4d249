//! The subscriptions port's contract, held to the in-memory and the Redis adapter alike:
//! put/get/list/delete, updates keeping their creation time, delivery logs (newest first,
//! capped, deleted with their subscription, keyed by any id including `call:<id>`). On
//! Redis it also checks that a deleted subscription leaves no key behind.

use std::sync::Arc;
use std::time::Duration;

use callfleet_core::adapters::{MemorySubscriptions, RedisStore};
use callfleet_core::domain::events::EventType;
use callfleet_core::domain::subscription::{
    call_subscription_id, DeliveryOutcome, DeliveryRecord, Subscription, SubscriptionInput,
};
use callfleet_core::ports::subscriptions::DELIVERY_LOG_LIMIT;
use callfleet_core::ports::SubscriptionStore;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;

use crate::harness::{redis_url, unique_prefix, CleanOnDrop};

fn at(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + s, 0)
        .single()
        .expect("valid time")
}

fn subscription(id: &str, url: &str) -> Subscription {
    let input: SubscriptionInput = serde_json::from_value(json!({
        "url": url,
        "event_types": ["call.completed", "call.failed"],
        "filter": {"tag": "reminders"},
    }))
    .expect("input");
    input.validate(Some(id), None, at(0)).expect("valid")
}

fn record(n: u32) -> DeliveryRecord {
    DeliveryRecord {
        webhook_id: format!("msg_{n}"),
        event_type: EventType::Completed,
        call_id: format!("call_{n}"),
        attempt: 1 + n % 3,
        at: at(i64::from(n)),
        status_code: n.is_multiple_of(2).then_some(200),
        error: (n % 2 == 1).then(|| "connection refused".to_owned()),
        duration_ms: u64::from(n),
        outcome: if n.is_multiple_of(2) {
            DeliveryOutcome::Delivered
        } else {
            DeliveryOutcome::Retrying
        },
    }
}

fn ids(subs: &[Subscription]) -> Vec<&str> {
    subs.iter().map(|s| s.id.as_str()).collect()
}

async fn contract(store: Arc<dyn SubscriptionStore>) {
    assert!(store.list().await.expect("list").is_empty());
    assert_eq!(store.get("sub_b").await.expect("get"), None);
    assert!(
        !store.delete("sub_b").await.expect("delete"),
        "nothing to delete"
    );

    // Round trip; listed by id whatever the write order.
    let b = subscription("sub_b", "https://b.example.com/hooks");
    let a = subscription("sub_a", "https://a.example.com/hooks");
    assert!(store.put(&b).await.expect("put"), "created");
    assert!(store.put(&a).await.expect("put"), "created");
    assert_eq!(store.get("sub_b").await.expect("get"), Some(b.clone()));
    assert_eq!(
        ids(&store.list().await.expect("list")),
        vec!["sub_a", "sub_b"]
    );

    // An update replaces it and keeps its creation time.
    let changed: SubscriptionInput =
        serde_json::from_value(json!({"url": "https://b2.example.com/hooks", "enabled": false}))
            .expect("input");
    let b2 = changed
        .validate(Some("sub_b"), Some(&b), at(60))
        .expect("valid");
    assert!(!store.put(&b2).await.expect("put"), "replaced, not created");
    let stored = store.get("sub_b").await.expect("get").expect("present");
    assert_eq!(stored, b2);
    assert_eq!(stored.created_at, b.created_at);
    assert_eq!(stored.updated_at, at(60));
    assert_eq!(stored.url, "https://b2.example.com/hooks");
    assert!(!stored.enabled);
    assert_eq!(store.list().await.expect("list").len(), 2);

    // Delivery logs: newest first, any limit, empty when none.
    assert!(store.deliveries("sub_a", 10).await.expect("log").is_empty());
    for n in 0..5 {
        store
            .record_delivery("sub_a", &record(n))
            .await
            .expect("record");
    }
    let log = store.deliveries("sub_a", 3).await.expect("log");
    assert_eq!(log, vec![record(4), record(3), record(2)]);
    assert_eq!(store.deliveries("sub_a", 100).await.expect("log").len(), 5);
    assert!(store.deliveries("sub_a", 0).await.expect("log").is_empty());
    assert!(
        store.deliveries("sub_b", 10).await.expect("log").is_empty(),
        "logs are per subscription"
    );

    // The log keeps the newest 1,000.
    for n in 5..(DELIVERY_LOG_LIMIT as u32 + 20) {
        store
            .record_delivery("sub_b", &record(n))
            .await
            .expect("record");
    }
    let log = store
        .deliveries("sub_b", DELIVERY_LOG_LIMIT + 50)
        .await
        .expect("log");
    assert_eq!(log.len(), DELIVERY_LOG_LIMIT);
    assert_eq!(log[0], record(DELIVERY_LOG_LIMIT as u32 + 19));
    assert_eq!(
        log[DELIVERY_LOG_LIMIT - 1],
        record(20),
        "the oldest went first"
    );

    // A call's own callback logs under `call:<id>`, which is not a subscription.
    let call_log = call_subscription_id("call_0193a:x");
    store
        .record_delivery(&call_log, &record(7))
        .await
        .expect("record");
    assert_eq!(
        store.deliveries(&call_log, 10).await.expect("log"),
        vec![record(7)]
    );
    assert_eq!(store.get(&call_log).await.expect("get"), None);
    assert_eq!(store.list().await.expect("list").len(), 2);

    // Deleting removes the subscription and its log, and only those.
    assert!(store.delete("sub_b").await.expect("delete"));
    assert!(
        !store.delete("sub_b").await.expect("delete"),
        "gone already"
    );
    assert_eq!(store.get("sub_b").await.expect("get"), None);
    assert!(store.deliveries("sub_b", 10).await.expect("log").is_empty());
    assert_eq!(ids(&store.list().await.expect("list")), vec!["sub_a"]);
    assert_eq!(store.deliveries("sub_a", 10).await.expect("log").len(), 5);
    assert_eq!(store.deliveries(&call_log, 10).await.expect("log").len(), 1);
}

#[tokio::test]
async fn memory_subscriptions_meet_the_contract() {
    contract(Arc::new(MemorySubscriptions::new())).await;
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(conn)
        .await
        .expect("keys");
    keys.sort();
    keys
}

#[tokio::test]
async fn redis_subscriptions_meet_the_contract_and_leave_no_keys_behind() {
    let prefix = unique_prefix("subscriptions");
    let _clean = CleanOnDrop(prefix.clone());
    let redis = RedisStore::connect(&redis_url(), &prefix, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("Redis must be reachable at {}: {e}", redis_url()));
    let store: Arc<dyn SubscriptionStore> = Arc::new(redis.subscriptions());
    contract(Arc::clone(&store)).await;

    // What is left: the hash and the two logs still owned; nothing outside the prefix.
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let call_log = call_subscription_id("call_0193a:x");
    assert_eq!(
        keys(&mut conn, &prefix).await,
        vec![
            format!("{prefix}:subs"),
            format!("{prefix}:subs:deliveries:{call_log}"),
            format!("{prefix}:subs:deliveries:sub_a"),
        ]
    );
    let len: u64 = redis::cmd("LLEN")
        .arg(format!("{prefix}:subs:deliveries:sub_a"))
        .query_async(&mut conn)
        .await
        .expect("llen");
    assert_eq!(len, 5);

    // Deleting the rest leaves nothing at all.
    assert!(store.delete("sub_a").await.expect("delete"));
    assert!(
        !store.delete(&call_log).await.expect("delete"),
        "not a subscription"
    );
    assert_eq!(keys(&mut conn, &prefix).await, Vec::<String>::new());
}
