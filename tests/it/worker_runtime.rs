//! The worker runtime: bounded retries to the dead-letter queue, panics contained, and a
//! graceful drain that finishes or hands back in-flight work.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use callfleet_core::ports::{Broker, BrokerError, Message, WorkQueue};
use callfleet_workers::{Handler, HandlerOutcome, WorkerRuntime};
use tokio_util::sync::CancellationToken;

use crate::harness::{eventually, memory_broker};

struct Scripted {
    calls: AtomicU32,
    behaviour: fn(&Message) -> HandlerOutcome,
    sleep: Duration,
}

#[async_trait]
impl Handler for Scripted {
    fn queue(&self) -> WorkQueue {
        WorkQueue::CallJobs
    }
    async fn handle(&self, message: &Message, _redeliveries: u32) -> HandlerOutcome {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.sleep).await;
        if message.body.as_ref() == b"panic" {
            panic!("handler bug");
        }
        (self.behaviour)(message)
    }
}

fn handler(behaviour: fn(&Message) -> HandlerOutcome, sleep: Duration) -> Arc<Scripted> {
    Arc::new(Scripted {
        calls: AtomicU32::new(0),
        behaviour,
        sleep,
    })
}

/// A runtime (prefetch 4, concurrency 4, 3 attempts) serving `handler` until `stop`.
fn spawn_runtime(
    broker: &Arc<dyn Broker>,
    handler: Arc<Scripted>,
    stop: &CancellationToken,
    deadline: Duration,
) -> tokio::task::JoinHandle<Result<(), BrokerError>> {
    let runtime = WorkerRuntime::new(Arc::clone(broker), 4, 4, 3).with_handler(handler);
    tokio::spawn(runtime.run(stop.clone(), deadline))
}

