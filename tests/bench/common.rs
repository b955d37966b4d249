//! What the benchmarks share: the local services and the clean-up after a run.

use std::time::Duration;

use callfleet_core::adapters::RabbitBroker;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS: &str = "redis://127.0.0.1:6379";

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Deletes what a run left under `prefix` (hundreds of thousands of messages and records),
/// so the next run measures the same broker and store.
pub async fn clean_up(broker: &RabbitBroker, prefix: &str) -> Result<(), Error> {
    // A late publish can make RabbitMQ refuse a queue deletion once; the next try
    // reconnects.
    let mut deleted = broker.delete_topology().await;
    for _ in 0..2 {
        if deleted.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        deleted = broker.delete_topology().await;
    }
    if let Err(e) = deleted {
        eprintln!("could not delete the queues under {prefix}: {e}");
    }
    let client = redis::Client::open(REDIS)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<String> =
            redis::AsyncCommands::scan_match(&mut conn, format!("{prefix}:*")).await?;
        let mut keys = Vec::new();
        while let Some(key) = futures::StreamExt::next(&mut iter).await {
            keys.push(key?);
        }
        keys
    };
    for chunk in keys.chunks(1_000) {
        let _: () = redis::AsyncCommands::del(&mut conn, chunk).await?;
    }
    Ok(())
}
