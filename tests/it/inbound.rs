//! Inbound calls through the whole fleet: a SIP caller in a room callfleet did not create
//! is routed to a profile and given its agent exactly once per room, whatever the
//! webhooks, the workers and LiveKit's answers do. Judged from LiveKit's side (the
//! emulator's record of CreateDispatch) and from what the broker and Redis hold after.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use livekit_emulator::{Faults, MethodFault};
use rand::seq::SliceRandom;
use serde_json::{json, Value};

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::{eventually, fault_on, sign_webhook};

pub const DID: &str = "+15105550100";

/// Creates a profile through the admin API (201), and waits until every worker's table
/// holds it (they follow the store within a second).
pub async fn create_profile(fleet: &TestFleet, body: Value) -> Value {
    let (status, profile) = fleet.post("/v1/routing/profiles", &body).await;
    assert_eq!(status, 201, "profile not created: {profile}");
    synced(fleet).await;
    profile
}

/// Waits until every worker's routing table is at the ingress's version.
pub async fn synced(fleet: &TestFleet) {
    let version = fleet.routing.version();
    eventually(
        "every worker's routing table to catch up",
        Duration::from_secs(5),
        || async {
            fleet
                .worker_routing
                .iter()
                .all(|r| r.version() >= version)
                .then_some(())
        },
    )
    .await;
}

/// Places a call through the emulator (as a carrier would), returning its answer.
pub async fn place(fleet: &TestFleet, body: Value) -> Value {
    let response = fleet
        .http
        .post(format!("{}/emulator/v1/inbound", fleet.emulator_url()))
        .json(&body)
        .send()
        .await
        .expect("emulator reachable");
    assert!(response.status().is_success(), "inbound call refused");
    response.json().await.expect("json")
}

/// The inbound call in `room`, once the fleet lists it.
pub async fn call_in_room(fleet: &TestFleet, room: &str, timeout: Duration) -> Value {
    eventually(&format!("an inbound call in {room}"), timeout, || async {
        let (_, page) = fleet.get("/v1/calls?direction=inbound&limit=200").await;
        page["calls"]
            .as_array()?
            .iter()
            .find(|c| c["room_name"] == room)
            .cloned()
    })
    .await
}

/// CreateDispatch requests LiveKit carried out for `room`.
pub fn dispatches_in(fleet: &TestFleet, room: &str) -> usize {
    fleet
        .emulator
        .requests_of("CreateDispatch")
        .iter()
        .filter(|r| r.room.as_deref() == Some(room) && r.outcome.executed())
        .count()
}

