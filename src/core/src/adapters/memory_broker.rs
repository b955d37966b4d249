//! In-memory broker with RabbitMQ's semantics: confirmed publish, manual ack, prefetch,
//! redelivery of unacked work when a consumer goes away, delayed delivery, a delivery limit
//! and a dead-letter queue. Used by dev mode and unit tests; held to the same conformance
//! suite as the RabbitMQ adapter.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{mpsc, Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::domain::delay::MAX_DELAY;
use crate::ports::broker::{
    headers, Acker, Broker, BrokerError, DeadLetter, Delivery, Message, Subscription, WorkQueue,
};

#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    notify: HashMap<WorkQueue, Notify>,
    delivery_limit: u32,
    /// Messages waiting for their due time.
    delayed: AtomicU64,
}

#[derive(Default)]
struct State {
    queues: HashMap<WorkQueue, QueueState>,
    dead: VecDeque<DeadLetter>,
    next_tag: u64,
    next_consumer: u64,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Stored>,
    unacked: HashMap<u64, (Stored, u64)>,
}

struct Stored {
    message: Message,
    redeliveries: u32,
}

impl MemoryBroker {
    /// `delivery_limit`: deliveries after which a message that keeps being handed back is
    /// dead-lettered with reason `delivery_limit`.
    pub fn new(delivery_limit: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                notify: WorkQueue::ALL
                    .into_iter()
                    .map(|q| (q, Notify::new()))
                    .collect(),
                delivery_limit,
                delayed: AtomicU64::new(0),
            }),
        }
    }
}

impl Inner {
    fn wake(&self, queue: WorkQueue) {
        if let Some(n) = self.notify.get(&queue) {
            n.notify_one();
        }
    }

    fn dead_letter_locked(state: &mut State, message: Message, reason: &str) {
        let mut headers = message.headers.clone();
        headers.insert(headers::DEAD_REASON.into(), reason.into());
        headers.insert(headers::DEAD_QUEUE.into(), message.queue.as_str().into());
        state.dead.push_back(DeadLetter {
            message_id: message.id.clone(),
            queue: Some(message.queue),
            reason: reason.to_owned(),
            headers,
            body_preview: preview(&message.body),
            body: message.body,
        });
    }

    /// Returns an unacked message to its queue, or dead-letters it past the limit.
    fn hand_back_locked(&self, state: &mut State, queue: WorkQueue, mut stored: Stored) {
        stored.redeliveries += 1;
        // Returned more than `limit` times, as RabbitMQ counts: a backstop behind the runtime.
        if stored.redeliveries > self.delivery_limit {
            Self::dead_letter_locked(state, stored.message, "delivery_limit");
        } else {
            state
                .queues
                .entry(queue)
                .or_default()
                .ready
                .push_front(stored);
        }
    }

    async fn push_ready(&self, message: Message) {
        let queue = message.queue;
        let stored = Stored {
            message,
            redeliveries: 0,
        };
        self.state
            .lock()
            .await
            .queues
            .entry(queue)
            .or_default()
            .ready
            .push_back(stored);
        self.wake(queue);
    }

    async fn enqueue(self: &Arc<Self>, message: Message) {
        match message.deliver_at.filter(|at| *at > Utc::now()) {
            Some(due) => {
                let inner = Arc::clone(self);
                inner.delayed.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep((due - Utc::now()).to_std().unwrap_or_default()).await;
                    inner.push_ready(message).await;
                    inner.delayed.fetch_sub(1, Ordering::SeqCst);
                });
            }
            None => self.push_ready(message).await,
        }
    }
}

fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    text.into_owned()
}

fn check_delay(message: &Message) -> Result<(), BrokerError> {
    if let Some(at) = message.deliver_at {
        let delay = (at - Utc::now()).to_std().unwrap_or_default();
        if delay > MAX_DELAY {
            return Err(BrokerError::DelayTooLong(delay));
        }
    }
    Ok(())
}

struct MemoryAcker {
    inner: Arc<Inner>,
    queue: WorkQueue,
    tag: u64,
    _permit: OwnedSemaphorePermit,
}

