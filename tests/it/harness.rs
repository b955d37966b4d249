//! Shared test helpers: unique prefixes, real-service connections, condition waits.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use callfleet_core::adapters::{MemoryBroker, MemoryStore, RabbitBroker, RabbitConfig, RedisStore};
use callfleet_core::ports::broker::{BrokerError, DeadLetter, Message, Subscription, WorkQueue};
use callfleet_core::ports::{Broker, Store};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("cftest-{test}-{}", uuid::Uuid::new_v4().simple())
}

pub fn amqp_url() -> String {
    std::env::var("CALLFLEET_TEST_AMQP_URL").unwrap_or_else(|_| AMQP_URL.to_owned())
}

pub fn redis_url() -> String {
    std::env::var("CALLFLEET_TEST_REDIS_URL").unwrap_or_else(|_| REDIS_URL.to_owned())
}

pub fn memory_broker(limit: u32) -> Arc<dyn Broker> {
    Arc::new(MemoryBroker::new(limit))
}

/// A RabbitMQ broker on a fresh prefix. Panics (never skips) if RabbitMQ is unreachable.
pub async fn rabbit_broker(test: &str, limit: u32) -> (Arc<RabbitBroker>, String) {
    let prefix = unique_prefix(test);
    let broker = RabbitBroker::connect(RabbitConfig {
        url: amqp_url(),
        prefix: prefix.clone(),
        delivery_limit: limit,
        publish_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "RabbitMQ must be reachable at {} for this test: {e}",
            amqp_url()
        )
    });
    (Arc::new(broker), prefix)
}

pub fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

/// A Redis store on a fresh key prefix. Panics (never skips) if Redis is unreachable.
pub async fn redis_store(test: &str) -> Arc<dyn Store> {
    redis_store_at(&unique_prefix(test)).await
}

/// A Redis store on `prefix`. Panics (never skips) if Redis is unreachable.
pub async fn redis_store_at(prefix: &str) -> Arc<dyn Store> {
    Arc::new(redis_at(prefix).await)
}

async fn redis_at(prefix: &str) -> RedisStore {
    RedisStore::connect(&redis_url(), prefix, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis must be reachable at {} for this test: {e}",
                redis_url()
            )
        })
}

/// The event log of the Redis store under `prefix` (its stream `prefix:events`).
pub async fn redis_events_at(prefix: &str) -> Arc<dyn callfleet_core::ports::EventLog> {
    Arc::new(redis_at(prefix).await.events())
}

/// The routing store on Redis under `prefix` (keys `prefix:routing:*`).
pub async fn redis_routing_at(prefix: &str) -> Arc<dyn callfleet_core::ports::RoutingStore> {
    Arc::new(redis_at(prefix).await.routing())
}

/// Polls `check` until it yields `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until message `id` is in the dead-letter queue, and returns its entry.
pub async fn dead_letter_of(broker: &dyn Broker, id: &str, timeout: Duration) -> DeadLetter {
    eventually(
        &format!("message {id} in the dead-letter queue"),
        timeout,
        || async {
            broker
                .list_dead_letters(10)
                .await
                .ok()?
                .into_iter()
                .find(|d| d.message_id == id)
        },
    )
    .await
}

/// Deletes a test's queues, exchanges and Redis keys when dropped: at the end of a test,
/// and also when it fails (its panic skips its last lines), so no run leaves anything on
/// the shared RabbitMQ and Redis.
pub struct CleanOnDrop(pub String);

impl Drop for CleanOnDrop {
    fn drop(&mut self) {
        let prefix = std::mem::take(&mut self.0);
        // Drop cannot await; a thread with its own runtime can, even inside a test's.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                cleanup_rabbit(&prefix).await;
                cleanup_redis(&prefix).await;
            });
        })
        .join();
    }
}

/// Closes this test's connections only (named after its prefix), as
/// `rabbitmqctl close_all_connections` would close everyone's.
pub fn close_connections_named(prefix: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl must be installed for the recovery test");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(prefix)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "callfleet recovery test"])
            .status()
            .expect("rabbitmqctl");
        assert!(status.success(), "close_connection {pid}");
        closed += 1;
    }
    closed
}

