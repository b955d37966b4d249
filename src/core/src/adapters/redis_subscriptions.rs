//! Subscriptions and delivery logs in Redis: one hash `{prefix}:subs` (id → JSON), and per
//! subscription a list `{prefix}:subs:deliveries:{id}` (newest first), trimmed to
//! [`DELIVERY_LOG_LIMIT`] in the same MULTI as each push. Ids may contain `:`
//! (`call:<call_id>`): the id is the key's whole tail, so it never collides with another
//! key kind.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::redis_store::err;
use crate::domain::subscription::{DeliveryRecord, Subscription, CALL_SUBSCRIPTION_PREFIX};
use crate::ports::subscriptions::{SubscriptionStore, DELIVERY_LOG_LIMIT};
use crate::ports::StoreError;

#[derive(Clone)]
pub struct RedisSubscriptions {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisSubscriptions {
    /// Subscriptions over `conn` (a clone of the store's connection), keys under
    /// `prefix:subs`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    fn subs_key(&self) -> String {
        format!("{}:subs", self.prefix)
    }

    fn log_key(&self, id: &str) -> String {
        format!("{}:subs:deliveries:{id}", self.prefix)
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, json: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(json)
        .map_err(|e| StoreError::Protocol(format!("{what} is corrupt: {e}")))
}

fn encode<T: serde::Serialize>(what: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Protocol(format!("{what} not encodable: {e}")))
}

/// How long a call's own delivery log is kept after its last attempt (30 days).
const CALL_LOG_TTL_S: u64 = 30 * 24 * 3600;

#[async_trait]
impl SubscriptionStore for RedisSubscriptions {
    async fn put(&self, sub: &Subscription) -> Result<bool, StoreError> {
        let json = encode(&format!("subscription {}", sub.id), sub)?;
        let mut conn = self.conn.clone();
        let added: i64 = redis::cmd("HSET")
            .arg(self.subs_key())
            .arg(&sub.id)
            .arg(json)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(added == 1)
    }

    async fn get(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.subs_key())
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        json.map(|j| decode(&format!("subscription {id}"), &j))
            .transpose()
    }

    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let (removed, _): (i64, i64) = redis::pipe()
            .atomic()
            .cmd("HDEL")
            .arg(self.subs_key())
            .arg(id)
            .cmd("DEL")
            .arg(self.log_key(id))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(removed == 1)
    }

    async fn list(&self) -> Result<Vec<Subscription>, StoreError> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(self.subs_key())
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let mut subs = all
            .iter()
            .map(|(id, json)| decode::<Subscription>(&format!("subscription {id}"), json))
            .collect::<Result<Vec<_>, _>>()?;
        subs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(subs)
    }

    async fn record_delivery(
        &self,
        sub_id: &str,
        record: &DeliveryRecord,
    ) -> Result<(), StoreError> {
        let json = encode("delivery record", record)?;
        let key = self.log_key(sub_id);
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LPUSH")
            .arg(&key)
            .arg(json)
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(DELIVERY_LOG_LIMIT as i64 - 1)
            .ignore();
        // A call's own log lives as long as anyone asks about a call's callbacks; a
        // subscription's lives as long as the subscription.
        if sub_id.starts_with(CALL_SUBSCRIPTION_PREFIX) {
            pipe.cmd("EXPIRE").arg(&key).arg(CALL_LOG_TTL_S).ignore();
        }
        let () = pipe.query_async(&mut conn).await.map_err(err)?;
        Ok(())
    }

    async fn deliveries(
        &self,
        sub_id: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let limit = limit.min(DELIVERY_LOG_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let jsons: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(self.log_key(sub_id))
            .arg(0)
            .arg(limit as i64 - 1)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        jsons
            .iter()
            .map(|j| decode(&format!("a delivery record of {sub_id}"), j))
            .collect()
    }
}
