//! One broker contract, two adapters: every case runs against the in-memory broker and
//! against RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use callfleet_core::ports::broker::headers;
use callfleet_core::ports::{Broker, Message, WorkQueue};
use chrono::Utc;

use crate::harness::eventually;

const WAIT: Duration = Duration::from_secs(20);

async fn next(sub: &mut callfleet_core::ports::Subscription) -> callfleet_core::ports::Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
}

pub async fn publish_consume_ack(broker: Arc<dyn Broker>) {
    let msg = Message::new(WorkQueue::CallJobs, &b"{\"n\":1}"[..])
        .with_header(headers::TRACE_ID, "trace-1");
    broker
        .publish(msg.clone())
        .await
        .expect("confirmed publish");
    let mut sub = broker
        .subscribe(WorkQueue::CallJobs, 4)
        .await
        .expect("subscribe");
    let d = next(&mut sub).await;
    assert_eq!(d.message.id, msg.id);
    assert_eq!(d.message.body, msg.body);
    assert_eq!(d.message.queue, WorkQueue::CallJobs);
    assert_eq!(
        d.message.headers.get(headers::TRACE_ID).map(String::as_str),
        Some("trace-1")
    );
    assert_eq!(d.redeliveries, 0);
    d.ack().await.expect("ack");
    drop(sub);
    // Acked work is gone for good: nothing comes back after resubscribing.
    eventually("queue to be empty", WAIT, || async {
        (broker.queue_depth(WorkQueue::CallJobs).await.ok()? == 0).then_some(())
    })
    .await;
    let mut again = broker
        .subscribe(WorkQueue::CallJobs, 4)
        .await
        .expect("subscribe");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), again.next())
            .await
            .is_err(),
        "acked message redelivered"
    );
}

pub async fn unacked_is_redelivered_when_consumer_drops(broker: Arc<dyn Broker>) {
    let msg = Message::new(WorkQueue::WebhookEvents, &b"{}"[..]);
    broker.publish(msg.clone()).await.expect("publish");
    let mut sub = broker
        .subscribe(WorkQueue::WebhookEvents, 1)
        .await
        .expect("subscribe");
    let first = next(&mut sub).await;
    assert_eq!(first.message.id, msg.id);
    drop(first); // never answered
    drop(sub); // the consumer goes away
    let mut sub = broker
        .subscribe(WorkQueue::WebhookEvents, 1)
        .await
        .expect("resubscribe");
    let again = next(&mut sub).await;
    assert_eq!(again.message.id, msg.id, "the unacked message came back");
    assert!(again.redeliveries >= 1, "marked as a redelivery");
    again.ack().await.expect("ack");
}

pub async fn delayed_arrives_not_early_and_bounded_late(broker: Arc<dyn Broker>) {
    let mut sub = broker
        .subscribe(WorkQueue::Control, 4)
        .await
        .expect("subscribe");
    let due = Utc::now() + chrono::Duration::milliseconds(1_700);
    let msg = Message::new(WorkQueue::Control, &b"later"[..]).deliver_at(due);
    broker.publish(msg.clone()).await.expect("publish delayed");
    let now = Message::new(WorkQueue::Control, &b"now"[..]);
    broker.publish(now.clone()).await.expect("publish now");
    let first = next(&mut sub).await;
    assert_eq!(
        first.message.id, now.id,
        "the undelayed message overtakes the delayed one"
    );
    first.ack().await.expect("ack");
    let later = next(&mut sub).await;
    let arrived = Utc::now();
    assert_eq!(later.message.id, msg.id);
    assert!(
        arrived >= due - chrono::Duration::milliseconds(5),
        "arrived {} ms early",
        (due - arrived).num_milliseconds()
    );
    let late = (arrived - due).num_milliseconds();
    assert!(late < 1_500, "arrived {late} ms late");
    later.ack().await.expect("ack");
}

pub async fn delay_beyond_seven_days_is_refused(broker: Arc<dyn Broker>) {
    let msg = Message::new(WorkQueue::CallJobs, &b"x"[..])
        .deliver_at(Utc::now() + chrono::Duration::days(8));
    let err = broker.publish(msg).await.expect_err("8 days is too long");
    assert!(err.to_string().contains("7-day"), "{err}");
    let week = Message::new(WorkQueue::CallJobs, &b"x"[..])
        .deliver_at(Utc::now() + chrono::Duration::days(7) - chrono::Duration::seconds(5));
    broker.publish(week).await.expect("7 days is accepted");
}

