//! Call control end to end on RabbitMQ + Redis: hang-up and transfer commands through the
//! control queue, counted from the emulator's record, with their outcomes on the call.

use std::time::Duration;

use livekit_emulator::Outcome;
use serde_json::{json, Value};

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::{eventually, fault_on, script};
use crate::inbound::{agent_joins_after, call_in_room, create_profile, place, queues_drained};

const SLOW: Duration = Duration::from_secs(20);
const DID: &str = "+15105550100";

fn on_rabbit() -> FleetOptions {
    FleetOptions {
        backing: Backing::RabbitRedis,
        ..Default::default()
    }
}

/// Scripts what a transfer to `target` does in the emulator.
async fn script_transfer(fleet: &TestFleet, target: &str, body: Value) {
    let response = fleet
        .http
        .put(format!(
            "{}/emulator/v1/transfers/{}",
            fleet.emulator_url(),
            target.replace(':', "%3A").replace('@', "%40")
        ))
        .json(&body)
        .send()
        .await
        .expect("emulator reachable");
    assert!(response.status().is_success(), "transfer script refused");
}

async fn command(
    fleet: &TestFleet,
    id: &str,
    what: &str,
    body: Value,
    key: Option<&str>,
) -> (u16, Value) {
    let mut request = fleet
        .http
        .post(format!("{}/v1/calls/{id}/{what}", fleet.base))
        .bearer_auth(crate::fleet::API_KEY);
    // `null`: no body at all (a hang-up needs none).
    if !body.is_null() {
        request = request.json(&body);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("ingress reachable");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Scripts the emulator's answer for the request's target, asks for the transfer (202)
/// and waits for its outcome: the call, and the command.
async fn scripted_transfer(
    fleet: &TestFleet,
    id: &str,
    script: Value,
    request: Value,
) -> (Value, Value) {
    let target = request["to"].as_str().expect("a target").to_owned();
    script_transfer(fleet, &target, script).await;
    let (status, taken) = command(fleet, id, "transfer", request, None).await;
    assert_eq!(status, 202, "{taken}");
    finished(fleet, id, taken["command_id"].as_str().expect("id")).await
}

/// Waits for the command to have an outcome and returns the call.
async fn finished(fleet: &TestFleet, id: &str, command_id: &str) -> (Value, Value) {
    eventually(&format!("command {command_id} to finish"), SLOW, || async {
        let (_, call) = fleet.get(&format!("/v1/calls/{id}")).await;
        let command = call["commands"]
            .as_array()?
            .iter()
            .find(|c| c["id"] == command_id)?
            .clone();
        command["outcome"].is_object().then_some((call, command))
    })
    .await
}

fn timeline(call: &Value) -> Vec<String> {
    call["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|e| {
                    format!(
                        "{} {}",
                        e["event"].as_str().unwrap_or_default(),
                        e["detail"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many `method` requests LiveKit (the emulator) carried out in `room`.
pub fn executed(fleet: &TestFleet, method: &str, room: &str) -> usize {
    fleet
        .emulator
        .requests_of(method)
        .iter()
        .filter(|r| r.room.as_deref() == Some(room) && r.outcome.executed())
        .count()
}

/// An answered outbound call: a declined transfer and one whose target never answers keep
/// the call; a hang-up ends it, once, however often it is asked with the same key; after
/// the end, commands conflict.
#[tokio::test]
async fn outbound_transfers_fail_with_their_sip_status_and_a_hangup_ends_the_call_once() {
    let fleet = TestFleet::start("control-out", on_rabbit()).await;
    let number = "+15105550131";
    fleet.emulator.script(number, script(Outcome::Answer, None));
    let id = fleet
        .submit(json!({"to": number, "wait_until_answered": true}))
        .await;
    let call = fleet.wait_for(&id, "in_progress", SLOW).await;
    let room = call["room_name"].as_str().expect("room").to_owned();

    // A bad target is refused before anything is queued.
    let (status, body) =
        command(&fleet, &id, "transfer", json!({"to": "+15105550199"}), None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "to");

    let (_, declined) = scripted_transfer(
        &fleet,
        &id,
        json!({"outcome": "decline", "after_ms": 100}),
        json!({"to": "tel:+15105550199"}),
    )
    .await;
    assert_eq!(
        declined["outcome"]["result"], "transfer_failed",
        "{declined}"
    );
    assert_eq!(declined["outcome"]["sip_status"], 603);

    let (call, unanswered) = scripted_transfer(
        &fleet,
        &id,
        json!({"outcome": "no_answer"}),
        json!({"to": "sip:desk@pbx.example.com", "ringing_timeout_s": 1, "play_dialtone": true}),
    )
    .await;
    assert_eq!(unanswered["outcome"]["sip_status"], 408, "{unanswered}");
    assert_eq!(
        call["status"], "in_progress",
        "a failed transfer keeps the call"
    );
    let transfers = fleet.emulator.requests_of("TransferSIPParticipant");
    assert_eq!(transfers.len(), 2);
    assert_eq!(
        transfers[1].fields.get("play_dialtone").map(String::as_str),
        Some("true")
    );

    // The hang-up, sent three times with one key: one command, one RemoveParticipant.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, taken) = command(&fleet, &id, "hangup", Value::Null, Some("hang-1")).await;
        assert_eq!(status, 202, "{taken}");
        ids.push(taken["command_id"].as_str().expect("id").to_owned());
    }
    assert!(ids.iter().all(|c| c == &ids[0]), "{ids:?}");
    let (status, body) = command(
        &fleet,
        &id,
        "hangup",
        json!({"delete_room": true}),
        Some("hang-1"),
    )
    .await;
    assert_eq!(status, 409, "a key names one command: {body}");
    let (_, hung) = finished(&fleet, &id, &ids[0]).await;
    assert_eq!(hung["outcome"]["result"], "hung_up");
    let ended = fleet.wait_for(&id, "completed", SLOW).await;
    assert_eq!(
        ended["attempts"][0]["disconnect_reason"],
        "PARTICIPANT_REMOVED"
    );
    let lines = timeline(&ended);
    for entry in ["transfer_failed 603", "transfer_failed 408", "hung_up"] {
        assert!(
            lines.iter().any(|l| l.starts_with(entry)),
            "{entry} missing from {lines:?}"
        );
    }
    assert_eq!(executed(&fleet, "RemoveParticipant", &room), 1);
    // The same key after the end still answers with the first command; a new one conflicts.
    let (status, again) = command(&fleet, &id, "hangup", Value::Null, Some("hang-1")).await;
    assert_eq!(
        (status, again["command_id"].as_str()),
        (202, Some(ids[0].as_str()))
    );
    let (status, body) = command(
        &fleet,
        &id,
        "transfer",
        json!({"to": "tel:+15105550199"}),
        None,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(executed(&fleet, "RemoveParticipant", &room), 1);
    queues_drained(&fleet, Duration::from_secs(10)).await;
    fleet.stop().await;
}

/// An inbound call with its agent: a transfer the target answers takes the caller out of
/// the room and ends the call; a hang-up of an unknown call is 404.
#[tokio::test]
async fn an_inbound_call_is_transferred_once() {
    let fleet = TestFleet::start("control-in", on_rabbit()).await;
    create_profile(
        &fleet,
        json!({"id": "desk", "name": "Desk", "agent_name": "desk-agent", "numbers": [DID],
               "agent_join_timeout_s": 1}),
    )
    .await;
    agent_joins_after(&fleet, "desk-agent", 100).await;
    let placed = place(&fleet, json!({"from": "+15105550177", "to": DID})).await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = eventually("the agent to answer", SLOW, || async {
        let c = call_in_room(&fleet, &room, SLOW).await;
        (c["status"] == "in_progress").then_some(c)
    })
    .await;
    let id = call["id"].as_str().expect("id").to_owned();
    // A target that declines first: the caller stays with the agent.
    let (call, declined) = scripted_transfer(
        &fleet,
        &id,
        json!({"outcome": "decline", "after_ms": 100}),
        json!({"to": "tel:+15105550187"}),
    )
    .await;
    assert_eq!(declined["outcome"]["sip_status"], 603, "{declined}");
    assert_eq!(call["status"], "in_progress");
    let (status, body) = command(
        &fleet,
        &id,
        "transfer",
        json!({"to": "tel:+15105550188", "headers": {"X-Note": "a\r\nX-Evil: 1"}}),
        None,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "headers.X-Note");
    script_transfer(
        &fleet,
        "tel:+15105550188",
        json!({"outcome": "answer", "after_ms": 300}),
    )
    .await;
    let (status, taken) = command(
        &fleet,
        &id,
        "transfer",
        json!({"to": "tel:+1 510 555 0188", "headers": {"X-Reason": "billing"}}),
        Some("t-1"),
    )
    .await;
    assert_eq!(status, 202, "{taken}");
    let (status, again) = command(
        &fleet,
        &id,
        "transfer",
        json!({"to": "tel:+15105550188", "headers": {"X-Reason": "billing"}}),
        Some("t-1"),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(again["command_id"], taken["command_id"]);
    let (_, done) = finished(&fleet, &id, taken["command_id"].as_str().expect("id")).await;
    assert_eq!(done["outcome"]["result"], "transferred", "{done}");
    assert_eq!(done["to"], "tel:+15105550188", "the target is normalised");
    let ended = fleet.wait_for(&id, "completed", SLOW).await;
    assert!(timeline(&ended)
        .iter()
        .any(|l| l == "transferred tel:+15105550188"));
    assert_eq!(executed(&fleet, "TransferSIPParticipant", &room), 2);
    let (status, _) = command(&fleet, "call_nope", "hangup", Value::Null, None).await;
    assert_eq!(status, 404);
    queues_drained(&fleet, Duration::from_secs(10)).await;
    fleet.stop().await;
}

/// LiveKit transfers the caller but the answer is lost: the worker waits until the first
/// request could have finished, sees the caller gone, and records the transfer without
/// sending a second REFER.
#[tokio::test]
async fn a_lost_transfer_answer_is_reconciled_not_repeated() {
    let fleet = TestFleet::start(
        "control-lost",
        FleetOptions {
            backing: Backing::RabbitRedis,
            livekit_timeout: Duration::from_secs(2),
            settings: callfleet_workers::OutboundSettings {
                livekit_settle: Duration::from_secs(3),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let number = "+15105550132";
    fleet.emulator.script(number, script(Outcome::Answer, None));
    let id = fleet
        .submit(json!({"to": number, "wait_until_answered": true}))
        .await;
    let call = fleet.wait_for(&id, "in_progress", SLOW).await;
    let room = call["room_name"].as_str().expect("room").to_owned();
    fleet.emulator.set_faults(fault_on(
        "TransferSIPParticipant",
        livekit_emulator::MethodFault {
            drop_after_rate: 1.0,
            ..Default::default()
        },
    ));
    let (status, taken) = command(
        &fleet,
        &id,
        "transfer",
        json!({"to": "tel:+15105550198", "ringing_timeout_s": 1}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{taken}");
    let (_, done) = finished(&fleet, &id, taken["command_id"].as_str().expect("id")).await;
    fleet.emulator.set_faults(Default::default());
    assert_eq!(done["outcome"]["result"], "transferred", "{done}");
    assert_eq!(
        fleet.emulator.requests_of("TransferSIPParticipant").len(),
        1
    );
    assert_eq!(executed(&fleet, "TransferSIPParticipant", &room), 1);
    queues_drained(&fleet, Duration::from_secs(10)).await;
    fleet.stop().await;
}

/// A ringing outbound call cannot be transferred, and hung up it ends canceled: the dial
/// it cuts short (waiting for the answer or not) is never retried, whatever the call's
/// retry policy says.
#[tokio::test]
async fn a_ringing_outbound_call_hung_up_is_canceled_not_redialed() {
    let fleet = TestFleet::start("control-ring", on_rabbit()).await;
    for (number, wait) in [("+15105550135", true), ("+15105550136", false)] {
        fleet.emulator.script(
            number,
            livekit_emulator::CallScript {
                outcome: Outcome::Answer,
                ring_ms: 30_000,
                talk_ms: None,
                sip_status: None,
            },
        );
        let id = fleet
            .submit(
                json!({"to": number, "wait_until_answered": wait, "max_attempts": 3,
                           "retry_on": ["no_answer", "unavailable", "busy"], "retry_delay_s": 1}),
            )
            .await;
        let call = eventually("the callee's phone to ring", SLOW, || async {
            let (_, call) = fleet.get(&format!("/v1/calls/{id}")).await;
            let dialed = call["attempts"][0]["steps"]["dial_started_at"].is_string();
            dialed.then_some(call)
        })
        .await;
        let room = call["room_name"].as_str().expect("room").to_owned();
        // The callee is in the room (ringing) as soon as LiveKit took the dial.
        eventually("the ringing callee in the room", SLOW, || async {
            let (_, rooms) = fleet.get_emulator("/emulator/v1/rooms").await;
            rooms["rooms"]
                .as_array()?
                .iter()
                .find(|r| r["room"]["name"] == room.as_str())
                .filter(|r| r["participants"].to_string().contains("\"sip-"))
                .map(|_| ())
        })
        .await;
        let (status, body) = command(
            &fleet,
            &id,
            "transfer",
            json!({"to": "tel:+15105550199"}),
            None,
        )
        .await;
        assert_eq!(status, 409, "{body}");
        let (status, body) = command(&fleet, &id, "hangup", Value::Null, None).await;
        assert_eq!(status, 202, "{body}");
        let deadline = tokio::time::Instant::now() + SLOW;
        let ended = loop {
            let (_, call) = fleet.get(&format!("/v1/calls/{id}")).await;
            if call["status"] == "canceled" {
                break call;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not canceled (waiting for the answer: {wait}): {call:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(ended["end_reason"], "hung_up", "{ended}");
        assert_eq!(
            ended["attempts"].as_array().map(Vec::len),
            Some(1),
            "{ended}"
        );
        // Past the retry delay: still the one dial.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(fleet.dials_to(number).len(), 1, "redialed after a hang-up");
        assert_eq!(executed(&fleet, "RemoveParticipant", &room), 1);
    }
    queues_drained(&fleet, Duration::from_secs(10)).await;
    fleet.stop().await;
}
