//! The subscriptions port: callback subscriptions and, per subscription, the log of its
//! recent delivery attempts. Subscriptions are few (hundreds), so they are listed whole.
//!
//! Deliveries to a call's own `callback_url` are logged under the pseudo subscription id
//! `call:<call_id>` ([`crate::domain::subscription::call_subscription_id`]); every adapter
//! MUST accept any id, `:` included, as a delivery-log key.

use async_trait::async_trait;

use crate::domain::subscription::{DeliveryRecord, Subscription};
use crate::ports::StoreError;

/// How many delivery records each log keeps (the oldest are dropped).
pub const DELIVERY_LOG_LIMIT: usize = crate::domain::subscription::limits::MAX_DELIVERIES;

#[async_trait]
pub trait SubscriptionStore: Send + Sync + 'static {
    /// Creates or replaces `sub` (by its id); returns whether it was created.
    async fn put(&self, sub: &Subscription) -> Result<bool, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Subscription>, StoreError>;
    /// Deletes `id` and its delivery log, in one step; false when there was no such
    /// subscription (a log alone is deleted all the same).
    async fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Every subscription, ordered by id.
    async fn list(&self) -> Result<Vec<Subscription>, StoreError>;
    /// Appends `record` to `sub_id`'s delivery log, keeping the newest
    /// [`DELIVERY_LOG_LIMIT`] in the same atomic step. `sub_id` need not name a stored
    /// subscription (`call:<call_id>`).
    async fn record_delivery(
        &self,
        sub_id: &str,
        record: &DeliveryRecord,
    ) -> Result<(), StoreError>;
    /// Up to `limit` records of `sub_id`'s log, newest first (empty when there is none).
    async fn deliveries(
        &self,
        sub_id: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;
}
