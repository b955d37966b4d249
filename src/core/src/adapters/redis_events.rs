//! The event log on Redis: a stream (`{prefix}:events`) the store's record scripts append
//! to, read with XRANGE / XREAD. Blocking reads use connections of their own: a blocked
//! XREAD holds its connection, so on the shared multiplexed one it would stall every other
//! store command behind it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};

use super::redis_store::err;
use crate::ports::events::{EventId, EventLog, LoggedEvent};
use crate::ports::store::StoreError;

/// How much longer than its BLOCK a blocking read may take to answer before it is given up.
const BLOCK_SLACK: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct RedisEventLog {
    conn: ConnectionManager,
    client: redis::Client,
    key: String,
    prefix: String,
    /// Idle connections for blocking reads (one per concurrent reader, reused).
    idle: Arc<Mutex<Vec<MultiplexedConnection>>>,
}

impl RedisEventLog {
    pub(crate) fn new(
        conn: ConnectionManager,
        client: redis::Client,
        key: &str,
        prefix: &str,
    ) -> Self {
        Self {
            conn,
            client,
            key: key.to_owned(),
            prefix: prefix.to_owned(),
            idle: Arc::default(),
        }
    }

    fn cursor_key(&self, name: &str) -> String {
        format!("{}:events:cursor:{name}", self.prefix)
    }

    async fn blocking_conn(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.idle.lock().pop() {
            return Ok(conn);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // Never shorter than a BLOCK plus its slack; each call is bounded again below.
            .set_response_timeout(Some(Duration::from_secs(60)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(err)
    }
}

fn protocol(what: &str) -> StoreError {
    StoreError::Protocol(format!("unexpected event log reply: {what}"))
}

/// `[[id, [field, value, …]], …]` (XRANGE, and each stream of XREAD).
fn entries(value: Value) -> Result<Vec<LoggedEvent>, StoreError> {
    let Value::Array(items) = value else {
        return match value {
            Value::Nil => Ok(Vec::new()),
            _ => Err(protocol("entries are not an array")),
        };
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            return Err(protocol("entry is not an array"));
        };
        if pair.len() != 2 {
            return Err(protocol("entry is not [id, fields]"));
        }
        let fields = pair.pop().unwrap_or(Value::Nil);
        let id: String = redis::from_redis_value(pair.pop().unwrap_or(Value::Nil))
            .map_err(|_| protocol("entry id"))?;
        let id = EventId::parse(&id).ok_or_else(|| protocol("entry id format"))?;
        let Value::Array(fields) = fields else {
            return Err(protocol("entry fields"));
        };
        // Fields come as name, value pairs; the event is the value of `d`.
        let data = fields
            .chunks(2)
            .find_map(|kv| match kv {
                [Value::BulkString(k), Value::BulkString(v)] if k.as_slice() == b"d" => {
                    Some(Bytes::from(v.clone()))
                }
                _ => None,
            })
            .ok_or_else(|| protocol("entry without data"))?;
        out.push(LoggedEvent { id, data });
    }
    Ok(out)
}

/// XREAD's reply: nil on timeout, else `[[key, entries]]` (RESP2) or a map (RESP3).
fn read_reply(value: Value) -> Result<Vec<LoggedEvent>, StoreError> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::new();
            for stream in streams {
                let Value::Array(mut pair) = stream else {
                    return Err(protocol("stream is not an array"));
                };
                let list = pair.pop().unwrap_or(Value::Nil);
                out.extend(entries(list)?);
            }
            Ok(out)
        }
        Value::Map(streams) => {
            let mut out = Vec::new();
            for (_, list) in streams {
                out.extend(entries(list)?);
            }
            Ok(out)
        }
        _ => Err(protocol("read reply")),
    }
}

#[async_trait]
impl EventLog for RedisEventLog {
    async fn read(
        &self,
        after: Option<EventId>,
        limit: usize,
        block: Option<Duration>,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        let limit = limit.max(1);
        let start = match after {
            // Exclusive start: XRANGE's `(` form.
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let mut conn = self.conn.clone();
        let found: Value = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let found = entries(found)?;
        let Some(block) = block.filter(|_| found.is_empty()) else {
            return Ok(found);
        };
        // Nothing yet: wait for the next one after `after`, or (the log was empty just now)
        // for the first one: `0-0`, not `$`, so one appended in between is not skipped.
        let from = after.map_or_else(|| "0-0".to_owned(), |id| id.to_string());
        let mut blocking = self.blocking_conn().await?;
        let reply = tokio::time::timeout(
            block + BLOCK_SLACK,
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(limit)
                .arg("BLOCK")
                .arg(block.as_millis().max(1) as u64)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(&from)
                .query_async::<Value>(&mut blocking),
        )
        .await;
        match reply {
            Ok(Ok(value)) => {
                self.idle.lock().push(blocking);
                read_reply(value)
            }
            // A connection that failed or hung is dropped, not reused.
            Ok(Err(e)) => Err(err(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "event log read did not answer within {:?}",
                block + BLOCK_SLACK
            ))),
        }
    }

    async fn bounds(&self) -> Result<Option<(EventId, EventId)>, StoreError> {
        let mut conn = self.conn.clone();
        let first: Value = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&self.key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let first = entries(first)?.into_iter().next();
        let last = entries(last)?.into_iter().next();
        Ok(first.zip(last).map(|(f, l)| (f.id, l.id)))
    }

    async fn cursor(&self, name: &str) -> Result<Option<EventId>, StoreError> {
        let mut conn = self.conn.clone();
        let at: Option<String> = redis::cmd("GET")
            .arg(self.cursor_key(name))
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(at.as_deref().and_then(EventId::parse))
    }

    async fn set_cursor(&self, name: &str, at: EventId) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let () = redis::cmd("SET")
            .arg(self.cursor_key(name))
            .arg(at.to_string())
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }
}
