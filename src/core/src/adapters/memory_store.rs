//! In-memory store with the same atomicity as the Redis adapter (one mutex around the
//! state; expiry checked on access). Used by dev mode and unit tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::ports::events::{EventId, EventLog, LoggedEvent};
use crate::ports::store::{
    index_cursor, parse_index_cursor, CasOutcome, IndexPage, LockToken, RateDecision, Store,
    StoreError, Versioned,
};

#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    /// Bumped after every append to the event log (wakes blocked readers).
    appended: Arc<tokio::sync::watch::Sender<u64>>,
    /// Events the log keeps.
    event_retention: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            appended: Arc::new(tokio::sync::watch::channel(0).0),
            event_retention: super::DEFAULT_EVENT_RETENTION,
        }
    }
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
    /// The event log, oldest first, and its readers' cursors.
    events: VecDeque<LoggedEvent>,
    cursors: HashMap<String, EventId>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the newest `events` events in the log.
    pub fn with_event_retention(mut self, events: usize) -> Self {
        self.event_retention = events.max(1);
        self
    }

    /// The event log of this store.
    pub fn events(&self) -> MemoryEventLog {
        MemoryEventLog {
            store: self.clone(),
        }
    }

    fn announce(&self, appended: usize) {
        if appended > 0 {
            self.appended.send_modify(|n| *n += appended as u64);
        }
    }
}

impl State {
    /// Appends `events` with ids after the newest one (ms of the wall clock, then a
    /// sequence within the millisecond, as Redis streams number entries).
    fn append(&mut self, events: &[Bytes], keep: usize) {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        for data in events {
            let id = match self.events.back() {
                Some(last) if last.id.ms >= now => EventId {
                    ms: last.id.ms,
                    seq: last.id.seq + 1,
                },
                _ => EventId { ms: now, seq: 0 },
            };
            self.events.push_back(LoggedEvent {
                id,
                data: data.clone(),
            });
        }
        while self.events.len() > keep {
            self.events.pop_front();
        }
    }

    fn events_after(&self, after: Option<EventId>, limit: usize) -> Vec<LoggedEvent> {
        let start = after.map_or(0, |a| self.events.partition_point(|e| e.id <= a));
        self.events
            .range(start..)
            .take(limit.max(1))
            .cloned()
            .collect()
    }
}

/// The memory store's event log (shares the store's state, as the Redis stream shares
/// the server with the records).
#[derive(Clone)]
pub struct MemoryEventLog {
    store: MemoryStore,
}

#[async_trait]
impl EventLog for MemoryEventLog {
    async fn read(
        &self,
        after: Option<EventId>,
        limit: usize,
        block: Option<Duration>,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        // Subscribed before looking, so an append in between still wakes us.
        let mut appended = self.store.appended.subscribe();
        let (found, newest) = {
            let s = self.store.state.lock().await;
            (s.events_after(after, limit), s.events.back().map(|e| e.id))
        };
        let Some(block) = block.filter(|_| found.is_empty()) else {
            return Ok(found);
        };
        // As XREAD with `$`: without a position, only what arrives from now on.
        let from = after.or(newest);
        let deadline = Instant::now() + block;
        loop {
            if tokio::time::timeout_at(deadline, appended.changed())
                .await
                .is_err()
            {
                return Ok(Vec::new());
            }
            let s = self.store.state.lock().await;
            let found = s.events_after(from, limit);
            if !found.is_empty() {
                return Ok(found);
            }
        }
    }

    async fn bounds(&self) -> Result<Option<(EventId, EventId)>, StoreError> {
        let s = self.store.state.lock().await;
        Ok(s.events
            .front()
            .zip(s.events.back())
            .map(|(f, l)| (f.id, l.id)))
    }

    async fn cursor(&self, name: &str) -> Result<Option<EventId>, StoreError> {
        Ok(self.store.state.lock().await.cursors.get(name).copied())
    }

    async fn set_cursor(&self, name: &str, at: EventId) -> Result<(), StoreError> {
        self.store
            .state
            .lock()
            .await
            .cursors
            .insert(name.to_owned(), at);
        Ok(())
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
        events: &[Bytes],
    ) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        if s.records.contains_key(id) {
            return Ok(false);
        }
        s.append(events, self.event_retention);
        s.records
            .insert(id.to_owned(), Versioned { version: 1, data });
        if let Some(score) = index_score {
            s.index.insert((score, id.to_owned()), ());
        }
        if let Some(due) = watch_ms {
            s.watches.insert(id.to_owned(), due);
        }
        drop(s);
        self.announce(events.len());
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
        events: &[Bytes],
    ) -> Result<CasOutcome, StoreError> {
        let mut s = self.state.lock().await;
        let version = match s.records.get_mut(id) {
            Some(rec) if rec.version == expected_version => {
                rec.version += 1;
                rec.data = data;
                rec.version
            }
            _ => return Ok(CasOutcome::Conflict),
        };
        s.append(events, self.event_retention);
        drop(s);
        self.announce(events.len());
        Ok(CasOutcome::Updated(version))
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
