//! Redis store (redis-rs `ConnectionManager`, which reconnects in the background). Every
//! multi-step operation is one Lua script, so it is atomic; time comes from Redis `TIME` so
//! that workers with skewed clocks agree on leases and rate limits.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::ports::store::{index_cursor, parse_index_cursor};
use crate::ports::store::{
    CasOutcome, IndexPage, LockToken, RateDecision, Store, StoreError, Versioned,
};

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// For the event log's blocking reads, which need connections of their own.
    client: redis::Client,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
    /// Events the log keeps (approximately: trimmed with `MAXLEN ~`).
    event_retention: usize,
}

struct Scripts {
    create: Script,
    cas: Script,
    extend: Script,
    unlock: Script,
    gcra: Script,
    lease: Script,
    live: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            // KEYS: record, index, watch list, event log. ARGV: data, score ('' = not
            // indexed), id, watch due ('' = not watched), log length kept, events….
            create: Script::new(
                r"if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
                  redis.call('HSET', KEYS[1], 'v', 1, 'd', ARGV[1])
                  if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3]) end
                  if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3]) end
                  for i = 6, #ARGV do
                    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[i])
                  end
                  return 1",
            ),
            // KEYS: record, event log. ARGV: expected version, data, log length kept,
            // events…. Returns the new version, or 0 on a conflict.
            cas: Script::new(
                r"local v = redis.call('HGET', KEYS[1], 'v')
                  if not v or tonumber(v) ~= tonumber(ARGV[1]) then return 0 end
                  local nv = tonumber(v) + 1
                  redis.call('HSET', KEYS[1], 'v', nv, 'd', ARGV[2])
                  for i = 4, #ARGV do
                    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[i])
                  end
                  return nv",
            ),
            extend: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
                  return 0",
            ),
            unlock: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                    return redis.call('DEL', KEYS[1]) end
                  return 0",
            ),
            // GCRA. ARGV: interval ms, tolerance ms. Returns 0 if allowed, else ms to wait.
            gcra: Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  local interval = tonumber(ARGV[1])
                  local tolerance = tonumber(ARGV[2])
                  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
                  if tat < now then tat = now end
                  if tat - now > tolerance then return math.max(1, tat - now - tolerance) end
                  redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now + 1000))
                  return 0",
            ),
            // Leases in a sorted set scored by expiry. ARGV: holder, max, ttl ms.
            lease: Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
                  local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
                  if held or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
                    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
                    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
                    return 1
                  end
                  return 0",
            ),
            live: Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
                  return redis.call('ZCARD', KEYS[1])",
            ),
        }
    }
}

pub(crate) fn err(e: redis::RedisError) -> StoreError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Protocol(e.to_string())
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

