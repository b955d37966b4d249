//! The worker runtime: one subscription per queue a handler serves, a shared concurrency
//! bound, panic isolation, bounded retries and a graceful drain.
//!
//! On shutdown it stops taking new deliveries, gives in-flight jobs until the deadline to
//! finish, then drops the subscriptions (which hands anything unfinished back to the
//! broker) and returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callfleet_core::ports::broker::headers;
use callfleet_core::ports::{Broker, Delivery, Message, WorkQueue};
use callfleet_core::telemetry::metrics as m;
use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What a handler decided about one message.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerOutcome {
    /// Done (the effect and its record are durable): ack.
    Done,
    /// Transient failure: publish again after `after` (counts as an attempt).
    RetryAfter { after: Duration, reason: String },
    /// Cannot succeed: park in the dead-letter queue with the reason.
    DeadLetter { reason: String },
    /// Not a failure, just not now (a limit is full, the job's time has not come): publish
    /// again after `after` without counting an attempt.
    Defer { after: Duration, reason: String },
}

#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The queue this handler consumes.
    fn queue(&self) -> WorkQueue;
    /// Handles one message. Must be idempotent: a message can arrive more than once.
    async fn handle(&self, message: &Message, redeliveries: u32) -> HandlerOutcome;
    /// Told after a message was parked in the dead-letter queue, so the handler can record
    /// it where users look (the call's timeline) and free what the job held.
    async fn dead_lettered(&self, _message: &Message, _reason: &str) {}
}

/// How often a worker samples the depth of the queues it consumes.
const DEPTH_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The delivery limit when none is configured (`CALLFLEET_DELIVERY_LIMIT`'s default).
const DEFAULT_DELIVERY_LIMIT: u32 = 10;

/// How long a delivery that could not be settled waits before it is handed back.
const SETTLE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Header counting broker-delayed retries of one job.
pub const RETRY_HEADER: &str = "x-callfleet-retry";

pub struct WorkerRuntime {
    broker: Arc<dyn Broker>,
    handlers: HashMap<WorkQueue, Arc<dyn Handler>>,
    prefetch: u16,
    concurrency: usize,
    max_retries: u32,
    delivery_limit: u32,
}

impl WorkerRuntime {
    pub fn new(
        broker: Arc<dyn Broker>,
        prefetch: u16,
        concurrency: usize,
        max_retries: u32,
    ) -> Self {
        Self {
            broker,
            handlers: HashMap::new(),
            prefetch,
            concurrency,
            max_retries,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }

    /// Deliveries after which a message that keeps coming back (its worker crashed or
    /// was stopped each time) is parked instead of handled again: the broker's own limit.
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit.max(1);
        self
    }

    pub fn with_handler(mut self, handler: Arc<dyn Handler>) -> Self {
        self.handlers.insert(handler.queue(), handler);
        self
    }

    /// Runs until `stop` is cancelled, then drains for at most `deadline`.
    pub async fn run(
        self,
        stop: CancellationToken,
        deadline: Duration,
    ) -> Result<(), callfleet_core::ports::BrokerError> {
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut subscriptions = Vec::new();
        for (queue, handler) in &self.handlers {
            subscriptions.push((
                *queue,
                Arc::clone(handler),
                self.broker.subscribe(*queue, self.prefetch).await?,
            ));
        }
        let mut jobs: JoinSet<()> = JoinSet::new();
        let mut pullers: JoinSet<()> = JoinSet::new();
        let (job_tx, mut job_rx) = tokio::sync::mpsc::channel::<(
            Arc<dyn Handler>,
            Delivery,
            tokio::sync::OwnedSemaphorePermit,
        )>(1);
        let pull_stop = stop.clone();
        // Subscriptions stay open until in-flight jobs drained, so their acks still land.
        let release = CancellationToken::new();
        for (queue, handler, mut sub) in subscriptions {
            let release = release.clone();
            let permits = Arc::clone(&permits);
            let tx = job_tx.clone();
            let stop = pull_stop.clone();
            pullers.spawn(async move {
                loop {
                    // Take a concurrency slot before taking work, so prefetched messages
                    // are not held hostage by a saturated worker.
                    let permit = tokio::select! {
                        _ = stop.cancelled() => break,
                        p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    };
                    let delivery = tokio::select! {
                        _ = stop.cancelled() => break,
                        d = sub.next() => match d { Some(d) => d, None => break },
                    };
                    if tx.send((Arc::clone(&handler), delivery, permit)).await.is_err() {
                        break;
                    }
                }
                tracing::debug!(queue = queue.as_str(), "stopped consuming");
                release.cancelled().await;
                drop(sub);
            });
        }
        drop(job_tx);
        // Depth of every queue (work queues, delay tiers, dead letters) for dashboards,
        // alerts and autoscaling; the label is the queue's logical name, a bounded set.
        let sampler = {
            let broker = Arc::clone(&self.broker);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(DEPTH_SAMPLE_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Ok(census) = broker.census().await {
                        for (queue, depth) in census {
                            metrics::gauge!(m::QUEUE_DEPTH, "queue" => queue).set(depth as f64);
                        }
                    }
                }
            })
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                next = job_rx.recv() => {
                    let Some((handler, delivery, permit)) = next else {
                        // Every subscription ended (or none was needed): idle until told to stop.
                        stop.cancelled().await;
                        break;
                    };
                    let broker = Arc::clone(&self.broker);
                    let limits = Limits { max_retries: self.max_retries, delivery_limit: self.delivery_limit };
                    // One span per job, carrying the call id the ingress put in the
                    // message's trace header: a call reads from ingress to worker.
                    let span = tracing::info_span!(
                        "job",
                        queue = delivery.queue.as_str(),
                        message_id = %delivery.message.id,
                        redeliveries = delivery.redeliveries,
                        call_id = delivery.message.headers.get(headers::TRACE_ID).map(String::as_str).unwrap_or(""),
                    );
                    jobs.spawn(tracing::Instrument::instrument(async move {
                        run_one(broker, handler, delivery, limits).await;
                        drop(permit);
                    }, span));
                }
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            }
        }
        tracing::info!(in_flight = jobs.len(), "draining in-flight jobs");
        let drained = tokio::time::timeout(deadline, async {
            while jobs.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = jobs.len(),
                "shutdown deadline reached; handing unfinished jobs back to the broker"
            );
            jobs.abort_all();
        }
        // Deliveries still queued for a job slot are dropped unanswered; then dropping the
        // subscriptions closes their channels and all unacked work goes back.
        drop(job_rx);
        release.cancel();
        while pullers.join_next().await.is_some() {}
        sampler.abort();
        Ok(())
    }
}

