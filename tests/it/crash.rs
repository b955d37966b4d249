//! Workers that die between two steps, on RabbitMQ and Redis: a worker process SIGKILLed
//! after CreateSIPParticipant was sent and before its result was recorded (the redelivered
//! job reconciles with LiveKit instead of dialing again); a worker frozen right after
//! marking a webhook event seen, then stopped (the redelivery is applied, not dropped as a
//! duplicate); a worker frozen after recording a busy attempt and before publishing its
//! retry, then stopped (the retry still dials, once).
use std::time::Duration;

use livekit_emulator::{CallScript, Faults, MethodFault, Outcome};
use serde_json::json;

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::{eventually, fault_on};

#[tokio::test]
async fn worker_killed_mid_dial_never_dials_twice() {
    let mut fleet = TestFleet::start(
        "crash",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 0,
            ..Default::default()
        },
    )
    .await;
    let number = "+15105550401";
    fleet.emulator.script(
        number,
        CallScript {
            outcome: Outcome::Answer,
            ring_ms: 100,
            // Still talking when the dead worker's call lock (10 s) expires, so the
            // redelivered job must reconcile rather than find the call already over.
            talk_ms: Some(12_000),
            sip_status: None,
        },
    );
    // The dial takes 1.5 s to answer: long enough to kill the worker while it waits.
    fleet.emulator.set_faults(fault_on(
        "CreateSIPParticipant",
        MethodFault {
            latency_ms: 1_500,
            ..Default::default()
        },
    ));
    let mut worker = fleet.worker_process();

    let id = fleet.submit(json!({"to": number})).await;
    eventually(
        "the worker's CreateSIPParticipant to reach LiveKit",
        Duration::from_secs(30),
        || async {
            (!fleet
                .emulator
                .requests_of("CreateSIPParticipant")
                .is_empty())
            .then_some(())
        },
    )
    .await;
    worker.start_kill().expect("SIGKILL");
    let status = worker.wait().await.expect("reaped");
    assert!(!status.success(), "killed, not exited");
    let (_, call) = fleet.get(&format!("/v1/calls/{id}")).await;
    assert_eq!(
        call["status"], "dialing",
        "the dial's result was never recorded: {call}"
    );

    fleet.emulator.set_faults(Faults::default());
    fleet.spawn_worker().await;
    let call = fleet
        .wait_for(&id, "completed", Duration::from_secs(60))
        .await;
    assert_eq!(
        fleet.emulator.requests_of("CreateSIPParticipant").len(),
        1,
        "exactly one dial"
    );
    assert!(
        fleet
            .emulator
            .requests_of("GetParticipant")
            .iter()
            .any(|r| r.result == "ok"),
        "the new worker found the first dial's participant"
    );
    assert_eq!(call["attempts"].as_array().map(Vec::len), Some(1));
    assert!(call["attempts"][0]["sip_call_id"].is_string());
    fleet.stop().await;
}

/// A worker that dies right after marking a webhook event seen (here: frozen after the
/// mark, then stopped, its jobs abandoned) must not make the redelivery look like a
/// duplicate: another worker applies it and the answered call completes, dialed once.
/// (With "mark, then apply" the call stayed `sip_participant_joined` until its room
/// emptied, minutes later.)
#[tokio::test]
async fn a_worker_killed_after_marking_a_webhook_seen_loses_no_event() {
    let outage = std::sync::Arc::new(crate::harness::Outage::default());
    let mut fleet = TestFleet::start(
        "crash-webhook",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 0,
            outage: Some(outage.clone()),
            ..Default::default()
        },
    )
    .await;
    let number = "+15105550411";
    fleet
        .emulator
        .script(number, crate::harness::script(Outcome::Answer, Some(300)));
    outage.hang_after("first_seen");
    let first = fleet.spawn_worker().await;
    let id = fleet.submit(json!({"to": number})).await;
    // Every event of the call reached the fleet (and froze the first worker after its
    // mark) once LiveKit reports the participant gone.
    eventually(
        "the participant_left webhook",
        Duration::from_secs(30),
        || async {
            fleet
                .emulator
                .webhooks()
                .iter()
                .any(|w| w.event == "participant_left" && w.last_status == Some(200))
                .then_some(())
        },
    )
    .await;
    first.cancel(); // its frozen jobs are abandoned and handed back
    outage.heal();
    fleet.spawn_worker().await;
    let call = fleet
        .wait_for(&id, "completed", Duration::from_secs(30))
        .await;
    assert_eq!(
        call["attempts"][0]["disconnect_reason"], "CLIENT_INITIATED",
        "{call}"
    );
    assert_eq!(fleet.dials_to(number).len(), 1);
    eventually("the queues to drain", Duration::from_secs(30), || async {
        let census = fleet.broker.census().await.ok()?;
        census.values().all(|n| *n == 0).then_some(())
    })
    .await;
    fleet.stop().await;
}

/// A worker that dies after recording a busy attempt and before publishing the retry (here:
/// the publish never returns, then the worker is stopped): the retry is still dialed,
/// exactly once, by the redelivered job or the sweeper.
#[tokio::test]
async fn a_worker_killed_before_publishing_the_retry_loses_no_attempt() {
    let outage = std::sync::Arc::new(crate::harness::Outage::default());
    let mut fleet = TestFleet::start(
        "crash-retry",
        FleetOptions {
            backing: Backing::RabbitRedis,
            workers: 0,
            outage: Some(outage.clone()),
            sweep: callfleet_workers::SweepSettings {
                every: Duration::from_millis(500),
                quiet: Duration::from_secs(2),
                batch: 100,
            },
            ..Default::default()
        },
    )
    .await;
    let number = "+15105550412";
    fleet
        .emulator
        .script(number, crate::harness::script(Outcome::Busy, None));
    let first = fleet.spawn_worker().await;
    let id = fleet
        .submit(
            json!({"to": number, "wait_until_answered": true, "ringing_timeout_s": 2,
                       "max_attempts": 2, "retry_delay_s": 1}),
        )
        .await;
    // From here on the attempt's end is recorded but its retry never leaves the worker.
    outage.hang_publishes_to(callfleet_core::ports::WorkQueue::CallJobs);
    fleet
        .wait_for(&id, "scheduled", Duration::from_secs(30))
        .await;
    first.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    outage.heal();
    fleet.spawn_worker().await;
    // The dead worker's call lock (10 s + ringing time) expires before the retry dials.
    let call = fleet.wait_for(&id, "busy", Duration::from_secs(45)).await;
    assert_eq!(call["attempts"].as_array().map(Vec::len), Some(2), "{call}");
    let dials = fleet.dials_to(number);
    assert_eq!(dials.len(), 2, "attempt 1 and its retry, once each");
    eventually("the queues to drain", Duration::from_secs(30), || async {
        let census = fleet.broker.census().await.ok()?;
        census.values().all(|n| *n == 0).then_some(())
    })
    .await;
    fleet.stop().await;
}
