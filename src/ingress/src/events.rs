//! `GET /v1/events`: the live stream of call changes (Server-Sent Events).
//!
//! Every ingress tails the shared event log (the Redis stream every worker's call changes
//! are appended to) and fans it out to its clients, so a change made anywhere reaches a
//! client connected anywhere. A client that reconnects with `Last-Event-ID` first gets
//! what it missed from the log's bounded history, then the live tail. A client too slow to
//! keep up is told so and disconnected: its backlog never grows past the hub's buffer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use callfleet_core::domain::events::{CallEvent, EventType};
use callfleet_core::domain::{CallStatus, Direction};
use callfleet_core::ports::{EventId, EventLog};
use callfleet_core::telemetry::metrics as m;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{ApiError, IngressState};

/// How many events the log is asked for at once.
const PAGE: usize = 500;
/// How long one tail read waits for news before asking again.
const TAIL_BLOCK: Duration = Duration::from_secs(1);

/// One event as the stream sends it, encoded once for every client.
pub struct StreamEvent {
    pub id: EventId,
    pub event: CallEvent,
    /// JSON with full numbers, and with masked ones.
    full: String,
    masked: String,
}

impl StreamEvent {
    fn new(id: EventId, mut event: CallEvent) -> Self {
        // The call's own callback URL is the dispatcher's business, not the stream's.
        event.callback_url = None;
        let full = data_json(id, &event);
        let masked = data_json(id, &event.clone().masked());
        Self {
            id,
            event,
            full,
            masked,
        }
    }

    fn decode(id: EventId, data: &[u8]) -> Option<Self> {
        serde_json::from_slice::<CallEvent>(data)
            .ok()
            .map(|event| Self::new(id, event))
    }
}

fn data_json(id: EventId, event: &CallEvent) -> String {
    let mut value = serde_json::to_value(event).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("id".into(), id.to_string().into());
    }
    value.to_string()
}

/// The process's tail of the event log, fanned out to its stream clients.
pub struct EventHub {
    log: Arc<dyn EventLog>,
    /// One permit per client served; none left means 503.
    clients: Arc<tokio::sync::Semaphore>,
    tx: broadcast::Sender<Arc<StreamEvent>>,
    heartbeat: Duration,
    /// Ends every client's stream (the server is stopping).
    closing: CancellationToken,
    _stop: DropGuard,
}

impl EventHub {
    /// Starts tailing `log` from its newest event. `buffer` bounds how far behind a client
    /// may fall before it is disconnected; `heartbeat` is the idle keep-alive interval;
    /// `closing` ends the tail and every client's stream.
    pub fn start(
        log: Arc<dyn EventLog>,
        buffer: usize,
        heartbeat: Duration,
        max_clients: usize,
        closing: CancellationToken,
    ) -> Arc<Self> {
        let (tx, _) = broadcast::channel(buffer.max(16));
        // Also ends when the hub is dropped (an ingress state that was never served).
        let stop = closing.child_token();
        tokio::spawn(tail(Arc::clone(&log), tx.clone(), stop.clone()));
        Arc::new(Self {
            log,
            clients: Arc::new(tokio::sync::Semaphore::new(max_clients.max(1))),
            tx,
            heartbeat,
            closing,
            _stop: stop.drop_guard(),
        })
    }
}