/// Exponential backoff with full jitter for broker-delayed retries: base 1 s, cap 10 min.
pub fn retry_delay(retry: u32) -> Duration {
    let cap = Duration::from_secs(600);
    let exp = Duration::from_secs(1)
        .saturating_mul(2u32.saturating_pow(retry.min(20)))
        .min(cap);
    let jitter = rand::random::<f64>();
    Duration::from_millis((exp.as_millis() as f64 * (0.5 + 0.5 * jitter)) as u64)
}

#[derive(Clone, Copy)]
struct Limits {
    max_retries: u32,
    delivery_limit: u32,
}

/// Why a delivery is parked before any handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// It arrived on a queue it was not published for (broken routing).
    Misrouted,
    /// It keeps coming back unsettled (its worker crashed or was stopped each time).
    DeliveryLimit,
}

impl Refusal {
    /// The `reason` label of the dead-letter counter.
    fn label(self) -> &'static str {
        match self {
            Refusal::Misrouted => "misrouted",
            Refusal::DeliveryLimit => "delivery_limit",
        }
    }

    fn reason(self, delivery: &Delivery) -> String {
        match self {
            Refusal::Misrouted => format!(
                "misrouted: a {} message arrived on the {} queue",
                delivery.message.queue, delivery.queue
            ),
            Refusal::DeliveryLimit => format!(
                "delivery limit: delivered {} times without being settled",
                delivery.redeliveries + 1
            ),
        }
    }
}

fn refuse(delivery: &Delivery, handler: &dyn Handler, limits: Limits) -> Option<Refusal> {
    let expected = handler.queue();
    if delivery.queue != expected || delivery.message.queue != expected {
        // Broken routing, never work: a handler must not run a message it is not for.
        metrics::counter!(m::MISROUTED, "queue" => delivery.queue.as_str()).increment(1);
        tracing::error!(
            queue = delivery.queue.as_str(),
            published_for = delivery.message.queue.as_str(),
            message_id = %delivery.message.id,
            "message delivered to a queue it was not published for; dead-lettering it"
        );
        return Some(Refusal::Misrouted);
    }
    if delivery.redeliveries >= limits.delivery_limit {
        tracing::error!(
            queue = delivery.queue.as_str(),
            message_id = %delivery.message.id,
            redeliveries = delivery.redeliveries,
            "message keeps coming back unfinished; dead-lettering it"
        );
        return Some(Refusal::DeliveryLimit);
    }
    None
}

/// Parks `message` in the dead-letter queue. The one place dead letters are counted, the
/// same for every broker.
async fn park(
    broker: &dyn Broker,
    queue: WorkQueue,
    message: Message,
    kind: &'static str,
    reason: &str,
) -> Result<(), callfleet_core::ports::BrokerError> {
    broker.dead_letter(message, reason).await?;
    metrics::counter!(m::DEAD_LETTERS, "queue" => queue.as_str(), "reason" => kind).increment(1);
    Ok(())
}