#[tokio::test]
async fn retries_are_bounded_then_dead_lettered_with_history() {
    let broker = memory_broker(10);
    let h = handler(
        |_| HandlerOutcome::RetryAfter {
            after: Duration::from_millis(10),
            reason: "livekit unavailable".into(),
        },
        Duration::ZERO,
    );
    let stop = CancellationToken::new();
    let task = spawn_runtime(&broker, h.clone(), &stop, Duration::from_secs(5));
    let msg = Message::new(WorkQueue::CallJobs, &b"job"[..]);
    broker.publish(msg.clone()).await.expect("publish");
    let dead =
        crate::harness::dead_letter_of(broker.as_ref(), &msg.id, Duration::from_secs(10)).await;
    assert_eq!(h.calls.load(Ordering::SeqCst), 3, "exactly max attempts");
    assert!(
        dead.reason
            .contains("retries exhausted: livekit unavailable"),
        "{}",
        dead.reason
    );
    assert!(
        dead.headers
            .get("x-callfleet-attempts")
            .is_some_and(|a| a.matches('#').count() == 3),
        "{:?}",
        dead.headers
    );
    stop.cancel();
    task.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn a_panicking_handler_dead_letters_instead_of_looping() {
    let broker = memory_broker(10);
    let h = handler(|_| HandlerOutcome::Done, Duration::ZERO);
    let stop = CancellationToken::new();
    let task = spawn_runtime(&broker, h.clone(), &stop, Duration::from_secs(5));
    broker
        .publish(Message::new(WorkQueue::CallJobs, &b"panic"[..]))
        .await
        .expect("publish");
    broker
        .publish(Message::new(WorkQueue::CallJobs, &b"fine"[..]))
        .await
        .expect("publish");
    let dead = eventually(
        "the panicking job parked",
        Duration::from_secs(5),
        || async { broker.list_dead_letters(10).await.ok()?.into_iter().next() },
    )
    .await;
    assert_eq!(dead.reason, "handler panicked");
    eventually("the other job done", Duration::from_secs(5), || async {
        (h.calls.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    stop.cancel();
    task.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_within_the_deadline() {
    let broker = memory_broker(10);
    let h = handler(|_| HandlerOutcome::Done, Duration::from_millis(300));
    let stop = CancellationToken::new();
    let task = spawn_runtime(&broker, h.clone(), &stop, Duration::from_secs(5));
    broker
        .publish(Message::new(WorkQueue::CallJobs, &b"slow"[..]))
        .await
        .expect("publish");
    eventually("the job to start", Duration::from_secs(5), || async {
        (h.calls.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    stop.cancel();
    task.await.expect("join").expect("clean stop");
    // Acked, not handed back: a new consumer gets nothing (an unacked delivery would come
    // back once the stopped runtime's subscription is gone; depth alone cannot tell).
    let mut sub = broker
        .subscribe(WorkQueue::CallJobs, 1)
        .await
        .expect("subscribe");
    assert!(
        tokio::time::timeout(Duration::from_millis(700), sub.next())
            .await
            .is_err(),
        "the finished job was handed back instead of acked"
    );
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
    crate::broker_conformance::assert_census(broker.as_ref(), &[]).await;
}

#[tokio::test]
async fn shutdown_hands_back_work_that_outlives_the_deadline() {
    let broker = memory_broker(10);
    let slow = handler(|_| HandlerOutcome::Done, Duration::from_secs(30));
    let stop = CancellationToken::new();
    let task = spawn_runtime(&broker, slow.clone(), &stop, Duration::from_millis(200));
    let msg = Message::new(WorkQueue::CallJobs, &b"stuck"[..]);
    broker.publish(msg.clone()).await.expect("publish");
    eventually("the job to start", Duration::from_secs(5), || async {
        (slow.calls.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops within the deadline")
        .expect("join")
        .expect("clean stop");
    // Another worker picks the unfinished job up.
    let mut sub = broker
        .subscribe(WorkQueue::CallJobs, 1)
        .await
        .expect("subscribe");
    let again = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("handed back")
        .expect("open");
    assert_eq!(again.message.id, msg.id);
    assert!(again.redeliveries >= 1);
}

/// Serves the webhook queue and counts what it is handed.
struct WebhookCounter(AtomicU32);

#[async_trait]
impl Handler for WebhookCounter {
    fn queue(&self) -> WorkQueue {
        WorkQueue::WebhookEvents
    }
    async fn handle(&self, _: &Message, _: u32) -> HandlerOutcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        HandlerOutcome::Done
    }
}

/// A call job that reaches the webhook queue (broken routing) is never handed to the
/// webhook handler: it is dead-lettered with a reason that says so, and counted.
#[tokio::test]
async fn a_message_on_the_wrong_queue_is_dead_lettered_not_handled() {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let (rabbit, prefix) = crate::harness::rabbit_broker("misrouted", 5).await;
    let _clean = crate::harness::CleanOnDrop(prefix.clone());
    let broker: Arc<dyn Broker> = rabbit.clone();
    let (conn, ch) = crate::harness::raw_channel().await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-callfleet-queue".into(),
        AMQPValue::LongString(LongString::from(b"call_jobs".to_vec())),
    );
    ch.basic_publish(
        "".into(),
        rabbit.queue_name(WorkQueue::WebhookEvents).as_str().into(),
        Default::default(),
        b"{\"call_id\":\"call_x\",\"attempt\":1}",
        lapin::BasicProperties::default()
            .with_message_id("stray-1".into())
            .with_headers(headers),
    )
    .await
    .expect("publish");
    let counter = Arc::new(WebhookCounter(AtomicU32::new(0)));
    let stop = CancellationToken::new();
    let runtime = WorkerRuntime::new(Arc::clone(&broker), 4, 4, 3).with_handler(counter.clone());
    let task = tokio::spawn(runtime.run(stop.clone(), Duration::from_secs(5)));
    let dead =
        crate::harness::dead_letter_of(broker.as_ref(), "stray-1", Duration::from_secs(10)).await;
    assert!(
        dead.reason.contains("misrouted") && dead.reason.contains("call_jobs"),
        "{}",
        dead.reason
    );
    assert_eq!(
        counter.0.load(Ordering::SeqCst),
        0,
        "the webhook handler ran a call job"
    );
    stop.cancel();
    task.await.expect("join").expect("clean stop");
    crate::broker_conformance::assert_census(broker.as_ref(), &[("dead", 1)]).await;
    let _ = conn.close(200, "done".into()).await;
}

/// A job whose worker dies every time (here: it never answers, and its runtime is
/// stopped) is parked by the runtime once it reaches the delivery limit, with a reason,
/// on both brokers alike.
async fn a_message_that_keeps_coming_back_is_parked_at_the_limit(broker: Arc<dyn Broker>) {
    let msg = Message::new(WorkQueue::CallJobs, &b"crashes"[..]);
    broker.publish(msg.clone()).await.expect("publish");
    let limit = 3;
    for round in 0..=limit {
        let h = handler(|_| HandlerOutcome::Done, Duration::from_secs(30));
        let stop = CancellationToken::new();
        let runtime = WorkerRuntime::new(Arc::clone(&broker), 4, 4, 3)
            .with_delivery_limit(limit)
            .with_handler(h.clone());
        let task = tokio::spawn(runtime.run(stop.clone(), Duration::from_millis(50)));
        if round < limit {
            eventually("the job to start", Duration::from_secs(10), || async {
                (h.calls.load(Ordering::SeqCst) == 1).then_some(())
            })
            .await;
        } else {
            let dead =
                crate::harness::dead_letter_of(broker.as_ref(), &msg.id, Duration::from_secs(10))
                    .await;
            assert!(dead.reason.contains("delivery limit"), "{}", dead.reason);
            assert_eq!(h.calls.load(Ordering::SeqCst), 0, "handled past the limit");
        }
        stop.cancel();
        task.await.expect("join").expect("clean stop");
    }
    crate::broker_conformance::assert_census(broker.as_ref(), &[("dead", 1)]).await;
}

#[tokio::test]
async fn delivery_limit_memory() {
    a_message_that_keeps_coming_back_is_parked_at_the_limit(memory_broker(3)).await;
}

#[tokio::test]
async fn delivery_limit_rabbitmq() {
    let (broker, prefix) = crate::harness::rabbit_broker("limit", 3).await;
    let _clean = crate::harness::CleanOnDrop(prefix.clone());
    a_message_that_keeps_coming_back_is_parked_at_the_limit(broker).await;
}

/// Defers the first delivery it sees, then is done.
struct DeferOnce(AtomicU32);

#[async_trait]
impl Handler for DeferOnce {
    fn queue(&self) -> WorkQueue {
        WorkQueue::CallJobs
    }
    async fn handle(&self, _: &Message, _: u32) -> HandlerOutcome {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            HandlerOutcome::Defer {
                after: Duration::from_millis(10),
                reason: "not yet".into(),
            }
        } else {
            HandlerOutcome::Done
        }
    }
}

/// A delivery whose outcome cannot be settled (the broker refuses the deferral's publish)
/// is handed back, not left unacknowledged on a live channel until it closes: it is
/// handled again. On RabbitMQ, where a stuck delivery shows.
#[tokio::test]
async fn a_delivery_that_cannot_be_settled_is_handed_back() {
    let (rabbit, prefix) = crate::harness::rabbit_broker("unsettled", 10).await;
    let _clean = crate::harness::CleanOnDrop(prefix.clone());
    let outage = Arc::new(crate::harness::Outage::default());
    let broker: Arc<dyn Broker> = Arc::new(crate::harness::FlakyBroker {
        inner: rabbit.clone(),
        outage: outage.clone(),
    });
    // The worker's publishes fail from the start; the job itself arrives.
    outage.broker_down(true);
    rabbit
        .publish(Message::new(WorkQueue::CallJobs, &b"job"[..]))
        .await
        .expect("publish");
    let h = Arc::new(DeferOnce(AtomicU32::new(0)));
    let stop = CancellationToken::new();
    let runtime = WorkerRuntime::new(Arc::clone(&broker), 4, 4, 3).with_handler(h.clone());
    let task = tokio::spawn(runtime.run(stop.clone(), Duration::from_secs(5)));
    eventually(
        "the delivery handed back and handled again",
        Duration::from_secs(10),
        || async { (h.0.load(Ordering::SeqCst) >= 2).then_some(()) },
    )
    .await;
    eventually("the queue empty", Duration::from_secs(10), || async {
        let census = broker.census().await.ok()?;
        census.values().all(|n| *n == 0).then_some(())
    })
    .await;
    stop.cancel();
    task.await.expect("join").expect("clean stop");
}