async fn tail(
    log: Arc<dyn EventLog>,
    tx: broadcast::Sender<Arc<StreamEvent>>,
    stop: CancellationToken,
) {
    let mut after = loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            bounds = log.bounds() => match bounds {
                Ok(bounds) => break bounds.map(|(_, last)| last),
                Err(e) => {
                    tracing::warn!(error = %e, "event log unreachable; the stream waits");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    };
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            read = log.read(after, PAGE, Some(TAIL_BLOCK)) => read,
        };
        match read {
            Ok(events) => {
                for logged in events {
                    after = Some(logged.id);
                    if let Some(event) = StreamEvent::decode(logged.id, &logged.data) {
                        // No receivers is fine: nobody is watching.
                        let _ = tx.send(Arc::new(event));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the event log failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamParams {
    direction: Option<String>,
    status: Option<String>,
    profile: Option<String>,
    organization: Option<String>,
    call_id: Option<String>,
    /// Comma-separated event types (`call.completed,call.failed`).
    #[serde(rename = "type")]
    types: Option<String>,
    /// For clients that cannot set the header (EventSource polyfills, curl scripts).
    last_event_id: Option<String>,
}

/// Which events a client asked for.
#[derive(Debug, Default)]
struct Filter {
    direction: Option<Direction>,
    status: Option<CallStatus>,
    profile: Option<String>,
    organization: Option<String>,
    call_id: Option<String>,
    types: Option<Vec<EventType>>,
}

impl Filter {
    fn parse(p: &StreamParams) -> Result<Self, ApiError> {
        let invalid = |field: &str, message: String| ApiError::Invalid {
            field: field.into(),
            message,
        };
        let direction = match p.direction.as_deref() {
            None => None,
            Some("inbound") => Some(Direction::Inbound),
            Some("outbound") => Some(Direction::Outbound),
            Some(other) => {
                return Err(invalid(
                    "direction",
                    format!("unknown direction {other:?}; expected inbound or outbound"),
                ))
            }
        };
        let status = match p.status.as_deref() {
            None => None,
            Some(s) => Some(
                CallStatus::parse(s)
                    .ok_or_else(|| invalid("status", format!("unknown status {s:?}")))?,
            ),
        };
        let types = match p.types.as_deref() {
            None => None,
            Some(list) => Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        EventType::parse(t)
                            .ok_or_else(|| invalid("type", format!("unknown event type {t:?}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Self {
            direction,
            status,
            profile: p.profile.clone(),
            organization: p.organization.clone(),
            call_id: p.call_id.clone(),
            types,
        })
    }

    fn matches(&self, e: &CallEvent) -> bool {
        self.direction.is_none_or(|d| e.direction == d)
            && self.status.is_none_or(|s| e.status == s)
            && self
                .profile
                .as_ref()
                .is_none_or(|p| e.profile_id.as_ref() == Some(p))
            && self
                .organization
                .as_ref()
                .is_none_or(|o| e.organization.as_ref() == Some(o))
            && self.call_id.as_ref().is_none_or(|c| &e.call_id == c)
            && self.types.as_ref().is_none_or(|t| t.contains(&e.kind))
    }
}

/// One client's stream: the history it asked to resume from, then the live tail.
struct Client {
    log: Arc<dyn EventLog>,
    rx: broadcast::Receiver<Arc<StreamEvent>>,
    filter: Filter,
    full_numbers: bool,
    /// Still to read from the log after this id (a resume), `None` once caught up.
    history: Option<EventId>,
    backlog: VecDeque<Arc<StreamEvent>>,
    last_sent: Option<EventId>,
    /// A note to send before anything else (history gap).
    notice: Option<Event>,
    /// It fell behind the live tail once and caught up from the log.
    caught_up_once: bool,
    done: bool,
    closing: CancellationToken,
    _connected: ClientGauge,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

struct ClientGauge;

impl ClientGauge {
    fn new() -> Self {
        metrics::gauge!(m::STREAM_CLIENTS).increment(1.0);
        Self
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::STREAM_CLIENTS).decrement(1.0);
    }
}

impl Client {
    fn event(&mut self, e: &StreamEvent) -> Option<Event> {
        if self.last_sent.is_some_and(|last| e.id <= last) {
            return None;
        }
        self.last_sent = Some(e.id);
        if !self.filter.matches(&e.event) {
            return None;
        }
        metrics::counter!(m::STREAM_EVENTS).increment(1);
        let data = if self.full_numbers {
            &e.full
        } else {
            &e.masked
        };
        Some(
            Event::default()
                .id(e.id.to_string())
                .event(e.event.kind.as_str())
                .data(data),
        )
    }

    async fn next(&mut self) -> Option<Event> {
        if let Some(notice) = self.notice.take() {
            return Some(notice);
        }
        loop {
            if self.done {
                return None;
            }
            while let Some(e) = self.backlog.pop_front() {
                if let Some(event) = self.event(&e) {
                    return Some(event);
                }
            }
            if let Some(after) = self.history {
                match self.log.read(Some(after), PAGE, None).await {
                    Ok(page) => {
                        self.history = (page.len() == PAGE)
                            .then(|| page.last().map(|e| e.id))
                            .flatten();
                        for logged in page {
                            if let Some(e) = StreamEvent::decode(logged.id, &logged.data) {
                                self.backlog.push_back(Arc::new(e));
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "stream history unavailable");
                        self.done = true;
                        return Some(error_event(
                            "unavailable",
                            "the event history could not be read; reconnect with Last-Event-ID",
                            self.last_sent,
                        ));
                    }
                }
            }
            let received = tokio::select! {
                _ = self.closing.cancelled() => return None,
                received = self.rx.recv() => received,
            };
            match received {
                Ok(e) => {
                    if let Some(event) = self.event(&e) {
                        return Some(event);
                    }
                }
                // Fell behind once (a resume reading a long history while the live tail
                // moved on, a burst): catch up from the log, which costs no memory here.
                Err(broadcast::error::RecvError::Lagged(_))
                    if !self.caught_up_once && self.last_sent.is_some() =>
                {
                    self.caught_up_once = true;
                    self.rx = self.rx.resubscribe();
                    self.history = self.last_sent;
                }
                // Behind again: this client cannot keep up.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!(m::STREAM_EVENTS_DROPPED).increment(missed);
                    self.done = true;
                    return Some(error_event(
                        "too_slow",
                        "this client fell too far behind the live stream and was disconnected; reconnect with Last-Event-ID to resume",
                        self.last_sent,
                    ));
                }
                Err(broadcast::error::RecvError::Closed) => self.done = true,
            }
        }
    }
}

fn error_event(code: &str, message: &str, last: Option<EventId>) -> Event {
    let data = serde_json::json!({
        "error": {"code": code, "message": message},
        "last_event_id": last.map(|id| id.to_string()),
    });
    Event::default().event("error").data(data.to_string())
}

/// `GET /v1/events`
pub async fn stream(
    State(state): State<IngressState>,
    headers: HeaderMap,
    params: Result<Query<StreamParams>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let params = crate::routing::query(params)?;
    let filter = Filter::parse(&params)?;
    let hub = Arc::clone(&state.events);
    let slot = Arc::clone(&hub.clients).try_acquire_owned().map_err(|_| {
        tracing::warn!("stream client refused: CALLFLEET_STREAM_MAX_CLIENTS reached");
        ApiError::Unavailable { retry_after_s: 5 }
    })?;
    // Subscribed before the history is read, so nothing falls between the two.
    let rx = hub.tx.subscribe();
    let header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (field, resume) = match header {
        Some(id) => ("Last-Event-ID", Some(id)),
        None => ("last_event_id", params.last_event_id),
    };
    let resume = match resume.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => Some(EventId::parse(raw).ok_or_else(|| ApiError::Invalid {
            field: field.into(),
            message: format!("{raw:?} is not an event id from this stream (<ms>-<seq>)"),
        })?),
    };
    let mut notice = None;
    if let Some(from) = resume {
        let bounds = hub
            .log
            .bounds()
            .await
            .map_err(|e| crate::calls::unavailable("store", e))?;
        if let Some((oldest, _)) = bounds {
            if from < oldest {
                let data = serde_json::json!({
                    "message": "events between Last-Event-ID and the oldest kept event are no longer available; resuming from the oldest kept",
                    "oldest_kept": oldest.to_string(),
                });
                notice = Some(Event::default().event("gap").data(data.to_string()));
            }
        }
    }
    let client = Client {
        log: Arc::clone(&hub.log),
        rx,
        filter,
        full_numbers: crate::sees_numbers(&state, &headers),
        history: resume,
        backlog: VecDeque::new(),
        last_sent: resume,
        notice,
        caught_up_once: false,
        done: false,
        closing: hub.closing.clone(),
        _connected: ClientGauge::new(),
        _slot: slot,
    };
    let stream = futures::stream::unfold(client, |mut client| async move {
        client.next().await.map(|event| (Ok(event), client))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(hub.heartbeat)))
}
