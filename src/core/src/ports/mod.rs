//! The ports the domain owns. Contracts are written on each trait; adapters in
//! [`crate::adapters`] implement them, and the conformance suites in `tests/` hold every
//! adapter of a port to the same contract.

pub mod broker;
pub mod events;
pub mod livekit;
pub mod routing;
pub mod store;
pub mod subscriptions;

pub use broker::{Broker, BrokerError, DeadLetter, Delivery, Message, Subscription, WorkQueue};
pub use events::{EventId, EventLog, LoggedEvent};
pub use livekit::{LiveKit, LiveKitError, TransferRequest};
pub use routing::{ProfileChanges, RoutingStore};
pub use store::{Store, StoreError};
pub use subscriptions::SubscriptionStore;
