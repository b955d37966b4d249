//! Signed callbacks: the dispatcher turns call events into one broker message per event
//! and receiver; the callback handler delivers each, signed per Standard Webhooks, and
//! retries on its own schedule (about a day by default) through the broker.
//!
//! At least once, never lost: the dispatcher moves its cursor in the event log only after
//! the broker confirmed every message of a batch, so a crash republishes (same message
//! and `webhook-id`), never skips. A callback delivered once is remembered by its
//! `webhook-id`, so a republished copy is not sent again; a receiver that still sees two
//! (an answer lost on the way back) sees the same `webhook-id` twice.
//!
//! A receiver that is down or slow costs its own callbacks: deliveries run on their own
//! worker runtime (never the call jobs' slots), each attempt is bounded by a timeout, and
//! one receiver may hold only part of the slots at once (a quarter of the worker's slots
//! at most wait for them in-process; the rest wait in the broker). With spare CPU the calls go on at their
//! rate; on a saturated machine retries compete for CPU like any work (README benchmarks).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callfleet_core::callback::{check_literal_host, sign_headers};
use callfleet_core::calls::{payload, wall_time, CallbackJob, Clock, Target};
use callfleet_core::domain::events::CallEvent;
use callfleet_core::domain::subscription::{
    DeliveryOutcome, DeliveryRecord, SigningSecret, Subscription,
};
use callfleet_core::ports::subscriptions::SubscriptionStore;
use callfleet_core::ports::{Broker, EventId, EventLog, Message, Store, StoreError, WorkQueue};
use callfleet_core::telemetry::metrics as m;
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{Handler, HandlerOutcome};

/// The dispatcher's name for its cursor and its leadership lock.
const DISPATCHER: &str = "callbacks";
/// How long a dispatcher leads without renewing (a dead one is replaced after this).
const LEAD_TTL: Duration = Duration::from_secs(10);
/// Events read per batch.
const BATCH: usize = 500;
/// How long after its last possible retry a delivered callback's `webhook-id` is still
/// remembered (a republished copy comes within the retry horizon, or a replay soon after).
const DELIVERED_MARGIN: Duration = Duration::from_secs(24 * 3600);
/// Receivers whose slots a worker keeps before it forgets the idle ones.
const MAX_RECEIVERS_KEPT: usize = 1_024;
/// Wait before a callback whose receiver has every slot busy is tried again.
const RECEIVER_BUSY: Duration = Duration::from_millis(250);

/// How callbacks are delivered.
#[derive(Debug, Clone)]
pub struct CallbackSettings {
    /// Waits between attempts: a callback gets `schedule.len() + 1` attempts.
    pub schedule: Vec<Duration>,
    /// One attempt's bound.
    pub timeout: Duration,
    /// Deliver to loopback and private addresses (dev mode).
    pub allow_private: bool,
    /// The fleet's secrets, newest first, for calls' own `callback_url`s.
    pub default_secrets: Vec<SigningSecret>,
    /// Deliveries a worker runs at once.
    pub concurrency: usize,
    /// Deliveries a worker runs at once to one receiver.
    pub per_receiver: usize,
}