/// Waits until every queue (work, delay tiers, dead letters) is empty.
pub async fn queues_drained(fleet: &TestFleet, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let census = fleet.broker.census().await.ok();
        if census.as_ref().is_some_and(|c| c.values().all(|n| *n == 0)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queues still hold messages after {timeout:?}: {census:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn caller_attributes(caller: &str, did: &str) -> Value {
    json!({
        "sip.callID": format!("SCL_{}", &caller[1..]),
        "sip.phoneNumber": caller,
        "sip.trunkPhoneNumber": did,
        "sip.trunkID": "ST_inbound",
        "sip.ruleID": "SDR_inbound",
        "sip.callStatus": "ringing",
    })
}

/// A webhook event about the SIP caller, shaped as LiveKit sends it (protojson).
pub fn sip_event(event: &str, id: &str, room: (&str, &str), caller: &str, did: &str) -> Vec<u8> {
    let now = chrono::Utc::now().timestamp();
    serde_json::to_vec(&json!({
        "event": event,
        "id": id,
        "createdAt": now.to_string(),
        "room": {"sid": room.1, "name": room.0},
        "participant": {
            "sid": format!("PA_{}", &caller[1..]),
            "identity": format!("sip_{caller}"),
            "kind": "SIP",
            "state": if event == "participant_joined" { "ACTIVE" } else { "DISCONNECTED" },
            "joinedAt": now.to_string(),
            "attributes": caller_attributes(caller, did),
            "disconnectReason": if event == "participant_joined" { Value::Null } else { json!("CLIENT_INITIATED") },
        },
    }))
    .expect("json")
}

pub async fn deliver(http: &reqwest::Client, base: &str, body: Vec<u8>) -> u16 {
    http.post(format!("{base}/v1/livekit/webhook"))
        .header("content-type", "application/webhook+json")
        .header("authorization", sign_webhook("devkey", "secret", &body))
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// The basics, on both backings: listed as inbound, routed (`active`), its agent
/// dispatched once with the profile's metadata and the call's facts, and the caller's end
/// completes the call and frees the profile's slot.
async fn routed_and_dispatched_once(backing: Backing) {
    let fleet = TestFleet::start(
        "inbound-basic",
        FleetOptions {
            backing,
            ..Default::default()
        },
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "support", "name": "Support", "agent_name": "support-agent",
               "numbers": ["+1 (510) 555-0100"], "metadata": {"greeting": "Hi there"},
               "agent_join_timeout_s": 5}),
    )
    .await;
    agent_joins_after(&fleet, "support-agent", 200).await;
    let placed = place(
        &fleet,
        json!({"from": "+15105550123", "to": DID, "hangup_after_ms": 2_000}),
    )
    .await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = call_in_room(&fleet, &room, Duration::from_secs(10)).await;
    let id = call["id"].as_str().expect("id").to_owned();
    assert_eq!(call["direction"], "inbound");
    assert_eq!(call["to"], DID);
    assert_eq!(call["from"], "+15105550123");
    let ended = fleet
        .wait_for(&id, "completed", Duration::from_secs(20))
        .await;
    assert!(ended["inbound"]["agent_joined_at"].is_string(), "{ended}");
    assert_eq!(ended["routing"]["decision"], "active");
    assert_eq!(ended["routing"]["profile_id"], "support");
    assert_eq!(ended["agent_name"], "support-agent");
    let dispatch = &ended["inbound"]["dispatches"][0];
    assert!(dispatch["dispatch_id"].is_string(), "{ended}");
    let metadata: Value =
        serde_json::from_str(dispatch["metadata"].as_str().expect("metadata")).expect("json");
    assert_eq!(metadata["greeting"], "Hi there");
    assert_eq!(metadata["caller_number"], "+15105550123");
    assert_eq!(metadata["dialed_number"], DID);
    assert_eq!(metadata["call_id"], id.as_str());
    assert_eq!(ended["inbound"]["sip_call_id"], placed["sip_call_id"]);
    assert!(ended["duration_s"].as_f64().is_some());
    let events: Vec<&str> = ended["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    for expected in [
        "routed",
        "dispatch_created",
        "agent_dispatched",
        "agent_joined",
        "in_progress",
        "completed",
    ] {
        assert!(
            events.contains(&expected),
            "{expected} missing from {events:?}"
        );
    }
    assert_eq!(dispatches_in(&fleet, &room), 1, "one agent for the room");
    // The slot is free again, and nothing is left in any queue.
    eventually(
        "the profile's slot to be freed",
        Duration::from_secs(10),
        || async {
            fleet
                .routing
                .store()
                .loads()
                .await
                .ok()?
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert_eq!(ended["inbound"]["slot"], "support");
    queues_drained(&fleet, Duration::from_secs(10)).await;
    fleet.stop().await;
}

#[tokio::test]
async fn an_inbound_call_is_routed_and_dispatched_once_in_memory() {
    routed_and_dispatched_once(Backing::Memory).await;
}

#[tokio::test]
async fn an_inbound_call_is_routed_and_dispatched_once_on_rabbitmq_and_redis() {
    routed_and_dispatched_once(Backing::RabbitRedis).await;
}

/// The storm: 10 copies of every `participant_joined` (and a replay with a new event id
/// for some rooms), shuffled with `participant_left` events, delivered concurrently to
/// two ingresses feeding three workers, while LiveKit drops 30 % of CreateDispatch answers
/// after carrying them out. Exactly one CreateDispatch per live room, none for rooms whose
/// end came first, every call recorded, every queue and slot empty afterwards.
#[tokio::test]
async fn a_webhook_storm_dispatches_exactly_once_per_room() {
    let mut fleet = TestFleet::start(
        "inbound-storm",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 3,
            ..Default::default()
        },
    )
    .await;
    let second = fleet.spawn_ingress().await;
    let ingresses = [fleet.base.clone(), second];
    // No agent ever joins: after 2 s each call's check hangs its caller up, so the storm
    // ends with nothing left running (and the checks are part of what must not repeat).
    never_join(&fleet, &["storm-agent"]).await;
    create_profile(
        &fleet,
        json!({"id": "storm", "name": "Storm", "agent_name": "storm-agent",
               "numbers": [DID], "agent_join_timeout_s": 2}),
    )
    .await;
    fleet.emulator.set_faults(fault_on(
        "CreateDispatch",
        MethodFault {
            drop_after_rate: 0.3,
            ..Default::default()
        },
    ));
    // Rooms whose end is seen first: the caller's leave is delivered (and applied)
    // before any of its joins.
    let ended: Vec<(String, String, String)> = (0..10)
        .map(|i| {
            (
                format!("call-_+1650555{i:04}_gone{i}"),
                format!("RM_gone{i}"),
                format!("+1650555{i:04}"),
            )
        })
        .collect();
    for (room, sid, caller) in &ended {
        let body = sip_event(
            "participant_left",
            &format!("EV_left_{sid}"),
            (room, sid),
            caller,
            DID,
        );
        assert_eq!(deliver(&fleet.http, &ingresses[0], body).await, 200);
    }
    eventually(
        "the leaves to be applied",
        Duration::from_secs(20),
        || async {
            let census = fleet.broker.census().await.ok()?;
            census.values().all(|n| *n == 0).then_some(())
        },
    )
    .await;

    // Live rooms: real callers in the emulator (its own webhooks flow too).
    let mut live = Vec::new();
    for i in 0..20 {
        let caller = format!("+1415555{i:04}");
        let placed = place(&fleet, json!({"from": caller, "to": DID})).await;
        live.push((
            placed["room_name"].as_str().expect("room").to_owned(),
            caller,
            placed["sip_call_id"].as_str().expect("call id").to_owned(),
        ));
    }
    let (_, rooms) = fleet.get_emulator("/emulator/v1/rooms").await;
    let sid_of: HashMap<String, String> = rooms["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| {
            (
                r["room"]["name"].as_str().unwrap_or_default().to_owned(),
                r["room"]["sid"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut storm: Vec<Vec<u8>> = Vec::new();
    for (i, (room, caller, _)) in live.iter().enumerate() {
        let sid = sid_of.get(room).expect("room sid").clone();
        for _ in 0..10 {
            storm.push(sip_event(
                "participant_joined",
                &format!("EV_join_{sid}"),
                (room, &sid),
                caller,
                DID,
            ));
        }
        if i % 4 == 0 {
            // The caller reconnecting (a new event, a new participant sid): not a new call.
            let rejoin = sip_event(
                "participant_joined",
                &format!("EV_rejoin_{sid}"),
                (room, &sid),
                caller,
                DID,
            );
            let mut rejoin: Value = serde_json::from_slice(&rejoin).expect("json");
            rejoin["participant"]["sid"] = json!(format!("PA_rejoin_{i}"));
            storm.push(serde_json::to_vec(&rejoin).expect("json"));
        }
    }
    for (room, sid, caller) in &ended {
        for _ in 0..10 {
            storm.push(sip_event(
                "participant_joined",
                &format!("EV_join_{sid}"),
                (room, sid),
                caller,
                DID,
            ));
        }
        storm.push(sip_event(
            "participant_left",
            &format!("EV_left_{sid}"),
            (room, sid),
            caller,
            DID,
        ));
    }
    storm.shuffle(&mut rand::rng());
    // Some callers hang up while the storm is on: their end races their joins.
    let hangers: Vec<usize> = (0..live.len()).filter(|i| i % 5 == 1).collect();
    for &i in &hangers {
        let url = format!(
            "{}/emulator/v1/inbound/{}/hangup",
            fleet.emulator_url(),
            live[i].2
        );
        let http = fleet.http.clone();
        let pause = Duration::from_millis(rand::random::<u64>() % 300);
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let _ = http.post(url).send().await;
        });
    }
    let http = fleet.http.clone();
    let statuses: Vec<u16> =
        futures::stream::iter(storm.into_iter().enumerate().map(|(i, body)| {
            let http = http.clone();
            let base = ingresses[i % 2].clone();
            async move { deliver(&http, &base, body).await }
        }))
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every delivery accepted"
    );

    let raced = |i: usize| hangers.contains(&i);
    for (i, (room, _, _)) in live.iter().enumerate() {
        if raced(i) {
            continue;
        }
        let call = eventually(
            &format!("{room}'s dispatch to be recorded"),
            Duration::from_secs(60),
            || async {
                let call = call_in_room(&fleet, room, Duration::from_secs(5)).await;
                call["inbound"]["dispatches"][0]["dispatch_id"]
                    .is_string()
                    .then_some(call)
            },
        )
        .await;
        assert_eq!(
            call["inbound"]["dispatches"].as_array().map(Vec::len),
            Some(1),
            "{call}"
        );
    }
    for (room, _, _) in &ended {
        let call = call_in_room(&fleet, room, Duration::from_secs(30)).await;
        assert_eq!(call["status"], "canceled", "ended first: {call}");
        assert!(
            call["inbound"]["dispatches"]
                .as_array()
                .is_none_or(Vec::is_empty),
            "{call}"
        );
    }
    // Judged from LiveKit's side, once nothing is left to run.
    queues_drained(&fleet, Duration::from_secs(60)).await;
    for (i, (room, _, _)) in live.iter().enumerate() {
        if raced(i) {
            // Its end raced its joins: one agent at most.
            assert!(
                dispatches_in(&fleet, room) <= 1,
                "at most one agent in {room}"
            );
        } else {
            assert_eq!(
                dispatches_in(&fleet, room),
                1,
                "exactly one agent in {room}"
            );
        }
    }
    for (room, _, _) in &ended {
        assert_eq!(
            dispatches_in(&fleet, room),
            0,
            "no agent for {room}: its end came first"
        );
    }
    let dropped = fleet
        .emulator
        .requests_of("CreateDispatch")
        .iter()
        .filter(|r| r.outcome == livekit_emulator::RequestOutcome::ExecutedThenDropped)
        .count();
    assert!(dropped > 0, "some answers were lost (and reconciled)");
    let (_, page) = fleet.get("/v1/calls?direction=inbound&limit=200").await;
    assert_eq!(
        page["calls"].as_array().map(Vec::len),
        Some(30),
        "one call per room"
    );
    // Every live call ended (its agent never came, or its caller left) and gave its
    // slot back; a reconnect stayed the same call.
    for (i, (room, _, _)) in live.iter().enumerate() {
        let call = call_in_room(&fleet, room, Duration::from_secs(5)).await;
        if raced(i) {
            assert!(
                matches!(call["status"].as_str(), Some("canceled" | "failed")),
                "{call}"
            );
        } else {
            assert_eq!(call["status"], "failed", "{call}");
            assert_eq!(call["end_reason"], "no_agent_joined");
        }
        if i % 4 == 0 {
            let events: Vec<&str> = call["timeline"]
                .as_array()
                .expect("timeline")
                .iter()
                .filter_map(|e| e["event"].as_str())
                .collect();
            assert!(events.contains(&"caller_reconnected"), "{call}");
        }
    }
    eventually(
        "every slot to be freed",
        Duration::from_secs(10),
        || async {
            fleet
                .routing
                .store()
                .loads()
                .await
                .ok()?
                .is_empty()
                .then_some(())
        },
    )
    .await;
    fleet.stop().await;
}

/// The first CreateDispatch's answer is lost three ways at once (executed then the
/// connection dropped, on every try, and the worker holding the call is stopped): the
/// call's next handler finds the dispatch in LiveKit and never sends another.
#[tokio::test]
async fn a_lost_dispatch_answer_is_reconciled_not_repeated() {
    let fleet = TestFleet::start(
        "inbound-lost",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 2,
            ..Default::default()
        },
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "lost", "name": "Lost", "agent_name": "lost-agent",
               "numbers": [DID], "agent_join_timeout_s": 600}),
    )
    .await;
    fleet.emulator.set_faults(fault_on(
        "CreateDispatch",
        MethodFault {
            drop_after_rate: 1.0,
            ..Default::default()
        },
    ));
    let placed = place(&fleet, json!({"from": "+15105550177", "to": DID})).await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    eventually(
        "the first CreateDispatch to run",
        Duration::from_secs(10),
        || async { (dispatches_in(&fleet, &room) >= 1).then_some(()) },
    )
    .await;
    fleet.emulator.set_faults(Faults::default());
    let call = eventually(
        "the dispatch to be reconciled",
        Duration::from_secs(30),
        || async {
            let call = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            call["inbound"]["dispatches"][0]["dispatch_id"]
                .is_string()
                .then_some(call)
        },
    )
    .await;
    // The emulator's agent worker joins the one dispatched agent.
    assert!(
        matches!(
            call["status"].as_str(),
            Some("agent_dispatched" | "in_progress")
        ),
        "{call}"
    );
    assert_eq!(
        dispatches_in(&fleet, &room),
        1,
        "reconciled, never repeated"
    );
    assert!(
        !fleet.emulator.requests_of("ListDispatch").is_empty(),
        "LiveKit was asked before anything was repeated"
    );
    fleet.stop().await;
}

