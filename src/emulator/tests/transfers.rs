//! Scripted transfer targets (TransferSIPParticipant, a cold transfer by SIP REFER) and the
//! disconnect reasons of hang-ups (RemoveParticipant, DeleteRoom), driven over HTTP and
//! checked by their effects: room membership, the request records, and the webhooks posted
//! to a receiver of our own.

mod common;
use common::{admin_token_for, start_with};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use livekit_emulator::{EmulatorConfig, RunningEmulator};
use serde_json::{json, Value};

const CALLER_FROM: &str = "+15105550123";
const CALLER: &str = "sip_+15105550123";

/// Every webhook body posted to us, in arrival order.
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<Value>>>);

impl Hooks {
    fn all(&self) -> Vec<Value> {
        self.0.lock().expect("hooks").clone()
    }

    /// The events about `room`, as `event` or `event:identity:disconnectReason`.
    fn trail(&self, room: &str) -> Vec<String> {
        self.all()
            .iter()
            .filter(|h| h["room"]["name"] == room)
            .map(|h| {
                let event = h["event"].as_str().unwrap_or("").to_owned();
                match h.get("participant") {
                    Some(p) if event.starts_with("participant_") => format!(
                        "{event}:{}:{}",
                        p["identity"].as_str().unwrap_or(""),
                        p["disconnectReason"].as_str().unwrap_or("")
                    ),
                    _ => event,
                }
            })
            .collect()
    }

    /// The `participant_left` of `identity` in `room`, if posted.
    fn left(&self, room: &str, identity: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|h| {
                h["event"] == "participant_left"
                    && h["room"]["name"] == room
                    && h["participant"]["identity"] == identity
            })
            .collect()
    }
}

