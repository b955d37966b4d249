//! The routing port's contract, held to the in-memory and the Redis adapter alike:
//! versions and the change log every instance follows, imports, and profile slots (cap,
//! idempotent per call, expiry). On Redis it also checks what the adapter leaves behind.

use std::sync::Arc;
use std::time::Duration;

use callfleet_core::adapters::MemoryRouting;
use callfleet_core::domain::routing::{Profile, ProfileInput};
use callfleet_core::ports::RoutingStore;
use serde_json::json;

use crate::harness::{redis_routing_at, unique_prefix, CleanOnDrop};

pub fn profile(id: &str, numbers: &[&str]) -> Profile {
    let input: ProfileInput = serde_json::from_value(json!({
        "id": id, "name": id, "agent_name": format!("agent-{id}"), "numbers": numbers,
    }))
    .expect("input");
    input
        .into_profile(None, None, None, chrono::Utc::now())
        .expect("valid")
}

async fn contract(store: Arc<dyn RoutingStore>) {
    assert_eq!(store.version().await.expect("version"), 0);
    let all = store.changes_since(0).await.expect("changes");
    assert!(all.upserts.is_empty() && all.deletes.is_empty());

    // Writes bump the version; a reader at v sees exactly what changed after v.
    let v1 = store
        .put(&profile("a", &["+15105550100"]))
        .await
        .expect("put");
    let v2 = store
        .put(&profile("b", &["+15105550101"]))
        .await
        .expect("put");
    assert!(v2 > v1 && v1 > 0);
    assert_eq!(store.version().await.expect("version"), v2);
    let since_v1 = store.changes_since(v1).await.expect("changes");
    assert_eq!(since_v1.version, v2);
    assert_eq!(
        since_v1
            .upserts
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>(),
        vec!["b"]
    );
    let mut changed = profile("a", &["+15105550102"]);
    changed.weight = 7;
    let v3 = store.put(&changed).await.expect("replace");
    let v4 = store.delete("b").await.expect("delete").expect("existed");
    assert!(v4 > v3);
    assert_eq!(
        store.delete("b").await.expect("delete"),
        None,
        "gone already"
    );
    let since_v2 = store.changes_since(v2).await.expect("changes");
    assert_eq!(since_v2.version, v4);
    assert_eq!(since_v2.upserts.len(), 1);
    assert_eq!(since_v2.upserts[0].weight, 7);
    assert_eq!(since_v2.deletes, vec!["b".to_owned()]);
    assert_eq!(store.get("a").await.expect("get"), Some(changed.clone()));
    assert_eq!(store.get("b").await.expect("get"), None);
    // A fresh reader (version 0) gets the current state only.
    let fresh = store.changes_since(0).await.expect("changes");
    assert_eq!(fresh.upserts, vec![changed]);
    assert_eq!(
        store.changes_since(v4).await.expect("none").upserts.len(),
        0
    );

    // Imports: merge adds and replaces; replace also deletes what is not imported.
    let many: Vec<Profile> = (0..1_200)
        .map(|i| profile(&format!("p{i:04}"), &["+15105550199"]))
        .collect();
    let vi = store.import(&many, None).await.expect("import");
    assert!(vi > v4);
    let now = store.changes_since(0).await.expect("changes");
    assert_eq!(now.upserts.len(), 1_201, "a + 1,200 imported");
    // Replace: ten are rewritten, ten more are kept as they are, the rest deleted.
    let keep: std::collections::HashSet<String> = many[..20].iter().map(|p| p.id.clone()).collect();
    let vr = store
        .import(&many[..10], Some(&keep))
        .await
        .expect("replace");
    assert!(vr > vi);
    let after = store.changes_since(vi).await.expect("changes");
    assert_eq!(
        after.deletes.len(),
        1_181,
        "a and 1,180 imported profiles deleted"
    );
    assert_eq!(after.upserts.len(), 10, "only the rewritten ones changed");
    assert_eq!(store.changes_since(0).await.expect("all").upserts.len(), 20);

    // Slots: capped, idempotent per call, released, counted.
    let ttl = Duration::from_secs(60);
    assert!(store
        .claim_slot("p0000", "c1", Some(2), ttl)
        .await
        .expect("claim"));
    assert!(
        store
            .claim_slot("p0000", "c1", Some(2), ttl)
            .await
            .expect("again"),
        "same call"
    );
    assert!(store
        .claim_slot("p0000", "c2", Some(2), ttl)
        .await
        .expect("claim"));
    assert!(!store
        .claim_slot("p0000", "c3", Some(2), ttl)
        .await
        .expect("full"));
    assert!(store
        .claim_slot("p0001", "c3", None, ttl)
        .await
        .expect("uncapped"));
    let loads = store.loads().await.expect("loads");
    assert_eq!(loads.get("p0000"), Some(&2));
    assert_eq!(loads.get("p0001"), Some(&1));
    assert!(store.release_slot("p0000", "c1").await.expect("release"));
    assert!(!store.release_slot("p0000", "c1").await.expect("twice"));
    assert!(store
        .claim_slot("p0000", "c3", Some(2), ttl)
        .await
        .expect("room again"));
    assert!(store.release_slot("p0001", "c3").await.expect("release"));
    let loads = store.loads().await.expect("loads");
    assert_eq!(
        loads.get("p0001"),
        None,
        "profiles without calls are left out"
    );
    // Concurrent claims never pass the cap.
    let racing: Vec<_> = (0..20)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .claim_slot("p0003", &format!("race{i}"), Some(5), ttl)
                    .await
                    .expect("claim")
            })
        })
        .collect();
    let mut won = 0;
    for r in racing {
        if r.await.expect("task") {
            won += 1;
        }
    }
    assert_eq!(won, 5, "exactly the cap");
    for i in 0..20 {
        store
            .release_slot("p0003", &format!("race{i}"))
            .await
            .expect("release");
    }
    // A slot whose call's end was never seen expires.
    assert!(store
        .claim_slot("p0002", "lost", Some(1), Duration::from_millis(200))
        .await
        .expect("claim"));
    assert!(!store
        .claim_slot("p0002", "next", Some(1), ttl)
        .await
        .expect("full while held"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store
        .claim_slot("p0002", "next", Some(1), ttl)
        .await
        .expect("free after expiry"));
}