/// No profile takes the number: the call is recorded `unrouted` and, by default, the
/// caller is removed rather than left ringing.
#[tokio::test]
async fn an_unrouted_call_is_recorded_and_hung_up() {
    let fleet = TestFleet::start("inbound-unrouted", FleetOptions::default()).await;
    let placed = place(
        &fleet,
        json!({"from": "+15105550188", "to": "+15105550999"}),
    )
    .await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = eventually(
        "the call to be unrouted",
        Duration::from_secs(10),
        || async {
            let call = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            (call["status"] == "unrouted" && call["inbound"]["hung_up"] == true).then_some(call)
        },
    )
    .await;
    assert_eq!(call["routing"]["decision"], "no_profile→unrouted");
    assert_eq!(dispatches_in(&fleet, &room), 0);
    let removed = fleet.emulator.requests_of("RemoveParticipant");
    assert!(
        removed
            .iter()
            .any(|r| r.room.as_deref() == Some(room.as_str()) && r.outcome.executed()),
        "the caller was removed"
    );
    fleet.stop().await;
}

/// A profile switched off through one instance's API is seen by every worker's table
/// within a second, and the next call goes to its fallback.
#[tokio::test]
async fn a_toggle_reaches_every_instance_within_a_second() {
    let fleet = TestFleet::start(
        "inbound-toggle",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 3,
            ..Default::default()
        },
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "night", "name": "Night", "agent_name": "night-agent", "agent_join_timeout_s": 600}),
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "day", "name": "Day", "agent_name": "day-agent", "numbers": [DID],
               "fallback": "night", "agent_join_timeout_s": 600}),
    )
    .await;
    let (status, _) = fleet
        .post("/v1/routing/profiles/day/deactivate", &json!({}))
        .await;
    assert_eq!(status, 200);
    let started = Instant::now();
    eventually(
        "every worker to see the toggle",
        Duration::from_secs(5),
        || async {
            fleet
                .worker_routing
                .iter()
                .all(|r| {
                    r.table().get("day").is_some_and(|p| {
                        p.profile.status == callfleet_core::domain::routing::ProfileStatus::Inactive
                    })
                })
                .then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    for i in 0..6 {
        let placed = place(
            &fleet,
            json!({"from": format!("+1415555{i:04}"), "to": DID}),
        )
        .await;
        let room = placed["room_name"].as_str().expect("room").to_owned();
        let call = eventually("routed", Duration::from_secs(10), || async {
            let c = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            c["routing"].is_object().then_some(c)
        })
        .await;
        assert_eq!(
            call["routing"]["decision"], "inactive→fallback:night",
            "{call}"
        );
        assert_eq!(call["agent_name"], "night-agent");
    }
    fleet.stop().await;
}

/// A capped profile takes calls up to its cap; the next goes to the fallback
/// (`at_capacity→fallback`), and a call's end frees its slot for the next.
#[tokio::test]
async fn capacity_overflows_to_the_fallback_and_ends_free_slots() {
    let fleet = TestFleet::start(
        "inbound-cap",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 2,
            ..Default::default()
        },
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "overflow", "name": "Overflow", "agent_name": "overflow-agent", "agent_join_timeout_s": 600}),
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "capped", "name": "Capped", "agent_name": "capped-agent", "numbers": [DID],
               "max_concurrent_calls": 2, "fallback": "overflow", "agent_join_timeout_s": 600}),
    )
    .await;
    let mut decisions = Vec::new();
    let mut rooms = Vec::new();
    for i in 0..3 {
        let placed = place(
            &fleet,
            json!({"from": format!("+1415555{i:04}"), "to": DID}),
        )
        .await;
        let room = placed["room_name"].as_str().expect("room").to_owned();
        let call = eventually("routed", Duration::from_secs(10), || async {
            let c = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            c["routing"].is_object().then_some(c)
        })
        .await;
        decisions.push(
            call["routing"]["decision"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        rooms.push((room, ()));
    }
    assert_eq!(
        decisions,
        vec!["active", "active", "at_capacity→fallback:overflow"]
    );
    // The first caller hangs up (its leave, as LiveKit sends it): its slot is freed and
    // the next call gets the capped profile again.
    let first_room = &rooms[0].0;
    let (_, rooms_now) = fleet.get_emulator("/emulator/v1/rooms").await;
    let sid = rooms_now["rooms"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["room"]["name"] == first_room.as_str()))
        .and_then(|r| r["room"]["sid"].as_str())
        .expect("the first call's room")
        .to_owned();
    let body = sip_event(
        "participant_left",
        "EV_cap_left",
        (first_room, &sid),
        "+14155550000",
        DID,
    );
    assert_eq!(deliver(&fleet.http, &fleet.base, body).await, 200);
    eventually("the slot to be freed", Duration::from_secs(10), || async {
        let loads = fleet.routing.store().loads().await.ok()?;
        (loads.get("capped") == Some(&1)).then_some(())
    })
    .await;
    // Every worker routes from its in-memory loads: wait until they show the freed slot.
    eventually(
        "every worker to see the freed slot",
        Duration::from_secs(5),
        || async {
            fleet
                .worker_routing
                .iter()
                .all(|r| r.loads().get("capped") == Some(&1))
                .then_some(())
        },
    )
    .await;
    let placed = place(&fleet, json!({"from": "+14155550999", "to": DID})).await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = eventually("routed", Duration::from_secs(10), || async {
        let c = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
        c["routing"].is_object().then_some(c)
    })
    .await;
    assert_eq!(call["routing"]["decision"], "active", "{call}");
    fleet.stop().await;
}