impl Default for CallbackSettings {
    fn default() -> Self {
        Self {
            schedule: [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            timeout: Duration::from_secs(10),
            allow_private: false,
            default_secrets: Vec::new(),
            concurrency: 64,
            per_receiver: 32,
        }
    }
}

/// The callbacks one event makes: one per subscription that wants it, and one to the
/// call's own URL. Pure, so a republished batch makes exactly the same messages.
pub fn fan_out(id: EventId, event: &CallEvent, subscriptions: &[Subscription]) -> Vec<CallbackJob> {
    if !event.kind.is_callback() {
        return Vec::new();
    }
    let mut data = event.clone();
    let own_url = data.callback_url.take();
    let mut data = serde_json::to_value(&data).unwrap_or_default();
    if let Some(object) = data.as_object_mut() {
        object.insert("event_id".into(), id.to_string().into());
    }
    let body = payload(event.kind, event.at, data);
    let job = |webhook_id: String, target: Target| CallbackJob {
        webhook_id,
        target,
        event_type: event.kind,
        call_id: event.call_id.clone(),
        event_at: event.at,
        payload: body.clone(),
        attempt: 1,
    };
    let mut jobs: Vec<CallbackJob> = subscriptions
        .iter()
        .filter(|s| {
            s.wants(
                event.kind,
                event.direction,
                &event.tags,
                event.organization.as_deref(),
            )
        })
        .map(|s| {
            job(
                format!("msg_{id}_{}", s.id),
                Target::Subscription { id: s.id.clone() },
            )
        })
        .collect();
    if let Some(url) = own_url {
        jobs.push(job(format!("msg_{id}_call"), Target::Call { url }));
    }
    jobs
}

/// Reads the event log and queues callbacks; one worker leads at a time.
pub struct Dispatcher {
    pub events: Arc<dyn EventLog>,
    pub store: Arc<dyn Store>,
    pub subscriptions: Arc<dyn SubscriptionStore>,
    pub broker: Arc<dyn Broker>,
}

impl Dispatcher {
    /// Leads whenever no other worker does, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let lock = format!("lead:{DISPATCHER}");
        loop {
            let token = match self.store.try_lock(&lock, LEAD_TTL).await {
                Ok(Some(token)) => token,
                Ok(None) => {
                    if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "callback dispatcher cannot reach the store");
                    if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            tracing::debug!("leading the callback dispatch");
            self.lead(&lock, &token, &stop).await;
            let _ = self.store.unlock(&lock, &token).await;
            if stop.is_cancelled() {
                return;
            }
        }
    }