#[tokio::test]
async fn memory_routing_meets_the_contract() {
    contract(Arc::new(MemoryRouting::new())).await;
}

#[tokio::test]
async fn redis_routing_meets_the_contract_and_keeps_its_keys_to_itself() {
    let prefix = unique_prefix("routing");
    let _clean = CleanOnDrop(prefix.clone());
    contract(redis_routing_at(&prefix).await).await;
    // What it left behind: the profiles, the version, the change log, and the slots
    // still held; nothing else, and nothing outside its prefix.
    let client = redis::Client::open(crate::harness::redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    keys.sort();
    let expected: Vec<String> = [
        "routing:busy",
        "routing:changes",
        "routing:profiles",
        "routing:slots:p0000",
        "routing:slots:p0002",
        "routing:version",
    ]
    .iter()
    .map(|k| format!("{prefix}:{k}"))
    .collect();
    assert_eq!(keys, expected);
    let held: u64 = redis::cmd("ZCARD")
        .arg(format!("{prefix}:routing:slots:p0000"))
        .query_async(&mut conn)
        .await
        .expect("zcard");
    assert_eq!(held, 2);
    let log: u64 = redis::cmd("ZCARD")
        .arg(format!("{prefix}:routing:changes"))
        .query_async(&mut conn)
        .await
        .expect("zcard");
    assert_eq!(
        log, 1_202,
        "one log entry per id ever written, not per write"
    );
}