impl RedisStore {
    /// Connects (failing fast if Redis is unreachable) with every key under `prefix:`.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Protocol(format!("bad redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("no answer within {timeout:?}")))?
        .map_err(err)?;
        Ok(Self {
            conn,
            client,
            prefix: prefix.to_owned(),
            scripts: std::sync::Arc::new(Scripts::new()),
            event_retention: super::DEFAULT_EVENT_RETENTION,
        })
    }

    /// Keeps about `events` events in the log (the live stream's resumable history).
    pub fn with_event_retention(mut self, events: usize) -> Self {
        self.event_retention = events.max(1);
        self
    }

    /// The event log on this store's key prefix.
    pub fn events(&self) -> super::RedisEventLog {
        super::RedisEventLog::new(
            self.conn.clone(),
            self.client.clone(),
            &self.events_key(),
            &self.prefix,
        )
    }

    fn events_key(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// The routing adapter on this store's connection and key prefix.
    pub fn routing(&self) -> super::RedisRouting {
        super::RedisRouting::new(self.conn.clone(), &self.prefix)
    }

    /// The subscriptions adapter on this store's connection and key prefix.
    pub fn subscriptions(&self) -> super::RedisSubscriptions {
        super::RedisSubscriptions::new(self.conn.clone(), &self.prefix)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}:index:records", self.prefix)
    }

    fn watch_key(&self) -> String {
        format!("{}:index:watch", self.prefix)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_record(
        &self,
        id: &str,
        data: Bytes,
        index_score: Option<i64>,
        watch_ms: Option<i64>,
        events: &[Bytes],
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.create.prepare_invoke();
        invocation
            .key(self.key("rec", id))
            .key(self.index_key())
            .key(self.watch_key())
            .key(self.events_key())
            .arg(data.as_ref())
            .arg(index_score.map(|s| s.to_string()).unwrap_or_default())
            .arg(id)
            .arg(watch_ms.map(|s| s.to_string()).unwrap_or_default())
            .arg(self.event_retention);
        for event in events {
            invocation.arg(event.as_ref());
        }
        let created: i64 = invocation.invoke_async(&mut conn).await.map_err(err)?;
        Ok(created == 1)
    }

    async fn get_record(&self, id: &str) -> Result<Option<Versioned>, StoreError> {
        let mut conn = self.conn.clone();
        let (version, data): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.key("rec", id))
            .arg("v")
            .arg("d")
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(match (version, data) {
            (Some(version), Some(data)) => Some(Versioned {
                version,
                data: Bytes::from(data),
            }),
            _ => None,
        })
    }

    async fn update_record(
        &self,
        id: &str,
        expected_version: u64,
        data: Bytes,
        events: &[Bytes],
    ) -> Result<CasOutcome, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.cas.prepare_invoke();
        invocation
            .key(self.key("rec", id))
            .key(self.events_key())
            .arg(expected_version)
            .arg(data.as_ref())
            .arg(self.event_retention);
        for event in events {
            invocation.arg(event.as_ref());
        }
        let version: u64 = invocation.invoke_async(&mut conn).await.map_err(err)?;
        Ok(if version == 0 {
            CasOutcome::Conflict
        } else {
            CasOutcome::Updated(version)
        })
    }

    async fn list_index(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<IndexPage, StoreError> {
        let mut conn = self.conn.clone();
        // Exclusive upper bound on the score; ids with the same score as the cursor are
        // resolved by id below, so fetch a little extra.
        let (max, after) = match cursor.and_then(parse_index_cursor) {
            Some((score, id)) => (score.to_string(), Some((score, id))),
            None => ("+inf".to_owned(), None),
        };
        let raw: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(self.index_key())
            .arg(&max)
            .arg("-inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1 + 64)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let mut ids = Vec::new();
        let mut last = None;
        for (id, score) in raw {
            let score = score as i64;
            if let Some((cs, cid)) = &after {
                if (score, &id) >= (*cs, cid) {
                    continue;
                }
            }
            if ids.len() == limit {
                return Ok(IndexPage { ids, next: last });
            }
            last = Some(index_cursor(score, &id));
            ids.push(id);
        }
        Ok(IndexPage { ids, next: None })
    }

    async fn claim_key(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.key("key", key);
        // SET NX GET returns the old value when the key existed (Redis ≥ 7).
        let previous: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ms(ttl))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(previous)
    }

    async fn get_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        conn.get(self.key("key", key)).await.map_err(err)
    }

    async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(self.key("key", key)).await.map_err(err)?;
        Ok(())
    }

    async fn watch(&self, id: &str, due_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.zadd(self.watch_key(), id, due_ms).await.map_err(err)?;
        Ok(())
    }

    async fn unwatch(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.zrem(self.watch_key(), id).await.map_err(err)?;
        Ok(())
    }

    async fn due_watches(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        conn.zrangebyscore_limit(self.watch_key(), "-inf", now_ms, 0, limit as isize)
            .await
            .map_err(err)
    }

    async fn first_seen(&self, event_id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key("seen", event_id))
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(set.is_some())
    }

    async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockToken>, StoreError> {
        let mut conn = self.conn.clone();
        let token = uuid::Uuid::new_v4().to_string();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key("lock", name))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(set.map(|_| LockToken(token)))
    }

    async fn extend_lock(
        &self,
        name: &str,
        token: &LockToken,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let ok: i64 = self
            .scripts
            .extend
            .key(self.key("lock", name))
            .arg(&token.0)
            .arg(ms(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(ok == 1)
    }

    async fn unlock(&self, name: &str, token: &LockToken) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let ok: i64 = self
            .scripts
            .unlock
            .key(self.key("lock", name))
            .arg(&token.0)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(ok == 1)
    }

    async fn rate_limit(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<RateDecision, StoreError> {
        let mut conn = self.conn.clone();
        let interval = (1000.0 / per_second.max(1e-6)).ceil() as u64;
        let tolerance = interval * u64::from(burst.saturating_sub(1));
        let wait: u64 = self
            .scripts
            .gcra
            .key(self.key("rate", key))
            .arg(interval)
            .arg(tolerance)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(if wait == 0 {
            RateDecision::Allowed
        } else {
            RateDecision::RetryAfter(Duration::from_millis(wait))
        })
    }

    async fn acquire_lease(
        &self,
        pool: &str,
        holder: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let ok: i64 = self
            .scripts
            .lease
            .key(self.key("lease", pool))
            .arg(holder)
            .arg(max)
            .arg(ms(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(ok == 1)
    }

    async fn release_lease(&self, pool: &str, holder: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let removed: i64 = conn
            .zrem(self.key("lease", pool), holder)
            .await
            .map_err(err)?;
        Ok(removed == 1)
    }

    async fn live_leases(&self, pool: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        self.scripts
            .live
            .key(self.key("lease", pool))
            .invoke_async(&mut conn)
            .await
            .map_err(err)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }
}
