//! Signed callbacks end to end on RabbitMQ + Redis, verified by a receiver that uses the
//! official `standardwebhooks` library: every event arrives through a receiver that fails,
//! goes down and is slow; a 410 disables its subscription; the last failure is a dead
//! letter that replays; private addresses are refused; secrets rotate without a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use livekit_emulator::Outcome;
use serde_json::{json, Value};

use crate::fleet::{test_callbacks, Backing, FleetOptions, TestFleet, SIGNING_SECRET};
use crate::harness::{eventually, script};
use crate::inbound::queues_drained;
use crate::receiver::{Answered, Received, Receiver};

const SLOW: Duration = Duration::from_secs(40);
/// The subscription's own secret (the receiver verifies with it and the fleet's).
const SUB_SECRET: &str = "whsec_dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IG9mIDMyIGJ5dGVz";

fn on_rabbit() -> FleetOptions {
    FleetOptions {
        backing: Backing::RabbitRedis,
        ..Default::default()
    }
}

async fn subscribe(fleet: &TestFleet, body: Value) -> Value {
    let (status, sub) = fleet.post("/v1/subscriptions", &body).await;
    assert_eq!(status, 201, "{sub}");
    sub
}

/// (call id, event type) → the webhook ids it arrived with, from verified deliveries.
fn by_event(records: &[Received]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut seen: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in records {
        let key = (
            r.body["data"]["call_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            r.body["type"].as_str().unwrap_or_default().to_owned(),
        );
        seen.entry(key)
            .or_default()
            .insert(r.webhook_id.clone().unwrap_or_default());
    }
    seen
}

/// Submits `n` calls to `{base}0`, `{base}1`…, each answered and hung up after `talk_ms`.
async fn answered_calls(fleet: &TestFleet, base: &str, n: usize, talk_ms: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let number = format!("{base}{i}");
        fleet
            .emulator
            .script(&number, script(Outcome::Answer, Some(talk_ms)));
        ids.push(fleet.submit(json!({"to": number})).await);
    }
    ids
}

/// Every (call, event type) pair the calls `ids` should announce.
fn each_event(ids: &[String], types: &[&str]) -> BTreeSet<(String, String)> {
    ids.iter()
        .flat_map(|id| types.iter().map(move |t| (id.clone(), (*t).to_owned())))
        .collect()
}

fn delivered(records: &[Received]) -> Vec<Received> {
    records
        .iter()
        .filter(|r| matches!(r.answered, Answered::Status(s) if (200..300).contains(&s)))
        .cloned()
        .collect()
}

