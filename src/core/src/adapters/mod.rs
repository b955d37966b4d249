//! Adapters for the ports, and the one place that picks them from configuration.

pub mod livekit;
pub mod livekit_sip;
pub mod memory_broker;
pub mod memory_routing;
pub mod memory_store;
pub mod memory_subscriptions;
pub mod rabbitmq;
pub mod redis_events;
pub mod redis_routing;
pub mod redis_store;
pub mod redis_subscriptions;

use std::sync::Arc;

use secrecy::ExposeSecret;

use crate::config::{BackendConfig, BrokerKind, StoreKind};
use crate::ports::{
    Broker, BrokerError, EventLog, RoutingStore, Store, StoreError, SubscriptionStore,
};

pub use livekit::LiveKitApi;
pub use livekit_sip::LiveKitSip;
pub use memory_broker::MemoryBroker;
pub use memory_routing::MemoryRouting;
pub use memory_store::{MemoryEventLog, MemoryStore};
pub use memory_subscriptions::MemorySubscriptions;
pub use rabbitmq::{RabbitBroker, RabbitConfig};
pub use redis_events::RedisEventLog;
pub use redis_routing::RedisRouting;
pub use redis_store::RedisStore;
pub use redis_subscriptions::RedisSubscriptions;

/// Events the log keeps by default: the live stream's resumable history.
pub const DEFAULT_EVENT_RETENTION: usize = 100_000;

/// The broker and store a process runs on.
#[derive(Clone)]
pub struct Backends {
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    /// Routing profiles and their slots (beside the store, on the same server).
    pub routing: Arc<dyn RoutingStore>,
    /// The call events the store appends with every change (stream and callbacks).
    pub events: Arc<dyn EventLog>,
    /// Callback subscriptions and their delivery logs (beside the store, on the same
    /// server).
    pub subscriptions: Arc<dyn SubscriptionStore>,
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

/// The adapters beside the store: records, routing, events, subscriptions.
type Stores = (
    Arc<dyn Store>,
    Arc<dyn RoutingStore>,
    Arc<dyn EventLog>,
    Arc<dyn SubscriptionStore>,
);

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
        let (store, routing, events, subscriptions): Stores = match store {
            StoreKind::Memory => {
                let memory = MemoryStore::new().with_event_retention(config.event_retention);
                let events = memory.events();
                (
                    Arc::new(memory),
                    Arc::new(MemoryRouting::new()),
                    Arc::new(events),
                    Arc::new(MemorySubscriptions::new()),
                )
            }
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
                })?
                .with_event_retention(config.event_retention);
                let routing = redis.routing();
                let events = redis.events();
                let subscriptions = redis.subscriptions();
                (
                    Arc::new(redis),
                    Arc::new(routing),
                    Arc::new(events),
                    Arc::new(subscriptions),
                )
            }
        };
        Ok(Self {
            broker,
            store,
            routing,
            events,
            subscriptions,
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
