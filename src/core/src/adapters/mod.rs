//! Adapters for the ports, and the one place that picks them from configuration.

pub mod livekit;
pub mod livekit_sip;
pub mod memory_broker;
pub mod memory_routing;
pub mod memory_store;
pub mod rabbitmq;
pub mod redis_routing;
pub mod redis_store;

use std::sync::Arc;

use secrecy::ExposeSecret;

use crate::config::{BackendConfig, BrokerKind, StoreKind};
use crate::ports::{Broker, BrokerError, RoutingStore, Store, StoreError};

pub use livekit::LiveKitApi;
pub use livekit_sip::LiveKitSip;
pub use memory_broker::MemoryBroker;
pub use memory_routing::MemoryRouting;
pub use memory_store::MemoryStore;
pub use rabbitmq::{RabbitBroker, RabbitConfig};
pub use redis_routing::RedisRouting;
pub use redis_store::RedisStore;

/// The broker and store a process runs on.
#[derive(Clone)]
pub struct Backends {
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    /// Routing profiles and their slots (beside the store, on the same server).
    pub routing: Arc<dyn RoutingStore>,
    /// Deliveries of one message before it is parked (the broker's limit).
    pub delivery_limit: u32,
}

/// A backend that could not be reached at start-up, named by where it was looked for
/// (host and port; never the credentials in its URL). The cause follows as the source.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("RabbitMQ at {at}")]
    Broker {
        at: String,
        #[source]
        source: BrokerError,
    },
    #[error("Redis at {at}")]
    Store {
        at: String,
        #[source]
        source: StoreError,
    },
}

/// `host:port` of a service URL such as `amqp://user:secret@host:5672/%2f`.
pub fn endpoint(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
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
                .await
                .map_err(|source| BackendError::Broker {
                    at: endpoint(config.amqp_url.expose_secret()),
                    source,
                })?,
            ),
        };
        let (store, routing): (Arc<dyn Store>, Arc<dyn RoutingStore>) = match store {
            StoreKind::Memory => (Arc::new(MemoryStore::new()), Arc::new(MemoryRouting::new())),
            StoreKind::Redis => {
                let redis = RedisStore::connect(
                    config.redis_url.expose_secret(),
                    &config.key_prefix,
                    config.io_timeout(),
                )
                .await
                .map_err(|source| BackendError::Store {
                    at: endpoint(config.redis_url.expose_secret()),
                    source,
                })?;
                let routing = redis.routing();
                (Arc::new(redis), Arc::new(routing))
            }
        };
        Ok(Self {
            broker,
            store,
            routing,
            delivery_limit: config.delivery_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoints_name_host_and_port_never_credentials() {
        assert_eq!(
            super::endpoint("amqp://guest:s3cret@rabbit.internal:5672/%2f"),
            "rabbit.internal:5672"
        );
        assert_eq!(
            super::endpoint("redis://:pw@10.0.0.7:6380/2"),
            "10.0.0.7:6380"
        );
        assert_eq!(super::endpoint("redis://127.0.0.1:6379"), "127.0.0.1:6379");
    }
}
