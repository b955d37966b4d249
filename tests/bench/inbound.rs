//! Inbound benchmark (release build), the parts wired by the fleet's composition root:
//!
//! 1. `POST /v1/routing/resolve` handled at 5,000 requests/s (open loop) with 10 and with
//!    100,000 profiles: server-side time (the router called in-process, no socket);
//! 2. a toggle reaching three instances' routing tables through Redis, with 10 and with
//!    100,000 profiles;
//! 3. webhook received → CreateDispatch issued, on RabbitMQ + Redis with two worker
//!    runtimes, at 1,000 inbound calls/s (open loop): from the moment the signed
//!    `participant_joined` is sent to the ingress to the moment the emulator receives the
//!    CreateDispatch; and exactly one dispatch per room.
//!
//! `cargo build --release --example inbound_bench && target/release/examples/inbound_bench
//!  [seconds] [calls_per_second] [webhook]` (`webhook`: only part 3)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use callfleet::fleet::{self, IngressSettings, WorkerSettings};
use callfleet_core::adapters::{
    Backends, MemoryBroker, MemoryRouting, MemoryStore, RabbitBroker, RabbitConfig, RedisStore,
};
use callfleet_core::calls::SystemClock;
use callfleet_core::domain::phone::parse_region;
use callfleet_core::domain::request::CallDefaults;
use callfleet_core::domain::routing::{Profile, ProfileInput, ProfileStatus};
use callfleet_core::ports::RoutingStore;
use callfleet_core::routing::RoutingCache;
use callfleet_workers::{InboundSettings, OutboundSettings, SweepSettings};
use livekit_emulator::{Emulator, EmulatorConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS: &str = "redis://127.0.0.1:6379";
const KEY: &str = "bench-api-key-0123456789";

type Error = Box<dyn std::error::Error + Send + Sync>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn number(i: usize) -> String {
    format!("+1{}{:07}", 212 + i / 8_000_000, 2_000_000 + i % 8_000_000)
}

fn profiles(n: usize) -> Vec<Profile> {
    (0..n)
        .map(|i| {
            let input: ProfileInput = serde_json::from_value(json!({
                "id": format!("p{i:06}"), "name": format!("Profile {i}"),
                "agent_name": format!("agent-{}", i % 100), "numbers": [number(i)],
                "metadata": {"prompt": "You are a helpful agent.", "voice": "alloy"},
                "agent_join_timeout_s": 600,
            }))
            .expect("input");
            input
                .into_profile(None, None, None, chrono::Utc::now())
                .expect("valid")
        })
        .collect()
}

fn ingress_settings() -> IngressSettings {
    IngressSettings {
        max_body_bytes: 64 * 1024,
        api_keys: vec![KEY.into()],
        webhook_keys: vec![("devkey".into(), "secret".into())],
        defaults: CallDefaults {
            region: parse_region("US").ok(),
            trunk_id: Some("ST_bench".into()),
        },
        number_keys: vec![KEY.into()],
        stream: Default::default(),
        callbacks: Default::default(),
    }
}

/// 1. The resolve endpoint's server-side time at `rate` requests/s for `seconds`.
async fn resolve(n: usize, rate: f64, seconds: u64) -> Result<(), Error> {
    let stop = CancellationToken::new();
    let routing_store = Arc::new(MemoryRouting::new());
    routing_store.import(&profiles(n), None).await?;
    let memory = MemoryStore::new();
    let backends = Backends {
        broker: Arc::new(MemoryBroker::new(10)),
        events: Arc::new(memory.events()),
        store: Arc::new(memory),
        routing: routing_store,
        subscriptions: Arc::new(callfleet_core::adapters::MemorySubscriptions::new()),
        delivery_limit: 10,
    };
    let routing = fleet::routing(&backends, None, stop.clone()).await?;
    let app = callfleet_ingress::app(fleet::ingress(
        &backends,
        routing,
        Arc::new(SystemClock),
        ingress_settings(),
        stop.clone(),
    ));
    let total = (rate * seconds as f64) as u64;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let app = app.clone();
        let body = json!({
            "call_id": format!("c{i}"),
            "trunk_id": "ST_bench",
            "sip_call_id": format!("SCL_{i}"),
            "from_user": {"number": format!("+1415555{:04}", i % 10_000), "name": "Caller"},
            "to_user": {"number": number((i as usize * 7_919) % n), "name": ""},
        })
        .to_string();
        tasks.push(tokio::spawn(async move {
            let request = axum::http::Request::post("/v1/routing/resolve")
                .header("authorization", format!("Bearer {KEY}"))
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("request");
            let t = Instant::now();
            let response = app.oneshot(request).await.expect("infallible");
            let status = response.status();
            let _ = axum::body::to_bytes(response.into_body(), 1 << 20).await;
            (t.elapsed(), status.is_success())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut failed = 0;
    for t in tasks {
        let (d, ok) = t.await?;
        latencies.push(d);
        if !ok {
            failed += 1;
        }
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "resolve, {n:>6} profiles, {achieved:>5.0} req/s: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {failed} not 200",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0)),
    );
    stop.cancel();
    Ok(())
}

async fn delete_keys(prefix: &str) -> Result<(), Error> {
    let client = redis::Client::open(REDIS)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await?;
    for chunk in keys.chunks(1_000) {
        let _: () = redis::AsyncCommands::del(&mut conn, chunk).await?;
    }
    Ok(())
}

/// 2. A toggle written through one instance reaching three others' tables.
async fn toggles(n: usize) -> Result<(), Error> {
    let prefix = format!("bench-toggle-{}", uuid::Uuid::new_v4().simple());
    let redis = RedisStore::connect(REDIS, &prefix, Duration::from_secs(5)).await?;
    let store: Arc<dyn RoutingStore> = Arc::new(redis.routing());
    let all = profiles(n);
    store.import(&all, None).await?;
    let stop = CancellationToken::new();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let cache = RoutingCache::load(Arc::clone(&store), None).await?;
        cache.spawn_refresher(callfleet_core::routing::REFRESH_EVERY, stop.clone());
        instances.push(cache);
    }
    let mut took = Vec::new();
    let mut profile = all[n / 2].clone();
    for _ in 0..20 {
        profile.status = match profile.status {
            ProfileStatus::Active => ProfileStatus::Inactive,
            ProfileStatus::Inactive => ProfileStatus::Active,
        };
        let t = Instant::now();
        store.put(&profile).await?;
        loop {
            let seen = instances.iter().all(|c| {
                c.table()
                    .get(&profile.id)
                    .is_some_and(|p| p.profile.status == profile.status)
            });
            if seen {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err("a toggle did not arrive within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(t.elapsed());
    }
    took.sort();
    println!(
        "toggle → 3 instances, {n:>6} profiles: p50 {:.0} ms, max {:.0} ms (20 toggles)",
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 1.0))
    );
    stop.cancel();
    delete_keys(&prefix).await?;
    Ok(())
}

fn sign(body: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body));
    livekit_api::access_token::AccessToken::with_api_key("devkey", "secret")
        .with_sha256(&digest)
        .to_jwt()
        .expect("jwt")
}

