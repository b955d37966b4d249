//! Health, readiness, the LiveKit adapter's error classification, and process shutdown.

use std::sync::Arc;
use std::time::Duration;

use callfleet_core::adapters::LiveKitApi;
use callfleet_core::domain::sip_outcome::{FailureKind, SipOutcome};
use callfleet_core::lifecycle::{health_router, Readiness};
use callfleet_core::ports::livekit::DialRequest;
use callfleet_core::ports::LiveKit;
use livekit_emulator::{CallScript, Emulator, EmulatorConfig, Outcome};

use crate::harness::{memory_store, DownBroker};

async fn get(app: axum::Router, path: &str) -> (u16, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("get");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test]
async fn readyz_reflects_real_dependencies_and_healthz_does_not() {
    let (broker, prefix) = crate::harness::rabbit_broker("readyz", 3).await;
    let _clean = crate::harness::CleanOnDrop(prefix.clone());
    let up = Readiness {
        broker,
        store: crate::harness::redis_store("readyz").await,
        timeout: Duration::from_secs(2),
    };
    assert_eq!(get(health_router(up), "/readyz").await.0, 200);
    let down = Readiness {
        broker: Arc::new(DownBroker),
        store: memory_store(),
        timeout: Duration::from_secs(2),
    };
    let (status, body) = get(health_router(down.clone()), "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("\"broker\":\"unreachable\""), "{body}");
    assert_eq!(
        get(health_router(down), "/healthz").await.0,
        200,
        "alive even when dependencies are not"
    );
}

#[tokio::test]
async fn livekit_adapter_classifies_failures_from_the_wire() {
    let running = Emulator::start(
        EmulatorConfig {
            outbound_trunks: vec!["ST_t".into()],
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("emulator");
    let api = LiveKitApi::new(
        &running.url(),
        "devkey",
        "secret",
        Duration::from_millis(500),
    );
    api.create_room("lk", "{}", 60).await.expect("create room");
    assert!(
        api.get_participant("lk", "nobody")
            .await
            .expect("lookup")
            .is_none(),
        "not_found is None"
    );
    running.emulator.script(
        "+15550100001",
        CallScript {
            outcome: Outcome::Busy,
            ring_ms: 50,
            talk_ms: None,
            sip_status: None,
        },
    );
    let busy = api
        .create_sip_participant(DialRequest {
            trunk_id: "ST_t".into(),
            call_to: "+15550100001".into(),
            room_name: "lk".into(),
            participant_identity: "sip-x-a1".into(),
            wait_until_answered: true,
            ..Default::default()
        })
        .await
        .expect_err("busy");
    assert_eq!(busy.kind(), FailureKind::CallOutcome(SipOutcome::Busy));
    running.emulator.set_faults(livekit_emulator::Faults {
        methods: [(
            "ListDispatch".to_owned(),
            livekit_emulator::MethodFault {
                error_rate: 1.0,
                error_code: Some("resource_exhausted".into()),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    assert_eq!(
        api.list_dispatch("lk").await.expect_err("429").kind(),
        FailureKind::BackPressure
    );
    running.emulator.set_faults(livekit_emulator::Faults {
        methods: [(
            "*".to_owned(),
            livekit_emulator::MethodFault {
                latency_ms: 2_000,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    let slow = api.list_participants("lk").await.expect_err("timeout");
    assert_eq!(slow.kind(), FailureKind::Retryable);
    let bad_key = LiveKitApi::new(&running.url(), "devkey", "wrong", Duration::from_secs(2));
    assert_eq!(
        bad_key.delete_room("lk").await.expect_err("401").kind(),
        FailureKind::Permanent
    );
    // No failover replay: one timed-out request is one request.
    // The SDK fails over synchronously, so any replay would already be recorded: the one
    // request is there (recorded on arrival), and the emulator saw the client give up on it.
    let emulator = running.emulator.clone();
    crate::harness::eventually(
        "the timed-out request marked client_gone",
        Duration::from_secs(5),
        || {
            let emulator = emulator.clone();
            async move {
                let listed = emulator.requests_of("ListParticipants");
                listed.iter().any(|r| r.client_gone).then_some(listed)
            }
        },
    )
    .await;
    assert_eq!(
        running.emulator.requests_of("ListParticipants").len(),
        1,
        "no failover replay"
    );
    running.shutdown().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test]
async fn dev_process_serves_then_exits_zero_on_sigterm() {
    let (http, emu) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
        .arg("dev")
        .env("CALLFLEET_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("CALLFLEET_EMULATOR_ADDR", format!("127.0.0.1:{emu}"))
        .env("CALLFLEET_SHUTDOWN_DEADLINE_S", "2")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn callfleet dev");
    crate::harness::eventually(
        "dev mode to be ready",
        Duration::from_secs(20),
        || async move {
            let r = reqwest::get(format!("http://127.0.0.1:{http}/readyz"))
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    let emulator_up = reqwest::get(format!("http://127.0.0.1:{emu}/settings/regions"))
        .await
        .expect("emulator");
    assert_eq!(emulator_up.status(), 200);
    let pid = child.id().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within the deadline")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
}
