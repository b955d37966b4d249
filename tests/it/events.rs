//! The live stream (`GET /v1/events`) on RabbitMQ + Redis: changes made by a worker in
//! another process reach clients of two ingress instances; a client that drops resumes
//! with `Last-Event-ID` and misses nothing, sees nothing twice.

use std::time::Duration;

use futures::StreamExt;
use livekit_emulator::Outcome;
use serde_json::{json, Value};

use crate::fleet::{Backing, FleetOptions, TestFleet, API_KEY, VIEWER_KEY};
use crate::harness::{eventually, script};
use crate::inbound::queues_drained;

const SLOW: Duration = Duration::from_secs(30);

/// One Server-Sent Event as received.
#[derive(Debug, Clone, Default)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A stream client: collects events in the background.
pub struct StreamClient {
    pub events: std::sync::Arc<parking_lot::Mutex<Vec<Sse>>>,
    /// Comment lines seen (heartbeats).
    pub comments: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamClient {
    pub async fn connect(base: &str, query: &str, last_event_id: Option<&str>, key: &str) -> Self {
        let mut request = reqwest::Client::new()
            .get(format!("{base}/v1/events{query}"))
            .bearer_auth(key);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("ingress reachable");
        assert_eq!(response.status(), 200, "stream refused");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        let events = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let comments = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (sink, seen) = (events.clone(), comments.clone());
        let task = tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let mut buffer = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let mut event = Sse::default();
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            event.id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event.event = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        } else if line.starts_with(':') {
                            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    if !data.is_empty() {
                        event.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                        sink.lock().push(event);
                    }
                }
            }
        });
        Self {
            events,
            comments,
            task,
        }
    }

    pub fn snapshot(&self) -> Vec<Sse> {
        self.events.lock().clone()
    }

    /// Waits until `check` holds for the events received so far.
    pub async fn until(&self, what: &str, check: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
        eventually(what, SLOW, || async {
            let events = self.snapshot();
            check(&events).then_some(events)
        })
        .await
    }

    pub fn close(self) -> Vec<Sse> {
        self.task.abort();
        self.snapshot()
    }
}

/// `GET /v1/events` with the test key, answered (whatever its status).
async fn open_stream(fleet: &TestFleet) -> reqwest::Response {
    fleet
        .http
        .get(format!("{}/v1/events", fleet.base))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("reachable")
}

fn completed(events: &[Sse], id: &str) -> bool {
    events
        .iter()
        .any(|e| e.data["call_id"] == id && e.event == "call.completed")
}

fn ids(events: &[Sse]) -> Vec<String> {
    events.iter().filter_map(|e| e.id.clone()).collect()
}

