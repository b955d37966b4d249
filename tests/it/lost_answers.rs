//! Lost LiveKit answers on RabbitMQ + Redis: a CreateSIPParticipant or CreateDispatch that
//! LiveKit carried out but whose answer never arrived (connection dropped after the work,
//! or the client timed out) is settled from LiveKit's state and never sent again. The
//! emulator's record is the judge: one executed dial per participant identity, one
//! executed dispatch per room, whatever the workers saw. Each test also checks that the
//! broker is left empty (work queues, delay tiers, dead letters).

use std::collections::HashMap;
use std::time::Duration;

use callfleet_workers::OutboundSettings;
use livekit_emulator::{ApiRecord, CallScript, MethodFault, Outcome, RequestOutcome};
use serde_json::{json, Value};

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::eventually;
use crate::harness::fault_on;

const WAIT: Duration = Duration::from_secs(25);
const NOT_REDIALED: &str = "dial outcome unknown after an interrupted dial; not redialed";

/// Answers at once, talks long enough that the participant is still in the room when the
/// next delivery of the job asks LiveKit for it, then hangs up.
fn answers(talk_ms: u64) -> CallScript {
    crate::harness::script(Outcome::Answer, Some(talk_ms))
}

/// A fleet on RabbitMQ + Redis with short settling times.
async fn fleet(name: &str, settings: OutboundSettings, script: CallScript) -> TestFleet {
    let mut options = FleetOptions {
        backing: Backing::RabbitRedis,
        workers: 2,
        settings,
        ..Default::default()
    };
    options.emulator.default_script = script;
    TestFleet::start(name, options).await
}

fn quick_settle() -> OutboundSettings {
    OutboundSettings {
        livekit_settle: Duration::from_secs(2),
        dial_evidence_grace: Duration::from_secs(10),
        ..FleetOptions::default().settings
    }
}

fn number(base: u32, i: u32) -> String {
    format!("+1510555{:04}", base + i)
}

async fn submit_calls(fleet: &TestFleet, base: u32, n: u32) -> Vec<(String, String)> {
    let mut calls = Vec::new();
    for i in 0..n {
        let to = number(base, i);
        let id = fleet.submit(json!({ "to": to })).await;
        calls.push((id, to));
    }
    calls
}

fn identity_of(id: &str) -> String {
    callfleet_core::domain::participant_identity(id, 1)
}

/// `method`'s requests whose effect took place, counted by `key` (identity, room).
fn executed_by(
    fleet: &TestFleet,
    method: &str,
    key: fn(&ApiRecord) -> Option<String>,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for record in fleet.emulator.requests_of(method) {
        if record.outcome.executed() {
            let k = key(&record).unwrap_or_else(|| format!("<no key: {record:?}>"));
            *counts.entry(k).or_insert(0) += 1;
        }
    }
    counts
}

fn by_identity(r: &ApiRecord) -> Option<String> {
    r.identity.clone()
}

fn by_room(r: &ApiRecord) -> Option<String> {
    r.room.clone()
}

/// Panics as soon as LiveKit carried out `method` twice for one key: checked while the
/// tests wait, so a product that re-sends fails at the first duplicate.
fn assert_never_twice(fleet: &TestFleet, method: &str, key: fn(&ApiRecord) -> Option<String>) {
    let twice: Vec<_> = executed_by(fleet, method, key)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "{method} carried out more than once for {twice:?}"
    );
}

async fn get_call(fleet: &TestFleet, id: &str) -> Value {
    let (status, call) = fleet.get(&format!("/v1/calls/{id}")).await;
    assert_eq!(status, 200, "{call}");
    call
}

/// Waits until every call has one of `statuses`, checking `guard` meanwhile.
async fn wait_until(
    fleet: &TestFleet,
    ids: &[String],
    statuses: &[&str],
    guard: &dyn Fn(&TestFleet),
) {
    for id in ids {
        eventually(
            &format!("call {id} to reach {statuses:?}"),
            WAIT,
            || async {
                guard(fleet);
                let call = get_call(fleet, id).await;
                let status = call["status"].as_str().unwrap_or_default();
                statuses.contains(&status).then_some(())
            },
        )
        .await;
    }
}

/// Waits until every call is final (completed, failed, ...), checking `guard` meanwhile.
async fn wait_final(fleet: &TestFleet, ids: &[String], guard: &dyn Fn(&TestFleet)) {
    const FINAL: [&str; 5] = ["completed", "failed", "no_answer", "busy", "canceled"];
    wait_until(fleet, ids, &FINAL, guard).await;
}

/// Waits until the broker holds nothing (every work queue, delay tier and the dead-letter
/// queue) and no API request is in flight, still so a second later; `guard` is checked
/// throughout so a late re-send is caught.
async fn assert_quiet(fleet: &TestFleet, guard: &dyn Fn(&TestFleet)) {
    let quiet = || async {
        guard(fleet);
        let census = fleet.broker.census().await.ok()?;
        let in_flight = fleet
            .emulator
            .requests()
            .iter()
            .any(|r| r.outcome == RequestOutcome::InFlight);
        (!in_flight && census.values().all(|n| *n == 0)).then_some(census)
    };
    eventually("the broker to drain", WAIT, quiet).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let census = eventually("the broker to stay drained", WAIT, quiet).await;
    assert_eq!(census.get("dead"), Some(&0), "{census:?}");
    let dead = fleet.broker.list_dead_letters(10).await.expect("dead");
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    guard(fleet);
}

