//! RabbitMQ broker (lapin 4). Topology, declared idempotently at start and after every
//! reconnect:
//!
//! ```text
//! publish ──► {p}.work (headers exchange, x-callfleet-queue=<kind>) ──► {p}.<kind> (quorum)
//!    │                        ▲                                          │ delivery limit,
//!    │ delayed                │ TTL expiry dead-letters back             │ nack → DLX
//!    └──► {p}.delay.<tier> ───┘ (quorum, x-message-ttl = tier)           ▼
//!                                                 {p}.dlx (fanout) ──► {p}.dead (parking lot)
//! ```
//!
//! Delays compose by hopping: a message whose due time is still ahead when it comes out of
//! a tier is parked in the next tier by the consumer, never handed to a handler early.
//! The connection is rebuilt on demand after a failure (broker restart, closed connection);
//! consumers resubscribe with backoff. Neither needs the process restarted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::domain::delay::{self, DELAY_TIERS, MAX_DELAY};
use crate::ports::broker::{
    headers, Acker, Broker, BrokerError, DeadLetter, Delivery, Message, Subscription, WorkQueue,
};
use crate::telemetry::metrics as m;

/// Header the work exchange routes on.
const ROUTE_HEADER: &str = "x-callfleet-queue";
/// Match mode of the work exchange's bindings. Plain `all` would ignore our `x-` header
/// and match everything; `all-with-x` (RabbitMQ 3.10+) compares it, so RabbitMQ itself
/// sends each message to exactly one queue.
const ROUTE_MATCH: &str = "all-with-x";

/// The work exchange's binding for `queue`.
fn route_binding(queue: WorkQueue, mode: &str) -> FieldTable {
    let mut bind = FieldTable::default();
    bind.insert(s("x-match"), long(mode));
    bind.insert(s(ROUTE_HEADER), long(queue.as_str()));
    bind
}

/// RabbitMQ settings.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    pub url: String,
    /// Prefix of every exchange and queue name (tests use a unique one each).
    pub prefix: String,
    /// Deliveries after which a quorum queue dead-letters a message.
    pub delivery_limit: u32,
    /// How long a publish may wait for the connection and its confirm.
    pub publish_timeout: Duration,
}

#[derive(Clone)]
pub struct RabbitBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: RabbitConfig,
    live: Mutex<Option<Live>>,
    /// Declare the topology on connect (a fleet), or only check it exists (tools).
    declare: bool,
}

struct Live {
    connection: Arc<Connection>,
    publisher: Channel,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn s(v: &str) -> ShortString {
    ShortString::from(v)
}

fn long(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

impl RabbitBroker {
    /// Connects and declares the topology, failing fast (within `publish_timeout`) if the
    /// broker is unreachable.
    pub async fn connect(config: RabbitConfig) -> Result<Self, BrokerError> {
        Self::open_with(config, true).await
    }

    /// Connects to a fleet's existing topology without declaring anything (operator
    /// tools): a wrong prefix is an error naming the queue that is not there, not a new
    /// empty topology.
    pub async fn attach(config: RabbitConfig) -> Result<Self, BrokerError> {
        Self::open_with(config, false).await
    }

    async fn open_with(config: RabbitConfig, declare: bool) -> Result<Self, BrokerError> {
        let broker = Self {
            inner: Arc::new(Inner {
                config,
                live: Mutex::new(None),
                declare,
            }),
        };
        broker.inner.publisher().await?;
        Ok(broker)
    }

    pub fn queue_name(&self, queue: WorkQueue) -> String {
        self.inner.queue_name(queue)
    }

    /// Name of the dead-letter queue.
    pub fn dead_queue_name(&self) -> String {
        self.inner.dead_queue()
    }

    /// Deletes every queue and exchange under this prefix, messages included: for tests
    /// and benchmarks, whose unique prefixes would otherwise pile up on the broker.
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let mut queues: Vec<String> = WorkQueue::ALL
            .into_iter()
            .map(|q| inner.queue_name(q))
            .collect();
        queues.push(inner.dead_queue());
        queues.extend(DELAY_TIERS.into_iter().map(|t| inner.tier_queue(t)));
        let exchanges = [inner.work_exchange(), inner.dlx()];
        let result = inner
            .with_temp_channel(|channel| async move {
                for queue in &queues {
                    channel
                        .queue_delete(s(queue), QueueDeleteOptions::default())
                        .await
                        .map_err(unavailable)?;
                }
                for exchange in &exchanges {
                    channel
                        .exchange_delete(s(exchange), ExchangeDeleteOptions::default())
                        .await
                        .map_err(unavailable)?;
                }
                Ok(())
            })
            .await;
        inner.invalidate().await;
        result
    }
}

impl Inner {
    fn queue_name(&self, queue: WorkQueue) -> String {
        format!("{}.{}", self.config.prefix, queue.as_str())
    }
    fn work_exchange(&self) -> String {
        format!("{}.work", self.config.prefix)
    }
    fn dlx(&self) -> String {
        format!("{}.dlx", self.config.prefix)
    }
    fn dead_queue(&self) -> String {
        format!("{}.dead", self.config.prefix)
    }
    fn tier_queue(&self, tier: Duration) -> String {
        format!("{}.delay.{}", self.config.prefix, delay::tier_name(tier))
    }

