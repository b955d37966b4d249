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
    let store = RedisStore::connect(&redis_url(), prefix, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis must be reachable at {} for this test: {e}",
                redis_url()
            )
        });
    Arc::new(store)
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
    let mut queues: Vec<String> = ["call_jobs", "webhook_events", "control", "dead"]
        .iter()
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