pub async fn poison_message_is_dead_lettered_after_the_limit(broker: Arc<dyn Broker>, limit: u32) {
    let msg = Message::new(WorkQueue::CallJobs, &b"poison"[..]);
    broker.publish(msg.clone()).await.expect("publish");
    let mut sub = broker
        .subscribe(WorkQueue::CallJobs, 1)
        .await
        .expect("subscribe");
    let mut deliveries = 0;
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(1_500), sub.next()).await {
        assert_eq!(d.message.id, msg.id);
        deliveries += 1;
        assert!(
            deliveries <= limit + 1,
            "delivered {deliveries} times with limit {limit}"
        );
        d.requeue().await.expect("requeue");
    }
    assert!(
        deliveries >= limit,
        "only {deliveries} deliveries before dead-lettering"
    );
    let dead = crate::harness::dead_letter_of(broker.as_ref(), &msg.id, WAIT).await;
    assert!(
        dead.reason.contains("delivery_limit"),
        "reason was {:?}",
        dead.reason
    );
    assert_eq!(dead.queue, Some(WorkQueue::CallJobs));
}

pub async fn dead_letters_list_replay_purge(broker: Arc<dyn Broker>) {
    let a = Message::new(WorkQueue::WebhookEvents, &b"{bad json"[..]);
    let b = Message::new(WorkQueue::WebhookEvents, &b"{also bad"[..]);
    broker
        .dead_letter(a.clone(), "undecodable: expected value")
        .await
        .expect("park a");
    broker
        .dead_letter(b.clone(), "undecodable: eof")
        .await
        .expect("park b");
    let listed = broker.list_dead_letters(10).await.expect("list");
    assert_eq!(listed.len(), 2, "listing does not consume");
    let la = listed
        .iter()
        .find(|d| d.message_id == a.id)
        .expect("a listed");
    assert_eq!(la.reason, "undecodable: expected value");
    assert_eq!(la.body_preview, "{bad json");
    assert_eq!(
        broker
            .list_dead_letters(10)
            .await
            .expect("list again")
            .len(),
        2
    );

    assert_eq!(
        broker
            .replay_dead_letters(Some(&a.id), 10)
            .await
            .expect("replay a"),
        1
    );
    let mut sub = broker
        .subscribe(WorkQueue::WebhookEvents, 1)
        .await
        .expect("subscribe");
    let replayed = next(&mut sub).await;
    assert_eq!(replayed.message.id, a.id);
    assert_eq!(replayed.message.body, a.body);
    assert!(!replayed.message.headers.contains_key(headers::DEAD_REASON));
    replayed.ack().await.expect("ack");

    assert_eq!(broker.purge_dead_letters().await.expect("purge"), 1);
    assert!(broker.list_dead_letters(10).await.expect("list").is_empty());
}

pub async fn publish_many_confirms_each(broker: Arc<dyn Broker>) {
    let messages: Vec<Message> = (0..200)
        .map(|i| Message::new(WorkQueue::CallJobs, format!("{{\"i\":{i}}}").into_bytes()))
        .collect();
    let results = broker.publish_many(messages.clone()).await;
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(Result::is_ok), "every message confirmed");
    eventually("200 ready messages", WAIT, || async {
        (broker.queue_depth(WorkQueue::CallJobs).await.ok()? == 200).then_some(())
    })
    .await;
}

pub async fn prefetch_bounds_unacked(broker: Arc<dyn Broker>) {
    for i in 0..5 {
        broker
            .publish(Message::new(WorkQueue::Control, vec![i]))
            .await
            .expect("publish");
    }
    let mut sub = broker
        .subscribe(WorkQueue::Control, 2)
        .await
        .expect("subscribe");
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(400), sub.next())
            .await
            .is_err(),
        "a third delivery beyond prefetch 2"
    );
    a.ack().await.expect("ack");
    let c = next(&mut sub).await;
    b.ack().await.expect("ack");
    c.ack().await.expect("ack");
}