    async fn lead(
        &self,
        lock: &str,
        token: &callfleet_core::ports::store::LockToken,
        stop: &CancellationToken,
    ) {
        let mut cursor = match self.start().await {
            Ok(cursor) => {
                self.warn_if_trimmed(cursor).await;
                cursor
            }
            Err(e) => {
                tracing::warn!(error = %e, "callback dispatcher cannot read its cursor");
                let _ = sleep_or_stop(stop, Duration::from_secs(1)).await;
                return;
            }
        };
        loop {
            match self.store.extend_lock(lock, token, LEAD_TTL).await {
                Ok(true) => {}
                // Lost the lead (paused too long): another worker dispatches now.
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "callback dispatcher lost the store");
                    let _ = sleep_or_stop(stop, Duration::from_secs(1)).await;
                    return;
                }
            }
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                read = self.events.read(cursor, BATCH, Some(Duration::from_secs(1))) => read,
            };
            let batch = match read {
                Ok(batch) if batch.is_empty() => continue,
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "callback dispatcher cannot read events");
                    if sleep_or_stop(stop, Duration::from_millis(500)).await {
                        return;
                    }
                    continue;
                }
            };
            match self.dispatch(&batch).await {
                Ok(()) => {
                    let last = batch.last().map(|e| e.id);
                    if let Some(last) = last {
                        if let Err(e) = self.events.set_cursor(DISPATCHER, last).await {
                            // Not moved: the batch is queued again (same ids), never lost.
                            tracing::warn!(error = %e, "callback cursor not saved");
                            continue;
                        }
                        cursor = Some(last);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "callbacks not queued; retrying the batch");
                    if sleep_or_stop(stop, Duration::from_millis(500)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Where to read from: the saved cursor, or (the very first time) the start of the
    /// log, so events of calls taken before any worker ran are still announced.
    async fn start(&self) -> Result<Option<EventId>, StoreError> {
        self.events.cursor(DISPATCHER).await
    }

    /// The log was trimmed past where dispatching stopped (the workers were down longer
    /// than the log's history): the events in between are gone, so say so loudly.
    async fn warn_if_trimmed(&self, cursor: Option<EventId>) {
        if let (Some(cursor), Ok(Some((oldest, _)))) = (cursor, self.events.bounds().await) {
            if cursor < oldest {
                metrics::counter!(m::CALLBACKS, "result" => "trimmed").increment(1);
                tracing::error!(
                    %cursor, %oldest,
                    "callbacks for the events between the dispatcher's cursor and the oldest kept event are lost: raise CALLFLEET_EVENT_RETENTION"
                );
            }
        }
    }

    async fn dispatch(&self, batch: &[callfleet_core::ports::LoggedEvent]) -> Result<(), String> {
        let subscriptions = self.subscriptions.list().await.map_err(|e| e.to_string())?;
        let mut messages = Vec::new();
        for logged in batch {
            let Ok(event) = serde_json::from_slice::<CallEvent>(&logged.data) else {
                tracing::warn!(event_id = %logged.id, "undecodable call event skipped");
                continue;
            };
            for job in fan_out(logged.id, &event, &subscriptions) {
                messages.push(job.message(None));
            }
        }
        if messages.is_empty() {
            return Ok(());
        }
        let count = messages.len();
        let results = self.broker.publish_many(messages).await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(e.to_string());
        }
        metrics::counter!(m::JOBS_ENQUEUED, "queue" => "callbacks").increment(count as u64);
        Ok(())
    }
}

/// Sleeps for `wait`; true if `stop` came first.
async fn sleep_or_stop(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

/// Delivers callbacks (consumes `callbacks`).
pub struct CallbackHandler {
    store: Arc<dyn Store>,
    subscriptions: Arc<dyn SubscriptionStore>,
    broker: Arc<dyn Broker>,
    clock: Arc<dyn Clock>,
    client: reqwest::Client,
    settings: CallbackSettings,
    receivers: Mutex<HashMap<String, Arc<Receiver>>>,
}

/// One receiver's share of a worker's deliveries.
struct Receiver {
    slots: Arc<Semaphore>,
    /// Callbacks waiting in-process for one of `slots`.
    waiting: AtomicUsize,
    /// Deliveries in a row that found every slot taken: each waits longer, so callbacks
    /// queued for a slow receiver do not cycle through the broker every few milliseconds.
    busy_streak: AtomicU32,
}

/// How one attempt went.
enum Sent {
    Status(u16),
    Failed(String),
}

impl CallbackHandler {
    pub fn new(
        store: Arc<dyn Store>,
        subscriptions: Arc<dyn SubscriptionStore>,
        broker: Arc<dyn Broker>,
        clock: Arc<dyn Clock>,
        settings: CallbackSettings,
    ) -> Result<Self, reqwest::Error> {
        let client =
            callfleet_core::callback::guarded_client(settings.allow_private, settings.timeout)?;
        Ok(Self {
            store,
            subscriptions,
            broker,
            clock,
            client,
            settings,
            receivers: Mutex::default(),
        })
    }

    /// The slots of one receiver (a URL's scheme, host and port: every call's own URL on
    /// one host shares them). Idle receivers are forgotten once many were seen.
    fn receiver_slots(&self, url: &str) -> Arc<Receiver> {
        let receiver = reqwest::Url::parse(url)
            .map(|u| {
                format!(
                    "{}://{}:{}",
                    u.scheme(),
                    u.host_str().unwrap_or(""),
                    u.port_or_known_default().unwrap_or(0)
                )
            })
            .unwrap_or_else(|_| url.to_owned());
        let full = self.settings.per_receiver.max(1);
        let mut receivers = self.receivers.lock();
        if receivers.len() > MAX_RECEIVERS_KEPT {
            receivers.retain(|_, r| r.slots.available_permits() < full);
        }
        Arc::clone(receivers.entry(receiver).or_insert_with(|| {
            Arc::new(Receiver {
                slots: Arc::new(Semaphore::new(full)),
                waiting: AtomicUsize::new(0),
                busy_streak: AtomicU32::new(0),
            })
        }))
    }

    /// One of the receiver's slots: at once, or after waiting in-process for one (at most
    /// one attempt's timeout) if few others wait for this receiver already. Only callbacks
    /// beyond that go back through the broker, so a busy receiver neither spins callbacks
    /// through RabbitMQ nor takes every delivery slot of the worker from other receivers.
    async fn take_slot(&self, receiver: &Receiver) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = Arc::clone(&receiver.slots).try_acquire_owned() {
            return Some(slot);
        }
        // Waiters hold delivery slots of the worker too: a quarter of them at most, so other
        // receivers always have the rest.
        let may_wait = self
            .settings
            .per_receiver
            .min(self.settings.concurrency / 4)
            .max(1);
        let waiting = receiver.waiting.fetch_add(1, Ordering::AcqRel);
        let slot = if waiting < may_wait {
            tokio::time::timeout(
                self.settings.timeout,
                Arc::clone(&receiver.slots).acquire_owned(),
            )
            .await
            .ok()
            .and_then(Result::ok)
        } else {
            None
        };
        receiver.waiting.fetch_sub(1, Ordering::AcqRel);
        slot
    }

    async fn record(
        &self,
        job: &CallbackJob,
        outcome: DeliveryOutcome,
        sent: Option<&Sent>,
        took: Duration,
    ) {
        let (status_code, error) = match sent {
            Some(Sent::Status(code)) => (Some(*code), None),
            Some(Sent::Failed(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        let record = DeliveryRecord {
            webhook_id: job.webhook_id.clone(),
            event_type: job.event_type,
            call_id: job.call_id.clone(),
            attempt: job.attempt,
            at: self.clock.now(),
            status_code,
            error,
            duration_ms: took.as_millis() as u64,
            outcome,
        };
        metrics::counter!(m::CALLBACKS, "result" => outcome.as_str()).increment(1);
        if let Err(e) = self
            .subscriptions
            .record_delivery(&job.log_id(), &record)
            .await
        {
            tracing::warn!(error = %e, "delivery not logged");
        }
    }

    async fn send(&self, url: &str, secrets: &[SigningSecret], job: &CallbackJob) -> Sent {
        let url = match reqwest::Url::parse(url) {
            Ok(url) => url,
            Err(e) => return Sent::Failed(format!("bad URL: {e}")),
        };
        if let Err(e) = check_literal_host(&url, self.settings.allow_private) {
            return Sent::Failed(e.to_string());
        }
        let timestamp = self.clock.now().timestamp();
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/json");
        for (name, value) in
            sign_headers(&job.webhook_id, timestamp, job.payload.as_bytes(), secrets)
        {
            request = request.header(name, value);
        }
        match request.body(job.payload.clone()).send().await {
            Ok(response) => Sent::Status(response.status().as_u16()),
            // The chain names the cause (refused, timed out, a refused address…).
            Err(e) => Sent::Failed(error_chain(&e)),
        }
    }

    async fn deliver(&self, job: &CallbackJob) -> Result<HandlerOutcome, StoreError> {
        let delivered = format!("cb-delivered:{}", job.webhook_id);
        if self.store.get_key(&delivered).await?.is_some() {
            return Ok(HandlerOutcome::Done);
        }
        let (url, secrets, subscription) = match &job.target {
            Target::Subscription { id } => match self.subscriptions.get(id).await? {
                // Deleted, with its log: nothing to send or record.
                None => return Ok(HandlerOutcome::Done),
                Some(sub) if !sub.enabled => {
                    self.record(job, DeliveryOutcome::Skipped, None, Duration::ZERO)
                        .await;
                    return Ok(HandlerOutcome::Done);
                }
                Some(sub) => (sub.url.clone(), sub.signing_secrets(), Some(sub)),
            },
            Target::Call { url } => (url.clone(), self.settings.default_secrets.clone(), None),
        };
        if secrets.is_empty() {
            let reason = "no signing secret: set CALLFLEET_CALLBACK_SECRETS".to_owned();
            self.record(
                job,
                DeliveryOutcome::DeadLettered,
                Some(&Sent::Failed(reason.clone())),
                Duration::ZERO,
            )
            .await;
            return Ok(HandlerOutcome::DeadLetter { reason });
        }
        let receiver = self.receiver_slots(&url);
        let Some(slot) = self.take_slot(&receiver).await else {
            let streak = receiver.busy_streak.fetch_add(1, Ordering::Relaxed).min(5);
            return Ok(HandlerOutcome::Defer {
                after: jitter(RECEIVER_BUSY * (1 << streak)),
                reason: "the receiver has every slot busy".into(),
            });
        };
        receiver.busy_streak.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let sent = self.send(&url, &secrets, job).await;
        let took = started.elapsed();
        // The receiver's part is done: its slot goes to the next callback now, not after
        // our own bookkeeping below.
        drop(slot);
        match &sent {
            Sent::Status(code) if (200..300).contains(code) => {
                let remember =
                    self.settings.schedule.iter().sum::<Duration>().mul_f64(1.2) + DELIVERED_MARGIN;
                self.store.claim_key(&delivered, "1", remember).await?;
                let delay = (self.clock.now() - job.event_at)
                    .to_std()
                    .unwrap_or_default();
                metrics::histogram!(m::CALLBACK_DELAY_SECONDS).record(delay.as_secs_f64());
                self.record(job, DeliveryOutcome::Delivered, Some(&sent), took)
                    .await;
                Ok(HandlerOutcome::Done)
            }
            Sent::Status(410) => {
                if let Some(mut sub) = subscription {
                    sub.disable("410 Gone from the receiver", self.clock.now());
                    self.subscriptions.put(&sub).await?;
                    tracing::info!(subscription = %sub.id, "receiver answered 410 Gone: subscription disabled");
                }
                self.record(job, DeliveryOutcome::Disabled, Some(&sent), took)
                    .await;
                Ok(HandlerOutcome::Done)
            }
            _ => {
                let reason = match &sent {
                    Sent::Status(code) => format!("receiver answered {code}"),
                    Sent::Failed(e) => e.clone(),
                };
                let Some(wait) = self
                    .settings
                    .schedule
                    .get(job.attempt as usize - 1)
                    .copied()
                else {
                    self.record(job, DeliveryOutcome::DeadLettered, Some(&sent), took)
                        .await;
                    return Ok(HandlerOutcome::DeadLetter {
                        reason: format!("{} attempts failed; last: {reason}", job.attempt),
                    });
                };
                let next = CallbackJob {
                    attempt: job.attempt + 1,
                    ..job.clone()
                };
                let due =
                    self.clock.now() + chrono::Duration::from_std(jitter(wait)).unwrap_or_default();
                let message = next.message(Some(wall_time(self.clock.as_ref(), due)));
                if let Err(e) = self.broker.publish(message).await {
                    // This attempt is handed back instead (and made again soon).
                    return Ok(HandlerOutcome::RetryAfter {
                        after: Duration::from_secs(1),
                        reason: format!("next attempt not queued: {e}"),
                    });
                }
                self.record(job, DeliveryOutcome::Retrying, Some(&sent), took)
                    .await;
                Ok(HandlerOutcome::Done)
            }
        }
    }
}

/// `wait` ±20 %, so receivers coming back are not hit by every retry at once.
fn jitter(wait: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..=1.2);
    wait.mul_f64(factor)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait]
impl Handler for CallbackHandler {
    fn queue(&self) -> WorkQueue {
        WorkQueue::Callbacks
    }

    async fn handle(&self, message: &Message, _redeliveries: u32) -> HandlerOutcome {
        let job = match CallbackJob::parse(&message.body) {
            Ok(job) => job,
            Err(reason) => return HandlerOutcome::DeadLetter { reason },
        };
        let span = tracing::info_span!("callback", call_id = %job.call_id, webhook_id = %job.webhook_id, attempt = job.attempt);
        match tracing::Instrument::instrument(self.deliver(&job), span).await {
            Ok(outcome) => outcome,
            Err(e) => HandlerOutcome::RetryAfter {
                after: Duration::from_secs(1),
                reason: e.to_string(),
            },
        }
    }
}