fn dials_never_twice(fleet: &TestFleet) {
    assert_never_twice(fleet, "CreateSIPParticipant", by_identity);
}

fn dispatches_never_twice(fleet: &TestFleet) {
    assert_never_twice(fleet, "CreateDispatch", by_room);
}

fn no_duplicates(fleet: &TestFleet) {
    dials_never_twice(fleet);
    dispatches_never_twice(fleet);
}

/// Every dial is carried out and its answer lost: each call is dialed exactly once, its
/// attempt settled from LiveKit's state (GetParticipant finds the participant), and it
/// completes.
#[tokio::test]
async fn lost_dial_answers_are_settled_from_livekit_never_resent() {
    let fleet = fleet("lost-dial", quick_settle(), answers(4_000)).await;
    fleet.emulator.set_faults(fault_on(
        "CreateSIPParticipant",
        MethodFault {
            drop_after_rate: 1.0,
            ..Default::default()
        },
    ));
    let calls = submit_calls(&fleet, 7000, 20).await;
    let ids: Vec<String> = calls.iter().map(|(id, _)| id.clone()).collect();
    wait_until(&fleet, &ids, &["completed"], &no_duplicates).await;
    assert_quiet(&fleet, &no_duplicates).await;

    let dials = executed_by(&fleet, "CreateSIPParticipant", by_identity);
    let lookups = fleet.emulator.requests_of("GetParticipant");
    for (id, to) in &calls {
        let identity = identity_of(id);
        let call = get_call(&fleet, id).await;
        assert_eq!(call["attempts"].as_array().map(Vec::len), Some(1), "{call}");
        assert_eq!(dials.get(&identity), Some(&1), "one dial for {identity}");
        let sent = fleet.dials_to(to);
        assert_eq!(sent.len(), 1, "no re-send to {to}: {sent:?}");
        assert_eq!(sent[0].outcome, RequestOutcome::ExecutedThenDropped);
        // Settled from LiveKit's state: the job found the participant and recorded it.
        assert!(
            lookups
                .iter()
                .any(|r| r.identity.as_deref() == Some(&identity) && r.result == "ok"),
            "GetParticipant found {identity}"
        );
        assert!(
            call["attempts"][0]["steps"]["participant_sid"]
                .as_str()
                .is_some_and(|s| s.starts_with("PA_")),
            "the found participant is journalled: {call}"
        );
    }
    assert_eq!(dials.len(), calls.len(), "{dials:?}");
    fleet.stop().await;
}

/// Every dispatch is carried out and its answer lost: ListDispatch finds it, so each room
/// gets exactly one dispatch, and the calls go on to complete.
#[tokio::test]
async fn lost_dispatch_answers_are_found_by_list_dispatch_never_resent() {
    let fleet = fleet("lost-dispatch", quick_settle(), answers(300)).await;
    fleet.emulator.set_faults(fault_on(
        "CreateDispatch",
        MethodFault {
            drop_after_rate: 1.0,
            ..Default::default()
        },
    ));
    let calls = submit_calls(&fleet, 7100, 10).await;
    let ids: Vec<String> = calls.iter().map(|(id, _)| id.clone()).collect();
    wait_until(&fleet, &ids, &["completed"], &no_duplicates).await;
    assert_quiet(&fleet, &no_duplicates).await;

    let dispatches = executed_by(&fleet, "CreateDispatch", by_room);
    let sent = fleet.emulator.requests_of("CreateDispatch");
    assert_eq!(sent.len(), calls.len(), "no re-send: {sent:?}");
    assert!(sent
        .iter()
        .all(|r| r.outcome == RequestOutcome::ExecutedThenDropped));
    for (id, to) in &calls {
        let call = get_call(&fleet, id).await;
        assert_eq!(call["attempts"].as_array().map(Vec::len), Some(1), "{call}");
        let room = call["room_name"].as_str().expect("room").to_owned();
        assert_eq!(dispatches.get(&room), Some(&1), "one dispatch in {room}");
        let found = call["attempts"][0]["steps"]["dispatch_id"]
            .as_str()
            .unwrap_or_default();
        assert!(found.starts_with("AD_"), "{call}");
        assert_eq!(call["dispatch_id"], found);
        assert_eq!(fleet.dials_to(to).len(), 1);
    }
    fleet.stop().await;
}

