//! Routing profiles and slots in Redis. Each write bumps one version counter and stamps
//! the profile's id with it in a change log (a sorted set, one entry per id, so it stays
//! as small as the set of ids ever written): a reader at version v fetches only the ids
//! scored above v. Every write is one Lua script, so a reader never sees a version whose
//! change is not yet logged.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::Script;

use super::redis_store::err;
use crate::domain::routing::Profile;
use crate::ports::routing::{ProfileChanges, RoutingStore};
use crate::ports::StoreError;

/// Profiles per script call during an import (bounded argument lists).
const CHUNK: usize = 500;

#[derive(Clone)]
pub struct RedisRouting {
    conn: ConnectionManager,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    put: Script,
    delete: Script,
    claim: Script,
    release: Script,
    loads: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            // KEYS: profiles, version, changes. ARGV: id1, json1, id2, json2, …
            put: Script::new(
                r"local v = redis.call('INCR', KEYS[2])
                  for i = 1, #ARGV, 2 do
                    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
                    redis.call('ZADD', KEYS[3], v, ARGV[i])
                  end
                  return v",
            ),
            // KEYS: profiles, version, changes. ARGV: ids. Returns the version, or 0 when
            // none of them existed.
            delete: Script::new(
                r"local removed = 0
                  for i = 1, #ARGV do removed = removed + redis.call('HDEL', KEYS[1], ARGV[i]) end
                  if removed == 0 then return 0 end
                  local v = redis.call('INCR', KEYS[2])
                  for i = 1, #ARGV do redis.call('ZADD', KEYS[3], v, ARGV[i]) end
                  return v",
            ),
            // Slots: a sorted set per profile, call → expiry (ms). KEYS: slots, busy set.
            // ARGV: profile, call, cap ('' = none), ttl ms.
            claim: Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
                  local held = redis.call('ZSCORE', KEYS[1], ARGV[2])
                  if not held and ARGV[3] ~= '' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
                    return 0
                  end
                  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
                  redis.call('SADD', KEYS[2], ARGV[1])
                  return 1",
            ),
            // KEYS: slots, busy set. ARGV: profile, call.
            release: Script::new(
                r"local removed = redis.call('ZREM', KEYS[1], ARGV[2])
                  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
                  return removed",
            ),
            // KEYS: busy set. ARGV: slot key prefix. Returns profile, count, profile, …
            loads: Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                  local out = {}
                  for _, p in ipairs(redis.call('SMEMBERS', KEYS[1])) do
                    local k = ARGV[1] .. p
                    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
                    local c = redis.call('ZCARD', k)
                    if c == 0 then redis.call('SREM', KEYS[1], p)
                    else table.insert(out, p); table.insert(out, c) end
                  end
                  return out",
            ),
        }
    }
}

impl RedisRouting {
    /// Routing over `conn` (a clone of the store's connection), keys under `prefix:routing:`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            scripts: std::sync::Arc::new(Scripts::new()),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:routing:{name}", self.prefix)
    }

    fn slot_prefix(&self) -> String {
        self.key("slots:")
    }

    async fn put_chunk(&self, profiles: &[Profile]) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.put.prepare_invoke();
        invocation
            .key(self.key("profiles"))
            .key(self.key("version"))
            .key(self.key("changes"));
        for p in profiles {
            let json = serde_json::to_string(p)
                .map_err(|e| StoreError::Protocol(format!("profile not encodable: {e}")))?;
            invocation.arg(&p.id).arg(json);
        }
        invocation.invoke_async(&mut conn).await.map_err(err)
    }

    async fn delete_many(&self, ids: &[String]) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.delete.prepare_invoke();
        invocation
            .key(self.key("profiles"))
            .key(self.key("version"))
            .key(self.key("changes"));
        for id in ids {
            invocation.arg(id);
        }
        invocation.invoke_async(&mut conn).await.map_err(err)
    }
}

fn decode(id: &str, json: &[u8]) -> Result<Profile, StoreError> {
    serde_json::from_slice(json)
        .map_err(|e| StoreError::Protocol(format!("profile {id} is corrupt: {e}")))
}

#[async_trait]
impl RoutingStore for RedisRouting {
    async fn put(&self, profile: &Profile) -> Result<u64, StoreError> {
        self.put_chunk(std::slice::from_ref(profile)).await
    }

    async fn delete(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let v = self.delete_many(&[id.to_owned()]).await?;
        Ok((v != 0).then_some(v))
    }

    async fn get(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.key("profiles"))
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        json.map(|j| decode(id, &j)).transpose()
    }

    async fn import(
        &self,
        profiles: &[Profile],
        keep: Option<&HashSet<String>>,
    ) -> Result<u64, StoreError> {
        let mut version = self.version().await?;
        if let Some(keep) = keep {
            let mut conn = self.conn.clone();
            let existing: Vec<String> = redis::cmd("HKEYS")
                .arg(self.key("profiles"))
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            let gone: Vec<String> = existing
                .into_iter()
                .filter(|id| !keep.contains(id))
                .collect();
            for chunk in gone.chunks(CHUNK) {
                version = version.max(self.delete_many(chunk).await?);
            }
        }
        for chunk in profiles.chunks(CHUNK) {
            version = version.max(self.put_chunk(chunk).await?);
        }
        Ok(version)
    }

    async fn version(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let v: Option<u64> = redis::cmd("GET")
            .arg(self.key("version"))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(v.unwrap_or(0))
    }

    async fn changes_since(&self, version: u64) -> Result<ProfileChanges, StoreError> {
        let mut conn = self.conn.clone();
        let current = self.version().await?;
        let changed: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.key("changes"))
            .arg(format!("({version}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let mut out = ProfileChanges {
            version: changed
                .iter()
                .map(|(_, v)| *v)
                .max()
                .unwrap_or(0)
                .max(current),
            ..Default::default()
        };
        for chunk in changed.chunks(1_000) {
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            let jsons: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(self.key("profiles"))
                .arg(&ids)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            for (id, json) in ids.into_iter().zip(jsons) {
                match json {
                    Some(j) => out.upserts.push(decode(id, &j)?),
                    None => out.deletes.push(id.to_owned()),
                }
            }
        }
        Ok(out)
    }

    async fn claim_slot(
        &self,
        profile: &str,
        call: &str,
        cap: Option<u32>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let taken: i64 = self
            .scripts
            .claim
            .key(format!("{}{profile}", self.slot_prefix()))
            .key(self.key("busy"))
            .arg(profile)
            .arg(call)
            .arg(cap.map(|c| c.to_string()).unwrap_or_default())
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(taken == 1)
    }

    async fn release_slot(&self, profile: &str, call: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let removed: i64 = self
            .scripts
            .release
            .key(format!("{}{profile}", self.slot_prefix()))
            .key(self.key("busy"))
            .arg(profile)
            .arg(call)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(removed == 1)
    }

    async fn loads(&self) -> Result<HashMap<String, u32>, StoreError> {
        let mut conn = self.conn.clone();
        let pairs: Vec<(String, u32)> = self
            .scripts
            .loads
            .key(self.key("busy"))
            .arg(self.slot_prefix())
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        let out: HashMap<String, u32> = pairs.into_iter().collect();
        Ok(out)
    }
}