/// Every queue's ready messages, all zero except the named ones.
pub async fn assert_census(broker: &dyn Broker, expected: &[(&str, u64)]) {
    let matches = |census: &std::collections::BTreeMap<String, u64>| {
        census.iter().all(|(queue, held)| {
            let want = expected
                .iter()
                .find(|(q, _)| q == queue)
                .map_or(0, |(_, n)| *n);
            *held == want
        })
    };
    // Messages a reader just handed back (a dead-letter listing) take a moment to be
    // counted as ready again; anything else that differs stays different.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let census = broker.census().await.expect("census");
        if matches(&census) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("queues hold {census:?}, expected {expected:?} and nothing else");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Delays that go through the short tiers, hops included (the long tiers are checked on
/// RabbitMQ with per-message expiry: nobody waits a day in a test).
const DELAYS_MS: [i64; 4] = [0, 150, 1_300, 5_200];

/// N messages per queue kind and per delay arrive exactly once each, on their own queue
/// only, and leave nothing behind anywhere: no copies, no strays, no dead letters.
pub async fn each_message_reaches_only_its_own_queue(broker: Arc<dyn Broker>) {
    const N: usize = 8;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for queue in WorkQueue::ALL {
        let mut sub = broker.subscribe(queue, 16).await.expect("subscribe");
        let tx = tx.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(d) = sub.next().await {
                let _ = tx.send((queue, d.queue, d.message.queue, d.message.id.clone()));
                d.ack().await.expect("ack");
            }
        }));
    }
    let mut sent = std::collections::HashMap::new();
    for queue in WorkQueue::ALL {
        for delay in DELAYS_MS {
            for i in 0..N {
                let mut msg = Message::new(queue, format!("{{\"i\":{i}}}").into_bytes());
                if delay > 0 {
                    msg = msg.deliver_at(Utc::now() + chrono::Duration::milliseconds(delay));
                }
                broker.publish(msg.clone()).await.expect("publish");
                sent.insert(msg.id.clone(), queue);
            }
        }
    }
    let mut seen = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Everything expected, then a quiet second and a half in which copies would show.
    while seen.len() < sent.len() || tokio::time::Instant::now() < deadline {
        let wait = if seen.len() < sent.len() {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_millis(1_500)
        };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some((subscribed, consumed, published_for, id))) => {
                let want = sent.get(&id).copied();
                assert_eq!(want, Some(published_for), "an unknown message {id}");
                assert_eq!(consumed, subscribed, "delivery names another queue");
                assert_eq!(
                    consumed, published_for,
                    "a {published_for} message arrived on {consumed}"
                );
                *seen.entry(id).or_insert(0u32) += 1;
            }
            Ok(None) => panic!("consumers ended"),
            Err(_) => break,
        }
    }
    assert_eq!(seen.len(), sent.len(), "messages missing");
    let copies: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(copies.is_empty(), "delivered more than once: {copies:?}");
    for c in consumers {
        c.abort();
    }
    assert_census(broker.as_ref(), &[]).await;
}

macro_rules! conformance {
    ($($name:ident $(($arg:expr))?),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::harness::memory_broker(3) $(, $arg)?).await;
                }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test]
                async fn $name() {
                    let (broker, prefix) = crate::harness::rabbit_broker(stringify!($name), 3).await;
                    let _clean = crate::harness::CleanOnDrop(prefix);
                    super::$name(broker $(, $arg)?).await;
                }
            )*
        }
    };
}

conformance!(
    publish_consume_ack,
    unacked_is_redelivered_when_consumer_drops,
    delayed_arrives_not_early_and_bounded_late,
    delay_beyond_seven_days_is_refused,
    poison_message_is_dead_lettered_after_the_limit(3),
    dead_letters_list_replay_purge,
    publish_many_confirms_each,
    prefetch_bounds_unacked,
    each_message_reaches_only_its_own_queue,
);

mod rabbitmq_only {
    use std::time::{Duration, Instant};

    use lapin::options::{BasicPublishOptions, QueueBindOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};

    use callfleet_core::adapters::{RabbitBroker, RabbitConfig};
    use callfleet_core::ports::{Broker, Message, WorkQueue};

    use crate::harness::rabbit_broker;

    #[tokio::test]
    async fn unreachable_broker_fails_fast() {
        let started = Instant::now();
        let result = RabbitBroker::connect(RabbitConfig {
            url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            prefix: "unreachable".into(),
            delivery_limit: 3,
            publish_timeout: Duration::from_secs(2),
        })
        .await;
        assert!(result.is_err(), "connecting to a closed port must fail");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "failed only after {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn declaring_the_topology_twice_is_idempotent() {
        let (first, prefix) = rabbit_broker("idempotent", 3).await;
        let _clean = crate::harness::CleanOnDrop(prefix.clone());
        let second = RabbitBroker::connect(RabbitConfig {
            url: crate::harness::amqp_url(),
            prefix: prefix.clone(),
            delivery_limit: 3,
            publish_timeout: Duration::from_secs(5),
        })
        .await
        .expect("same topology declared again");
        second
            .publish(Message::new(WorkQueue::CallJobs, &b"x"[..]))
            .await
            .expect("publish");
        assert_eq!(
            first.queue_depth(WorkQueue::CallJobs).await.expect("depth"),
            1
        );
    }