/// An emulator posting its webhooks to a receiver in this test.
async fn start() -> (RunningEmulator, Hooks) {
    let hooks = Hooks::default();
    let sink = hooks.clone();
    let app = Router::new().route(
        "/hooks",
        post(move |body: String| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_str(&body).expect("webhook body is JSON");
                sink.0.lock().expect("hooks").push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let e = start_with(EmulatorConfig {
        webhook_urls: vec![format!("http://{addr}/hooks")],
        agent_join_after: Some(Duration::from_millis(50)),
        ..EmulatorConfig::default()
    })
    .await;
    (e, hooks)
}

/// A JSON Twirp call with every grant for `room`, plus an optional `X-Lk-Mock` header.
async fn twirp_mock(
    e: &RunningEmulator,
    service: &str,
    method: &str,
    room: &str,
    body: Value,
    mock: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/twirp/livekit.{service}/{method}", e.url()))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", admin_token_for(room)))
        .body(body.to_string());
    if let Some(m) = mock {
        req = req.header("x-lk-mock", m.to_string());
    }
    let resp = req.send().await.expect("answered");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn twirp(
    e: &RunningEmulator,
    service: &str,
    method: &str,
    room: &str,
    body: Value,
) -> (u16, Value) {
    twirp_mock(e, service, method, room, body, None).await
}

/// TransferSIPParticipant of the caller in `room` to `to`; status, body and time taken.
async fn transfer(
    e: &RunningEmulator,
    room: &str,
    to: &str,
    extra: Value,
) -> (u16, Value, Duration) {
    let mut body = json!({"roomName": room, "participantIdentity": CALLER, "transferTo": to});
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    let started = Instant::now();
    let (status, v) = twirp(e, "SIP", "TransferSIPParticipant", room, body).await;
    (status, v, started.elapsed())
}

/// A control API call: status and JSON body (`null` for none).
async fn control(
    e: &RunningEmulator,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}/emulator/v1{path}", e.url()));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = req.send().await.expect("control answered");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `PUT /transfers/{target}` (URL-encoded), expecting 204.
async fn script(e: &RunningEmulator, target: &str, body: Value) {
    let path = format!("/transfers/{}", encode(target));
    let (status, v) = control(e, reqwest::Method::PUT, &path, Some(&body.to_string())).await;
    assert_eq!(status, 204, "PUT {path}: {v}");
}

/// Percent-encodes a transfer target for a path segment.
fn encode(target: &str) -> String {
    target
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An inbound PSTN call from [`CALLER_FROM`] answered in `room` (no trunk or rule: the
/// caller joins at once, active); its `sip_call_id`.
/// Dispatches an agent to `room` and waits until it joined; its identity.
async fn agent_in(e: &RunningEmulator, room: &str) -> String {
    let (status, v) = twirp(
        e,
        "AgentDispatchService",
        "CreateDispatch",
        room,
        json!({"room": room, "agentName": "helper"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    eventually("the agent to join", || async {
        participants(e, room)
            .await
            .into_iter()
            .find(|p| p["kind"] == "AGENT")
            .and_then(|p| p["identity"].as_str().map(str::to_owned))
    })
    .await
}

async fn caller_in(e: &RunningEmulator, room: &str) -> String {
    let body = json!({"from": CALLER_FROM, "to": "+15105550100", "room_name": room}).to_string();
    let (status, v) = control(e, reqwest::Method::POST, "/inbound", Some(&body)).await;
    assert_eq!(status, 201, "{v}");
    assert!(in_room(e, room, CALLER).await);
    v["sip_call_id"].as_str().expect("sip_call_id").to_owned()
}

async fn participants(e: &RunningEmulator, room: &str) -> Vec<Value> {
    let (_, v) = twirp(
        e,
        "RoomService",
        "ListParticipants",
        room,
        json!({"room": room}),
    )
    .await;
    v["participants"].as_array().cloned().unwrap_or_default()
}

async fn in_room(e: &RunningEmulator, room: &str, identity: &str) -> bool {
    participants(e, room)
        .await
        .iter()
        .any(|p| p["identity"] == identity)
}

/// The recorded requests of `method`, oldest first.
async fn records(e: &RunningEmulator, method: &str) -> Vec<Value> {
    let (_, v) = control(
        e,
        reqwest::Method::GET,
        &format!("/requests?method={method}"),
        None,
    )
    .await;
    v["requests"].as_array().cloned().unwrap_or_default()
}

/// Polls `check` for up to 5 s.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    for _ in 0..100 {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The caller's `participant_left`, once posted: exactly one.
async fn caller_left(hooks: &Hooks, room: &str) -> Value {
    let left = eventually("the caller's participant_left", || async {
        let left = hooks.left(room, CALLER);
        (!left.is_empty()).then_some(left)
    })
    .await;
    assert_eq!(left.len(), 1, "{left:?}");
    left[0].clone()
}

/// Waits long enough for webhooks of what already happened to arrive, then checks the
/// caller never left.
async fn caller_never_left(hooks: &Hooks, room: &str) {
    // The caller's participant_joined proves the queue for this room is flowing.
    eventually("the caller's participant_joined", || async {
        hooks
            .trail(room)
            .iter()
            .any(|t| t.starts_with(&format!("participant_joined:{CALLER}")))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        hooks.left(room, CALLER).is_empty(),
        "{:?}",
        hooks.trail(room)
    );
}

#[tokio::test]
async fn an_answered_transfer_returns_after_the_ring_and_the_caller_leaves_client_initiated() {
    let (e, hooks) = start().await;
    let room = "call-answer";
    caller_in(&e, room).await;
    script(
        &e,
        "tel:+15105550199",
        json!({"outcome": "answer", "after_ms": 300}),
    )
    .await;

    let (status, body, took) = transfer(
        &e,
        room,
        "tel:+15105550199",
        json!({"playDialtone": true, "ringingTimeout": "5s", "headers": {"X-Case": "1", "X-Queue": "billing"}}),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({})));
    assert!(
        took >= Duration::from_millis(300),
        "answered after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");

    // The caller is gone from the room, hung up, and LiveKit said so.
    assert!(!in_room(&e, room, CALLER).await);
    let left = caller_left(&hooks, room).await;
    assert_eq!(left["participant"]["disconnectReason"], "CLIENT_INITIATED");
    assert_eq!(left["participant"]["kind"], "SIP");
    assert_eq!(
        left["participant"]["attributes"]["sip.callStatus"],
        "hangup"
    );

    // The request record says what LiveKit was asked and what became of it.
    let recs = records(&e, "TransferSIPParticipant").await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["outcome"], "executed");
    assert_eq!(r["result"], "ok");
    assert_eq!(r["room"], room);
    assert_eq!(r["identity"], CALLER);
    assert_eq!(r["fields"]["transfer_to"], "tel:+15105550199");
    assert_eq!(r["fields"]["play_dialtone"], "true");
    assert_eq!(r["fields"]["ringing_timeout"], "5");
    assert_eq!(r["fields"]["headers_count"], "2");
    assert_eq!(r["fields"]["transfer_outcome"], "answer");
    assert!(r["duration_ms"].as_u64().is_some_and(|ms| ms >= 300), "{r}");

    // The inbound call is over.
    let (_, calls) = control(&e, reqwest::Method::GET, "/inbound", None).await;
    assert_eq!(calls["calls"][0]["status"], "ended", "{calls}");
    e.shutdown().await;
}

#[tokio::test]
async fn failed_transfers_answer_the_sip_status_after_the_ring_and_keep_the_caller() {
    let (e, hooks) = start().await;
    let room = "call-fail";
    caller_in(&e, room).await;
    // (target, script, HTTP status, Twirp code, SIP status, recorded outcome)
    let cases = [
        (
            "sip:desk@pbx.example.com",
            json!({"outcome": "decline", "after_ms": 150}),
            403,
            "permission_denied",
            "603",
            "decline",
        ),
        (
            "tel:+15105550198",
            json!({"outcome": "busy", "after_ms": 150}),
            429,
            "resource_exhausted",
            "486",
            "busy",
        ),
        (
            "tel:+15105550197",
            json!({"outcome": "unavailable", "after_ms": 150}),
            429,
            "resource_exhausted",
            "480",
            "unavailable",
        ),
        (
            "sips:queue@pbx.example.com",
            json!({"outcome": "sip_status", "sip_status": 404, "after_ms": 150}),
            404,
            "not_found",
            "404",
            "sip_status",
        ),
    ];
    for (target, body, _, _, _, _) in &cases {
        script(&e, target, body.clone()).await;
    }
    for (target, _, http, code, sip, _) in &cases {
        let (status, err, took) =
            transfer(&e, room, target, json!({"ringingTimeout": "10s"})).await;
        assert_eq!(status, *http, "{target}: {err}");
        assert_eq!(err["code"], *code, "{target}: {err}");
        assert_eq!(err["meta"]["sip_status_code"], *sip, "{target}: {err}");
        assert!(
            err["meta"]["sip_status"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{err}"
        );
        assert!(
            took >= Duration::from_millis(150),
            "{target} failed after {took:?}"
        );
        // A failed transfer keeps the call.
        assert!(in_room(&e, room, CALLER).await, "{target}");
    }
    let recs = records(&e, "TransferSIPParticipant").await;
    assert_eq!(recs.len(), cases.len(), "{recs:?}");
    for (r, (target, _, http, code, _, outcome)) in recs.iter().zip(&cases) {
        assert_eq!(r["fields"]["transfer_to"], *target);
        assert_eq!(r["fields"]["transfer_outcome"], *outcome);
        assert_eq!(r["fields"]["ringing_timeout"], "10");
        assert_eq!(r["fields"]["play_dialtone"], "false");
        assert_eq!(r["fields"]["headers_count"], "0");
        assert_eq!(r["outcome"], "executed");
        assert_eq!(
            (r["status"].as_u64(), r["result"].as_str()),
            (Some(u64::from(*http)), Some(*code))
        );
    }
    caller_never_left(&hooks, room).await;
    let (_, calls) = control(&e, reqwest::Method::GET, "/inbound", None).await;
    assert_eq!(calls["calls"][0]["status"], "active", "{calls}");
    e.shutdown().await;
}

#[tokio::test]
async fn an_unanswered_transfer_fails_with_408_at_the_ringing_timeout() {
    let (e, hooks) = start().await;
    let room = "call-no-answer";
    caller_in(&e, room).await;
    script(&e, "tel:+15105550196", json!({"outcome": "no_answer"})).await;

    let (status, err, took) = transfer(
        &e,
        room,
        "tel:+15105550196",
        json!({"ringingTimeout": "1s"}),
    )
    .await;
    assert_eq!(status, 408, "{err}");
    assert_eq!(err["code"], "deadline_exceeded");
    assert_eq!(err["meta"]["sip_status_code"], "408");
    assert!(took >= Duration::from_millis(950), "gave up after {took:?}");
    assert!(took < Duration::from_secs(3), "gave up after {took:?}");
    assert!(in_room(&e, room, CALLER).await);

    // `after_ms` caps the ringing timeout (30 s here, LiveKit's default when unset).
    script(
        &e,
        "tel:+15105550195",
        json!({"outcome": "no_answer", "after_ms": 200}),
    )
    .await;
    let (status, err, took) = transfer(&e, room, "tel:+15105550195", json!({})).await;
    assert_eq!(
        (status, err["meta"]["sip_status_code"].as_str()),
        (408, Some("408"))
    );
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // A target that would answer after the ringing timeout never gets to.
    script(
        &e,
        "tel:+15105550194",
        json!({"outcome": "answer", "after_ms": 5000}),
    )
    .await;
    let (status, err, took) = transfer(
        &e,
        room,
        "tel:+15105550194",
        json!({"ringingTimeout": "1s"}),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (408, Some("deadline_exceeded")),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(in_room(&e, room, CALLER).await);

    let recs = records(&e, "TransferSIPParticipant").await;
    let outcomes: Vec<_> = recs
        .iter()
        .map(|r| {
            (
                r["fields"]["transfer_outcome"].as_str().unwrap_or(""),
                r["fields"]["ringing_timeout"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("no_answer", "1"),
            ("no_answer", "0"),
            ("ringing_timeout", "1")
        ]
    );
    caller_never_left(&hooks, room).await;
    e.shutdown().await;
}

#[tokio::test]
async fn an_unscripted_transfer_succeeds_at_once_unless_x_lk_mock_forces_a_sip_status() {
    let (e, hooks) = start().await;
    let room = "call-unscripted";
    caller_in(&e, room).await;

    // A forced SIP status fails it before anything happens: the caller stays.
    let (status, err) = twirp_mock(
        &e,
        "SIP",
        "TransferSIPParticipant",
        room,
        json!({"roomName": room, "participantIdentity": CALLER, "transferTo": "tel:+15105550193"}),
        Some(json!({"sipStatus": {"code": 486, "status": "Busy Here"}})),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (429, Some("resource_exhausted")),
        "{err}"
    );
    assert_eq!(err["meta"]["sip_status_code"], "486");
    assert_eq!(err["meta"]["sip_status"], "Busy Here");
    assert!(in_room(&e, room, CALLER).await);

    let (status, body, took) = transfer(&e, room, "tel:+15105550193", json!({})).await;
    assert_eq!((status, &body), (200, &json!({})));
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!in_room(&e, room, CALLER).await);
    let left = caller_left(&hooks, room).await;
    assert_eq!(left["participant"]["disconnectReason"], "CLIENT_INITIATED");
    assert_eq!(
        left["participant"]["attributes"]["sip.callStatus"],
        "hangup"
    );

    let recs = records(&e, "TransferSIPParticipant").await;
    let seen: Vec<_> = recs
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap_or(""),
                r["fields"]["transfer_outcome"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("rejected", "mock_sip_status"), ("executed", "unscripted")]
    );
    e.shutdown().await;
}

#[tokio::test]
async fn a_caller_hanging_up_while_the_target_rings_ends_the_transfer_as_done() {
    let (e, hooks) = start().await;
    let room = "call-gone";
    let call = caller_in(&e, room).await;
    script(
        &e,
        "tel:+15105550187",
        json!({"outcome": "answer", "after_ms": 5000}),
    )
    .await;
    let e = Arc::new(e);
    let ringing = {
        let e = Arc::clone(&e);
        tokio::spawn(async move { transfer(&e, room, "tel:+15105550187", json!({})).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = control(
        &e,
        reqwest::Method::POST,
        &format!("/inbound/{call}/hangup"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    // LiveKit's SIP service answers success when the call ends before the REFER completes.
    let (status, body, took) = ringing.await.expect("transfer");
    assert_eq!((status, &body), (200, &json!({})));
    assert!(took < Duration::from_secs(2), "{took:?}");
    let left = caller_left(&hooks, room).await;
    assert_eq!(left["participant"]["disconnectReason"], "CLIENT_INITIATED");
    let recs = records(&e, "TransferSIPParticipant").await;
    assert_eq!(
        recs[0]["fields"]["transfer_outcome"], "caller_left",
        "{recs:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(hooks.left(room, CALLER).len(), 1);
    if let Ok(e) = Arc::try_unwrap(e) {
        e.shutdown().await;
    }
}

#[tokio::test]
async fn transfers_of_missing_or_non_sip_participants_are_refused() {
    let (e, _hooks) = start().await;
    let room = "call-refused";
    caller_in(&e, room).await;
    script(
        &e,
        "tel:+15105550192",
        json!({"outcome": "answer", "after_ms": 50}),
    )
    .await;

    let missing = json!({"roomName": room, "participantIdentity": "nobody", "transferTo": "tel:+15105550192"});
    let (status, err) = twirp(&e, "SIP", "TransferSIPParticipant", room, missing).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
    assert!(err["msg"]
        .as_str()
        .is_some_and(|m| m.contains("participant does not exist")));

    // An agent joins the room: a participant with no SIP session.
    let agent = agent_in(&e, room).await;
    let not_sip =
        json!({"roomName": room, "participantIdentity": agent, "transferTo": "tel:+15105550192"});
    let (status, err) = twirp(&e, "SIP", "TransferSIPParticipant", room, not_sip).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument")),
        "{err}"
    );
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("no SIP session")),
        "{err}"
    );

    // Neither touched the room.
    assert!(in_room(&e, room, CALLER).await);
    assert!(in_room(&e, room, &agent).await);
    let outcomes: Vec<_> = records(&e, "TransferSIPParticipant")
        .await
        .iter()
        .map(|r| {
            r["fields"]["transfer_outcome"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(outcomes, ["no_participant", "not_sip"]);
    e.shutdown().await;
}

#[tokio::test]
async fn a_repeated_transfer_waits_for_the_ringing_one_and_another_target_is_refused() {
    let (e, hooks) = start().await;
    let room = "call-repeat";
    caller_in(&e, room).await;
    script(
        &e,
        "tel:+15105550191",
        json!({"outcome": "answer", "after_ms": 600}),
    )
    .await;
    let e = Arc::new(e);

    let first = {
        let e = Arc::clone(&e);
        tokio::spawn(async move { transfer(&e, room, "tel:+15105550191", json!({})).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, err, _) = transfer(&e, room, "tel:+15105550190", json!({})).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument")),
        "{err}"
    );
    let (status, body, took) = transfer(&e, room, "tel:+15105550191", json!({})).await;
    assert_eq!((status, &body), (200, &json!({})));
    assert!(
        took < Duration::from_millis(600),
        "joined the ringing transfer: {took:?}"
    );
    let (status, _, _) = first.await.expect("first transfer");
    assert_eq!(status, 200);

    // One REFER, one departure.
    caller_left(&hooks, room).await;
    let recs = records(&e, "TransferSIPParticipant").await;
    let mut seen: Vec<_> = recs
        .iter()
        .map(|r| {
            (
                r["fields"]["transfer_outcome"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                r["fields"]["transfer_repeat"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("already_transferring".to_owned(), String::new()),
            ("answer".to_owned(), String::new()),
            ("answer".to_owned(), "true".to_owned()),
        ]
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(hooks.left(room, CALLER).len(), 1);
    if let Ok(e) = Arc::try_unwrap(e) {
        e.shutdown().await;
    }
}

#[tokio::test]
async fn transfer_scripts_are_listed_validated_deleted_and_reset() {
    let (e, _hooks) = start().await;
    use reqwest::Method;
    script(&e, "tel:+15105550189", json!({"outcome": "busy"})).await;
    script(
        &e,
        "sip:desk@pbx.example.com",
        json!({"outcome": "sip_status", "sip_status": 488, "after_ms": 10}),
    )
    .await;
    let (status, list) = control(&e, Method::GET, "/transfers", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        list["transfers"],
        json!({
            "tel:+15105550189": {"outcome": "busy"},
            "sip:desk@pbx.example.com": {"outcome": "sip_status", "sip_status": 488, "after_ms": 10},
        })
    );
    assert_eq!(list["default_after_ms"], 200);

    // Bad bodies and targets: 422 naming the field.
    let bad = [
        (
            "tel:+15105550188",
            r#"{"outcome": "busy", "ring_ms": 5}"#,
            "ring_ms",
        ),
        ("tel:+15105550188", r#"{"after_ms": 5}"#, "outcome"),
        ("tel:+15105550188", r#"{"outcome": "maybe"}"#, "outcome"),
        (
            "tel:+15105550188",
            r#"{"outcome": "busy", "after_ms": -1}"#,
            "after_ms",
        ),
        (
            "tel:+15105550188",
            r#"{"outcome": "sip_status"}"#,
            "sip_status",
        ),
        (
            "tel:+15105550188",
            r#"{"outcome": "sip_status", "sip_status": 200}"#,
            "sip_status",
        ),
        (
            "tel:+15105550188",
            r#"{"outcome": "decline", "sip_status": 486}"#,
            "sip_status",
        ),
        ("+15105550188", r#"{"outcome": "busy"}"#, "+15105550188"),
    ];
    for (target, body, field) in bad {
        let path = format!("/transfers/{}", encode(target));
        let (status, v) = control(&e, Method::PUT, &path, Some(body)).await;
        assert_eq!(status, 422, "{body}: {v}");
        assert_eq!(v["status"], 422);
        assert!(
            v["error"].as_str().is_some_and(|m| m.contains(field)),
            "{body}: {v}"
        );
    }
    let (_, list) = control(&e, Method::GET, "/transfers", None).await;
    assert_eq!(
        list["transfers"].as_object().map(|m| m.len()),
        Some(2),
        "{list}"
    );

    // A deleted script no longer plays: the transfer succeeds at once.
    let room = "call-crud";
    caller_in(&e, room).await;
    let (status, _, _) = transfer(&e, room, "tel:+15105550189", json!({})).await;
    assert_eq!(status, 429);
    let (status, _) = control(
        &e,
        Method::DELETE,
        // Unencoded works too: `:` and `+` are plain path characters.
        "/transfers/tel:+15105550189",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (_, list) = control(&e, Method::GET, "/transfers", None).await;
    assert!(
        list["transfers"].get("tel:+15105550189").is_none(),
        "{list}"
    );
    let (status, _, _) = transfer(&e, room, "tel:+15105550189", json!({})).await;
    assert_eq!(status, 200);
    assert!(!in_room(&e, room, CALLER).await);

    // Reset forgets the rest.
    let (status, _) = control(&e, Method::POST, "/reset", None).await;
    assert_eq!(status, 204);
    let (_, list) = control(&e, Method::GET, "/transfers", None).await;
    assert_eq!(list["transfers"], json!({}));
    let room = "call-after-reset";
    caller_in(&e, room).await;
    let (status, _, _) = transfer(&e, room, "sip:desk@pbx.example.com", json!({})).await;
    assert_eq!(status, 200, "the 488 script is gone");
    e.shutdown().await;
}

#[tokio::test]
async fn removing_a_sip_participant_hangs_up_with_participant_removed() {
    let (e, hooks) = start().await;
    let room = "call-remove";
    caller_in(&e, room).await;
    let who = json!({"room": room, "identity": CALLER});

    let (status, v) = twirp(&e, "RoomService", "RemoveParticipant", room, who.clone()).await;
    assert_eq!((status, &v), (200, &json!({})));
    assert!(!in_room(&e, room, CALLER).await);
    let left = caller_left(&hooks, room).await;
    assert_eq!(
        left["participant"]["disconnectReason"],
        "PARTICIPANT_REMOVED"
    );
    assert_eq!(
        left["participant"]["attributes"]["sip.callStatus"],
        "hangup"
    );

    // Again: the participant is gone.
    let (status, err) = twirp(&e, "RoomService", "RemoveParticipant", room, who).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("participant does not exist")),
        "{err}"
    );
    // In a room that does not exist either (LiveKit asks its store for the participant).
    let (status, err) = twirp(
        &e,
        "RoomService",
        "RemoveParticipant",
        "no-such-room",
        json!({"room": "no-such-room", "identity": CALLER}),
    )
    .await;
    assert_eq!(status, 404, "{err}");
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("participant does not exist")),
        "{err}"
    );

    let (_, calls) = control(&e, reqwest::Method::GET, "/inbound", None).await;
    assert_eq!(
        calls["calls"][0]["reason"], "participant_removed",
        "{calls}"
    );
    assert_eq!(hooks.left(room, CALLER).len(), 1);
    e.shutdown().await;
}

#[tokio::test]
async fn deleting_a_room_disconnects_everyone_with_room_deleted_then_finishes_it() {
    let (e, hooks) = start().await;
    let room = "call-delete";
    caller_in(&e, room).await;
    let agent = agent_in(&e, room).await;

    let (status, v) = twirp(&e, "RoomService", "DeleteRoom", room, json!({"room": room})).await;
    assert_eq!((status, &v), (200, &json!({})));
    let (_, rooms) = control(&e, reqwest::Method::GET, "/rooms", None).await;
    assert!(
        !rooms["rooms"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["room"]["name"] == room)),
        "{rooms}"
    );

    // Everyone leaves with ROOM_DELETED, then the room finishes.
    let tail = eventually("room_finished", || async {
        let trail = hooks.trail(room);
        trail
            .last()
            .is_some_and(|t| t == "room_finished")
            .then_some(trail)
    })
    .await;
    let departures: Vec<_> = tail
        .iter()
        .filter(|t| t.starts_with("participant_left"))
        .cloned()
        .collect();
    let mut expected = vec![
        format!("participant_left:{CALLER}:ROOM_DELETED"),
        format!("participant_left:{agent}:ROOM_DELETED"),
    ];
    let mut got = departures.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "{tail:?}");
    let finished_at = tail.iter().position(|t| t == "room_finished");
    let last_left = tail.iter().rposition(|t| t.starts_with("participant_left"));
    assert!(last_left < finished_at, "{tail:?}");
    assert_eq!(tail.iter().filter(|t| *t == "room_finished").count(), 1);

    // Again: the room does not exist.
    let (status, err) = twirp(&e, "RoomService", "DeleteRoom", room, json!({"room": room})).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("requested room does not exist")),
        "{err}"
    );
    let (_, calls) = control(&e, reqwest::Method::GET, "/inbound", None).await;
    assert_eq!(calls["calls"][0]["reason"], "room_deleted", "{calls}");
    e.shutdown().await;
}