/// Five answered calls, each announcing queued, in progress and completed to a
/// subscription and to the call's own URL, while the receiver answers 500 twice, is
/// slower than the timeout once, and goes down and comes back: every event arrives,
/// verified, and an event that arrived twice carries one webhook-id.
#[tokio::test]
async fn every_event_arrives_signed_through_a_failing_receiver() {
    // Retries spread over ~15 s: longer than the receiver is down.
    let fleet = TestFleet::start(
        "callbacks",
        FleetOptions {
            callbacks: callfleet_workers::CallbackSettings {
                schedule: [500, 1_000, 2_000, 4_000, 8_000]
                    .map(Duration::from_millis)
                    .to_vec(),
                ..test_callbacks()
            },
            ..on_rabbit()
        },
    )
    .await;
    let mut receiver = Receiver::start(&[SUB_SECRET, SIGNING_SECRET]).await;
    let sub = subscribe(
        &fleet,
        json!({"url": receiver.endpoint("/hooks"), "secret": SUB_SECRET,
               "event_types": ["call.queued", "call.in_progress", "call.completed"],
               "filter": {"direction": "outbound"}}),
    )
    .await;
    assert_eq!(sub["secret"], SUB_SECRET);
    receiver.set_mode("/hooks", 500, 0, false, Some(2)).await;
    receiver.set_mode("/own", 200, 2_500, false, Some(1)).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let number = format!("+1510555016{n}");
        fleet
            .emulator
            .script(&number, script(Outcome::Answer, Some(300)));
        ids.push(
            fleet
                .submit(json!({"to": number, "wait_until_answered": true,
                               "callback_url": receiver.endpoint("/own")}))
                .await,
        );
    }
    for id in &ids[..2] {
        fleet.wait_for(id, "completed", SLOW).await;
    }
    // Down for a while: attempts meanwhile are refused connections, retried later. The
    // receiver forgets what it saw when it restarts, so first it fails everything (503,
    // retried), then what it accepted so far is read, then it goes down.
    receiver.set_mode("/hooks", 503, 0, false, None).await;
    receiver.set_mode("/own", 503, 0, false, None).await;
    let mut records = receiver.received(None).await;
    receiver.stop();
    tokio::time::sleep(Duration::from_millis(800)).await;
    receiver.restart().await;
    let expected = each_event(&ids, &["call.queued", "call.in_progress", "call.completed"]);
    let all = eventually("every event at both URLs", SLOW, || {
        let seen_before = records.clone();
        let receiver = &receiver;
        let expected = &expected;
        async move {
            let mut all = seen_before;
            all.extend(receiver.received(None).await);
            let ok = ["/hooks", "/own"].iter().all(|path| {
                let got: Vec<Received> = delivered(&all)
                    .into_iter()
                    .filter(|r| r.path == *path)
                    .collect();
                by_event(&got).keys().cloned().collect::<BTreeSet<_>>() == *expected
            });
            ok.then_some(all)
        }
    })
    .await;
    records = all;
    assert!(
        records.iter().all(|r| r.verified),
        "unverified: {:?}",
        records.iter().filter(|r| !r.verified).collect::<Vec<_>>()
    );
    for path in ["/hooks", "/own"] {
        let got: Vec<Received> = records.iter().filter(|r| r.path == path).cloned().collect();
        for (event, webhook_ids) in by_event(&got) {
            assert_eq!(webhook_ids.len(), 1, "{event:?} came with {webhook_ids:?}");
        }
    }
    // The receiver's failures were retried: the log shows them, newest first.
    let sub_id = sub["id"].as_str().expect("id");
    let (_, log) = fleet
        .get(&format!("/v1/subscriptions/{sub_id}/deliveries?limit=1000"))
        .await;
    let outcomes: Vec<&str> = log["deliveries"]
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|d| d["outcome"].as_str())
        .collect();
    assert!(outcomes.contains(&"retrying"), "{outcomes:?}");
    assert_eq!(
        outcomes.iter().filter(|o| **o == "delivered").count(),
        15,
        "{outcomes:?}"
    );
    queues_drained(&fleet, Duration::from_secs(15)).await;
    fleet.stop().await;
}