    #[tokio::test]
    async fn recovers_after_the_broker_closes_the_connection_without_losing_messages() {
        let (broker, prefix) = rabbit_broker("recovery", 5).await;
        let _clean = crate::harness::CleanOnDrop(prefix.clone());
        let mut sub = broker
            .subscribe(WorkQueue::CallJobs, 4)
            .await
            .expect("subscribe");
        let before = Message::new(WorkQueue::CallJobs, &b"before"[..]);
        broker
            .publish(before.clone())
            .await
            .expect("publish before");
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("in time")
            .expect("open");
        assert_eq!(d.message.id, before.id);
        // Leave it unacked, then cut the connection under both the consumer and the publisher.
        let closed = crate::harness::eventually(
            "the test connection to show up",
            Duration::from_secs(10),
            || async {
                let n = crate::harness::close_connections_named(&prefix);
                (n > 0).then_some(n)
            },
        )
        .await;
        assert!(closed >= 1);
        drop(d);
        // The publisher reconnects by itself (retrying what a caller would retry).
        let after = Message::new(WorkQueue::CallJobs, &b"after"[..]);
        crate::harness::eventually(
            "a publish after the connection was closed",
            Duration::from_secs(20),
            || {
                let broker = broker.clone();
                let after = after.clone();
                async move { broker.publish(after).await.ok() }
            },
        )
        .await;
        // The consumer resubscribes by itself and gets both: the unacked one back, and the new one.
        let mut seen = std::collections::HashSet::new();
        while seen.len() < 2 {
            let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
                .await
                .expect("deliveries after recovery")
                .expect("open");
            seen.insert(d.message.id.clone());
            d.ack().await.expect("ack after recovery");
        }
        assert!(
            seen.contains(&before.id) && seen.contains(&after.id),
            "no message lost: {seen:?}"
        );
    }

    fn text(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
    }

    /// Every delay tier, the day-long ones included, hands each message back to its own
    /// work queue only. Messages are put straight into each tier with a 20 ms per-message
    /// expiry, which dead-letters them exactly as the tier's own TTL would.
    #[tokio::test]
    async fn every_delay_tier_returns_messages_to_their_own_queue_only() {
        const N: u64 = 5;
        let (broker, prefix) = rabbit_broker("tiers", 3).await;
        let _clean = crate::harness::CleanOnDrop(prefix.clone());
        let (conn, ch) = crate::harness::raw_channel().await;
        let tiers = callfleet_core::domain::delay::DELAY_TIERS;
        for tier in tiers {
            let tier_queue = format!(
                "{prefix}.delay.{}",
                callfleet_core::domain::delay::tier_name(tier)
            );
            for queue in WorkQueue::ALL {
                for _ in 0..N {
                    let mut headers = FieldTable::default();
                    headers.insert("x-callfleet-queue".into(), text(queue.as_str()));
                    let props = lapin::BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_expiration("20".into())
                        .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
                        .with_headers(headers);
                    ch.basic_publish(
                        "".into(),
                        tier_queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"{}",
                        props,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
                }
            }
        }
        let per_queue = N * tiers.len() as u64;
        crate::harness::eventually("every tier to expire", Duration::from_secs(20), || async {
            let census = broker.census().await.ok()?;
            WorkQueue::ALL
                .iter()
                .all(|q| census.get(q.as_str()) >= Some(&per_queue))
                .then_some(())
        })
        .await;
        // Copies would arrive within the same expiry; give them a moment to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let expected: Vec<(&str, u64)> = WorkQueue::ALL
            .iter()
            .map(|q| (q.as_str(), per_queue))
            .collect();
        super::assert_census(broker.as_ref(), &expected).await;
        let _ = conn.close(200, "done".into()).await;
    }

    /// A broker that still has the bindings of a version that fanned out (`x-match: all`
    /// on an `x-` header, which RabbitMQ ignores) stops fanning out once this version
    /// connects: the old bindings are removed.
    #[tokio::test]
    async fn bindings_left_by_an_earlier_version_stop_fanning_out() {
        let (first, prefix) = rabbit_broker("legacy", 3).await;
        let _clean = crate::harness::CleanOnDrop(prefix.clone());
        let (conn, ch) = crate::harness::raw_channel().await;
        for queue in WorkQueue::ALL {
            let mut bind = FieldTable::default();
            bind.insert("x-match".into(), text("all"));
            bind.insert("x-callfleet-queue".into(), text(queue.as_str()));
            ch.queue_bind(
                first.queue_name(queue).as_str().into(),
                format!("{prefix}.work").as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                bind,
            )
            .await
            .expect("legacy binding");
        }
        let _ = conn.close(200, "done".into()).await;
        drop(first);
        // The new version starts on the same broker.
        let broker = RabbitBroker::connect(RabbitConfig {
            url: crate::harness::amqp_url(),
            prefix: prefix.clone(),
            delivery_limit: 3,
            publish_timeout: Duration::from_secs(5),
        })
        .await
        .expect("connect over the old topology");
        let due = chrono::Utc::now() + chrono::Duration::milliseconds(150);
        broker
            .publish(Message::new(WorkQueue::WebhookEvents, &b"{}"[..]).deliver_at(due))
            .await
            .expect("publish delayed");
        crate::harness::eventually("the delayed message", Duration::from_secs(10), || async {
            (broker.census().await.ok()?.get("webhook_events") == Some(&1)).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        super::assert_census(&broker, &[("webhook_events", 1)]).await;
    }
}