/// Two ingress instances, a worker in its own process: both streams see every change of
/// every call, in order; a client that drops resumes with Last-Event-ID without a gap or a
/// repeat; filters and number masking apply.
#[tokio::test]
async fn the_stream_spans_instances_and_resumes_with_last_event_id() {
    let mut fleet = TestFleet::start(
        "events",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    let second = fleet.spawn_ingress().await;
    let mut worker = fleet.worker_process();
    for n in 0..6 {
        fleet.emulator.script(
            &format!("+1510555014{n}"),
            script(Outcome::Answer, Some(200)),
        );
    }
    let everything = StreamClient::connect(&fleet.base, "", None, API_KEY).await;
    let completions = StreamClient::connect(
        &second,
        "?type=call.completed&direction=outbound",
        None,
        API_KEY,
    )
    .await;
    let dropping = StreamClient::connect(&second, "", None, API_KEY).await;

    let first = fleet.submit(json!({"to": "+15105550140"})).await;
    dropping
        .until("the first call to complete on the second ingress", |e| {
            completed(e, &first)
        })
        .await;
    // The last event the client got before it dropped (anything after is for the resume).
    let before = dropping.close();
    let resume_from = before.last().and_then(|e| e.id.clone()).expect("ids");

    // While the client is away, more calls run.
    let mut rest = Vec::new();
    for n in 1..6 {
        rest.push(fleet.submit(json!({"to": format!("+1510555014{n}")})).await);
    }
    for id in &rest {
        everything
            .until("every call to complete", |e| completed(e, id))
            .await;
    }
    let resumed = StreamClient::connect(&second, "", Some(&resume_from), API_KEY).await;
    let all = everything.snapshot();
    let after = resumed
        .until("the resumed stream to catch up", |e| {
            e.len() >= all.len() - before.len()
        })
        .await;
    // Nothing missed, nothing twice: the first stream's ids after the resume point are
    // exactly the resumed stream's.
    let expected: Vec<String> = ids(&all)
        .into_iter()
        .skip_while(|id| id != &resume_from)
        .skip(1)
        .collect();
    assert_eq!(ids(&after)[..expected.len()], expected[..]);
    // The two ingress instances saw the same events in the same order.
    let before_ids = ids(&before);
    assert_eq!(ids(&all)[..before_ids.len()], before_ids[..]);
    // Every change of a call is there: its queued, dialing… completed.
    let kinds: Vec<String> = all
        .iter()
        .filter(|e| e.data["call_id"] == first.as_str())
        .map(|e| {
            e.data["entry"]["event"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    for step in ["accepted", "dialing", "completed"] {
        assert!(
            kinds.iter().any(|k| k == step),
            "{step} missing from {kinds:?}"
        );
    }
    // Filtered: only completions, one per call.
    let done = completions.until("six completions", |e| e.len() >= 6).await;
    assert!(done.iter().all(|e| e.event == "call.completed"), "{done:?}");
    assert_eq!(done.len(), 6);
    // This key sees numbers in full.
    assert_eq!(
        done[0].data["to"]
            .as_str()
            .map(|n| n.starts_with("+1510555014")),
        Some(true)
    );
    queues_drained(&fleet, Duration::from_secs(10)).await;
    // Gone before the fleet's clean-up, so it cannot declare or write anything after it.
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    fleet.stop().await;
}

/// Bad filters and resume ids are refused naming the parameter; a key without the
/// numbers right sees them masked; an idle stream gets heartbeats.
#[tokio::test]
async fn filters_are_checked_and_numbers_masked() {
    let fleet = TestFleet::start("events-mask", FleetOptions::default()).await;
    let (status, body) = fleet.get("/v1/events?direction=sideways").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "direction");
    let (status, body) = fleet.get("/v1/events?type=call.nope").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "type");
    let response = fleet
        .http
        .get(format!("{}/v1/events", fleet.base))
        .bearer_auth(API_KEY)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .expect("reachable");
    assert_eq!(response.status(), 422);
    let unauthorized = fleet
        .http
        .get(format!("{}/v1/events", fleet.base))
        .send()
        .await
        .expect("reachable");
    assert_eq!(unauthorized.status(), 401);

    let viewer = StreamClient::connect(&fleet.base, "", None, VIEWER_KEY).await;
    fleet
        .emulator
        .script("+15105550149", script(Outcome::Answer, Some(100)));
    let id = fleet.submit(json!({"to": "+15105550149"})).await;
    let seen = viewer
        .until("the call to complete", |e| completed(e, &id))
        .await;
    assert!(
        seen.iter().all(|e| e.data["to"] == "+1••••••••49"),
        "{:?}",
        seen.iter().map(|e| &e.data["to"]).collect::<Vec<_>>()
    );
    assert!(seen.iter().all(|e| e.data.get("callback_url").is_none()));
    eventually("a heartbeat on the idle stream", SLOW, || async {
        (viewer.comments.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    fleet.stop().await;
}

/// A client that stops reading while changes pour in is told it fell behind and is
/// disconnected; the ingress never buffers more than its bound for it.
#[tokio::test]
async fn a_client_too_slow_to_keep_up_is_told_and_dropped() {
    let fleet = TestFleet::start(
        "events-slow",
        FleetOptions {
            stream_buffer: 64,
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    let response = open_stream(&fleet).await;
    assert_eq!(response.status(), 200);
    // A call changed 20,000 times while the client reads nothing (about 12 MB of events,
    // more than the sockets between them hold).
    fleet
        .emulator
        .script("+15105550150", script(Outcome::Answer, Some(100)));
    let id = fleet.submit(json!({"to": "+15105550150"})).await;
    let calls = fleet.calls();
    for n in 0..20_000 {
        calls
            .update(&id, |c| {
                c.note(chrono::Utc::now(), "bench_tick", Some(n.to_string()))
            })
            .await
            .expect("update");
    }
    let body = tokio::time::timeout(SLOW, response.text())
        .await
        .expect("the stream ends")
        .unwrap_or_default();
    let tail: Vec<&str> = body.lines().rev().take(6).collect();
    assert!(
        body.contains("event: error") && body.contains("too_slow"),
        "the stream ended without saying why: {tail:?}"
    );
    let received = body.matches("event: call.").count();
    assert!(received < 20_000, "received {received}: never fell behind?");
    fleet.stop().await;
}

/// One ingress serves a bounded number of stream clients: one more is told to come back
/// (503, Retry-After) and gets in once another left.
#[tokio::test]
async fn stream_clients_are_capped_per_ingress() {
    let fleet = TestFleet::start("events-cap", FleetOptions::default()).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(StreamClient::connect(&fleet.base, "", None, API_KEY).await);
    }
    let refused = open_stream(&fleet).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    drop(clients.pop().map(StreamClient::close));
    eventually("a freed place", SLOW, || async {
        (open_stream(&fleet).await.status() == 200).then_some(())
    })
    .await;
    fleet.stop().await;
}
