//! The LiveKit webhook endpoint: verification exactly as LiveKit signs, enqueue-then-200,
//! 503 when the broker is down, and the worker's dedupe and forward-only updates.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use callfleet_core::ports::WorkQueue;
use livekit_api::access_token::Claims;
use livekit_emulator::{CallScript, Faults, Outcome, WebhookFaults};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::fleet::{FleetOptions, TestFleet};
use crate::harness::DownBroker;

use crate::harness::sign_webhook as sign;

/// An HS256 JWT with exactly these claims (the SDK's builder cannot backdate `exp`).
fn hs256(secret: &str, claims: &Claims) -> String {
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64.encode(serde_json::to_vec(claims).expect("claims"));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

async fn deliver(fleet: &TestFleet, authorization: Option<String>, body: &[u8]) -> u16 {
    let mut request = fleet
        .http
        .post(format!("{}/v1/livekit/webhook", fleet.base))
        .header("content-type", "application/webhook+json")
        .body(body.to_vec());
    if let Some(a) = authorization {
        request = request.header("authorization", a);
    }
    request.send().await.expect("send").status().as_u16()
}

#[tokio::test]
async fn signature_matrix_enqueues_only_what_livekit_signed() {
    // No workers: what the ingress accepted stays in the queue to be counted.
    let fleet = TestFleet::start(
        "whmatrix",
        FleetOptions {
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    let body = br#"{"event":"room_started","room":{"sid":"RM_1","name":"cf-x"},"id":"EV_matrix","createdAt":"1755878400"}"#;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as usize;
    let expired = hs256(
        "secret",
        &Claims {
            iss: "devkey".into(),
            exp: now - 600,
            nbf: now - 900,
            sha256: base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body)),
            ..Default::default()
        },
    );
    let mut one_byte = body.to_vec();
    let pos = one_byte.len() - 3;
    one_byte[pos] = b'1';
    let reserialized = serde_json::to_vec_pretty(
        &serde_json::from_slice::<serde_json::Value>(body).expect("json"),
    )
    .expect("json");
    let cases: Vec<(&str, Option<String>, Vec<u8>, u16)> = vec![
        (
            "valid raw JWT",
            Some(sign("devkey", "secret", body)),
            body.to_vec(),
            200,
        ),
        (
            "Bearer prefix",
            Some(format!("Bearer {}", sign("devkey", "secret", body))),
            body.to_vec(),
            200,
        ),
        (
            "wrong secret",
            Some(sign("devkey", "nope", body)),
            body.to_vec(),
            401,
        ),
        (
            "unknown key",
            Some(sign("otherkey", "secret", body)),
            body.to_vec(),
            401,
        ),
        ("expired", Some(expired), body.to_vec(), 401),
        (
            "body changed by one byte",
            Some(sign("devkey", "secret", body)),
            one_byte,
            401,
        ),
        (
            "hash of a re-serialized body",
            Some(sign("devkey", "secret", &reserialized)),
            body.to_vec(),
            401,
        ),
        ("missing header", None, body.to_vec(), 401),
        ("not a JWT", Some("Bearer hello".into()), body.to_vec(), 401),
    ];
    for (name, auth, payload, expected) in cases {
        assert_eq!(deliver(&fleet, auth, &payload).await, expected, "{name}");
    }
    assert_eq!(
        fleet
            .broker
            .queue_depth(WorkQueue::WebhookEvents)
            .await
            .expect("depth"),
        2,
        "exactly the two valid deliveries were enqueued"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn broker_down_answers_503_so_livekit_retries() {
    let fleet = TestFleet::start(
        "whdown",
        FleetOptions {
            workers: 0,
            broker: Some(Arc::new(DownBroker)),
            ..Default::default()
        },
    )
    .await;
    let body = br#"{"event":"room_started","id":"EV_down"}"#;
    let response = fleet
        .http
        .post(format!("{}/v1/livekit/webhook", fleet.base))
        .header("authorization", sign("devkey", "secret", body))
        .body(body.to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());
    // The call API too: never 2xx for something not enqueued.
    let (status, answer) = fleet
        .post("/v1/calls", &json!({"to": "+15105550301"}))
        .await;
    assert_eq!(status, 503, "{answer}");
    fleet.stop().await;
}

/// LiveKit retries deliveries with the same id, and emulated duplication sends every
/// event twice: the call still completes once, counted once.
#[tokio::test]
async fn duplicated_webhooks_are_applied_once() {
    let handle = callfleet_core::telemetry::prometheus().expect("recorder");
    let fleet = TestFleet::start("whdup", FleetOptions::default()).await;
    fleet.emulator.set_faults(Faults {
        webhooks: WebhookFaults {
            duplicate_rate: 1.0,
            ..Default::default()
        },
        ..Default::default()
    });
    fleet.emulator.script(
        "+15105550311",
        CallScript {
            outcome: Outcome::Answer,
            ring_ms: 50,
            talk_ms: Some(200),
            sip_status: None,
        },
    );
    let id = fleet.submit(json!({"to": "+15105550311"})).await;
    fleet
        .wait_for(&id, "completed", Duration::from_secs(20))
        .await;
    crate::harness::eventually("duplicates delivered", Duration::from_secs(10), || async {
        fleet
            .emulator
            .webhooks()
            .iter()
            .any(|w| w.duplicate && w.event == "participant_left" && w.outcome == "delivered")
            .then_some(())
    })
    .await;
    crate::harness::eventually(
        "duplicates seen by the worker",
        Duration::from_secs(10),
        || async {
            handle
                .render()
                .contains("result=\"duplicate\",reason=\"event_id\"}")
                .then_some(())
        },
    )
    .await;
    // Read the call once every duplicate has been handled, not before they arrived.
    crate::harness::eventually(
        "the webhook queue to drain",
        Duration::from_secs(10),
        || async {
            let census = fleet.broker.census().await.ok()?;
            census.values().all(|n| *n == 0).then_some(())
        },
    )
    .await;
    let (_, call) = fleet.get(&format!("/v1/calls/{id}")).await;
    assert_eq!(
        call["timeline"]
            .as_array()
            .map(|t| t.iter().filter(|e| e["event"] == "completed").count()),
        Some(1)
    );
    assert!(handle
        .render()
        .contains("callfleet_calls_finished_total{direction=\"outbound\",status=\"completed\"} 1"));
    fleet.stop().await;
}

/// A `participant_joined` arriving after the call completed (LiveKit does not promise
/// order across retries) does not move it back.
#[tokio::test]
async fn late_events_never_move_a_call_backwards() {
    let handle = callfleet_core::telemetry::prometheus().expect("recorder");
    let fleet = TestFleet::start("whlate", FleetOptions::default()).await;
    let id = fleet.submit(json!({"to": "+15105550321"})).await;
    let done = fleet
        .wait_for(&id, "completed", Duration::from_secs(20))
        .await;
    let identity = done["attempts"][0]["participant_identity"]
        .as_str()
        .expect("identity");
    let late = json!({
        "event": "participant_joined", "id": "EV_late_join", "createdAt": "1755878400",
        "room": {"name": done["room_name"], "sid": "RM_old"},
        "participant": {"identity": identity, "sid": "PA_late", "kind": "SIP",
                        "attributes": {"sip.callStatus": "active"}}
    })
    .to_string();
    assert_eq!(
        deliver(
            &fleet,
            Some(sign("devkey", "secret", late.as_bytes())),
            late.as_bytes()
        )
        .await,
        200
    );
    // Wait until the worker judged it stale, then the call is unchanged.
    crate::harness::eventually(
        "the late event judged stale",
        Duration::from_secs(10),
        || async {
            handle
                .render()
                .contains("result=\"stale\",reason=\"none\"}")
                .then_some(())
        },
    )
    .await;
    let (_, after) = fleet.get(&format!("/v1/calls/{id}")).await;
    assert_eq!(after["status"], "completed");
    assert_eq!(after["timeline"], done["timeline"]);
    fleet.stop().await;
}
