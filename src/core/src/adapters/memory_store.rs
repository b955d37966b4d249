//! In-memory store with the same atomicity as the Redis adapter (one mutex around the
//! state; expiry checked on access). Used by dev mode and unit tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::ports::store::{
    index_cursor, parse_index_cursor, CasOutcome, IndexPage, LockToken, RateDecision, Store,
    StoreError, Versioned,
};

#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    records: HashMap<String, Versioned>,
    /// (score, id) → (), newest last.
    index: BTreeMap<(i64, String), ()>,
    keys: HashMap<String, (String, Instant)>,
    /// GCRA theoretical arrival time per key.
    tat: HashMap<String, Instant>,
    leases: HashMap<String, HashMap<String, Instant>>,
    /// Watched id → due (epoch ms).
    watches: HashMap<String, i64>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl State {
    /// Sets `key` unless it is live; returns the live value if it was.
    fn claim(&mut self, key: &str, value: &str, ttl: Duration) -> Option<String> {
        let now = Instant::now();
        if let Some(existing) = self.live_key(key, now) {
            return Some(existing.clone());
        }
        self.keys
            .insert(key.to_owned(), (value.to_owned(), now + ttl));
        None
    }

    fn live_key(&mut self, key: &str, now: Instant) -> Option<&String> {
        if self.keys.get(key).is_some_and(|(_, exp)| *exp <= now) {
            self.keys.remove(key);
        }
        self.keys.get(key).map(|(v, _)| v)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_record(
        &self,
        id: &str,
        data: Bytes,
        index_score: Option<i64>,
        watch_ms: Option<i64>,
    ) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        if s.records.contains_key(id) {
            return Ok(false);
        }
        s.records
            .insert(id.to_owned(), Versioned { version: 1, data });
        if let Some(score) = index_score {
            s.index.insert((score, id.to_owned()), ());
        }
        if let Some(due) = watch_ms {
            s.watches.insert(id.to_owned(), due);
        }
        Ok(true)
    }

    async fn get_record(&self, id: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.state.lock().await.records.get(id).cloned())
    }

    async fn update_record(
        &self,
        id: &str,
        expected_version: u64,
        data: Bytes,
    ) -> Result<CasOutcome, StoreError> {
        let mut s = self.state.lock().await;
        match s.records.get_mut(id) {
            Some(rec) if rec.version == expected_version => {
                rec.version += 1;
                rec.data = data;
                Ok(CasOutcome::Updated(rec.version))
            }
            _ => Ok(CasOutcome::Conflict),
        }
    }

    async fn list_index(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<IndexPage, StoreError> {
        let s = self.state.lock().await;
        let upper = cursor.and_then(parse_index_cursor);
        let mut ids = Vec::new();
        let mut last = None;
        for ((score, id), _) in s.index.iter().rev() {
            if let Some((cs, cid)) = &upper {
                if (*score, id) >= (*cs, cid) {
                    continue;
                }
            }
            if ids.len() == limit {
                return Ok(IndexPage { ids, next: last });
            }
            ids.push(id.clone());
            last = Some(index_cursor(*score, id));
        }
        Ok(IndexPage { ids, next: None })
    }

    async fn claim_key(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        // Each kind of key has its own namespace, as in Redis, so an idempotency key can
        // never collide with a lock or a dedupe mark.
        Ok(self
            .state
            .lock()
            .await
            .claim(&format!("key:{key}"), value, ttl))
    }

    async fn get_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut s = self.state.lock().await;
        Ok(s.live_key(&format!("key:{key}"), Instant::now()).cloned())
    }

    async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        self.state.lock().await.keys.remove(&format!("key:{key}"));
        Ok(())
    }

    async fn watch(&self, id: &str, due_ms: i64) -> Result<(), StoreError> {
        self.state
            .lock()
            .await
            .watches
            .insert(id.to_owned(), due_ms);
        Ok(())
    }

    async fn unwatch(&self, id: &str) -> Result<(), StoreError> {
        self.state.lock().await.watches.remove(id);
        Ok(())
    }

    async fn due_watches(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let state = self.state.lock().await;
        let mut due: Vec<(i64, &String)> = state
            .watches
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(id, at)| (*at, id))
            .collect();
        due.sort();
        Ok(due
            .into_iter()
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect())
    }

    async fn first_seen(&self, event_id: &str, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self
            .state
            .lock()
            .await
            .claim(&format!("seen:{event_id}"), "1", ttl)
            .is_none())
    }

    async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockToken>, StoreError> {
        let token = uuid::Uuid::new_v4().to_string();
        match self
            .state
            .lock()
            .await
            .claim(&format!("lock:{name}"), &token, ttl)
        {
            None => Ok(Some(LockToken(token))),
            Some(_) => Ok(None),
        }
    }

    async fn extend_lock(
        &self,
        name: &str,
        token: &LockToken,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        let key = format!("lock:{name}");
        let now = Instant::now();
        if s.live_key(&key, now) == Some(&token.0) {
            s.keys.insert(key, (token.0.clone(), now + ttl));
            return Ok(true);
        }
        Ok(false)
    }

    async fn unlock(&self, name: &str, token: &LockToken) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        let key = format!("lock:{name}");
        if s.live_key(&key, Instant::now()) == Some(&token.0) {
            s.keys.remove(&key);
            return Ok(true);
        }
        Ok(false)
    }

    async fn rate_limit(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<RateDecision, StoreError> {
        let mut s = self.state.lock().await;
        let now = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / per_second.max(1e-6));
        let tolerance = interval * burst.saturating_sub(1);
        let tat = s.tat.get(key).copied().unwrap_or(now).max(now);
        if tat - now > tolerance {
            return Ok(RateDecision::RetryAfter(tat - now - tolerance));
        }
        s.tat.insert(key.to_owned(), tat + interval);
        Ok(RateDecision::Allowed)
    }

    async fn acquire_lease(
        &self,
        pool: &str,
        holder: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        let now = Instant::now();
        let leases = s.leases.entry(pool.to_owned()).or_default();
        leases.retain(|_, exp| *exp > now);
        if leases.contains_key(holder) || (leases.len() as u32) < max {
            leases.insert(holder.to_owned(), now + ttl);
            return Ok(true);
        }
        Ok(false)
    }

    async fn release_lease(&self, pool: &str, holder: &str) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        Ok(s.leases
            .get_mut(pool)
            .and_then(|l| l.remove(holder))
            .is_some())
    }

    async fn live_leases(&self, pool: &str) -> Result<u64, StoreError> {
        let mut s = self.state.lock().await;
        let now = Instant::now();
        Ok(s.leases.get_mut(pool).map_or(0, |l| {
            l.retain(|_, exp| *exp > now);
            l.len() as u64
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