/// LiveKit takes longer than the client's 10 s timeout and carries the dial out after the
/// client gave up: the job waits `livekit_settle` (longer than the timeout) for it to show
/// and never dials again.
#[tokio::test]
async fn a_dial_completing_after_the_client_timeout_is_not_resent() {
    let settings = OutboundSettings {
        livekit_settle: Duration::from_secs(13),
        dial_evidence_grace: Duration::from_secs(15),
        ..FleetOptions::default().settings
    };
    let fleet = fleet("late-dial", settings, answers(3_000)).await;
    fleet.emulator.set_faults(fault_on(
        "CreateSIPParticipant",
        MethodFault {
            latency_ms: 11_000,
            ..Default::default()
        },
    ));
    let calls = submit_calls(&fleet, 7200, 3).await;
    let ids: Vec<String> = calls.iter().map(|(id, _)| id.clone()).collect();
    wait_until(&fleet, &ids, &["completed"], &dials_never_twice).await;
    // A re-send would still be in flight (or arrive) here: wait it out.
    assert_quiet(&fleet, &dials_never_twice).await;

    let dials = executed_by(&fleet, "CreateSIPParticipant", by_identity);
    for (id, to) in &calls {
        assert_eq!(dials.get(&identity_of(id)), Some(&1));
        let sent = fleet.dials_to(to);
        assert_eq!(sent.len(), 1, "no re-send to {to}: {sent:?}");
        assert_eq!(sent[0].outcome, RequestOutcome::Executed);
        assert!(sent[0].client_gone, "the client timed out: {:?}", sent[0]);
    }
    fleet.stop().await;
}

/// Half the dials are dropped before LiveKit carries them out. To the client that looks
/// exactly like a lost answer (the connection breaks after the request was sent), so no
/// dial is ever sent twice: calls whose dial went through complete, the others end
/// `failed` as unknown once the evidence grace has passed, and nobody is called twice.
#[tokio::test]
async fn dials_dropped_before_execution_are_never_resent_or_guessed() {
    let fleet = fleet("drop-before", quick_settle(), answers(300)).await;
    fleet.emulator.set_faults(fault_on(
        "CreateSIPParticipant",
        MethodFault {
            drop_rate: 0.5,
            ..Default::default()
        },
    ));
    let calls = submit_calls(&fleet, 7300, 12).await;
    let ids: Vec<String> = calls.iter().map(|(id, _)| id.clone()).collect();
    wait_final(&fleet, &ids, &no_duplicates).await;
    assert_quiet(&fleet, &no_duplicates).await;

    let records = fleet.emulator.requests_of("CreateSIPParticipant");
    assert_eq!(records.len(), calls.len(), "one dial sent per call");
    let dropped = records
        .iter()
        .filter(|r| r.outcome == RequestOutcome::DroppedBefore)
        .count();
    let dials = executed_by(&fleet, "CreateSIPParticipant", by_identity);
    let mut failed = 0;
    for (id, _) in &calls {
        let call = get_call(&fleet, id).await;
        assert_eq!(call["attempts"].as_array().map(Vec::len), Some(1), "{call}");
        match dials.get(&identity_of(id)) {
            Some(1) => assert_eq!(call["status"], "completed", "{call}"),
            None => {
                failed += 1;
                assert_eq!(call["status"], "failed", "{call}");
                assert_eq!(call["end_reason"], NOT_REDIALED, "{call}");
            }
            Some(n) => panic!("{n} dials for {id}"),
        }
    }
    assert_eq!(failed, dropped, "the dropped dials are the failed calls");
    fleet.stop().await;
}

/// Dials answered with a Twirp error were never carried out and are sent again at once;
/// dials carried out and then dropped never are: every call completes with exactly one
/// executed dial, after some rejected ones.
#[tokio::test]
async fn rejected_dials_are_resent_and_lost_answers_never() {
    let fleet = fleet("reject-mix", quick_settle(), answers(2_500)).await;
    fleet.emulator.set_faults(fault_on(
        "CreateSIPParticipant",
        MethodFault {
            error_rate: 0.5,
            error_code: Some("unavailable".into()),
            drop_after_rate: 0.5,
            ..Default::default()
        },
    ));
    let calls = submit_calls(&fleet, 7400, 16).await;
    let ids: Vec<String> = calls.iter().map(|(id, _)| id.clone()).collect();
    wait_until(&fleet, &ids, &["completed"], &no_duplicates).await;
    assert_quiet(&fleet, &no_duplicates).await;

    let records = fleet.emulator.requests_of("CreateSIPParticipant");
    let count = |outcome: RequestOutcome| records.iter().filter(|r| r.outcome == outcome).count();
    let dials = executed_by(&fleet, "CreateSIPParticipant", by_identity);
    for (id, _) in &calls {
        assert_eq!(dials.get(&identity_of(id)), Some(&1), "one dial for {id}");
    }
    assert_eq!(
        count(RequestOutcome::Executed) + count(RequestOutcome::ExecutedThenDropped),
        calls.len()
    );
    assert!(
        count(RequestOutcome::ExecutedThenDropped) > 0,
        "some answers were lost"
    );
    assert!(
        count(RequestOutcome::Rejected) > 0,
        "some dials were rejected and sent again"
    );
    assert_eq!(
        records.len(),
        calls.len() + count(RequestOutcome::Rejected),
        "only rejected dials were sent again"
    );
    fleet.stop().await;
}