/// The routed agent never joins: after the profile's wait its fallback's agent is
/// dispatched once; when that one does not join either, the caller is hung up and the
/// call fails `no_agent_joined`, never left ringing.
#[tokio::test]
async fn an_agent_that_never_joins_gets_the_fallback_once_then_a_hang_up() {
    let fleet = TestFleet::start("inbound-noagent", FleetOptions::default()).await;
    never_join(&fleet, &["absent-agent", "backup-agent"]).await;
    create_profile(
        &fleet,
        json!({"id": "backup", "name": "Backup", "agent_name": "backup-agent", "agent_join_timeout_s": 1}),
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "absent", "name": "Absent", "agent_name": "absent-agent", "numbers": [DID],
               "fallback": "backup", "agent_join_timeout_s": 1}),
    )
    .await;
    let placed = place(&fleet, json!({"from": "+15105550166", "to": DID})).await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = eventually(
        "the call to fail for want of an agent and its caller to be hung up",
        Duration::from_secs(20),
        || async {
            // The end is recorded first, the caller's removal by the next step.
            let c = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            (c["status"] == "failed" && c["inbound"]["hung_up"] == true).then_some(c)
        },
    )
    .await;
    assert_eq!(call["end_reason"], "no_agent_joined");
    let dispatches = call["inbound"]["dispatches"]
        .as_array()
        .expect("dispatches");
    assert_eq!(dispatches.len(), 2, "{call}");
    assert_eq!(dispatches[0]["agent_name"], "absent-agent");
    assert_eq!(dispatches[1]["agent_name"], "backup-agent");
    let agents: Vec<String> = fleet
        .emulator
        .requests_of("CreateDispatch")
        .iter()
        .filter(|r| r.room.as_deref() == Some(room.as_str()) && r.outcome.executed())
        .filter_map(|r| r.fields.get("agent_name").cloned())
        .collect();
    assert_eq!(agents, vec!["absent-agent", "backup-agent"]);
    queues_drained(&fleet, Duration::from_secs(10)).await;
    fleet.stop().await;
}

/// Makes the emulator's worker for `agent` join its rooms `ms` after a dispatch.
pub async fn agent_joins_after(fleet: &TestFleet, agent: &str, ms: u64) {
    let response = fleet
        .http
        .put(format!(
            "{}/emulator/v1/agents/{agent}",
            fleet.emulator_url()
        ))
        .json(&json!({"join_after_ms": ms}))
        .send()
        .await
        .expect("emulator reachable");
    assert!(response.status().is_success(), "agent not configured");
}