impl MemoryAcker {
    /// Removes this delivery from the unacked set; an error if it was already answered or
    /// handed back (as RabbitMQ refuses an unknown delivery tag).
    fn take_unacked(&self, state: &mut State) -> Result<Stored, BrokerError> {
        let unacked = &mut state.queues.entry(self.queue).or_default().unacked;
        unacked
            .remove(&self.tag)
            .map(|(stored, _)| stored)
            .ok_or_else(|| {
                BrokerError::Protocol(
                    "unknown delivery tag (already answered or handed back)".into(),
                )
            })
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        let mut state = self.inner.state.lock().await;
        self.take_unacked(&mut state).map(drop)
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        let mut state = self.inner.state.lock().await;
        let stored = self.take_unacked(&mut state)?;
        self.inner.hand_back_locked(&mut state, self.queue, stored);
        drop(state);
        self.inner.wake(self.queue);
        Ok(())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        check_delay(&message)?;
        self.inner.enqueue(message).await;
        Ok(())
    }

    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<(), BrokerError>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            results.push(self.publish(message).await);
        }
        results
    }

    async fn subscribe(
        &self,
        queue: WorkQueue,
        prefetch: u16,
    ) -> Result<Subscription, BrokerError> {
        let (tx, rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let inner = Arc::clone(&self.inner);
        let consumer = {
            let mut state = inner.state.lock().await;
            state.next_consumer += 1;
            state.next_consumer
        };
        let permits = Arc::new(Semaphore::new(prefetch.max(1) as usize));
        let task_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = task_stop.cancelled() => break,
                    p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                };
                let delivery = loop {
                    let notified = inner.notify.get(&queue).map(|n| n.notified());
                    let popped = {
                        let mut state = inner.state.lock().await;
                        state.next_tag += 1;
                        let tag = state.next_tag;
                        let qs = state.queues.entry(queue).or_default();
                        qs.ready.pop_front().map(|stored| {
                            let found = (stored.message.clone(), stored.redeliveries, tag);
                            qs.unacked.insert(tag, (stored, consumer));
                            found
                        })
                    };
                    if let Some(found) = popped {
                        break Some(found);
                    }
                    let Some(notified) = notified else { break None };
                    tokio::select! {
                        _ = task_stop.cancelled() => break None,
                        _ = notified => {},
                    }
                };
                let Some((message, redeliveries, tag)) = delivery else {
                    break;
                };
                let delivery = Delivery {
                    queue,
                    message,
                    redeliveries,
                    acker: Box::new(MemoryAcker {
                        inner: Arc::clone(&inner),
                        queue,
                        tag,
                        _permit: permit,
                    }),
                };
                if tx.send(delivery).await.is_err() {
                    break;
                }
            }
            // The consumer went away: everything it still holds goes back to the queue.
            let mut state = inner.state.lock().await;
            let qs = state.queues.entry(queue).or_default();
            let mine: Vec<u64> = qs
                .unacked
                .iter()
                .filter(|(_, (_, c))| *c == consumer)
                .map(|(t, _)| *t)
                .collect();
            let mut handed_back = Vec::new();
            for tag in mine {
                if let Some((stored, _)) = qs.unacked.remove(&tag) {
                    handed_back.push(stored);
                }
            }
            for stored in handed_back.into_iter().rev() {
                inner.hand_back_locked(&mut state, queue, stored);
            }
            drop(state);
            inner.wake(queue);
        });
        Ok(Subscription::new(rx, stop))
    }

    async fn dead_letter(&self, message: Message, reason: &str) -> Result<(), BrokerError> {
        let mut state = self.inner.state.lock().await;
        Inner::dead_letter_locked(&mut state, message, reason);
        Ok(())
    }

    async fn list_dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        Ok(self
            .inner
            .state
            .lock()
            .await
            .dead
            .iter()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn replay_dead_letters(
        &self,
        message_id: Option<&str>,
        limit: usize,
    ) -> Result<usize, BrokerError> {
        let replayed: Vec<DeadLetter> = {
            let mut state = self.inner.state.lock().await;
            let mut kept = VecDeque::new();
            let mut out = Vec::new();
            while let Some(dead) = state.dead.pop_front() {
                let wanted = message_id.is_none_or(|id| id == dead.message_id);
                if wanted && out.len() < limit && dead.queue.is_some() {
                    out.push(dead);
                } else {
                    kept.push_back(dead);
                }
            }
            state.dead = kept;
            out
        };
        let count = replayed.len();
        for dead in replayed {
            let Some(queue) = dead.queue else { continue };
            let mut message = Message::new(queue, dead.body).with_id(dead.message_id);
            message.headers = dead.headers;
            message.headers.remove(headers::DEAD_REASON);
            message.headers.remove(headers::DEAD_QUEUE);
            self.inner.enqueue(message).await;
        }
        Ok(count)
    }

    async fn purge_dead_letters(&self) -> Result<usize, BrokerError> {
        let mut state = self.inner.state.lock().await;
        let n = state.dead.len();
        state.dead.clear();
        Ok(n)
    }

    async fn queue_depth(&self, queue: WorkQueue) -> Result<u64, BrokerError> {
        let state = self.inner.state.lock().await;
        Ok(state.queues.get(&queue).map_or(0, |q| q.ready.len() as u64))
    }

    async fn census(&self) -> Result<BTreeMap<String, u64>, BrokerError> {
        let state = self.inner.state.lock().await;
        let mut out: BTreeMap<String, u64> = WorkQueue::ALL
            .into_iter()
            .map(|q| {
                let held = state.queues.get(&q).map_or(0, |qs| qs.ready.len() as u64);
                (q.as_str().to_owned(), held)
            })
            .collect();
        out.insert("delay".into(), self.inner.delayed.load(Ordering::SeqCst));
        out.insert("dead".into(), state.dead.len() as u64);
        Ok(out)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}