/// A plain lapin connection and a confirm-mode channel, for tests that put messages
/// where the adapter never would (straight into a delay tier, onto the wrong queue).
pub async fn raw_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ must be reachable at {}: {e}", amqp_url()));
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    (conn, ch)
}

/// What the emulator does when a number is dialed: `outcome` after 100 ms of ringing,
/// then (if answered) a hang-up after `talk_ms`.
pub fn script(
    outcome: livekit_emulator::Outcome,
    talk_ms: Option<u64>,
) -> livekit_emulator::CallScript {
    livekit_emulator::CallScript {
        outcome,
        ring_ms: 100,
        talk_ms,
        sip_status: None,
    }
}

/// Deletes every Redis key under `prefix:` (best effort).
pub async fn cleanup_redis(prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> =
        match redis::AsyncCommands::scan_match::<_, String>(&mut conn, format!("{prefix}:*")).await
        {
            Ok(iter) => {
                let found: Vec<redis::RedisResult<String>> =
                    futures::StreamExt::collect(iter).await;
                found.into_iter().filter_map(Result::ok).collect()
            }
            Err(_) => return,
        };
    for chunk in keys.chunks(500) {
        let _: Result<i64, _> = redis::AsyncCommands::del(&mut conn, chunk).await;
    }
}