/// Makes the emulator's workers for these agents never join.
pub async fn never_join(fleet: &TestFleet, agents: &[&str]) {
    for agent in agents {
        let response = fleet
            .http
            .put(format!(
                "{}/emulator/v1/agents/{agent}",
                fleet.emulator_url()
            ))
            .json(&json!({"join_after_ms": null}))
            .send()
            .await
            .expect("emulator reachable");
        assert!(response.status().is_success(), "agent not configured");
    }
}

/// `POST /v1/routing/resolve`: both request shapes, a weighted split over 1,000 callers
/// within tolerance and sticky per caller, and `explain`.
#[tokio::test]
async fn resolve_answers_both_shapes_and_splits_by_weight() {
    let fleet = TestFleet::start("inbound-resolve", FleetOptions::default()).await;
    create_profile(
        &fleet,
        json!({"id": "a", "name": "A", "agent_name": "agent-a", "numbers": [DID], "weight": 80,
               "metadata": {"voice": "alloy"}}),
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "b", "name": "B", "agent_name": "agent-b", "numbers": [DID], "weight": 20}),
    )
    .await;
    let (status, seed) = fleet
        .post(
            "/v1/routing/resolve",
            &json!({"call_id": "c1", "trunk_id": "ST_1", "sip_call_id": "SCL_1",
                    "from_user": {"number": "+15105550123", "name": "Ada"},
                    "to_user": {"number": DID, "name": "Support"}}),
        )
        .await;
    assert_eq!(status, 200, "{seed}");
    let agent = seed["agent"]["agent_name"].as_str().expect("agent");
    assert!(
        seed["room_name"]
            .as_str()
            .is_some_and(|r| r.contains(agent)),
        "{seed}"
    );
    assert_eq!(seed["participant_identity"], "sip_+15105550123");
    assert_eq!(seed["participant_name"], "Ada");
    let (status, draft) = fleet
        .post(
            "/v1/routing/resolve",
            &json!({"project_id": "p", "trunk_id": "ST_1", "call_id": "SCL_2",
                    "from_user": "+15105550123", "from_host": "carrier.example",
                    "to_user": DID, "to_host": "sip.example"}),
        )
        .await;
    assert_eq!(status, 200, "{draft}");
    assert_eq!(draft["dispatch_action"], "accept");
    assert!(draft["room_name"].is_string());
    assert!(draft["metadata"].is_string());
    assert!(draft["attributes"]["callfleet.profileID"].is_string());
    let (_, rejected) = fleet
        .post(
            "/v1/routing/resolve",
            &json!({"to_user": "+15105550999", "from_user": "+15105550123"}),
        )
        .await;
    assert_eq!(rejected["dispatch_action"], "reject");
    let (status, _) = fleet
        .post(
            "/v1/routing/resolve",
            &json!({"from_user": {"number": "+15105550123"}, "to_user": {"number": "+15105550999"}}),
        )
        .await;
    assert_eq!(status, 404, "unrouted in the seed's shape");
    let (status, err) = fleet
        .post(
            "/v1/routing/resolve",
            &json!({"from_user": {"number": "x"}, "to_user": {"number": "nope"}}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "to_user.number");

    let mut to_a = 0;
    for i in 0..1_000 {
        let body =
            json!({"from_user": {"number": format!("+1415556{i:04}")}, "to_user": {"number": DID}});
        let (_, first) = fleet.post("/v1/routing/resolve", &body).await;
        let (_, again) = fleet.post("/v1/routing/resolve", &body).await;
        assert_eq!(
            first["agent"]["profile_id"], again["agent"]["profile_id"],
            "sticky per caller"
        );
        if first["agent"]["profile_id"] == "a" {
            to_a += 1;
        }
    }
    // 80/20 over 1,000 callers: within ±5 points (4 standard deviations).
    assert!((750..=850).contains(&to_a), "a took {to_a} of 1000");

    let (status, explained) = fleet
        .get("/v1/routing/explain?to=%2B15105550100&from=%2B15105550123&at=2026-11-20T17:00:00Z")
        .await;
    assert_eq!(status, 200, "{explained}");
    assert_eq!(explained["decision"], "weighted");
    assert_eq!(explained["considered"].as_array().map(Vec::len), Some(2));
    fleet.stop().await;
}