    async fn open(&self) -> Result<Live, BrokerError> {
        // Named after the prefix so operators (and tests) can find this fleet's connections.
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.config.prefix.as_bytes().to_vec()));
        let connect = Connection::connect(&self.config.url, properties);
        let connection = tokio::time::timeout(self.config.publish_timeout, connect)
            .await
            .map_err(|_| {
                BrokerError::Unavailable(format!(
                    "no connection within {:?}",
                    self.config.publish_timeout
                ))
            })?
            .map_err(unavailable)?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        if self.declare {
            self.declare_topology(&channel).await?;
        } else {
            let dead = self.dead_queue();
            if message_count(&channel, &dead).await.is_err() {
                return Err(BrokerError::Protocol(format!(
                    "there is no queue {dead} on this broker: is CALLFLEET_QUEUE_PREFIX ({}) the fleet's?",
                    self.config.prefix
                )));
            }
        }
        let publisher = connection.create_channel().await.map_err(unavailable)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let _ = channel.close(200, s("topology declared")).await;
        Ok(Live {
            connection: Arc::new(connection),
            publisher,
        })
    }

    /// Declares everything; idempotent (same arguments every time).
    async fn declare_topology(&self, ch: &Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            s(&self.work_exchange()),
            ExchangeKind::Headers,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
        ch.exchange_declare(
            s(&self.dlx()),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
        let queue_opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };

        // The parking lot: no delivery limit, so inspecting it never loses anything.
        let mut dead_args = FieldTable::default();
        dead_args.insert(s("x-queue-type"), long("quorum"));
        ch.queue_declare(s(&self.dead_queue()), queue_opts, dead_args)
            .await
            .map_err(unavailable)?;
        ch.queue_bind(
            s(&self.dead_queue()),
            s(&self.dlx()),
            s(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;

        for queue in WorkQueue::ALL {
            let mut args = FieldTable::default();
            args.insert(s("x-queue-type"), long("quorum"));
            // RabbitMQ dead-letters a message returned more than this many times; the
            // runtime parks it one delivery earlier (see `Acker::requeue`).
            args.insert(
                s("x-delivery-limit"),
                AMQPValue::LongLongInt(i64::from(self.config.delivery_limit)),
            );
            args.insert(s("x-dead-letter-exchange"), long(&self.dlx()));
            // At-least-once dead-lettering: a dead letter is never dropped in transit.
            args.insert(s("x-dead-letter-strategy"), long("at-least-once"));
            args.insert(s("x-overflow"), long("reject-publish"));
            let name = self.queue_name(queue);
            ch.queue_declare(s(&name), queue_opts, args)
                .await
                .map_err(unavailable)?;
            // Versions before 0.2 bound with `x-match: all`, under which RabbitMQ ignores
            // every `x-` header: the binding matched every message, so each due message
            // went to every work queue. Remove that binding wherever it still exists
            // (unbinding a missing binding is a no-op) before binding the right way.
            ch.queue_unbind(
                s(&name),
                s(&self.work_exchange()),
                s(""),
                route_binding(queue, "all"),
            )
            .await
            .map_err(unavailable)?;
            ch.queue_bind(
                s(&name),
                s(&self.work_exchange()),
                s(""),
                QueueBindOptions::default(),
                route_binding(queue, ROUTE_MATCH),
            )
            .await
            .map_err(unavailable)?;
        }

        for tier in DELAY_TIERS {
            let mut args = FieldTable::default();
            args.insert(s("x-queue-type"), long("quorum"));
            args.insert(
                s("x-message-ttl"),
                AMQPValue::LongLongInt(tier.as_millis() as i64),
            );
            args.insert(s("x-dead-letter-exchange"), long(&self.work_exchange()));
            args.insert(s("x-dead-letter-strategy"), long("at-least-once"));
            args.insert(s("x-overflow"), long("reject-publish"));
            ch.queue_declare(s(&self.tier_queue(tier)), queue_opts, args)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// The confirm-mode publishing channel, reconnecting if the connection is gone.
    async fn publisher(&self) -> Result<Channel, BrokerError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref() {
            if l.connection.status().connected() && l.publisher.status().connected() {
                return Ok(l.publisher.clone());
            }
            metrics::counter!(m::BROKER_RECONNECTS).increment(1);
            tracing::warn!("broker connection lost; reconnecting");
        }
        *live = None;
        let fresh = self.open().await?;
        let channel = fresh.publisher.clone();
        *live = Some(fresh);
        Ok(channel)
    }

    async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        self.publisher().await?;
        let live = self.live.lock().await;
        live.as_ref()
            .map(|l| l.connection.clone())
            .ok_or_else(|| BrokerError::Unavailable("no connection".into()))
    }

    /// Forgets a connection that failed so the next call reconnects.
    async fn invalidate(&self) {
        let mut live = self.live.lock().await;
        if let Some(l) = live.take() {
            let _ = l.connection.close(320, s("callfleet reconnecting")).await;
        }
    }

    fn properties(&self, message: &Message, extra: &[(&str, String)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in &message.headers {
            table.insert(s(k), long(v));
        }
        table.insert(s(ROUTE_HEADER), long(message.queue.as_str()));
        if let Some(at) = message.deliver_at {
            table.insert(s(headers::DUE_MS), long(&at.timestamp_millis().to_string()));
        }
        for (k, v) in extra {
            table.insert(s(k), long(v));
        }
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(s("application/json"))
            .with_message_id(s(&message.id))
            .with_headers(table)
    }

    /// Where a message goes now: its work queue, or a delay tier if it is not yet due.
    fn route(&self, message: &Message) -> Result<(String, String), BrokerError> {
        let remaining = message
            .deliver_at
            .map(|at| delay::remaining(at.timestamp_millis(), Utc::now().timestamp_millis()))
            .unwrap_or_default();
        if remaining > MAX_DELAY + Duration::from_secs(60) {
            return Err(BrokerError::DelayTooLong(remaining));
        }
        Ok(match delay::next_hop(remaining) {
            // Due now: straight to the work queue through the default exchange (cheaper for
            // the broker than header matching, which only the delay tiers' dead-lettering
            // needs, to find each message's queue again).
            None => (String::new(), self.queue_name(message.queue)),
            Some(tier) => (String::new(), self.tier_queue(tier)),
        })
    }

    async fn send(
        &self,
        channel: &Channel,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        channel
            .basic_publish(
                s(exchange),
                s(key),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(unavailable)
    }

    async fn publish_confirmed(
        &self,
        message: &Message,
        extra: &[(&str, String)],
        to: Option<(String, String)>,
    ) -> Result<(), BrokerError> {
        let (exchange, key) = match to {
            Some(t) => t,
            None => self.route(message)?,
        };
        let timeout = self.config.publish_timeout;
        let attempt = async {
            let channel = self.publisher().await?;
            let confirm = self
                .send(
                    &channel,
                    &exchange,
                    &key,
                    &message.body,
                    self.properties(message, extra),
                )
                .await?;
            confirm_result(confirm.await.map_err(unavailable)?)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                if matches!(e, BrokerError::Unavailable(_)) {
                    self.invalidate().await;
                }
                Err(e)
            }
            Err(_) => {
                self.invalidate().await;
                Err(BrokerError::Timeout(timeout))
            }
        }
    }
}

fn confirm_result(confirmation: Confirmation) -> Result<(), BrokerError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => {
            Err(BrokerError::Unroutable(returned.reply_text.to_string()))
        }
        Confirmation::Nack(_) => Err(BrokerError::NotConfirmed(
            "broker nacked the message".into(),
        )),
        Confirmation::NotRequested => Err(BrokerError::NotConfirmed("confirms not enabled".into())),
    }
}

