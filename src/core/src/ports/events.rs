//! The event log port: the bounded, ordered history of call events that the live stream
//! and the callback dispatcher read. Events are appended by the store in the same atomic
//! step as the call change that caused them ([`crate::ports::Store::update_record`]), so a
//! change is never stored without its event nor announced without being stored.

use std::cmp::Ordering;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::ports::store::StoreError;

/// An event's position in the log: `<epoch ms>-<sequence>` (a Redis stream id), ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.trim().split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl Ord for EventId {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.seq).cmp(&(other.ms, other.seq))
    }
}

impl PartialOrd for EventId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One event as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub id: EventId,
    pub data: Bytes,
}

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Up to `limit` events after `after` (from the oldest retained when `None`), oldest
    /// first. With `block`, waits up to that long for the first one to arrive.
    async fn read(
        &self,
        after: Option<EventId>,
        limit: usize,
        block: Option<Duration>,
    ) -> Result<Vec<LoggedEvent>, StoreError>;

    /// The oldest and newest retained ids (`None` when the log is empty).
    async fn bounds(&self) -> Result<Option<(EventId, EventId)>, StoreError>;

    /// A named reader's saved position (the callback dispatcher's).
    async fn cursor(&self, name: &str) -> Result<Option<EventId>, StoreError>;

    async fn set_cursor(&self, name: &str, at: EventId) -> Result<(), StoreError>;
}