/// The admin API: errors name the field; list filters and pages; patch, toggle, delete;
/// export imports back unchanged.
#[tokio::test]
async fn the_routing_admin_api_validates_lists_and_round_trips() {
    let fleet = TestFleet::start("inbound-admin", FleetOptions::default()).await;
    let (status, err) = fleet
        .post(
            "/v1/routing/profiles",
            &json!({"name": "x", "agent_name": "a", "numbers": ["+15105550100", "not a number"]}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "numbers[1]");
    let (status, err) = fleet
        .post(
            "/v1/routing/profiles",
            &json!({"name": "x", "agent_name": "a", "wieght": 3}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "wieght");
    for i in 0..12 {
        create_profile(
            &fleet,
            json!({"id": format!("p{i:02}"), "name": format!("P{i}"), "agent_name": "agent",
                   "organization": if i % 3 == 0 { "acme" } else { "other" },
                   "numbers": [format!("+1510555{:04}", 100 + i % 2)]}),
        )
        .await;
    }
    let (status, _) = fleet
        .post(
            "/v1/routing/profiles",
            &json!({"id": "p00", "name": "dup", "agent_name": "a"}),
        )
        .await;
    assert_eq!(status, 409);
    let (_, page) = fleet.get("/v1/routing/profiles?limit=5").await;
    assert_eq!(page["profiles"].as_array().map(Vec::len), Some(5));
    assert_eq!(page["next_cursor"], "p04");
    let (_, rest) = fleet.get("/v1/routing/profiles?limit=100&cursor=p04").await;
    assert_eq!(rest["profiles"].as_array().map(Vec::len), Some(7));
    assert!(rest["next_cursor"].is_null());
    let (_, acme) = fleet.get("/v1/routing/profiles?organization=acme").await;
    assert_eq!(acme["profiles"].as_array().map(Vec::len), Some(4));
    let (_, by_number) = fleet
        .get("/v1/routing/profiles?number=%2B15105550101")
        .await;
    assert_eq!(by_number["profiles"].as_array().map(Vec::len), Some(6));

    let patched = fleet
        .send_json(
            reqwest::Method::PATCH,
            "/v1/routing/profiles/p01",
            &json!({"weight": 5, "organization": null}),
        )
        .await;
    assert_eq!(patched.0, 200, "{}", patched.1);
    assert_eq!(patched.1["weight"], 5);
    assert!(patched.1.get("organization").is_none());
    let (_, off) = fleet
        .post("/v1/routing/profiles/p02/deactivate", &json!({}))
        .await;
    assert_eq!(off["status"], "inactive");
    let (_, inactive) = fleet.get("/v1/routing/profiles?status=inactive").await;
    assert_eq!(inactive["profiles"].as_array().map(Vec::len), Some(1));
    let deleted = fleet
        .send_json(
            reqwest::Method::DELETE,
            "/v1/routing/profiles/p03",
            &json!(null),
        )
        .await;
    assert_eq!(deleted.0, 204);
    let (status, _) = fleet.get("/v1/routing/profiles/p03").await;
    assert_eq!(status, 404);

    let (_, export) = fleet.get("/v1/routing/export").await;
    assert_eq!(export["profiles"].as_array().map(Vec::len), Some(11));
    let (status, imported) = fleet.post("/v1/routing/import?mode=replace", &export).await;
    assert_eq!(status, 200, "{imported}");
    assert_eq!(imported["imported"], 0);
    assert_eq!(imported["unchanged"], 11);
    assert_eq!(imported["deleted"], 0);
    let (_, again) = fleet.get("/v1/routing/export").await;
    assert_eq!(
        again["profiles"], export["profiles"],
        "an export imports unchanged"
    );
    let (status, err) = fleet
        .post(
            "/v1/routing/import",
            &json!({"profiles": [{"id": "x", "name": "x", "agent_name": "a", "numbers": ["bad"]}]}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "profiles[0].numbers[0]");
    fleet.stop().await;
}

/// 100,000 profiles imported through the API into Redis, held by every instance, and
/// resolved correctly.
#[tokio::test]
async fn a_hundred_thousand_profiles_import_and_resolve() {
    let fleet = TestFleet::start(
        "inbound-100k",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 1,
            ..Default::default()
        },
    )
    .await;
    let profiles: Vec<Value> = (0..100_000)
        .map(|i| {
            json!({"id": format!("p{i:06}"), "name": format!("Profile {i}"),
                   "agent_name": format!("agent-{}", i % 100),
                   "numbers": [format!("+1{}{:07}", 212 + i / 10_000_000, 2_000_000 + i)]})
        })
        .collect();
    let started = Instant::now();
    let response = fleet
        .http
        .post(format!("{}/v1/routing/import", fleet.base))
        .bearer_auth(crate::fleet::API_KEY)
        .json(&json!({"profiles": profiles}))
        .send()
        .await
        .expect("import");
    assert_eq!(response.status().as_u16(), 200);
    let import_took = started.elapsed();
    eventually(
        "the worker to hold every profile",
        Duration::from_secs(30),
        || async { (fleet.worker_routing[0].table().len() == 100_000).then_some(()) },
    )
    .await;
    for i in [0usize, 4_242, 99_999] {
        let to = format!("+1{}{:07}", 212 + i / 10_000_000, 2_000_000 + i);
        let (status, seed) = fleet
            .post(
                "/v1/routing/resolve",
                &json!({"from_user": {"number": "+15105550123"}, "to_user": {"number": to}}),
            )
            .await;
        assert_eq!(status, 200, "{seed}");
        assert_eq!(seed["agent"]["profile_id"], format!("p{i:06}"));
    }
    eprintln!("imported 100,000 profiles in {import_took:?}");
    fleet.stop().await;
}

/// A worker process SIGKILLed after its CreateDispatch reached LiveKit and before the
/// dispatch was journalled: the redelivered webhook's worker finds the dispatch in
/// LiveKit (ListDispatch) and sends none of its own. One agent.
#[tokio::test]
async fn a_worker_killed_between_dispatch_and_journal_dispatches_once() {
    let mut fleet = TestFleet::start(
        "inbound-crash",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    let (status, _) = fleet
        .post(
            "/v1/routing/profiles",
            &json!({"id": "crash", "name": "Crash", "agent_name": "crash-agent", "numbers": [DID],
                    "agent_join_timeout_s": 600}),
        )
        .await;
    assert_eq!(status, 201);
    // CreateDispatch is carried out 1.5 s after it arrives: the worker waits for its
    // answer meanwhile, and dies waiting.
    fleet.emulator.set_faults(fault_on(
        "CreateDispatch",
        MethodFault {
            latency_ms: 1_500,
            ..Default::default()
        },
    ));
    let mut worker = fleet.worker_process();
    let placed = place(&fleet, json!({"from": "+15105550155", "to": DID})).await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    // Recorded on arrival (its room is filled in once it has been carried out).
    eventually(
        "the worker's CreateDispatch to reach LiveKit",
        Duration::from_secs(30),
        || async { (!fleet.emulator.requests_of("CreateDispatch").is_empty()).then_some(()) },
    )
    .await;
    worker.start_kill().expect("SIGKILL");
    assert!(!worker.wait().await.expect("reaped").success(), "killed");
    let call = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
    let journal = &call["inbound"]["dispatches"][0];
    assert!(
        journal["started_at"].is_string(),
        "journalled as started: {call}"
    );
    assert!(
        journal["dispatch_id"].is_null(),
        "its answer never recorded: {call}"
    );
    fleet.emulator.set_faults(Faults::default());
    // Another worker takes the call once the dead one's lock expires (10 s).
    fleet.spawn_worker().await;
    let call = eventually(
        "the dispatch to be reconciled",
        Duration::from_secs(60),
        || async {
            let c = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            c["inbound"]["dispatches"][0]["dispatch_id"]
                .is_string()
                .then_some(c)
        },
    )
    .await;
    assert_eq!(
        call["inbound"]["dispatches"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(dispatches_in(&fleet, &room), 1, "exactly one agent");
    assert_eq!(
        fleet
            .emulator
            .requests_of("CreateDispatch")
            .iter()
            .filter(|r| r.room.as_deref() == Some(room.as_str()))
            .count(),
        1,
        "nothing was sent again"
    );
    fleet.stop().await;
}

/// Hours of operation through the API: inside the weekly window the profile takes the
/// call; outside it, and on a closed date, its fallback does; `explain` says why.
#[tokio::test]
async fn hours_and_date_overrides_route_to_the_fallback() {
    let fleet = TestFleet::start("inbound-hours", FleetOptions::default()).await;
    create_profile(
        &fleet,
        json!({"id": "after-hours", "name": "After hours", "agent_name": "voicemail-agent"}),
    )
    .await;
    create_profile(
        &fleet,
        json!({"id": "office", "name": "Office", "agent_name": "office-agent", "numbers": [DID],
               "fallback": "after-hours",
               "hours": {"time_zone": "America/New_York",
                         "weekly": [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:30"}],
                         "overrides": [{"date": "2026-11-26", "closed": true}]}}),
    )
    .await;
    let explain = |at: &'static str| {
        let fleet = &fleet;
        async move {
            let (status, body) = fleet
                .get(&format!("/v1/routing/explain?to=%2B15105550100&at={at}"))
                .await;
            assert_eq!(status, 200, "{body}");
            body["decision"].as_str().unwrap_or_default().to_owned()
        }
    };
    // Friday 12:00 in New York; Friday 20:00; Saturday noon; Thanksgiving (a Thursday).
    assert_eq!(explain("2026-11-20T17:00:00Z").await, "active");
    assert_eq!(
        explain("2026-11-21T01:00:00Z").await,
        "outside_hours→fallback:after-hours"
    );
    assert_eq!(
        explain("2026-11-21T17:00:00Z").await,
        "outside_hours→fallback:after-hours"
    );
    assert_eq!(
        explain("2026-11-26T17:00:00Z").await,
        "outside_hours→fallback:after-hours"
    );
    assert_eq!(explain("2026-11-25T17:00:00Z").await, "active");
    let (status, err) = fleet
        .send_json(
            reqwest::Method::PATCH,
            "/v1/routing/profiles/office",
            &json!({"hours": {"time_zone": "America/Gotham", "weekly": []}}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "hours.time_zone");
    let (status, err) = fleet.get("/v1/routing/explain").await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "to", "{err}");
    assert_eq!(err["error"]["message"], "is required");
    fleet.stop().await;
}

/// A number whose dispatch rule already dispatches the agent (`room_config.agents`): the
/// fleet sees the rule's dispatch in the room, records `dispatched_by_rule` and sends no
/// CreateDispatch of its own — one agent, from LiveKit's record. A call routed through a
/// trunk and a rule carries their ids.
#[tokio::test]
async fn a_rule_that_dispatches_the_agent_itself_gets_no_second_one() {
    use livekit_protocol as proto;
    let fleet = TestFleet::start("inbound-byrule", FleetOptions::default()).await;
    let sip = callfleet_core::adapters::LiveKitSip::new(
        &fleet.emulator_url(),
        "devkey",
        "secret",
        Duration::from_secs(5),
    )
    .expect("client");
    let trunk = sip
        .create_inbound_trunk(proto::SipInboundTrunkInfo {
            name: "byrule".into(),
            numbers: vec![DID.into()],
            ..Default::default()
        })
        .await
        .expect("trunk");
    let rule = sip
        .create_dispatch_rule(proto::SipDispatchRuleInfo {
            name: "rule with its own agent".into(),
            trunk_ids: vec![trunk.sip_trunk_id.clone()],
            numbers: vec![DID.into()],
            rule: Some(proto::SipDispatchRule {
                rule: Some(proto::sip_dispatch_rule::Rule::DispatchRuleIndividual(
                    proto::SipDispatchRuleIndividual {
                        room_prefix: "call-".into(),
                        ..Default::default()
                    },
                )),
            }),
            room_config: Some(proto::RoomConfiguration {
                agents: vec![proto::RoomAgentDispatch {
                    agent_name: "rule-agent".into(),
                    metadata: "{}".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("rule");
    create_profile(
        &fleet,
        json!({"id": "rule", "name": "Rule", "agent_name": "rule-agent", "numbers": [DID]}),
    )
    .await;
    let placed = place(&fleet, json!({"from": "+15105550144", "to": DID})).await;
    assert_eq!(
        placed["rule_id"],
        rule.sip_dispatch_rule_id.as_str(),
        "{placed}"
    );
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = eventually(
        "the call to be settled",
        Duration::from_secs(10),
        || async {
            let c = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            c["inbound"]["dispatches"][0]["by_rule"]
                .as_bool()
                .filter(|b| *b)
                .map(|_| c)
        },
    )
    .await;
    assert_eq!(call["inbound"]["trunk_id"], trunk.sip_trunk_id.as_str());
    assert_eq!(
        call["inbound"]["rule_id"],
        rule.sip_dispatch_rule_id.as_str()
    );
    let events: Vec<&str> = call["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert!(events.contains(&"dispatched_by_rule"), "{events:?}");
    assert_eq!(
        dispatches_in(&fleet, &room),
        0,
        "the fleet sent no CreateDispatch"
    );
    let dispatches = fleet.emulator.dispatches_in(&room);
    assert_eq!(dispatches.len(), 1, "one agent in the room: the rule's");
    fleet.stop().await;
}

/// LiveKit carries the CreateDispatch out 3 s after it arrives, long after the client
/// gave up at 1 s: the worker keeps looking (ListDispatch) until LiveKit is done with
/// it, instead of sending another one the moment it does not see it.
#[tokio::test]
async fn a_dispatch_landing_after_the_client_timeout_is_not_resent() {
    let fleet = TestFleet::start(
        "inbound-late",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 2,
            livekit_timeout: Duration::from_secs(1),
            settings: callfleet_workers::OutboundSettings {
                livekit_settle: Duration::from_secs(6),
                ..FleetOptions::default().settings
            },
            ..Default::default()
        },
    )
    .await;
    never_join(&fleet, &["late-agent"]).await;
    create_profile(
        &fleet,
        json!({"id": "late", "name": "Late", "agent_name": "late-agent", "numbers": [DID],
               "agent_join_timeout_s": 600}),
    )
    .await;
    fleet.emulator.set_faults(fault_on(
        "CreateDispatch",
        MethodFault {
            latency_ms: 3_000,
            ..Default::default()
        },
    ));
    let placed = place(&fleet, json!({"from": "+15105550133", "to": DID})).await;
    let room = placed["room_name"].as_str().expect("room").to_owned();
    let call = eventually(
        "the late dispatch to be found",
        Duration::from_secs(30),
        || async {
            let c = call_in_room(&fleet, &room, Duration::from_secs(5)).await;
            c["inbound"]["dispatches"][0]["dispatch_id"]
                .is_string()
                .then_some(c)
        },
    )
    .await;
    assert_eq!(
        call["inbound"]["dispatches"].as_array().map(Vec::len),
        Some(1)
    );
    // Past the settle time nothing more is sent either.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(dispatches_in(&fleet, &room), 1, "one agent");
    assert_eq!(
        fleet.emulator.requests_of("CreateDispatch").len(),
        1,
        "sent once"
    );
    assert!(
        fleet.emulator.requests_of("ListDispatch").len() >= 2,
        "LiveKit was asked again while the first was in flight"
    );
    fleet.stop().await;
}

/// The caller reconnecting (a new `participant_joined` with a new event id and a new
/// participant sid in the same room) is the same call, noted on its timeline.
#[tokio::test]
async fn a_reconnect_is_the_same_call() {
    let fleet = TestFleet::start("inbound-reconnect", FleetOptions::default()).await;
    never_join(&fleet, &["re-agent"]).await;
    create_profile(
        &fleet,
        json!({"id": "re", "name": "Re", "agent_name": "re-agent", "numbers": [DID],
               "agent_join_timeout_s": 600}),
    )
    .await;
    let room = ("call-_+15105550122_re", "RM_re");
    let first = sip_event("participant_joined", "EV_re_1", room, "+15105550122", DID);
    assert_eq!(deliver(&fleet.http, &fleet.base, first).await, 200);
    let call = call_in_room(&fleet, room.0, Duration::from_secs(5)).await;
    let again = sip_event("participant_joined", "EV_re_2", room, "+15105550122", DID);
    let mut again: Value = serde_json::from_slice(&again).expect("json");
    again["participant"]["sid"] = json!("PA_second");
    let again = serde_json::to_vec(&again).expect("json");
    assert_eq!(deliver(&fleet.http, &fleet.base, again).await, 200);
    let id = call["id"].as_str().expect("id").to_owned();
    let call = eventually(
        "the reconnect to be noted",
        Duration::from_secs(5),
        || async {
            let (_, c) = fleet.get(&format!("/v1/calls/{id}")).await;
            (c["inbound"]["participant_sid"] == "PA_second").then_some(c)
        },
    )
    .await;
    assert!(call["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .any(|e| e["event"] == "caller_reconnected"));
    let (_, page) = fleet.get("/v1/calls?direction=inbound").await;
    assert_eq!(page["calls"].as_array().map(Vec::len), Some(1));
    assert_eq!(dispatches_in(&fleet, room.0), 1);
    fleet.stop().await;
}

/// `PUT` creates (201) then replaces (200) a profile under the path's id.
#[tokio::test]
async fn put_creates_then_replaces() {
    let fleet = TestFleet::start("inbound-put", FleetOptions::default()).await;
    let body = json!({"name": "Put", "agent_name": "put-agent", "numbers": [DID]});
    let (status, created) = fleet
        .send_json(reqwest::Method::PUT, "/v1/routing/profiles/put", &body)
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["id"], "put");
    let (status, replaced) = fleet
        .send_json(
            reqwest::Method::PUT,
            "/v1/routing/profiles/put",
            &json!({"name": "Put again", "agent_name": "put-agent"}),
        )
        .await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["name"], "Put again");
    assert_eq!(replaced["numbers"], json!([]), "a replace, not a merge");
    assert_eq!(replaced["created_at"], created["created_at"]);
    fleet.stop().await;
}

/// The caller's leave never arrives (webhooks paused): the sweeper's nudge asks LiveKit,
/// finds the caller gone, completes the call and frees its profile slot; a caller still
/// talking keeps (renews) its slot.
#[tokio::test]
async fn the_sweeper_ends_a_call_whose_leave_was_lost() {
    let fleet = TestFleet::start(
        "inbound-sweep",
        FleetOptions {
            backing: Backing::RabbitRedis,
            sweep: callfleet_workers::SweepSettings {
                every: Duration::from_millis(500),
                quiet: Duration::from_secs(1),
                ..callfleet_workers::SweepSettings::default()
            },
            ..Default::default()
        },
    )
    .await;
    agent_joins_after(&fleet, "sweep-agent", 100).await;
    create_profile(
        &fleet,
        json!({"id": "sweep", "name": "Sweep", "agent_name": "sweep-agent", "numbers": [DID]}),
    )
    .await;
    let gone = place(&fleet, json!({"from": "+15105550111", "to": DID})).await;
    let stays = place(&fleet, json!({"from": "+15105550112", "to": DID})).await;
    let gone_room = gone["room_name"].as_str().expect("room").to_owned();
    let stays_room = stays["room_name"].as_str().expect("room").to_owned();
    for room in [&gone_room, &stays_room] {
        eventually("the agent to join", Duration::from_secs(10), || async {
            let c = call_in_room(&fleet, room, Duration::from_secs(5)).await;
            (c["status"] == "in_progress").then_some(())
        })
        .await;
    }
    // From here no webhook reaches the fleet: the first caller's leave is lost.
    fleet.emulator.set_faults(Faults {
        webhooks: livekit_emulator::WebhookFaults {
            paused: true,
            ..Default::default()
        },
        ..Default::default()
    });
    let response = fleet
        .http
        .post(format!(
            "{}/emulator/v1/inbound/{}/hangup",
            fleet.emulator_url(),
            gone["sip_call_id"].as_str().expect("id")
        ))
        .send()
        .await
        .expect("hang up");
    assert!(response.status().is_success());
    let call = eventually(
        "the sweeper to end the call",
        Duration::from_secs(20),
        || async {
            let c = call_in_room(&fleet, &gone_room, Duration::from_secs(5)).await;
            (c["status"] == "completed").then_some(c)
        },
    )
    .await;
    assert!(call["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .any(|e| e["detail"] == "caller gone (sweeper)"));
    let loads = fleet.routing.store().loads().await.expect("loads");
    assert_eq!(
        loads.get("sweep"),
        Some(&1),
        "the caller still talking keeps its slot"
    );
    let still = call_in_room(&fleet, &stays_room, Duration::from_secs(5)).await;
    assert_eq!(still["status"], "in_progress");
    fleet.emulator.set_faults(Faults::default());
    fleet.stop().await;
}