/// Up to `limit` of the messages in `queue`, delivered to `ch` unacknowledged (they go
/// back when the channel closes): a quorum queue cannot be browsed, and consumers read
/// 100,000 messages in seconds where `basic.get` takes one round trip each. A consumer
/// holds at most 65,535 unacknowledged messages (the largest prefetch), so larger reads
/// use several consumers on the channel. Ends at `limit`, or once nothing more comes:
/// briefly after what the queue held at the start (messages another reader just handed
/// back may still be on their way), longer before.
async fn browse(
    ch: &Channel,
    queue: &str,
    limit: usize,
) -> Result<
    futures::stream::BoxStream<'static, Result<lapin::message::Delivery, BrokerError>>,
    BrokerError,
> {
    const MAX_PREFETCH: usize = u16::MAX as usize;
    let held = message_count(ch, queue).await? as usize;
    ch.basic_qos(
        limit.clamp(1, MAX_PREFETCH) as u16,
        BasicQosOptions::default(),
    )
    .await
    .map_err(unavailable)?;
    let mut consumers = Vec::new();
    for _ in 0..limit.min(held).div_ceil(MAX_PREFETCH).max(1) {
        consumers.push(
            ch.basic_consume(
                s(queue),
                s(&format!(
                    "callfleet-browse-{}",
                    uuid::Uuid::new_v4().simple()
                )),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?,
        );
    }
    let deliveries = futures::stream::select_all(consumers).map(|d| d.map_err(unavailable));
    let started = tokio::time::Instant::now();
    Ok(futures::stream::unfold(
        (deliveries, 0usize),
        move |(mut deliveries, got)| async move {
            if got >= limit || started.elapsed() > BROWSE_LIMIT {
                return None;
            }
            let idle = if got < held {
                Duration::from_secs(5)
            } else {
                Duration::from_millis(300)
            };
            match tokio::time::timeout(idle, deliveries.next()).await {
                Ok(Some(item)) => Some((item, (deliveries, got + 1))),
                _ => None,
            }
        },
    )
    .boxed())
}

/// How long browsing a queue may take at most.
const BROWSE_LIMIT: Duration = Duration::from_secs(120);

/// Ready messages in `queue` (a passive declare; deliveries awaiting an ack not included).
async fn message_count(ch: &Channel, queue: &str) -> Result<u64, BrokerError> {
    let q = ch
        .queue_declare(
            s(queue),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    Ok(u64::from(q.message_count()))
}

fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        AMQPValue::ShortString(v) => Some(v.to_string()),
        AMQPValue::LongLongInt(v) => Some(v.to_string()),
        AMQPValue::LongInt(v) => Some(v.to_string()),
        AMQPValue::LongUInt(v) => Some(v.to_string()),
        _ => None,
    }
}

