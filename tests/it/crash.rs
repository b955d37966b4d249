//! A worker process killed with SIGKILL after CreateSIPParticipant was sent and before its
//! result was recorded: the job is redelivered to another worker, which reconciles with
//! LiveKit instead of dialing again.

use std::process::Stdio;
use std::time::Duration;

use livekit_emulator::{CallScript, Faults, MethodFault, Outcome};
use serde_json::json;

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::{amqp_url, eventually, redis_url};

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
    let prefix = fleet.prefix.clone().expect("rabbit prefix");
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
    fleet.emulator.set_faults(Faults {
        methods: [(
            "CreateSIPParticipant".to_owned(),
            MethodFault {
                latency_ms: 1_500,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
        .arg("worker")
        .env("CALLFLEET_BROKER", "rabbitmq")
        .env("CALLFLEET_STORE", "redis")
        .env("CALLFLEET_AMQP_URL", amqp_url())
        .env("CALLFLEET_REDIS_URL", redis_url())
        .env("CALLFLEET_QUEUE_PREFIX", &prefix)
        .env("CALLFLEET_KEY_PREFIX", &prefix)
        .env("CALLFLEET_WORKER_HTTP_ADDR", "127.0.0.1:0")
        .env("LIVEKIT_URL", fleet.emulator_url())
        .env("LIVEKIT_API_KEY", "devkey")
        .env("LIVEKIT_API_SECRET", "secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start a worker process");

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
    fleet.spawn_worker();
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