/// Deletes a test's RabbitMQ queues and exchanges (best effort) so runs do not pile up.
pub async fn cleanup_rabbit(prefix: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(conn) =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    // Every work queue there is (a list written out here once missed a new one, and its
    // quorum queues piled up on the shared broker run after run), and the parking lot.
    let mut queues: Vec<String> = callfleet_core::ports::WorkQueue::ALL
        .iter()
        .map(|q| q.as_str())
        .chain(["dead"])
        .map(|q| format!("{prefix}.{q}"))
        .collect();
    for tier in callfleet_core::domain::delay::DELAY_TIERS {
        queues.push(format!(
            "{prefix}.delay.{}",
            callfleet_core::domain::delay::tier_name(tier)
        ));
    }
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in ["work", "dlx"] {
        let _ = ch
            .exchange_delete(
                format!("{prefix}.{x}").as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// A broker that is down: every call fails as an unreachable RabbitMQ would.
pub struct DownBroker;

#[async_trait]
impl Broker for DownBroker {
    async fn publish(&self, _: Message) -> Result<(), BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn publish_many(&self, m: Vec<Message>) -> Vec<Result<(), BrokerError>> {
        m.iter()
            .map(|_| Err(BrokerError::Unavailable("down".into())))
            .collect()
    }
    async fn subscribe(&self, _: WorkQueue, _: u16) -> Result<Subscription, BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn dead_letter(&self, _: Message, _: &str) -> Result<(), BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn list_dead_letters(&self, _: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn replay_dead_letters(&self, _: Option<&str>, _: usize) -> Result<usize, BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn purge_dead_letters(&self) -> Result<usize, BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn queue_depth(&self, _: WorkQueue) -> Result<u64, BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn census(&self) -> Result<std::collections::BTreeMap<String, u64>, BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
    async fn ping(&self) -> Result<(), BrokerError> {
        Err(BrokerError::Unavailable("down".into()))
    }
}

/// Failures a test switches on and off at run time: the named store operations and the
/// broker's publishes fail as an unreachable service would, the rest goes through.
#[derive(Default)]
pub struct Outage {
    store_ops: parking_lot::Mutex<std::collections::HashSet<&'static str>>,
    publish: std::sync::atomic::AtomicBool,
    /// Store operations that hang for ever once they have been carried out: a worker
    /// frozen (then killed) right after that step.
    hang_after: parking_lot::Mutex<std::collections::HashSet<&'static str>>,
    /// A queue whose publishes hang for ever before anything is sent.
    hang_publish: parking_lot::Mutex<Option<WorkQueue>>,
}

impl Outage {
    pub fn store_down(&self, ops: &[&'static str]) {
        self.store_ops.lock().extend(ops.iter().copied());
    }
    pub fn broker_down(&self, down: bool) {
        self.publish
            .store(down, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn heal(&self) {
        self.store_ops.lock().clear();
        self.broker_down(false);
        self.hang_after.lock().clear();
        *self.hang_publish.lock() = None;
    }
    /// `op` is carried out, then never returns.
    pub fn hang_after(&self, op: &'static str) {
        self.hang_after.lock().insert(op);
    }
    /// Publishes to `queue` never return (nothing is sent).
    pub fn hang_publishes_to(&self, queue: WorkQueue) {
        *self.hang_publish.lock() = Some(queue);
    }
    async fn maybe_hang_after(&self, op: &'static str) {
        if self.hang_after.lock().contains(op) {
            std::future::pending::<()>().await;
        }
    }
    fn store(&self, op: &'static str) -> Result<(), callfleet_core::ports::StoreError> {
        if self.store_ops.lock().contains(op) {
            return Err(callfleet_core::ports::StoreError::Unavailable(format!(
                "{op}: injected outage"
            )));
        }
        Ok(())
    }
    fn broker(&self) -> Result<(), BrokerError> {
        if self.publish.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BrokerError::Unavailable("injected outage".into()));
        }
        Ok(())
    }
}

/// A store that fails the operations its [`Outage`] names.
pub struct FlakyStore {
    pub inner: Arc<dyn Store>,
    pub outage: Arc<Outage>,
}

#[async_trait]
impl Store for FlakyStore {
    async fn create_record(
        &self,
        id: &str,
        data: bytes::Bytes,
        index_score: Option<i64>,
        watch_ms: Option<i64>,
        events: &[bytes::Bytes],
    ) -> Result<bool, callfleet_core::ports::StoreError> {
        self.outage.store("create_record")?;
        self.inner
            .create_record(id, data, index_score, watch_ms, events)
            .await
    }
    async fn get_record(
        &self,
        id: &str,
    ) -> Result<Option<callfleet_core::ports::store::Versioned>, callfleet_core::ports::StoreError>
    {
        self.outage.store("get_record")?;
        self.inner.get_record(id).await
    }
    async fn update_record(
        &self,
        id: &str,
        expected_version: u64,
        data: bytes::Bytes,
        events: &[bytes::Bytes],
    ) -> Result<callfleet_core::ports::store::CasOutcome, callfleet_core::ports::StoreError> {
        self.outage.store("update_record")?;
        self.inner
            .update_record(id, expected_version, data, events)
            .await
    }
    async fn list_index(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<callfleet_core::ports::store::IndexPage, callfleet_core::ports::StoreError> {
        self.outage.store("list_index")?;
        self.inner.list_index(cursor, limit).await
    }
    async fn claim_key(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, callfleet_core::ports::StoreError> {
        self.outage.store("claim_key")?;
        self.inner.claim_key(key, value, ttl).await
    }
    async fn get_key(
        &self,
        key: &str,
    ) -> Result<Option<String>, callfleet_core::ports::StoreError> {
        self.outage.store("get_key")?;
        self.inner.get_key(key).await
    }
    async fn delete_key(&self, key: &str) -> Result<(), callfleet_core::ports::StoreError> {
        self.outage.store("delete_key")?;
        self.inner.delete_key(key).await
    }
    async fn first_seen(
        &self,
        event_id: &str,
        ttl: Duration,
    ) -> Result<bool, callfleet_core::ports::StoreError> {
        self.outage.store("first_seen")?;
        let first = self.inner.first_seen(event_id, ttl).await;
        self.outage.maybe_hang_after("first_seen").await;
        first
    }
    async fn watch(&self, id: &str, due_ms: i64) -> Result<(), callfleet_core::ports::StoreError> {
        self.outage.store("watch")?;
        self.inner.watch(id, due_ms).await
    }
    async fn unwatch(&self, id: &str) -> Result<(), callfleet_core::ports::StoreError> {
        self.outage.store("unwatch")?;
        self.inner.unwatch(id).await
    }
    async fn due_watches(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, callfleet_core::ports::StoreError> {
        self.inner.due_watches(now_ms, limit).await
    }
    async fn try_lock(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<callfleet_core::ports::store::LockToken>, callfleet_core::ports::StoreError>
    {
        self.outage.store("try_lock")?;
        self.inner.try_lock(name, ttl).await
    }
    async fn extend_lock(
        &self,
        name: &str,
        token: &callfleet_core::ports::store::LockToken,
        ttl: Duration,
    ) -> Result<bool, callfleet_core::ports::StoreError> {
        self.inner.extend_lock(name, token, ttl).await
    }
    async fn unlock(
        &self,
        name: &str,
        token: &callfleet_core::ports::store::LockToken,
    ) -> Result<bool, callfleet_core::ports::StoreError> {
        self.inner.unlock(name, token).await
    }
    async fn rate_limit(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<callfleet_core::ports::store::RateDecision, callfleet_core::ports::StoreError> {
        self.inner.rate_limit(key, per_second, burst).await
    }
    async fn acquire_lease(
        &self,
        pool: &str,
        holder: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<bool, callfleet_core::ports::StoreError> {
        self.inner.acquire_lease(pool, holder, max, ttl).await
    }
    async fn release_lease(
        &self,
        pool: &str,
        holder: &str,
    ) -> Result<bool, callfleet_core::ports::StoreError> {
        self.inner.release_lease(pool, holder).await
    }
    async fn live_leases(&self, pool: &str) -> Result<u64, callfleet_core::ports::StoreError> {
        self.inner.live_leases(pool).await
    }
    async fn ping(&self) -> Result<(), callfleet_core::ports::StoreError> {
        self.outage.store("ping")?;
        self.inner.ping().await
    }
}

/// A broker whose publishes fail while its [`Outage`] says so.
pub struct FlakyBroker {
    pub inner: Arc<dyn Broker>,
    pub outage: Arc<Outage>,
}

#[async_trait]
impl Broker for FlakyBroker {
    async fn publish(&self, m: Message) -> Result<(), BrokerError> {
        self.outage.broker()?;
        if *self.outage.hang_publish.lock() == Some(m.queue) {
            std::future::pending::<()>().await;
        }
        self.inner.publish(m).await
    }
    async fn publish_many(&self, m: Vec<Message>) -> Vec<Result<(), BrokerError>> {
        if self.outage.broker().is_err() {
            return m
                .iter()
                .map(|_| Err(BrokerError::Unavailable("injected outage".into())))
                .collect();
        }
        self.inner.publish_many(m).await
    }
    async fn subscribe(&self, q: WorkQueue, p: u16) -> Result<Subscription, BrokerError> {
        self.inner.subscribe(q, p).await
    }
    async fn dead_letter(&self, m: Message, r: &str) -> Result<(), BrokerError> {
        self.inner.dead_letter(m, r).await
    }
    async fn list_dead_letters(&self, n: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        self.inner.list_dead_letters(n).await
    }
    async fn replay_dead_letters(&self, id: Option<&str>, n: usize) -> Result<usize, BrokerError> {
        self.inner.replay_dead_letters(id, n).await
    }
    async fn purge_dead_letters(&self) -> Result<usize, BrokerError> {
        self.inner.purge_dead_letters().await
    }
    async fn queue_depth(&self, q: WorkQueue) -> Result<u64, BrokerError> {
        self.inner.queue_depth(q).await
    }
    async fn census(&self) -> Result<std::collections::BTreeMap<String, u64>, BrokerError> {
        self.inner.census().await
    }
    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }
}

/// A LiveKit webhook `Authorization` header for `body`, signed as LiveKit signs (a JWT
/// with the body's SHA-256).
pub fn sign_webhook(key: &str, secret: &str, body: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body));
    livekit_api::access_token::AccessToken::with_api_key(key, secret)
        .with_sha256(&digest)
        .to_jwt()
        .expect("jwt")
}

/// Emulator faults on one Twirp method.
pub fn fault_on(method: &str, fault: livekit_emulator::MethodFault) -> livekit_emulator::Faults {
    livekit_emulator::Faults {
        methods: [(method.to_owned(), fault)].into_iter().collect(),
        ..Default::default()
    }
}