/// Reason of the most recent `x-death` entry (e.g. `delivery_limit`, `rejected`).
fn x_death_reason(table: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = table.inner().get(&s("x-death"))? else {
        return None;
    };
    deaths.as_slice().iter().find_map(|d| match d {
        AMQPValue::FieldTable(t) => t.inner().get(&s("reason")).and_then(header_text),
        _ => None,
    })
}

/// Rebuilds a [`Message`] from a delivery; returns it with the redelivery count and whether
/// its `x-death` says why it was dead-lettered.
fn decode(
    delivery: &lapin::message::Delivery,
    fallback_queue: Option<WorkQueue>,
) -> (Message, u32, Option<String>) {
    let mut headers = BTreeMap::new();
    let mut redeliveries = 0;
    let mut death = None;
    if let Some(table) = delivery.properties.headers() {
        for (k, v) in table.inner() {
            let key = k.as_str();
            if key == "x-delivery-count" {
                redeliveries = header_text(v).and_then(|t| t.parse().ok()).unwrap_or(0);
            } else if key == "x-death" {
                death = x_death_reason(table);
            } else if key.starts_with("x-first-death")
                || key.starts_with("x-last-death")
                || key == ROUTE_HEADER
            {
                continue;
            } else if let Some(text) = header_text(v) {
                headers.insert(key.to_owned(), text);
            }
        }
    }
    let queue = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(&s(ROUTE_HEADER)).and_then(header_text))
        .and_then(|q| WorkQueue::parse(&q))
        .or(fallback_queue)
        .unwrap_or(WorkQueue::CallJobs);
    let deliver_at = headers
        .remove(headers::DUE_MS)
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|v| v.to_string())
        .unwrap_or_default();
    let message = Message {
        id,
        queue,
        body: Bytes::from(delivery.data.clone()),
        headers,
        deliver_at,
    };
    if delivery.redelivered && redeliveries == 0 {
        redeliveries = 1;
    }
    (message, redeliveries, death)
}

