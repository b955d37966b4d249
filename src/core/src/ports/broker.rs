//! The broker port: durable work queues with confirmed publishes, manual acks, delayed
//! delivery, a delivery limit and a dead-letter queue.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::ErrorClass;

/// The kinds of work, one durable queue each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkQueue {
    /// Outbound call jobs from schedulers.
    CallJobs,
    /// Verified LiveKit webhook events.
    WebhookEvents,
    /// Call control commands (hang up, transfer, cancel).
    Control,
    /// Signed callbacks to deliver to receivers (one message per callback and receiver).
    Callbacks,
}

impl WorkQueue {
    pub const ALL: [WorkQueue; 4] = [
        WorkQueue::CallJobs,
        WorkQueue::WebhookEvents,
        WorkQueue::Control,
        WorkQueue::Callbacks,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkQueue::CallJobs => "call_jobs",
            WorkQueue::WebhookEvents => "webhook_events",
            WorkQueue::Control => "control",
            WorkQueue::Callbacks => "callbacks",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.as_str() == s)
    }
}

impl fmt::Display for WorkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header names the adapters and workers agree on.
pub mod headers {
    /// Epoch milliseconds before which the message must not be handed to a consumer.
    pub const DUE_MS: &str = "x-callfleet-due-ms";
    /// Why the message was dead-lettered.
    pub const DEAD_REASON: &str = "x-callfleet-dead-reason";
    /// The queue it was dead-lettered from.
    pub const DEAD_QUEUE: &str = "x-callfleet-dead-queue";
    /// Attempt history, newest last, as text.
    pub const ATTEMPTS: &str = "x-callfleet-attempts";
    /// Trace context propagated from ingress to worker.
    pub const TRACE_ID: &str = "x-callfleet-trace-id";
    /// Epoch milliseconds at which the ingress received the webhook (latency metrics).
    pub const RECEIVED_MS: &str = "x-callfleet-received-ms";
}

/// A message to publish, or as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique message id (the AMQP `message_id`).
    pub id: String,
    pub queue: WorkQueue,
    pub body: Bytes,
    /// String headers; values stay small (ids, reasons), never bodies or secrets.
    pub headers: BTreeMap<String, String>,
    /// Deliver no earlier than this instant; `None` = now.
    pub deliver_at: Option<DateTime<Utc>>,
}

impl Message {
    pub fn new(queue: WorkQueue, body: impl Into<Bytes>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            queue,
            body: body.into(),
            headers: BTreeMap::new(),
            deliver_at: None,
        }
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    pub fn with_header(mut self, key: &str, value: impl Into<String>) -> Self {
        self.headers.insert(key.to_owned(), value.into());
        self
    }

    pub fn deliver_at(mut self, at: DateTime<Utc>) -> Self {
        self.deliver_at = Some(at);
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unreachable: {0}")]
    Unavailable(String),
    #[error("publish not confirmed: {0}")]
    NotConfirmed(String),
    #[error("message was returned unroutable: {0}")]
    Unroutable(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("delay of {0:?} is longer than the 7-day maximum")]
    DelayTooLong(std::time::Duration),
    #[error("broker protocol error: {0}")]
    Protocol(String),
}

impl BrokerError {
    pub fn class(&self) -> ErrorClass {
        match self {
            BrokerError::DelayTooLong(_) => ErrorClass::BadInput,
            _ => ErrorClass::Retryable,
        }
    }
}

/// Acknowledgement of one delivery. Exactly one of the methods should be called; dropping
/// a delivery unanswered hands it back to the broker when its subscription ends.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), BrokerError>;
    /// Hands the message back for redelivery; counts toward the queue's delivery limit.
    /// The worker runtime parks a message that reaches the limit itself (so every dead
    /// letter is counted in one place); the broker's own limit sits one delivery higher,
    /// as a backstop for a runtime that cannot publish the dead letter.
    async fn requeue(&self) -> Result<(), BrokerError>;
}

/// A message handed to a consumer.
pub struct Delivery {
    /// The queue it was consumed from. `message.queue` is the queue the message was
    /// published for; the two differ only if routing is broken, which the runtime treats
    /// as a bug (logged, counted, dead-lettered), never as work for the wrong handler.
    pub queue: WorkQueue,
    pub message: Message,
    /// How many times this message was delivered before (0 on first delivery).
    pub redeliveries: u32,
    pub acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message_id", &self.message.id)
            .field("queue", &self.queue)
            .field("published_for", &self.message.queue)
            .field("redeliveries", &self.redeliveries)
            .finish()
    }
}

impl Delivery {
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    pub async fn requeue(self) -> Result<(), BrokerError> {
        self.acker.requeue().await
    }
}

/// A live consumer. Deliveries arrive at most `prefetch` unacked at a time. Dropping the
/// subscription stops consuming; its unacked deliveries go back to the queue.
pub struct Subscription {
    pub(crate) rx: mpsc::Receiver<Delivery>,
    pub(crate) _stop: tokio_util::sync::DropGuard,
}

impl Subscription {
    pub fn new(rx: mpsc::Receiver<Delivery>, stop: tokio_util::sync::CancellationToken) -> Self {
        Self {
            rx,
            _stop: stop.drop_guard(),
        }
    }

    /// The next delivery; `None` once the subscription has ended for good.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

/// A message parked in the dead-letter queue.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub message_id: String,
    pub queue: Option<WorkQueue>,
    pub reason: String,
    pub headers: BTreeMap<String, String>,
    #[serde(skip)]
    pub body: Bytes,
    pub body_preview: String,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes one persistent message and returns only once the broker confirmed it; a
    /// nack, a returned (unroutable) message, an unreachable broker or a confirm that does
    /// not arrive within the publish timeout is an error, never a silent success.
    async fn publish(&self, message: Message) -> Result<(), BrokerError>;

    /// Publishes many messages with pipelined confirms; one result per message, in order.
    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<(), BrokerError>>;

    /// Starts consuming `queue` with at most `prefetch` unacked deliveries. The subscription
    /// survives broker restarts (the adapter reconnects and resubscribes).
    async fn subscribe(&self, queue: WorkQueue, prefetch: u16)
        -> Result<Subscription, BrokerError>;

    /// Parks a message in the dead-letter queue with `reason` (the caller then acks the
    /// original delivery). Adapters do not count dead letters: the worker runtime does,
    /// once, for both brokers.
    async fn dead_letter(&self, message: Message, reason: &str) -> Result<(), BrokerError>;

    /// Up to `limit` dead letters, oldest first, without removing them.
    async fn list_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError>;

    /// Moves up to `limit` dead letters (only `message_id` if given) back to their work
    /// queue; returns how many moved.
    async fn replay_dead_letters(
        &self,
        message_id: Option<&str>,
        limit: usize,
    ) -> Result<usize, BrokerError>;

    /// Deletes every dead letter; returns how many.
    async fn purge_dead_letters(&self) -> Result<usize, BrokerError>;

    /// Ready messages per work queue (for metrics and autoscaling).
    async fn queue_depth(&self, queue: WorkQueue) -> Result<u64, BrokerError>;

    /// Ready messages in every queue this broker manages, by logical name: each work queue
    /// (`call_jobs`…; deliveries awaiting an ack not included), each delay tier (`delay.<tier>`; the
    /// memory broker has one, `delay`), and `dead`. What tests, chaos runs and operators
    /// read to see what the fleet left behind.
    async fn census(&self) -> Result<BTreeMap<String, u64>, BrokerError>;

    /// Round-trips to the broker (readiness).
    async fn ping(&self) -> Result<(), BrokerError>;
}