/// A receiver answering 410 disables its subscription (later events are not sent); one
/// that always fails ends in the dead-letter queue with the reason, and a replay
/// delivers it once the receiver is back.
#[tokio::test]
async fn gone_disables_and_the_last_failure_is_a_replayable_dead_letter() {
    let fleet = TestFleet::start("callbacks-dead", on_rabbit()).await;
    let receiver = Receiver::start(&[SUB_SECRET]).await;
    receiver.set_mode("/gone", 410, 0, false, None).await;
    receiver.set_mode("/broken", 503, 0, false, None).await;
    let gone = subscribe(
        &fleet,
        json!({"url": receiver.endpoint("/gone"), "secret": SUB_SECRET, "event_types": ["call.queued"]}),
    )
    .await;
    let broken = subscribe(
        &fleet,
        json!({"url": receiver.endpoint("/broken"), "secret": SUB_SECRET, "event_types": ["call.queued"]}),
    )
    .await;
    fleet
        .emulator
        .script("+15105550171", script(Outcome::Answer, Some(100)));
    let id = fleet.submit(json!({"to": "+15105550171"})).await;
    let gone_id = gone["id"].as_str().expect("id");
    let disabled = eventually("the 410 to disable the subscription", SLOW, || async {
        let (_, sub) = fleet.get(&format!("/v1/subscriptions/{gone_id}")).await;
        (sub["enabled"] == false).then_some(sub)
    })
    .await;
    assert_eq!(disabled["disabled_reason"], "410 Gone from the receiver");
    // Four attempts (one and the schedule's three retries), then the dead letter.
    let dead = eventually("the callback's dead letter", SLOW, || async {
        fleet
            .broker
            .list_dead_letters(10)
            .await
            .ok()?
            .into_iter()
            .find(|d| d.queue == Some(callfleet_core::ports::WorkQueue::Callbacks))
    })
    .await;
    assert!(dead.reason.contains("4 attempts failed"), "{}", dead.reason);
    assert!(dead.reason.contains("503"), "{}", dead.reason);
    let attempts = receiver.received(Some("/broken")).await;
    assert_eq!(attempts.len(), 4);
    assert!(attempts
        .iter()
        .all(|r| r.verified && r.body["data"]["call_id"] == id.as_str()));
    // A second call: nothing for the disabled subscription.
    fleet
        .emulator
        .script("+15105550172", script(Outcome::Answer, Some(100)));
    let second = fleet.submit(json!({"to": "+15105550172"})).await;
    fleet.wait_for(&second, "completed", SLOW).await;
    // Back up, the dead letter replays and is delivered with its first webhook-id.
    receiver.set_mode("/broken", 200, 0, false, None).await;
    let replayed = fleet
        .broker
        .replay_dead_letters(Some(&dead.message_id), 10)
        .await
        .expect("replay");
    assert_eq!(replayed, 1);
    let broken_id = broken["id"].as_str().expect("id");
    eventually("the replay to be delivered", SLOW, || async {
        let got = receiver.received(Some("/broken")).await;
        got.iter()
            .any(|r| {
                matches!(r.answered, Answered::Status(200))
                    && r.webhook_id == attempts[0].webhook_id
            })
            .then_some(())
    })
    .await;
    let (_, log) = fleet
        .get(&format!("/v1/subscriptions/{broken_id}/deliveries"))
        .await;
    let outcomes: Vec<&str> = log["deliveries"]
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|d| d["outcome"].as_str())
        .collect();
    assert_eq!(outcomes.first(), Some(&"delivered"), "{outcomes:?}");
    assert!(outcomes.contains(&"dead_lettered"), "{outcomes:?}");
    // The second call's queued event reached the broken subscription, never the gone one.
    let gone_calls: BTreeSet<String> = receiver
        .received(Some("/gone"))
        .await
        .iter()
        .filter_map(|r| r.body["data"]["call_id"].as_str().map(str::to_owned))
        .collect();
    assert!(!gone_calls.contains(&second), "{gone_calls:?}");
    queues_drained(&fleet, Duration::from_secs(15)).await;
    fleet.stop().await;
}