fn joined(room: &str, caller: &str, did: &str) -> Vec<u8> {
    let now = chrono::Utc::now().timestamp().to_string();
    serde_json::to_vec(&json!({
        "event": "participant_joined",
        "id": format!("EV_{room}"),
        "createdAt": now,
        "room": {"sid": format!("RM_{room}"), "name": room},
        "participant": {
            "sid": format!("PA_{room}"), "identity": format!("sip_{caller}"), "kind": "SIP",
            "joinedAt": now,
            "attributes": {"sip.callID": format!("SCL_{room}"), "sip.phoneNumber": caller,
                           "sip.trunkPhoneNumber": did, "sip.trunkID": "ST_bench", "sip.ruleID": "SDR_bench"},
        },
    }))
    .expect("json")
}

/// 3. Webhook received → CreateDispatch issued at `rate` calls/s for `seconds`.
async fn webhook_to_dispatch(rate: f64, seconds: u64) -> Result<(), Error> {
    let prefix = format!("bench-inbound-{}", uuid::Uuid::new_v4().simple());
    let stop = CancellationToken::new();
    let broker = Arc::new(
        RabbitBroker::connect(RabbitConfig {
            url: AMQP.into(),
            prefix: prefix.clone(),
            delivery_limit: 10,
            publish_timeout: Duration::from_secs(5),
        })
        .await?,
    );
    let redis = RedisStore::connect(REDIS, &prefix, Duration::from_secs(5)).await?;
    let backends = Backends {
        broker: broker.clone(),
        routing: Arc::new(redis.routing()),
        subscriptions: Arc::new(redis.subscriptions()),
        events: Arc::new(redis.events()),
        store: Arc::new(redis),
        delivery_limit: 10,
    };
    let did = number(0);
    backends.routing.import(&profiles(10), None).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse()?).await?;
    let routing = fleet::routing(&backends, None, stop.clone()).await?;
    let state = fleet::ingress(
        &backends,
        routing,
        Arc::new(SystemClock),
        ingress_settings(),
        stop.clone(),
    );
    let server = tokio::spawn(fleet::serve(
        listener,
        callfleet_ingress::app(state),
        stop.clone(),
    ));
    let livekit = Arc::new(callfleet_core::adapters::LiveKitApi::new(
        &emulator.url(),
        "devkey",
        "secret",
        Duration::from_secs(10),
    ));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let settings = WorkerSettings {
            outbound: OutboundSettings::default(),
            inbound: InboundSettings::default(),
            sweep: SweepSettings {
                every: Duration::from_secs(3_600),
                ..SweepSettings::default()
            },
            prefetch: 128,
            concurrency: 128,
            max_job_attempts: 5,
            callbacks: Default::default(),
        };
        let routing = fleet::routing(&backends, None, stop.clone()).await?;
        let worker = fleet::worker(
            &backends,
            routing,
            livekit.clone(),
            Arc::new(SystemClock),
            &settings,
        )?;
        let s = stop.clone();
        workers.push(tokio::spawn(async move {
            let _ = worker.run(s, Duration::from_secs(2)).await;
        }));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()?;
    let total = (rate * seconds as f64) as usize;
    let started = Instant::now();
    let mut sent_at: HashMap<String, i64> = HashMap::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let room = format!("bench_{i:07}");
        let body = joined(&room, &format!("+1415556{:04}", i % 10_000), &did);
        let auth = sign(&body);
        sent_at.insert(room, chrono::Utc::now().timestamp_micros());
        let http = http.clone();
        let url = format!("{base}/v1/livekit/webhook");
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .header("authorization", auth)
                .header("content-type", "application/webhook+json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        }));
    }
    let mut refused = 0;
    for t in tasks {
        if !t.await? {
            refused += 1;
        }
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = emulator
            .emulator
            .requests_of("CreateDispatch")
            .iter()
            .filter(|r| r.outcome.executed())
            .count();
        if done >= total - refused || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut per_room: HashMap<String, usize> = HashMap::new();
    let mut latencies = Vec::new();
    for r in emulator.emulator.requests_of("CreateDispatch") {
        let Some(room) = r.room else { continue };
        *per_room.entry(room.clone()).or_default() += 1;
        if let Some(sent) = sent_at.get(&room) {
            let arrived_us = r.at_ms * 1_000;
            latencies.push(Duration::from_micros((arrived_us - sent).max(0) as u64));
        }
    }
    latencies.sort();
    let twice = per_room.values().filter(|n| **n > 1).count();
    println!(
        "webhook → CreateDispatch at {offered:.0} calls/s offered ({total} calls, 2 workers): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} dispatched, {twice} rooms with more than one, {refused} webhooks refused",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0)),
        per_room.len(),
    );
    stop.cancel();
    let _ = server.await;
    for w in workers {
        let _ = w.await;
    }
    emulator.shutdown().await;
    if let Err(e) = broker.delete_topology().await {
        eprintln!("queues under {prefix} not deleted: {e}");
    }
    delete_keys(&prefix).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let rate: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1_000.0);
    // `webhook` runs only the webhook → CreateDispatch part.
    let only_webhook = args.get(3).is_some_and(|p| p == "webhook");
    if !only_webhook {
        for n in [10, 100_000] {
            resolve(n, 5_000.0, seconds).await?;
        }
        for n in [10, 100_000] {
            toggles(n).await?;
        }
    }
    webhook_to_dispatch(rate, seconds).await?;
    Ok(())
}
