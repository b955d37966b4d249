//! Outbound calls end to end: HTTP API → broker → worker → LiveKit emulator → signed
//! webhooks → ingress → worker → call record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use callfleet_core::ports::WorkQueue;
use callfleet_workers::OutboundSettings;
use livekit_emulator::{CallScript, MethodFault, Outcome};
use serde_json::{json, Value};

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::{eventually, script};

const SLOW: Duration = Duration::from_secs(20);

fn statuses(call: &Value) -> Vec<String> {
    call["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|e| e["event"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn happy_path(backing: Backing, wait_until_answered: bool) {
    let fleet = TestFleet::start(
        "happy",
        FleetOptions {
            backing,
            ..Default::default()
        },
    )
    .await;
    let number = "+15105550101";
    fleet
        .emulator
        .script(number, script(Outcome::Answer, Some(400)));
    let (status, accepted) = fleet
        .post(
            "/v1/calls",
            &json!({
                "to": "(510) 555-0101",
                "agent_name": "reminder-agent",
                "context": {"customerName": "Ada", "amountDue": "42.00"},
                "wait_until_answered": wait_until_answered,
                "tags": ["campaign:november"]
            }),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "queued");
    assert_eq!(
        accepted["to"], number,
        "national number normalised to E.164"
    );
    let id = accepted["id"].as_str().expect("id").to_owned();

    let call = fleet.wait_for(&id, "completed", SLOW).await;
    let attempt = &call["attempts"][0];
    assert_eq!(call["attempts"].as_array().map(Vec::len), Some(1));
    assert!(attempt["sip_call_id"]
        .as_str()
        .is_some_and(|s| s.starts_with("SCL_")));
    assert_eq!(
        attempt["participant_identity"],
        format!("sip-{}-a1", &id[5..])
    );
    assert_eq!(attempt["disconnect_reason"], "CLIENT_INITIATED");
    assert!(attempt["ended_at"].is_string());
    assert!(call["dispatch_id"]
        .as_str()
        .is_some_and(|d| d.starts_with("AD_")));
    assert!(call["duration_s"].as_f64().is_some_and(|d| d > 0.0));
    let timeline = statuses(&call);
    for step in [
        "accepted",
        "agent_dispatched",
        "dialing",
        "sip_participant_joined",
        "completed",
    ] {
        assert!(
            timeline.iter().any(|e| e == step),
            "{step} missing from {timeline:?}"
        );
    }
    // Answered: in progress before completed, known from the dial's answer with
    // wait_until_answered, and from the leave's `sip.callStatus=hangup` without it.
    assert!(timeline.iter().any(|e| e == "in_progress"), "{timeline:?}");
    assert_eq!(attempt["answered"], true);
    assert_eq!(attempt["answered_at"].is_string(), wait_until_answered);
    // Exactly one room, one dispatch, one dial, with what the agent needs.
    let dispatches = fleet.emulator.requests_of("CreateDispatch");
    assert_eq!(dispatches.len(), 1);
    assert_eq!(
        dispatches[0].fields.get("agent_name").map(String::as_str),
        Some("reminder-agent")
    );
    let dials = fleet.dials_to(number);
    assert_eq!(dials.len(), 1);
    assert_eq!(
        dials[0].fields.get("sip_trunk_id").map(String::as_str),
        Some(crate::fleet::TRUNK)
    );
    assert_eq!(
        dials[0].identity.as_deref(),
        attempt["participant_identity"].as_str()
    );
    // The end arrived through signed webhooks the ingress accepted.
    assert!(fleet
        .emulator
        .webhooks()
        .iter()
        .any(|w| w.event == "participant_left" && w.last_status == Some(200)));
    // Listing finds it by tag and status.
    let (_, listed) = fleet
        .get("/v1/calls?tag=campaign:november&status=completed")
        .await;
    assert_eq!(listed["calls"][0]["id"], id.as_str());
    fleet.stop().await;
}

#[tokio::test]
async fn happy_path_in_memory_waiting_for_answer() {
    happy_path(Backing::Memory, true).await;
}

#[tokio::test]
async fn happy_path_on_rabbitmq_and_redis_through_webhooks() {
    happy_path(Backing::RabbitRedis, false).await;
}

/// Each SIP outcome with no attempts left: the final status and the SIP code LiveKit gave.
#[tokio::test]
async fn every_sip_outcome_without_retries_is_final() {
    let fleet = TestFleet::start("outcomes", FleetOptions::default()).await;
    let cases = [
        ("+15105550111", Outcome::Busy, "busy", Some(486)),
        ("+15105550112", Outcome::Unavailable, "no_answer", Some(480)),
        ("+15105550113", Outcome::NoAnswer, "no_answer", None),
        ("+15105550114", Outcome::Decline, "failed", Some(603)),
        ("+15105550115", Outcome::NotFound, "failed", Some(404)),
        ("+15105550116", Outcome::Failed, "failed", Some(503)),
    ];
    let mut ids = Vec::new();
    for (number, outcome, _, _) in &cases {
        fleet.emulator.script(number, script(*outcome, None));
        ids.push(
            fleet
                .submit(json!({"to": number, "wait_until_answered": true, "ringing_timeout_s": 1}))
                .await,
        );
    }
    for ((number, _, status, code), id) in cases.iter().zip(&ids) {
        let call = fleet.wait_for(id, status, SLOW).await;
        assert_eq!(
            call["attempts"][0]["sip_status_code"].as_u64(),
            code.map(|c: u16| u64::from(c)),
            "{number}: {call}"
        );
        assert_eq!(fleet.dials_to(number).len(), 1, "{number} dialed once");
        assert_eq!(call["attempts"].as_array().map(Vec::len), Some(1));
    }
    fleet.stop().await;
}

/// Busy, unavailable and no-answer are retried per the policy; decline, not found and
/// carrier failure are final at once even with attempts left.
#[tokio::test]
async fn retryable_outcomes_are_retried_and_final_ones_are_not() {
    let fleet = TestFleet::start("retries", FleetOptions::default()).await;
    let policy = |to: &str| {
        json!({"to": to, "wait_until_answered": true, "ringing_timeout_s": 1,
               "max_attempts": 3, "retry_delay_s": 1})
    };
    let retried = [
        ("+15105550121", Outcome::Busy, "busy"),
        ("+15105550122", Outcome::Unavailable, "no_answer"),
        ("+15105550123", Outcome::NoAnswer, "no_answer"),
    ];
    let final_at_once = [
        ("+15105550124", Outcome::Decline),
        ("+15105550125", Outcome::NotFound),
        ("+15105550126", Outcome::Failed),
    ];
    let mut waits = Vec::new();
    for (number, outcome, status) in retried {
        fleet.emulator.script(number, script(outcome, None));
        waits.push((number, status, 3, fleet.submit(policy(number)).await));
    }
    for (number, outcome) in final_at_once {
        fleet.emulator.script(number, script(outcome, None));
        waits.push((number, "failed", 1, fleet.submit(policy(number)).await));
    }
    // A retry that then answers completes the call on its second attempt.
    let flaky = "+15105550127";
    fleet.emulator.script(flaky, script(Outcome::Busy, None));
    let flaky_id = fleet.submit(policy(flaky)).await;
    crate::harness::eventually("the first busy dial", SLOW, || async {
        (fleet.dials_to(flaky).len() == 1).then_some(())
    })
    .await;
    fleet
        .emulator
        .script(flaky, script(Outcome::Answer, Some(200)));

    for (number, status, dials, id) in waits {
        let call = fleet.wait_for(&id, status, SLOW).await;
        assert_eq!(fleet.dials_to(number).len(), dials, "{number}: {call}");
        assert_eq!(call["attempts"].as_array().map(Vec::len), Some(dials));
        if dials > 1 {
            assert!(statuses(&call).iter().any(|e| e == "retry_scheduled"));
        }
    }
    let call = fleet.wait_for(&flaky_id, "completed", SLOW).await;
    assert_eq!(call["attempts"][0]["outcome"], "busy");
    assert_eq!(call["attempts"][1]["outcome"], "completed");
    assert_eq!(
        call["attempts"][1]["participant_identity"],
        format!("sip-{}-a2", &flaky_id[5..])
    );
    fleet.stop().await;
}

/// Without wait_until_answered the dial returns at once; the failure arrives only as the
/// participant leaving, and the webhook worker classifies it.
#[tokio::test]
async fn unanswered_dials_without_waiting_end_through_webhooks() {
    let fleet = TestFleet::start("nowait", FleetOptions::default()).await;
    fleet
        .emulator
        .script("+15105550131", script(Outcome::Busy, None));
    fleet
        .emulator
        .script("+15105550132", script(Outcome::Unavailable, None));
    let busy = fleet.submit(json!({"to": "+15105550131"})).await;
    let away = fleet.submit(json!({"to": "+15105550132"})).await;
    let call = fleet.wait_for(&busy, "busy", SLOW).await;
    assert_eq!(call["attempts"][0]["disconnect_reason"], "USER_REJECTED");
    let call = fleet.wait_for(&away, "no_answer", SLOW).await;
    assert_eq!(call["attempts"][0]["disconnect_reason"], "USER_UNAVAILABLE");
    fleet.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_existing_call_or_conflicts() {
    let fleet = TestFleet::start("idem", FleetOptions::default()).await;
    let body = json!({"to": "+15105550141", "idempotency_key": "invoice-77", "context": {"a": 1}});
    let (first_status, first) = fleet.post("/v1/calls", &body).await;
    assert_eq!(first_status, 202);
    let (again_status, again) = fleet.post("/v1/calls", &body).await;
    assert_eq!(again_status, 200, "{again}");
    assert_eq!(again["id"], first["id"]);
    let mut changed = body.clone();
    changed["context"]["a"] = json!(2);
    let (conflict_status, conflict) = fleet.post("/v1/calls", &changed).await;
    assert_eq!(conflict_status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "conflict");
    let id = first["id"].as_str().expect("id");
    fleet.wait_for(id, "completed", SLOW).await;
    assert_eq!(
        fleet.dials_to("+15105550141").len(),
        1,
        "one call, one dial"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn a_batch_accepts_and_rejects_each_item_on_its_own() {
    let fleet = TestFleet::start("batch", FleetOptions::default()).await;
    let (status, answer) = fleet
        .post(
            "/v1/calls/batch",
            &json!({"calls": [
                {"to": "+15105550151"},
                {"to": "not a number"},
                {"to": "+15105550152", "colour": "blue"},
                {"to": "+15105550153", "max_attempts": 99},
                {"to": "+15105550154", "tags": ["batch"]}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["rejected"], 3);
    let results = answer["results"].as_array().expect("results");
    let by_index: HashMap<u64, &Value> = results
        .iter()
        .map(|r| (r["index"].as_u64().expect("index"), r))
        .collect();
    assert_eq!(by_index[&0]["status"], 202);
    assert_eq!(by_index[&1]["error"]["field"], "to");
    assert_eq!(by_index[&2]["error"]["field"], "colour");
    assert_eq!(by_index[&3]["error"]["field"], "max_attempts");
    assert_eq!(by_index[&4]["status"], 202);
    for index in [0, 4] {
        let id = by_index[&index]["call"]["id"].as_str().expect("id");
        fleet.wait_for(id, "completed", SLOW).await;
    }
    assert!(fleet.dials_to("+15105550152").is_empty());
    let (status, _) = fleet
        .post(
            "/v1/calls/batch",
            &json!({"calls": vec![json!({"to": "+15105550151"}); 1001]}),
        )
        .await;
    assert_eq!(status, 422, "more than 1,000 items");
    fleet.stop().await;
}

#[tokio::test]
async fn bad_requests_get_one_error_shape_naming_the_field() {
    let fleet = TestFleet::start("invalid", FleetOptions::default()).await;
    let cases = [
        (json!({"to": "12"}), "to"),
        (json!({"to": "+15105550161", "from": "x"}), "from"),
        (
            json!({"to": "+15105550161", "unknown_field": 1}),
            "unknown_field",
        ),
        (
            json!({"to": "+15105550161", "call_window": {"timezone": "UTC", "start": "9", "end": "17:00"}}),
            "call_window.start",
        ),
        (
            json!({"to": "+15105550161", "call_window": {"timezone": "UTC", "start": "09:00", "end": "17:00", "nights": []}}),
            "call_window.nights",
        ),
        (
            json!({"to": "+15105550161", "not_before": "tomorrow"}),
            "not_before",
        ),
        (
            json!({"to": "+15105550161", "retry_on": ["declined"]}),
            "retry_on",
        ),
        (json!({"to": 5105550161u64}), "to"),
        (json!({}), "body"),
    ];
    for (body, field) in cases {
        let (status, answer) = fleet.post("/v1/calls", &body).await;
        assert_eq!(status, 422, "{body} → {answer}");
        assert_eq!(answer["error"]["code"], "invalid");
        assert_eq!(answer["error"]["field"], field, "{body} → {answer}");
    }
    // Malformed JSON, oversized body, missing and wrong keys.
    let raw = fleet
        .http
        .post(format!("{}/v1/calls", fleet.base))
        .bearer_auth(crate::fleet::API_KEY)
        .header("content-type", "application/json")
        .body("{\"to\":")
        .send()
        .await
        .expect("send");
    assert_eq!(raw.status().as_u16(), 422);
    let huge = json!({"to": "+15105550161", "context": {"blob": "x".repeat(100_000)}});
    let (status, answer) = fleet.post("/v1/calls", &huge).await;
    assert_eq!(status, 413);
    assert_eq!(answer["error"]["code"], "too_large");
    for key in [None, Some("wrong")] {
        let mut request = fleet
            .http
            .post(format!("{}/v1/calls", fleet.base))
            .json(&json!({"to": "+15105550161"}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status().as_u16(), 401);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, answer) = fleet.get("/v1/calls?status=sleeping").await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (422, json!("status"))
    );
    let (status, _) = fleet.get("/v1/calls/call_nope").await;
    assert_eq!(status, 404);
    assert!(fleet
        .emulator
        .requests_of("CreateSIPParticipant")
        .is_empty());
    fleet.stop().await;
}

#[tokio::test]
async fn listing_pages_newest_first_with_a_cursor() {
    let fleet = TestFleet::start("list", FleetOptions::default()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let tag = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(
            fleet
                .submit(json!({"to": "+15105550171", "tags": [tag],
                               "not_before": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()}))
                .await,
        );
    }
    let (_, page1) = fleet.get("/v1/calls?limit=2").await;
    let cursor = page1["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, page2) = fleet
        .get(&format!("/v1/calls?limit=2&cursor={cursor}"))
        .await;
    let listed: Vec<&str> = page1["calls"]
        .as_array()
        .into_iter()
        .chain(page2["calls"].as_array())
        .flatten()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(listed, vec![&ids[4], &ids[3], &ids[2], &ids[1]]);
    let (_, evens) = fleet.get("/v1/calls?tag=even&status=scheduled").await;
    assert_eq!(evens["calls"].as_array().map(Vec::len), Some(3));
    let (_, none) = fleet.get("/v1/calls?direction=inbound").await;
    assert_eq!(none["calls"].as_array().map(Vec::len), Some(0));
    fleet.stop().await;
}

#[tokio::test]
async fn cancel_before_dial_stops_the_call_and_after_dial_conflicts() {
    let fleet = TestFleet::start("cancel", FleetOptions::default()).await;
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(800)).to_rfc3339();
    let canceled = fleet
        .submit(json!({"to": "+15105550181", "not_before": soon}))
        .await;
    let witness = fleet
        .submit(json!({"to": "+15105550182", "not_before": soon}))
        .await;
    let (status, call) = fleet
        .post(&format!("/v1/calls/{canceled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{call}");
    assert_eq!(call["status"], "canceled");
    // The witness, due at the same time, is dialed; the canceled call never is.
    fleet.wait_for(&witness, "completed", SLOW).await;
    assert!(fleet.dials_to("+15105550181").is_empty());
    let (status, answer) = fleet
        .post(&format!("/v1/calls/{canceled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409, "{answer}");
    // A ringing call cannot be canceled.
    fleet.emulator.script(
        "+15105550183",
        CallScript {
            outcome: Outcome::Answer,
            ring_ms: 3_000,
            talk_ms: Some(100),
            sip_status: None,
        },
    );
    let ringing = fleet.submit(json!({"to": "+15105550183"})).await;
    fleet
        .wait_for(&ringing, "sip_participant_joined", SLOW)
        .await;
    let (status, answer) = fleet
        .post(&format!("/v1/calls/{ringing}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(
        answer["error"]["message"],
        "the call has already been dialed"
    );
    fleet.stop().await;
}

/// The callee's window opens in ~1.5 s on the fleet's clock: the job waits in the broker's
/// delay queues (no worker sleeps) and is dialed once the window is open.
#[tokio::test]
async fn a_closed_call_window_defers_the_job_through_the_broker() {
    let fleet = TestFleet::start(
        "window",
        FleetOptions {
            backing: Backing::RabbitRedis,
            ..Default::default()
        },
    )
    .await;
    let opens: chrono::DateTime<chrono::Utc> = "2026-11-23T14:00:00Z".parse().expect("time");
    fleet
        .clock
        .set(opens - chrono::Duration::milliseconds(1_500));
    let submitted = chrono::Utc::now();
    let (status, call) = fleet
        .post(
            "/v1/calls",
            &json!({"to": "+15105550191", "call_window": {
                "timezone": "America/New_York", "start": "09:00", "end": "17:00",
                "days": ["mon", "tue", "wed", "thu", "fri"]}}),
        )
        .await;
    assert_eq!(status, 202, "{call}");
    assert_eq!(call["status"], "scheduled");
    assert_eq!(call["scheduled_for"], "2026-11-23T14:00:00Z");
    let id = call["id"].as_str().expect("id");
    let done = fleet.wait_for(id, "completed", SLOW).await;
    let dial = &fleet.dials_to("+15105550191")[0];
    let waited = dial.at_ms - submitted.timestamp_millis();
    assert!(
        waited >= 1_400,
        "dialed {waited} ms after submission, before the window"
    );
    let started: chrono::DateTime<chrono::Utc> = done["attempts"][0]["started_at"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("started_at");
    assert!(
        started >= opens,
        "attempt started at {started}, window opens {opens}"
    );
    fleet.stop().await;
}

/// Two workers get the same job (a redelivery racing the original): one dial.
#[tokio::test]
async fn two_workers_racing_on_one_job_dial_once() {
    let mut options = FleetOptions {
        backing: Backing::RabbitRedis,
        workers: 2,
        ..Default::default()
    };
    options.emulator.default_script = script(Outcome::Answer, Some(300));
    let fleet = TestFleet::start("race", options).await;
    fleet.emulator.set_faults(livekit_emulator::Faults {
        methods: [(
            "CreateSIPParticipant".to_owned(),
            MethodFault {
                latency_ms: 400,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = fleet.submit(json!({"to": format!("+1510555020{i}")})).await;
        // The same job again, as a broker redelivery would bring it.
        let duplicate = callfleet_core::calls::CallJob {
            call_id: id.clone(),
            attempt: 1,
        }
        .message(None);
        fleet.broker.publish(duplicate).await.expect("publish");
        ids.push(id);
    }
    for id in &ids {
        fleet.wait_for(id, "completed", SLOW).await;
    }
    // A duplicate deferred while the other worker held the call comes back later: count
    // only once nothing is left in the broker to come back.
    eventually(
        "the deferred duplicates to come back and go",
        SLOW,
        || async {
            let census = fleet.broker.census().await.ok()?;
            census.values().all(|n| *n == 0).then_some(())
        },
    )
    .await;
    for i in 0..ids.len() {
        assert_eq!(fleet.dials_to(&format!("+1510555020{i}")).len(), 1);
    }
    assert_eq!(fleet.emulator.requests_of("CreateDispatch").len(), 5);
    fleet.stop().await;
}

/// 200 calls submitted at once on a trunk allowing 5 concurrent calls: the emulator never
/// has more than 5 of its calls up at the same time.
#[tokio::test]
async fn trunk_concurrency_holds_under_200_concurrent_submissions() {
    let mut options = FleetOptions {
        backing: Backing::RabbitRedis,
        workers: 2,
        settings: OutboundSettings {
            trunk_max_concurrent: 5,
            trunk_cps: 1_000.0,
            ..FleetOptions::default().settings
        },
        ..Default::default()
    };
    options.emulator.default_script = CallScript {
        outcome: Outcome::Answer,
        ring_ms: 20,
        talk_ms: Some(100),
        sip_status: None,
    };
    let fleet = std::sync::Arc::new(TestFleet::start("concurrency", options).await);
    let mut submissions = tokio::task::JoinSet::new();
    for i in 0..200 {
        let fleet = fleet.clone();
        submissions.spawn(async move {
            fleet
                .submit(json!({"to": format!("+1510555{:04}", 3000 + i)}))
                .await
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = submissions.join_next().await {
        ids.push(id.expect("submitted"));
    }
    for id in &ids {
        fleet
            .wait_for(id, "completed", Duration::from_secs(90))
            .await;
    }
    // Up intervals per room from the emulator's own record: dial arrival → leave event.
    let mut events: Vec<(i64, i32)> = Vec::new();
    for dial in fleet.emulator.requests_of("CreateSIPParticipant") {
        events.push((dial.at_ms, 1));
    }
    for hook in fleet.emulator.webhooks() {
        if hook.event == "participant_left" || hook.event == "participant_connection_aborted" {
            events.push((hook.queued_ms, -1));
        }
    }
    assert_eq!(
        events.iter().filter(|e| e.1 == 1).count(),
        200,
        "one dial per call"
    );
    events.sort();
    let (mut up, mut peak) = (0, 0);
    for (_, delta) in events {
        up += delta;
        peak = peak.max(up);
    }
    assert!(peak <= 5, "{peak} calls were up at once on a 5-call trunk");
    assert!(peak >= 2, "the limit was exercised (peak {peak})");
    let fleet = std::sync::Arc::into_inner(fleet).expect("sole owner");
    fleet.stop().await;
}

/// Metrics move as a call does.
#[tokio::test]
async fn metrics_follow_the_call() {
    let handle = callfleet_core::telemetry::prometheus().expect("recorder");
    let fleet = TestFleet::start("metrics", FleetOptions::default()).await;
    let id = fleet
        .submit(json!({"to": "+15105550211", "wait_until_answered": true}))
        .await;
    fleet.wait_for(&id, "completed", SLOW).await;
    let text = handle.render();
    for needle in [
        "callfleet_jobs_enqueued_total{queue=\"call_jobs\"} 1",
        "callfleet_calls_finished_total{direction=\"outbound\",status=\"completed\"} 1",
        "callfleet_call_attempts_total{outcome=\"completed\"} 1",
        "callfleet_livekit_requests_total{method=\"CreateSIPParticipant\",code=\"ok\"} 1",
        "callfleet_dials_total{result=\"sent\"} 1",
        "callfleet_dispatches_total{result=\"done\"} 1",
        "callfleet_call_setup_seconds_count 1",
        "callfleet_active_calls{trunk=\"ST_test\"} 0",
        "callfleet_webhooks_total{result=\"accepted\",reason=\"none\"}",
        "callfleet_jobs_processed_total{queue=\"call_jobs\",outcome=\"done\"} 1",
        "callfleet_http_requests_total{route=\"/v1/calls\",method=\"POST\",status=\"202\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let depth = fleet
        .broker
        .queue_depth(WorkQueue::CallJobs)
        .await
        .expect("depth");
    assert_eq!(depth, 0);
    fleet.stop().await;
}

fn failing(method: &str, code: &str) -> livekit_emulator::Faults {
    livekit_emulator::Faults {
        methods: [(
            method.to_owned(),
            MethodFault {
                error_rate: 1.0,
                error_code: Some(code.to_owned()),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// A LiveKit that keeps failing transiently: quick in-process retries, then a
/// broker-delayed retry, then the dead-letter queue with the reason, which the call's
/// timeline shows; replaying it once LiveKit is back places the call.
#[tokio::test]
async fn transient_failures_end_in_the_dead_letter_queue_and_replay_resumes() {
    let fleet = TestFleet::start(
        "dlq",
        FleetOptions {
            max_job_attempts: 2,
            ..Default::default()
        },
    )
    .await;
    fleet
        .emulator
        .set_faults(failing("CreateRoom", "unavailable"));
    let id = fleet.submit(json!({"to": "+15105550501"})).await;
    let dead = crate::harness::eventually("a dead letter", SLOW, || async {
        let dead = fleet.broker.list_dead_letters(10).await.ok()?;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert!(
        dead[0].reason.contains("retries exhausted"),
        "{}",
        dead[0].reason
    );
    assert!(dead[0].reason.contains("CreateRoom"), "{}", dead[0].reason);
    // 4 tries in process per delivery (1 + 3 quick retries), two deliveries.
    assert_eq!(fleet.emulator.requests_of("CreateRoom").len(), 8);
    let (_, call) = fleet.get(&format!("/v1/calls/{id}")).await;
    assert!(
        statuses(&call).iter().any(|e| e == "dead_lettered"),
        "{call}"
    );
    assert!(fleet.dials_to("+15105550501").is_empty());

    fleet
        .emulator
        .set_faults(livekit_emulator::Faults::default());
    assert_eq!(
        fleet
            .broker
            .replay_dead_letters(None, 10)
            .await
            .expect("replay"),
        1
    );
    fleet.wait_for(&id, "completed", SLOW).await;
    assert_eq!(fleet.dials_to("+15105550501").len(), 1);
    fleet.stop().await;
}

/// A permanent LiveKit error fails the call with the reason; nothing is retried.
#[tokio::test]
async fn permanent_errors_fail_the_call_with_the_reason() {
    let fleet = TestFleet::start("permanent", FleetOptions::default()).await;
    fleet
        .emulator
        .set_faults(failing("CreateDispatch", "permission_denied"));
    let id = fleet.submit(json!({"to": "+15105550511"})).await;
    let call = fleet.wait_for(&id, "failed", SLOW).await;
    let reason = call["end_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("CreateDispatch") && reason.contains("permission_denied"),
        "{call}"
    );
    assert_eq!(
        fleet.emulator.requests_of("CreateDispatch").len(),
        1,
        "not retried"
    );
    assert!(fleet.dials_to("+15105550511").is_empty());
    fleet.stop().await;
}

/// A client that retries after a 503 ends with exactly one accepted, enqueued call,
/// whichever part was down: the store after the key was claimed, or the broker and then
/// the store when the ingress tried to mark the call `not_enqueued`. Checked on RabbitMQ
/// and Redis: one call for the key, one dial in the emulator's record, queues empty.
#[tokio::test]
async fn a_retry_after_a_503_ends_with_exactly_one_enqueued_call() {
    let outage = Arc::new(crate::harness::Outage::default());
    let fleet = TestFleet::start(
        "outage",
        FleetOptions {
            backing: Backing::RabbitRedis,
            outage: Some(outage.clone()),
            ..Default::default()
        },
    )
    .await;

    // 1. The store fails right after the key is claimed: the record is never written.
    let a = json!({"to": "+15105550181", "idempotency_key": "outage-a"});
    outage.store_down(&["create_record"]);
    let (status, body) = fleet.post("/v1/calls", &a).await;
    assert_eq!(status, 503, "{body}");
    outage.heal();
    let (status, first) = fleet.post("/v1/calls", &a).await;
    assert_eq!(
        status, 202,
        "the retry stores the call under its claimed id: {first}"
    );
    let id_a = first["id"].as_str().expect("id").to_owned();

    // 2. The broker refuses the job, then the store cannot mark the call `not_enqueued`:
    // the record says `queued` although no job exists.
    let b = json!({"to": "+15105550182", "idempotency_key": "outage-b"});
    outage.broker_down(true);
    outage.store_down(&["update_record", "delete_key"]);
    let (status, body) = fleet.post("/v1/calls", &b).await;
    assert_eq!(status, 503, "{body}");
    outage.heal();
    let (status, again) = fleet.post("/v1/calls", &b).await;
    assert_eq!(status, 200, "the retry finds the stored call: {again}");
    let id_b = again["id"].as_str().expect("id").to_owned();

    // 3. The broker refuses the job and the store works: the call is marked
    // `not_enqueued`, and the client's retry queues that same call again.
    let c = json!({"to": "+15105550183", "idempotency_key": "outage-c"});
    outage.broker_down(true);
    let (status, body) = fleet.post("/v1/calls", &c).await;
    assert_eq!(status, 503, "{body}");
    outage.heal();
    let (_, marked) = fleet.get("/v1/calls?status=failed").await;
    assert!(
        marked.to_string().contains("not_enqueued"),
        "the unenqueued call is marked: {marked}"
    );
    let (status, revived) = fleet.post("/v1/calls", &c).await;
    assert_eq!(status, 200, "{revived}");
    assert_eq!(revived["status"], "queued");
    let id_c = revived["id"].as_str().expect("id").to_owned();

    for (id, number) in [
        (&id_a, "+15105550181"),
        (&id_b, "+15105550182"),
        (&id_c, "+15105550183"),
    ] {
        fleet.wait_for(id, "completed", SLOW).await;
        assert_eq!(fleet.dials_to(number).len(), 1, "one dial to {number}");
    }
    let (_, listed) = fleet.get("/v1/calls?limit=50").await;
    assert_eq!(
        listed["calls"].as_array().map(Vec::len),
        Some(3),
        "one call per key: {listed}"
    );
    eventually("queues to drain", SLOW, || async {
        let census = fleet.broker.census().await.ok()?;
        census.values().all(|n| *n == 0).then_some(())
    })
    .await;
    fleet.stop().await;
}

/// A number that crashed rlibphonenumber 2.2 is refused with a 422 naming the field, alone
/// or inside a batch, and the batch's valid items are accepted and dialed, not stranded.
#[tokio::test]
async fn a_number_that_crashed_the_parser_is_a_clear_422() {
    let fleet = TestFleet::start("parser-panic", FleetOptions::default()).await;
    let bad = ";phone-context=+1;tel:5105550123";
    let (status, body) = fleet.post("/v1/calls", &json!({ "to": bad })).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "to");
    assert!(
        !body.to_string().contains("phone-context"),
        "the input is not echoed: {body}"
    );
    let (status, batch) = fleet
        .post(
            "/v1/calls/batch",
            &json!({"calls": [{"to": "+15105550171", "idempotency_key": "pp-1"}, {"from": bad, "to": "+15105550172"}]}),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["accepted"], 1, "{batch}");
    assert_eq!(batch["results"][1]["status"], 422);
    assert_eq!(batch["results"][1]["error"]["field"], "from", "{batch}");
    let id = batch["results"][0]["call"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    fleet.wait_for(&id, "completed", SLOW).await;
    fleet.stop().await;
}