struct RabbitAcker {
    acker: lapin::Acker,
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

impl Inner {
    /// One consumer session: returns `Ok` when stopped, `Err` when the channel or
    /// connection failed (the caller resubscribes).
    async fn consume_once(
        self: &Arc<Self>,
        queue: WorkQueue,
        prefetch: u16,
        tx: &mpsc::Sender<Delivery>,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let connection = self.connection().await?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(unavailable)?;
        let tag = format!(
            "callfleet-{}-{}",
            queue.as_str(),
            uuid::Uuid::new_v4().simple()
        );
        let mut consumer = channel
            .basic_consume(
                s(&self.queue_name(queue)),
                s(&tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let result = loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = tx.closed() => break Ok(()),
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(unavailable(e)),
                None => {
                    break Err(BrokerError::Unavailable(
                        "consumer cancelled by the broker".into(),
                    ))
                }
            };
            let (message, redeliveries, _) = decode(&delivery, Some(queue));
            let remaining = message
                .deliver_at
                .map(|at| delay::remaining(at.timestamp_millis(), Utc::now().timestamp_millis()))
                .unwrap_or_default();
            if !remaining.is_zero() {
                // Not due yet: park it in the next tier, then ack this copy.
                match self.publish_confirmed(&message, &[], None).await {
                    Ok(()) => {
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not re-park a delayed message; handing it back");
                        let _ = delivery
                            .acker
                            .nack(BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            })
                            .await;
                    }
                }
                continue;
            }
            let out = Delivery {
                queue,
                message,
                redeliveries,
                acker: Box::new(RabbitAcker {
                    acker: delivery.acker.clone(),
                }),
            };
            if tx.send(out).await.is_err() {
                break Ok(());
            }
        };
        // Closing the channel hands every unacked delivery back to the queue.
        let _ = channel.close(200, s("consumer stopped")).await;
        result
    }

    async fn with_temp_channel<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let connection = self.connection().await?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        let result = f(channel.clone()).await;
        let _ = channel.close(200, s("done")).await;
        if matches!(result, Err(BrokerError::Unavailable(_))) {
            self.invalidate().await;
        }
        result
    }
}

