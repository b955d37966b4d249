//! In-memory subscriptions and delivery logs, with the Redis adapter's semantics. Dev mode
//! and tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::domain::subscription::{DeliveryRecord, Subscription};
use crate::ports::subscriptions::{SubscriptionStore, DELIVERY_LOG_LIMIT};
use crate::ports::StoreError;

#[derive(Clone, Default)]
pub struct MemorySubscriptions {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    subs: BTreeMap<String, Subscription>,
    /// Newest first.
    deliveries: HashMap<String, VecDeque<DeliveryRecord>>,
}

impl MemorySubscriptions {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl SubscriptionStore for MemorySubscriptions {
    async fn put(&self, sub: &Subscription) -> Result<bool, StoreError> {
        Ok(self
            .state
            .lock()
            .subs
            .insert(sub.id.clone(), sub.clone())
            .is_none())
    }

    async fn get(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        Ok(self.state.lock().subs.get(id).cloned())
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let mut s = self.state.lock();
        s.deliveries.remove(id);
        Ok(s.subs.remove(id).is_some())
    }

    async fn list(&self) -> Result<Vec<Subscription>, StoreError> {
        Ok(self.state.lock().subs.values().cloned().collect())
    }

    async fn record_delivery(
        &self,
        sub_id: &str,
        record: &DeliveryRecord,
    ) -> Result<(), StoreError> {
        let mut s = self.state.lock();
        let log = s.deliveries.entry(sub_id.to_owned()).or_default();
        log.push_front(record.clone());
        log.truncate(DELIVERY_LOG_LIMIT);
        Ok(())
    }

    async fn deliveries(
        &self,
        sub_id: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        Ok(self
            .state
            .lock()
            .deliveries
            .get(sub_id)
            .map(|log| log.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }
}
