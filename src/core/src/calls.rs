//! Call records over the store port (typed, versioned, updated by compare-and-swap), the
//! call-job message, and the clock the scheduling decisions read.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::events::{CallEvent, EventType};
use crate::domain::subscription::call_subscription_id;
use crate::domain::{Call, CallStatus, Direction, TimelineEntry};
use crate::ports::broker::{headers, Message, WorkQueue};
use crate::ports::store::{index_cursor, CasOutcome, Store, StoreError};
use crate::ErrorClass;

/// Where "now" comes from. Workers read it for every scheduling decision, so tests can move
/// it (call windows) without sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// System time shifted by an adjustable offset: time still flows (so broker delays stay
/// real), but a test can put "now" just before a call window opens.
#[derive(Debug, Default)]
pub struct ShiftedClock {
    offset_ms: AtomicI64,
}

impl ShiftedClock {
    /// Makes `now()` read `at` at this instant.
    pub fn set(&self, at: DateTime<Utc>) {
        self.offset_ms
            .store((at - Utc::now()).num_milliseconds(), Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::SeqCst))
    }
}

/// The body of an outbound call job: which call, which attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallJob {
    pub call_id: String,
    pub attempt: u32,
}

impl CallJob {
    /// The broker message for this job, delivered at `deliver_at` (or now).
    pub fn message(&self, deliver_at: Option<DateTime<Utc>>) -> Message {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut message = Message::new(WorkQueue::CallJobs, body)
            .with_id(format!("{}-a{}", self.call_id, self.attempt))
            .with_header(headers::TRACE_ID, self.call_id.clone());
        message.deliver_at = deliver_at;
        message
    }

    pub fn parse(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("undecodable call job: {e}"))
    }
}

/// The body of a control message: run this command of this call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlJob {
    pub call_id: String,
    pub command_id: String,
}

impl ControlJob {
    /// Its broker message (one per command: the id dedupes a republished one).
    pub fn message(&self) -> Message {
        let body = serde_json::to_vec(self).unwrap_or_default();
        Message::new(WorkQueue::Control, body)
            .with_id(self.command_id.clone())
            .with_header(headers::TRACE_ID, self.call_id.clone())
    }

    pub fn parse(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("undecodable control job: {e}"))
    }
}

/// Who a callback goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    Subscription {
        id: String,
    },
    /// A call's own `callback_url`, signed with the fleet's secrets.
    Call {
        url: String,
    },
}

/// One callback to one receiver: the body as signed, and which attempt this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackJob {
    pub webhook_id: String,
    pub target: Target,
    pub event_type: EventType,
    pub call_id: String,
    pub event_at: DateTime<Utc>,
    /// The JSON body, byte for byte what is signed and sent on every attempt.
    pub payload: String,
    pub attempt: u32,
}

impl CallbackJob {
    pub fn message(&self, deliver_at: Option<DateTime<Utc>>) -> Message {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut message = Message::new(WorkQueue::Callbacks, body)
            .with_id(format!("{}-a{}", self.webhook_id, self.attempt))
            .with_header(headers::TRACE_ID, self.call_id.clone());
        message.deliver_at = deliver_at;
        message
    }

    pub fn parse(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("undecodable callback: {e}"))
    }

    /// The delivery log it is recorded in.
    pub fn log_id(&self) -> String {
        match &self.target {
            Target::Subscription { id } => id.clone(),
            Target::Call { .. } => call_subscription_id(&self.call_id),
        }
    }
}