fn dead_letter_from(delivery: &lapin::message::Delivery) -> DeadLetter {
    let (message, _, death) = decode(delivery, None);
    let queue = message
        .headers
        .get(headers::DEAD_QUEUE)
        .and_then(|q| WorkQueue::parse(q))
        .or(Some(message.queue));
    let reason = message
        .headers
        .get(headers::DEAD_REASON)
        .cloned()
        .or(death)
        .unwrap_or_else(|| "unknown".into());
    DeadLetter {
        message_id: message.id.clone(),
        queue,
        reason,
        headers: message.headers.clone(),
        body_preview: String::from_utf8_lossy(&message.body[..message.body.len().min(512)])
            .into_owned(),
        body: message.body,
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        self.inner.publish_confirmed(&message, &[], None).await
    }

    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<(), BrokerError>> {
        let inner = &self.inner;
        let timeout = inner.config.publish_timeout;
        let channel = match inner.publisher().await {
            Ok(c) => c,
            Err(e) => {
                return messages
                    .iter()
                    .map(|_| Err(BrokerError::Unavailable(e.to_string())))
                    .collect()
            }
        };
        // Send everything first, then await the confirms together (pipelined).
        let mut pending = Vec::with_capacity(messages.len());
        for message in &messages {
            let sent = match inner.route(message) {
                Ok((exchange, key)) => {
                    inner
                        .send(
                            &channel,
                            &exchange,
                            &key,
                            &message.body,
                            inner.properties(message, &[]),
                        )
                        .await
                }
                Err(e) => Err(e),
            };
            pending.push(sent);
        }
        let waits = pending.into_iter().map(|sent| async move {
            match sent {
                Ok(confirm) => match tokio::time::timeout(timeout, confirm).await {
                    Ok(Ok(c)) => confirm_result(c),
                    Ok(Err(e)) => Err(unavailable(e)),
                    Err(_) => Err(BrokerError::Timeout(timeout)),
                },
                Err(e) => Err(e),
            }
        });
        let results = futures::future::join_all(waits).await;
        if results.iter().any(|r| {
            matches!(
                r,
                Err(BrokerError::Unavailable(_) | BrokerError::Timeout(_))
            )
        }) {
            inner.invalidate().await;
        }
        results
    }

    async fn subscribe(
        &self,
        queue: WorkQueue,
        prefetch: u16,
    ) -> Result<Subscription, BrokerError> {
        // Fail fast if the broker is unreachable right now; later failures are retried.
        self.inner.connection().await?;
        let (tx, rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let inner = Arc::clone(&self.inner);
        let task_stop = stop.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match inner.consume_once(queue, prefetch, &tx, &task_stop).await {
                    Ok(()) => break,
                    Err(e) => {
                        if task_stop.is_cancelled() || tx.is_closed() {
                            break;
                        }
                        tracing::warn!(queue = queue.as_str(), error = %e, "consumer lost; resubscribing");
                        metrics::counter!(m::BROKER_RECONNECTS).increment(1);
                        inner.invalidate().await;
                        tokio::select! {
                            _ = task_stop.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {},
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(Subscription::new(rx, stop))
    }

    async fn dead_letter(&self, message: Message, reason: &str) -> Result<(), BrokerError> {
        let extra = [
            (headers::DEAD_REASON, reason.to_owned()),
            (headers::DEAD_QUEUE, message.queue.as_str().to_owned()),
        ];
        let mut parked = message;
        parked.deliver_at = None;
        self.inner
            .publish_confirmed(&parked, &extra, Some((self.inner.dlx(), String::new())))
            .await
    }

    async fn list_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let queue = self.inner.dead_queue();
        self.inner
            .with_temp_channel(|ch| async move {
                let mut out = Vec::new();
                let mut deliveries = browse(&ch, &queue, limit).await?;
                // Unacknowledged, they all go back when the channel closes.
                while let Some(delivery) = deliveries.next().await {
                    out.push(dead_letter_from(&delivery?));
                }
                Ok(out)
            })
            .await
    }

    async fn replay_dead_letters(
        &self,
        message_id: Option<&str>,
        limit: usize,
    ) -> Result<usize, BrokerError> {
        let queue = self.inner.dead_queue();
        let inner = Arc::clone(&self.inner);
        let wanted = message_id.map(str::to_owned);
        self.inner
            .with_temp_channel(|ch| async move {
                let mut moved = 0;
                // Looking for one id scans the whole queue; otherwise the first `limit`.
                let scan = if wanted.is_some() { usize::MAX } else { limit };
                let mut deliveries = browse(&ch, &queue, scan).await?;
                while moved < limit {
                    let Some(delivery) = deliveries.next().await else {
                        break;
                    };
                    let delivery = delivery?;
                    let dead = dead_letter_from(&delivery);
                    if wanted.as_deref().is_some_and(|id| id != dead.message_id) {
                        continue; // returned to the queue when the channel closes
                    }
                    let Some(target) = dead.queue else { continue };
                    let mut message = Message::new(target, dead.body).with_id(dead.message_id);
                    message.headers = dead.headers;
                    message.headers.remove(headers::DEAD_REASON);
                    message.headers.remove(headers::DEAD_QUEUE);
                    inner.publish_confirmed(&message, &[], None).await?;
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(unavailable)?;
                    moved += 1;
                }
                Ok(moved)
            })
            .await
    }

    async fn purge_dead_letters(&self) -> Result<usize, BrokerError> {
        let queue = self.inner.dead_queue();
        self.inner
            .with_temp_channel(|ch| async move {
                ch.queue_purge(s(&queue), QueuePurgeOptions::default())
                    .await
                    .map(|n| n as usize)
                    .map_err(unavailable)
            })
            .await
    }

    async fn queue_depth(&self, queue: WorkQueue) -> Result<u64, BrokerError> {
        let name = self.inner.queue_name(queue);
        self.inner
            .with_temp_channel(|ch| async move { message_count(&ch, &name).await })
            .await
    }

    async fn census(&self) -> Result<BTreeMap<String, u64>, BrokerError> {
        let inner = &self.inner;
        let mut names: Vec<(String, String)> = WorkQueue::ALL
            .into_iter()
            .map(|q| (q.as_str().to_owned(), inner.queue_name(q)))
            .collect();
        names.extend(DELAY_TIERS.into_iter().map(|t| {
            (
                format!("delay.{}", delay::tier_name(t)),
                inner.tier_queue(t),
            )
        }));
        names.push(("dead".into(), inner.dead_queue()));
        inner
            .with_temp_channel(|ch| async move {
                let mut out = BTreeMap::new();
                for (logical, name) in &names {
                    out.insert(logical.clone(), message_count(&ch, name).await?);
                }
                Ok(out)
            })
            .await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let timeout = self.inner.config.publish_timeout;
        tokio::time::timeout(timeout, self.inner.with_temp_channel(|_| async { Ok(()) }))
            .await
            .map_err(|_| BrokerError::Timeout(timeout))?
    }
}
