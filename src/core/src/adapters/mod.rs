//! Adapters for the ports, and the one place that picks them from configuration.

pub mod livekit;
pub mod memory_broker;
pub mod memory_store;
pub mod rabbitmq;
pub mod redis_store;

use std::sync::Arc;

use secrecy::ExposeSecret;

use crate::config::{BackendConfig, BrokerKind, StoreKind};
use crate::ports::{Broker, BrokerError, Store, StoreError};

pub use livekit::LiveKitApi;
pub use memory_broker::MemoryBroker;
pub use memory_store::MemoryStore;
pub use rabbitmq::{RabbitBroker, RabbitConfig};
pub use redis_store::RedisStore;

/// The broker and store a process runs on.
#[derive(Clone)]
pub struct Backends {
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    /// Deliveries of one message before it is parked (the broker's limit).
    pub delivery_limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl Backends {
    /// Connects the chosen adapters (failing fast when a service is unreachable).
    pub async fn connect(
        config: &BackendConfig,
        broker: BrokerKind,
        store: StoreKind,
    ) -> Result<Self, BackendError> {
        let broker: Arc<dyn Broker> = match broker {
            BrokerKind::Memory => Arc::new(MemoryBroker::new(config.delivery_limit)),
            BrokerKind::Rabbitmq => Arc::new(
                RabbitBroker::connect(RabbitConfig {
                    url: config.amqp_url.expose_secret().to_owned(),
                    prefix: config.queue_prefix.clone(),
                    delivery_limit: config.delivery_limit,
                    publish_timeout: config.io_timeout(),
                })
                .await?,
            ),
        };
        let store: Arc<dyn Store> = match store {
            StoreKind::Memory => Arc::new(MemoryStore::new()),
            StoreKind::Redis => Arc::new(
                RedisStore::connect(
                    config.redis_url.expose_secret(),
                    &config.key_prefix,
                    config.io_timeout(),
                )
                .await?,
            ),
        };
        Ok(Self {
            broker,
            store,
            delivery_limit: config.delivery_limit,
        })
    }
}