/// The body receivers get: `{type, timestamp, data}` (the Standard Webhooks shape).
pub fn payload(kind: EventType, at: DateTime<Utc>, data: serde_json::Value) -> String {
    serde_json::json!({
        "type": kind.as_str(),
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": data,
    })
    .to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum CallBookError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("call record {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("call {0} is being updated concurrently; gave up after repeated conflicts")]
    Contended(String),
}

impl CallBookError {
    pub fn class(&self) -> ErrorClass {
        match self {
            CallBookError::Store(_) | CallBookError::Contended(_) => ErrorClass::Retryable,
            CallBookError::Corrupt { .. } => ErrorClass::Permanent,
        }
    }
}

/// Filters for listing calls.
#[derive(Debug, Clone, Default)]
pub struct CallFilter {
    pub status: Option<CallStatus>,
    pub direction: Option<Direction>,
    pub tag: Option<String>,
}

impl CallFilter {
    fn matches(&self, call: &Call) -> bool {
        self.status.is_none_or(|s| call.status == s)
            && self.direction.is_none_or(|d| call.direction == d)
            && self.tag.as_ref().is_none_or(|t| call.tags.contains(t))
    }
}

/// A page of calls, newest first.
#[derive(Debug, Clone)]
pub struct CallPage {
    pub calls: Vec<Call>,
    pub next_cursor: Option<String>,
}

/// How many index entries one filtered listing may scan before answering with what it has
/// (and a cursor to continue), so a rare filter cannot make one request scan everything.
const MAX_SCAN: usize = 2_000;
const CAS_ATTEMPTS: usize = 32;

/// A call with the version of the record it was read from.
#[derive(Debug, Clone)]
pub struct Held {
    pub call: Call,
    pub version: u64,
}

/// A held call reads as the call (the version only matters to the next write).
impl std::ops::Deref for Held {
    type Target = Call;

    fn deref(&self) -> &Call {
        &self.call
    }
}

/// Typed access to call records.
#[derive(Clone)]
pub struct CallBook {
    store: Arc<dyn Store>,
}

fn encode(call: &Call) -> Bytes {
    Bytes::from(serde_json::to_vec(call).unwrap_or_default())
}

/// The events a change from `before` to `after` announces, encoded for the event log.
fn events_of(before: Option<&[TimelineEntry]>, after: &Call) -> Vec<Bytes> {
    CallEvent::of_change(before, after)
        .iter()
        .filter_map(|e| serde_json::to_vec(e).ok().map(Bytes::from))
        .collect()
}

impl CallBook {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stores a new call and indexes it for listing; false if the id already exists.
    /// Stores a new call; its JSON (what the API shows for it) when created, `None` when
    /// the id is taken. Handing the JSON back lets the ingress answer without encoding the
    /// call a second time.
    pub async fn create(&self, call: &Call) -> Result<Option<Bytes>, CallBookError> {
        let json = encode(call);
        let created = self
            .store
            .create_record(
                &call.id,
                json.clone(),
                Some(call.created_at.timestamp_millis()),
                // On the sweeper's watch list from the moment it exists.
                call.look_at().map(|at| at.timestamp_millis()),
                &events_of(None, call),
            )
            .await?;
        Ok(created.then_some(json))
    }

    async fn get_versioned(&self, id: &str) -> Result<Option<(Call, u64)>, CallBookError> {
        let Some(record) = self.store.get_record(id).await? else {
            return Ok(None);
        };
        let call = serde_json::from_slice(&record.data).map_err(|e| CallBookError::Corrupt {
            id: id.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Some((call, record.version)))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Call>, CallBookError> {
        Ok(self.get_versioned(id).await?.map(|(call, _)| call))
    }

    /// The call and the version of its record (what [`CallBook::update_held`] starts from).
    pub async fn get_held(&self, id: &str) -> Result<Option<Held>, CallBookError> {
        Ok(self
            .get_versioned(id)
            .await?
            .map(|(call, version)| Held { call, version }))
    }

    /// Applies `change` to the current record and writes it back only if nobody wrote in
    /// between (re-reading and re-applying on conflict). `change` must be a pure function
    /// of the call it is given. A change that leaves the call as it was writes nothing.
    /// `Ok(None)` when there is no such call.
    pub async fn update<T>(
        &self,
        id: &str,
        change: impl FnMut(&mut Call) -> T,
    ) -> Result<Option<(Call, T)>, CallBookError> {
        Ok(self
            .cas(id, None, change)
            .await?
            .map(|(held, value)| (held.call, value)))
    }

    /// [`CallBook::update`] starting from a call already read (`held`): no read first,
    /// unless someone wrote since (then re-read and re-applied, as `update` does). A
    /// worker that keeps the call it holds saves a store round trip per step.
    pub async fn update_held<T>(
        &self,
        held: Held,
        change: impl FnMut(&mut Call) -> T,
    ) -> Result<Option<(Held, T)>, CallBookError> {
        let id = held.call.id.clone();
        self.cas(&id, Some(held), change).await
    }

    async fn cas<T>(
        &self,
        id: &str,
        mut known: Option<Held>,
        mut change: impl FnMut(&mut Call) -> T,
    ) -> Result<Option<(Held, T)>, CallBookError> {
        for _ in 0..CAS_ATTEMPTS {
            let held = match known.take() {
                Some(held) => held,
                None => match self.get_held(id).await? {
                    Some(held) => held,
                    None => return Ok(None),
                },
            };
            let Held { mut call, version } = held;
            let before = encode(&call);
            let previous = call.timeline.clone();
            let (was_final, was_due) = (call.status.is_terminal(), call.scheduled_for);
            let value = change(&mut call);
            let after = encode(&call);
            if before == after {
                return Ok(Some((Held { call, version }, value)));
            }
            let events = events_of(Some(&previous), &call);
            match self
                .store
                .update_record(id, version, after, &events)
                .await?
            {
                CasOutcome::Updated(version) => {
                    self.rewatch(&call, was_final, was_due).await;
                    return Ok(Some((Held { call, version }, value)));
                }
                CasOutcome::Conflict => continue,
            }
        }
        Err(CallBookError::Contended(id.to_owned()))
    }

    /// Keeps the sweeper's watch list in step with a change: off it once final, moved
    /// when the call's due time moved. A failure here only makes the sweeper look early
    /// (or at a final call, which it then drops), so it is logged, not returned.
    async fn rewatch(&self, call: &Call, was_final: bool, was_due: Option<DateTime<Utc>>) {
        let result = match call.look_at() {
            None if !was_final => self.store.unwatch(&call.id).await,
            Some(at) if call.scheduled_for != was_due => {
                self.store.watch(&call.id, at.timestamp_millis()).await
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(call_id = %call.id, error = %e, "watch list not updated");
        }
    }

    /// Calls matching `filter`, newest first, at most `limit`, continuing after `cursor`.
    pub async fn list(
        &self,
        filter: &CallFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<CallPage, CallBookError> {
        let mut calls = Vec::new();
        let mut cursor = cursor.map(str::to_owned);
        let mut scanned = 0;
        loop {
            let page = self.store.list_index(cursor.as_deref(), limit).await?;
            for id in &page.ids {
                scanned += 1;
                let Some(call) = self.get(id).await? else {
                    continue;
                };
                cursor = Some(index_cursor(call.created_at.timestamp_millis(), &call.id));
                if filter.matches(&call) {
                    calls.push(call);
                    if calls.len() == limit {
                        // More may follow; the caller finds out with the cursor.
                        return Ok(CallPage {
                            calls,
                            next_cursor: cursor,
                        });
                    }
                }
            }
            if page.next.is_none() {
                return Ok(CallPage {
                    calls,
                    next_cursor: None,
                });
            }
            if scanned >= MAX_SCAN {
                return Ok(CallPage {
                    calls,
                    next_cursor: cursor,
                });
            }
            cursor = page.next;
        }
    }
}

/// The wall-clock instant at which `clock` will read `at` (broker delays run on wall time).
pub fn wall_time(clock: &dyn Clock, at: DateTime<Utc>) -> DateTime<Utc> {
    Utc::now() + (at - clock.now())
}