async fn run_one(
    broker: Arc<dyn Broker>,
    handler: Arc<dyn Handler>,
    delivery: Delivery,
    limits: Limits,
) {
    let queue = delivery.queue;
    if let Some(refusal) = refuse(&delivery, handler.as_ref(), limits) {
        let reason = refusal.reason(&delivery);
        let parked = park(
            broker.as_ref(),
            queue,
            delivery.message.clone(),
            refusal.label(),
            &reason,
        );
        let result = match parked.await {
            Ok(()) => {
                // A misrouted message is not this handler's to record.
                if refusal == Refusal::DeliveryLimit {
                    handler.dead_lettered(&delivery.message, &reason).await;
                }
                delivery.acker.ack().await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(queue = queue.as_str(), error = %e, "could not park a refused delivery; handing it back");
            let _ = delivery.acker.requeue().await;
        }
        return;
    }
    let started = Instant::now();
    metrics::gauge!(m::INFLIGHT_JOBS, "queue" => queue.as_str()).increment(1.0);
    let outcome =
        std::panic::AssertUnwindSafe(handler.handle(&delivery.message, delivery.redeliveries))
            .catch_unwind()
            .await;
    metrics::gauge!(m::INFLIGHT_JOBS, "queue" => queue.as_str()).decrement(1.0);
    metrics::histogram!(m::JOB_SECONDS, "queue" => queue.as_str())
        .record(started.elapsed().as_secs_f64());
    let outcome = match outcome {
        Ok(o) => o,
        Err(_) => HandlerOutcome::DeadLetter {
            reason: "handler panicked".into(),
        },
    };
    let label = match &outcome {
        HandlerOutcome::Done => "done",
        HandlerOutcome::RetryAfter { .. } => "retry",
        HandlerOutcome::DeadLetter { .. } => "dead_letter",
        HandlerOutcome::Defer { .. } => "deferred",
    };
    metrics::counter!(m::JOBS_PROCESSED, "queue" => queue.as_str(), "outcome" => label)
        .increment(1);
    let result = match outcome {
        HandlerOutcome::Done => delivery.acker.ack().await,
        HandlerOutcome::RetryAfter { after, reason } => {
            let retries: u32 = delivery
                .message
                .headers
                .get(RETRY_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut next = delivery.message.clone();
            let history = format!(
                "{}{}#{}: {}",
                next.headers
                    .get(headers::ATTEMPTS)
                    .map(|h| format!("{h}; "))
                    .unwrap_or_default(),
                chrono::Utc::now().to_rfc3339(),
                retries + 1,
                reason
            );
            next.headers.insert(headers::ATTEMPTS.into(), history);
            if retries + 1 >= limits.max_retries {
                let reason = format!("retries exhausted: {reason}");
                match park(broker.as_ref(), queue, next, "retries_exhausted", &reason).await {
                    Ok(()) => {
                        handler.dead_lettered(&delivery.message, &reason).await;
                        delivery.acker.ack().await
                    }
                    Err(e) => Err(e),
                }
            } else {
                metrics::counter!(m::JOB_RETRIES, "queue" => queue.as_str()).increment(1);
                next.headers
                    .insert(RETRY_HEADER.into(), (retries + 1).to_string());
                next.deliver_at = Some(
                    chrono::Utc::now() + chrono::Duration::from_std(after).unwrap_or_default(),
                );
                match broker.publish(next).await {
                    Ok(()) => delivery.acker.ack().await,
                    Err(e) => Err(e),
                }
            }
        }
        HandlerOutcome::DeadLetter { reason } => {
            match park(
                broker.as_ref(),
                queue,
                delivery.message.clone(),
                "handler",
                &reason,
            )
            .await
            {
                Ok(()) => {
                    handler.dead_lettered(&delivery.message, &reason).await;
                    delivery.acker.ack().await
                }
                Err(e) => Err(e),
            }
        }
        HandlerOutcome::Defer { after, reason } => {
            tracing::debug!(queue = queue.as_str(), reason = %reason, ?after, "deferred");
            let mut next = delivery.message.clone();
            next.deliver_at =
                Some(chrono::Utc::now() + chrono::Duration::from_std(after).unwrap_or_default());
            match broker.publish(next).await {
                Ok(()) => delivery.acker.ack().await,
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = result {
        // Handed back at once: left unacknowledged on a channel that stays open, it would
        // not come back until that channel closed (at-least-once, never lost, never stuck).
        tracing::warn!(queue = queue.as_str(), error = %e, "could not settle a delivery; handing it back");
        // Not at once: whatever failed (the broker refusing publishes) gets a moment.
        tokio::time::sleep(SETTLE_RETRY_PAUSE).await;
        if let Err(e) = delivery.acker.requeue().await {
            tracing::warn!(queue = queue.as_str(), error = %e, "could not hand a delivery back; it returns when its channel closes");
        }
    }
}