/// Without permission for private addresses, a subscription or a call aimed at the
/// fleet's own network is refused naming the field; so is a URL that is not http(s).
#[tokio::test]
async fn private_and_bad_callback_urls_are_refused() {
    let fleet = TestFleet::start(
        "callbacks-ssrf",
        FleetOptions {
            callbacks: workers_without_private(),
            ..Default::default()
        },
    )
    .await;
    for url in [
        "http://127.0.0.1:9000/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost/hook",
        "http://[::1]/hook",
    ] {
        let (status, body) = fleet.post("/v1/subscriptions", &json!({"url": url})).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["error"]["field"], "url", "{body}");
        let (status, body) = fleet
            .post(
                "/v1/calls",
                &json!({"to": "+15105550181", "callback_url": url}),
            )
            .await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["error"]["field"], "callback_url", "{body}");
    }
    let (status, body) = fleet
        .post("/v1/subscriptions", &json!({"url": "ftp://example.com/x"}))
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("url")),
        "{body}"
    );
    let (status, body) = fleet
        .post(
            "/v1/calls/batch",
            &json!({"calls": [{"to": "+15105550181", "callback_url": "http://192.168.1.1/x"},
                               {"to": "+15105550182"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], 422, "{body}");
    assert_eq!(body["results"][1]["status"], 202, "{body}");
    fleet.stop().await;
}

fn workers_without_private() -> callfleet_workers::CallbackSettings {
    callfleet_workers::CallbackSettings {
        allow_private: false,
        ..test_callbacks()
    }
}

/// CRUD, a test-send in the delivery log, and a rotation: the new secret signs first and
/// the old one keeps verifying until it is removed.
#[tokio::test]
async fn subscriptions_rotate_secrets_and_test_sends_are_logged() {
    let fleet = TestFleet::start("callbacks-rotate", on_rabbit()).await;
    let receiver = Receiver::start(&[SUB_SECRET]).await;
    let sub = subscribe(
        &fleet,
        json!({"url": receiver.endpoint("/r"), "secret": SUB_SECRET, "description": "desk"}),
    )
    .await;
    let id = sub["id"].as_str().expect("id").to_owned();
    let (_, listed) = fleet.get("/v1/subscriptions").await;
    assert!(listed["subscriptions"]
        .as_array()
        .is_some_and(|s| s.iter().any(|x| x["id"] == id.as_str())));
    assert!(
        !listed.to_string().contains(SUB_SECRET),
        "secrets are masked in listings"
    );
    let (status, rotated) = fleet
        .post(
            &format!("/v1/subscriptions/{id}/rotate-secret"),
            &Value::Null,
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let (status, sent) = fleet
        .post(&format!("/v1/subscriptions/{id}/test"), &Value::Null)
        .await;
    assert_eq!(status, 202, "{sent}");
    let got = eventually("the test-send", SLOW, || async {
        receiver.received(Some("/r")).await.into_iter().next()
    })
    .await;
    assert!(
        got.verified,
        "the old secret still verifies during a rotation"
    );
    assert_eq!(got.body["type"], "subscription.test");
    assert_eq!(got.webhook_id.as_deref(), sent["webhook_id"].as_str());
    assert_eq!(
        got.signature.as_deref().map(|s| s.split(' ').count()),
        Some(2),
        "signed with the new and the old secret"
    );
    // The old secret retired: the receiver that only knows it no longer verifies.
    let (status, body) = fleet
        .send_json(
            reqwest::Method::DELETE,
            &format!("/v1/subscriptions/{id}/secrets/1"),
            &Value::Null,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, sent) = fleet
        .post(&format!("/v1/subscriptions/{id}/test"), &Value::Null)
        .await;
    let second = eventually("the second test-send", SLOW, || async {
        receiver
            .received(Some("/r"))
            .await
            .into_iter()
            .find(|r| r.webhook_id.as_deref() == sent["webhook_id"].as_str())
    })
    .await;
    assert!(!second.verified);
    let (_, log) = fleet
        .get(&format!("/v1/subscriptions/{id}/deliveries"))
        .await;
    assert_eq!(
        log["deliveries"][0]["event_type"], "subscription.test",
        "{log}"
    );
    let (status, _) = fleet
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/subscriptions/{id}"),
            &json!({"enabled": false}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = fleet
        .send_json(
            reqwest::Method::DELETE,
            &format!("/v1/subscriptions/{id}"),
            &Value::Null,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = fleet.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(status, 404);
    queues_drained(&fleet, Duration::from_secs(15)).await;
    fleet.stop().await;
}

/// The worker delivering callbacks to a slow receiver is SIGKILLed mid-delivery; another
/// worker process takes over the dispatch and the deliveries: every event still arrives,
/// and one that arrived twice carries the same webhook-id.
#[tokio::test]
async fn a_killed_worker_loses_no_callback() {
    let fleet = TestFleet::start(
        "callbacks-kill",
        FleetOptions {
            workers: 0,
            ..on_rabbit()
        },
    )
    .await;
    let receiver = Receiver::start(&[SUB_SECRET]).await;
    receiver.set_mode("/k", 200, 400, false, None).await;
    subscribe(
        &fleet,
        json!({"url": receiver.endpoint("/k"), "secret": SUB_SECRET,
               "event_types": ["call.queued", "call.completed"]}),
    )
    .await;
    let mut first = fleet.worker_process();
    let ids = answered_calls(&fleet, "+1510555019", 8, 100).await;
    // Some callbacks are in flight at the slow receiver when the worker dies.
    eventually("the first deliveries to start", SLOW, || async {
        (!receiver.received(Some("/k")).await.is_empty()).then_some(())
    })
    .await;
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    let mut second = fleet.worker_process();
    let expected = each_event(&ids, &["call.queued", "call.completed"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let records = loop {
        let all = receiver.received(Some("/k")).await;
        let seen: BTreeSet<(String, String)> = by_event(&delivered(&all)).into_keys().collect();
        if seen == expected {
            break all;
        }
        if tokio::time::Instant::now() > deadline {
            let (_, calls) = fleet.get("/v1/calls?limit=20").await;
            let statuses: Vec<(&str, &str)> = calls["calls"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .map(|c| {
                            (
                                c["id"].as_str().unwrap_or(""),
                                c["status"].as_str().unwrap_or(""),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            panic!(
                "missing {:?}; calls {statuses:?}; census {:?}",
                expected.difference(&seen).collect::<Vec<_>>(),
                fleet.broker.census().await.ok()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(records.iter().all(|r| r.verified));
    for (event, webhook_ids) in by_event(&records) {
        assert_eq!(webhook_ids.len(), 1, "{event:?} came with {webhook_ids:?}");
    }
    queues_drained(&fleet, Duration::from_secs(20)).await;
    // Gone before the fleet's clean-up, so it cannot declare or write anything after it.
    let _ = second.start_kill();
    let _ = second.wait().await;
    fleet.stop().await;
}

/// An inbound call announces its start, the hang-up an operator asked for and its end to
/// the subscription of its profile's organization, and nothing to another organization's.
#[tokio::test]
async fn inbound_calls_are_announced_to_their_organization() {
    use crate::inbound::{agent_joins_after, call_in_room, create_profile, place};
    const DID: &str = "+15105550100";
    let fleet = TestFleet::start("callbacks-in", on_rabbit()).await;
    let receiver = Receiver::start(&[SUB_SECRET]).await;
    create_profile(
        &fleet,
        json!({"id": "acme-desk", "name": "Acme desk", "organization": "acme",
               "agent_name": "acme-agent", "numbers": [DID], "agent_join_timeout_s": 1}),
    )
    .await;
    agent_joins_after(&fleet, "acme-agent", 100).await;
    for (path, org) in [("/acme", "acme"), ("/other", "other")] {
        subscribe(
            &fleet,
            json!({"url": receiver.endpoint(path), "secret": SUB_SECRET,
                   "event_types": ["call.started", "call.hung_up", "call.ended"],
                   "filter": {"organization": org, "direction": "inbound"}}),
        )
        .await;
    }
    let placed = place(&fleet, json!({"from": "+15105550133", "to": DID})).await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = eventually("the agent to answer", SLOW, || async {
        let c = call_in_room(&fleet, &room, SLOW).await;
        (c["status"] == "in_progress").then_some(c)
    })
    .await;
    let id = call["id"].as_str().expect("id").to_owned();
    let (status, body) = fleet
        .post(
            &format!("/v1/calls/{id}/hangup"),
            &json!({"delete_room": true}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    fleet.wait_for(&id, "completed", SLOW).await;
    let got = eventually("start, hang-up and end", SLOW, || async {
        let got = delivered(&receiver.received(Some("/acme")).await);
        let types: BTreeSet<String> = got
            .iter()
            .filter_map(|r| r.body["type"].as_str().map(str::to_owned))
            .collect();
        (types.len() == 3).then_some(got)
    })
    .await;
    assert!(got
        .iter()
        .all(|r| r.verified && r.body["data"]["call_id"] == id.as_str()));
    let ended = got
        .iter()
        .find(|r| r.body["type"] == "call.ended")
        .expect("ended");
    assert_eq!(ended.body["data"]["status"], "completed");
    assert_eq!(ended.body["data"]["profile_id"], "acme-desk");
    assert_eq!(ended.body["data"]["organization"], "acme");
    assert_eq!(crate::control::executed(&fleet, "DeleteRoom", &room), 1);
    assert!(receiver.received(Some("/other")).await.is_empty());
    queues_drained(&fleet, Duration::from_secs(15)).await;
    fleet.stop().await;
}

/// The broker connection is closed under the dispatcher and the deliveries: publishes
/// and acks fail until the adapter reconnects, and no callback is lost for it.
#[tokio::test]
async fn a_closed_broker_connection_loses_no_callback() {
    let fleet = TestFleet::start("callbacks-amqp", on_rabbit()).await;
    let prefix = fleet.prefix.clone().expect("a RabbitMQ prefix");
    let receiver = Receiver::start(&[SUB_SECRET]).await;
    receiver.set_mode("/b", 200, 150, false, None).await;
    subscribe(
        &fleet,
        json!({"url": receiver.endpoint("/b"), "secret": SUB_SECRET,
               "event_types": ["call.queued", "call.completed"]}),
    )
    .await;
    let ids = answered_calls(&fleet, "+1510555012", 6, 200).await;
    eventually("the first deliveries", SLOW, || async {
        (!receiver.received(Some("/b")).await.is_empty()).then_some(())
    })
    .await;
    let closed =
        tokio::task::spawn_blocking(move || crate::harness::close_connections_named(&prefix))
            .await
            .expect("rabbitmqctl");
    assert!(closed > 0, "no connection of this test was found to close");
    let expected = each_event(&ids, &["call.queued", "call.completed"]);
    let records = eventually("every event after the broker came back", SLOW, || async {
        let all = receiver.received(Some("/b")).await;
        let seen: BTreeSet<(String, String)> = by_event(&delivered(&all)).into_keys().collect();
        (seen == expected).then_some(all)
    })
    .await;
    assert!(records.iter().all(|r| r.verified));
    for (event, webhook_ids) in by_event(&records) {
        assert_eq!(webhook_ids.len(), 1, "{event:?} came with {webhook_ids:?}");
    }
    queues_drained(&fleet, Duration::from_secs(20)).await;
    fleet.stop().await;
}

/// Subscriptions listed in CALLFLEET_SUBSCRIPTIONS are created, then replaced by id on the
/// next start; a wrong entry stops the start naming it.
#[tokio::test]
async fn configured_subscriptions_are_created_then_replaced() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        callbacks: callfleet_core::config::CallbackConfig,
    }
    let config = |json: &str, private: &str| {
        Cli::try_parse_from([
            "t",
            "--subscriptions",
            json,
            "--callbacks-allow-private",
            private,
        ])
        .expect("parses")
        .callbacks
    };
    let fleet = TestFleet::start("callbacks-config", FleetOptions::default()).await;
    let first = config(
        &format!(
            r#"[{{"id": "ops", "url": "http://127.0.0.1:9/hook", "event_types": ["call.failed"], "secret": "{SUB_SECRET}"}}]"#
        ),
        "true",
    );
    let made = callfleet::fleet::configured_subscriptions(fleet.backends(), &first)
        .await
        .expect("applied");
    assert_eq!(made, 1);
    let (status, ops) = fleet.get("/v1/subscriptions/ops").await;
    assert_eq!(status, 200, "{ops}");
    assert_eq!(ops["event_types"], json!(["call.failed"]));
    let again = config(
        &format!(
            r#"[{{"id": "ops", "url": "http://127.0.0.1:9/other", "event_types": ["call.failed"], "secret": "{SUB_SECRET}"}}]"#
        ),
        "true",
    );
    callfleet::fleet::configured_subscriptions(fleet.backends(), &again)
        .await
        .expect("applied");
    let (_, replaced) = fleet.get("/v1/subscriptions/ops").await;
    assert_eq!(replaced["url"], "http://127.0.0.1:9/other");
    assert_eq!(replaced["created_at"], ops["created_at"]);
    for (json, private, names) in [
        (
            r#"[{"url": "http://127.0.0.1:9/x"}]"#.to_owned(),
            "true",
            "[0].id",
        ),
        (
            r#"[{"id": "x", "url": "http://127.0.0.1:9/x"}]"#.to_owned(),
            "true",
            "[0].secret",
        ),
        (
            format!(r#"[{{"id": "x", "url": "http://127.0.0.1:9/x", "secret": "{SUB_SECRET}"}}]"#),
            "false",
            "[0].url",
        ),
        (r#"{"id": "x"}"#.to_owned(), "true", "JSON array"),
    ] {
        let e =
            callfleet::fleet::configured_subscriptions(fleet.backends(), &config(&json, private))
                .await
                .expect_err("refused");
        assert!(e.to_string().contains(names), "{e}");
        assert!(e.to_string().starts_with("CALLFLEET_SUBSCRIPTIONS"), "{e}");
    }
    fleet.stop().await;
}

/// The metrics of the ways out: commands by kind and result, stream clients and events,
/// callbacks by result and their delay.
#[tokio::test]
async fn the_ways_out_are_measured() {
    let handle = callfleet_core::telemetry::prometheus().expect("recorder");
    let fleet = TestFleet::start("callbacks-metrics", FleetOptions::default()).await;
    let receiver = Receiver::start(&[SUB_SECRET]).await;
    subscribe(
        &fleet,
        json!({"url": receiver.endpoint("/m"), "secret": SUB_SECRET, "event_types": ["call.hung_up"]}),
    )
    .await;
    let stream =
        crate::events::StreamClient::connect(&fleet.base, "", None, crate::fleet::API_KEY).await;
    fleet
        .emulator
        .script("+15105550231", script(Outcome::Answer, None));
    let id = fleet
        .submit(json!({"to": "+15105550231", "wait_until_answered": true}))
        .await;
    fleet.wait_for(&id, "in_progress", SLOW).await;
    let (status, _) = fleet
        .post(&format!("/v1/calls/{id}/hangup"), &json!({}))
        .await;
    assert_eq!(status, 202);
    fleet.wait_for(&id, "completed", SLOW).await;
    eventually("the hang-up's callback", SLOW, || async {
        (!delivered(&receiver.received(Some("/m")).await).is_empty()).then_some(())
    })
    .await;
    stream
        .until("the end on the stream", |e| {
            e.iter().any(|e| e.event == "call.completed")
        })
        .await;
    let text = handle.render();
    for needle in [
        "callfleet_control_commands_total{kind=\"hangup\",result=\"accepted\"} 1",
        "callfleet_control_commands_total{kind=\"hangup\",result=\"hung_up\"} 1",
        "callfleet_jobs_enqueued_total{queue=\"control\"} 1",
        "callfleet_stream_clients 1",
        "callfleet_stream_events_total",
        "callfleet_callbacks_total{result=\"delivered\"} 1",
        "callfleet_callback_delivery_delay_seconds_count 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    drop(stream.close());
    fleet.stop().await;
}
