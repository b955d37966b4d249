//! Chaos on the real thing: RabbitMQ and Redis, worker *processes* SIGKILLed and restarted
//! every few seconds, the fleet's broker connections closed, a LiveKit with latency, errors
//! and connections dropped before and after carrying requests out, webhooks duplicated and
//! reordered; optionally a Redis (with AOF) restarted mid-run. Judged from outside: every
//! call final (or dead-lettered, with the reason on its timeline), at most one executed
//! dial per participant identity and one dispatch per attempt (the emulator's record),
//! every queue empty afterwards except dead letters that explain themselves, and the
//! broker's peak message count a small multiple of the calls.
//!
//! The suite runs a few hundred calls; `scripts/chaos` runs the same test at 10,000
//! (release build, `CALLFLEET_CHAOS_CALLS`) and prints the summary table.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callfleet_core::domain::{participant_identity, room_for_call};
use livekit_emulator::{Faults, MethodFault, Outcome, WebhookFaults};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::{amqp_url, close_connections_named, eventually, redis_url, script};

/// One kind of call in the mix: the number it dials, what the emulator does there, and
/// the request's extra fields.
struct Kind {
    name: &'static str,
    number: &'static str,
    outcome: Outcome,
    talk_ms: Option<u64>,
    extra: Value,
    cancel: bool,
}

fn mix() -> Vec<Kind> {
    let retried = json!({"max_attempts": 2, "retry_delay_s": 1, "wait_until_answered": true, "ringing_timeout_s": 1});
    vec![
        Kind {
            name: "answered",
            number: "+15105550601",
            outcome: Outcome::Answer,
            talk_ms: Some(400),
            extra: json!({}),
            cancel: false,
        },
        Kind {
            name: "answered_waiting",
            number: "+15105550602",
            outcome: Outcome::Answer,
            talk_ms: Some(400),
            extra: json!({"wait_until_answered": true}),
            cancel: false,
        },
        Kind {
            name: "busy_retried",
            number: "+15105550603",
            outcome: Outcome::Busy,
            talk_ms: None,
            extra: retried.clone(),
            cancel: false,
        },
        Kind {
            name: "no_answer_retried",
            number: "+15105550604",
            outcome: Outcome::NoAnswer,
            talk_ms: None,
            extra: retried,
            cancel: false,
        },
        Kind {
            name: "declined",
            number: "+15105550605",
            outcome: Outcome::Decline,
            talk_ms: None,
            extra: json!({"wait_until_answered": true}),
            cancel: false,
        },
        Kind {
            name: "scheduled",
            number: "+15105550606",
            outcome: Outcome::Answer,
            talk_ms: Some(300),
            extra: json!({"not_before": "SOON"}),
            cancel: false,
        },
        Kind {
            name: "canceled",
            number: "+15105550607",
            outcome: Outcome::Answer,
            talk_ms: Some(300),
            extra: json!({"not_before": "LATER"}),
            cancel: true,
        },
    ]
}

struct Settings {
    calls: usize,
    /// Worker processes; one is SIGKILLed and restarted every `kill_every`.
    workers: usize,
    kill_every: Duration,
    /// A Redis with AOF on its own port to restart mid-run (`scripts/chaos`).
    redis_aof: Option<(u16, String)>,
    /// How long the whole run may take before the test gives up.
    limit: Duration,
}

impl Settings {
    fn from_env(default_calls: usize) -> Self {
        let calls = std::env::var("CALLFLEET_CHAOS_CALLS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_calls);
        let redis_aof = std::env::var("CALLFLEET_CHAOS_REDIS_AOF_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .zip(std::env::var("CALLFLEET_CHAOS_REDIS_AOF_DIR").ok());
        Self {
            calls,
            workers: 3,
            kill_every: Duration::from_secs(3),
            redis_aof,
            limit: Duration::from_secs(80 + (calls as u64) / 20),
        }
    }
}

fn spawn_worker(fleet: &TestFleet, prefix: &str, n: usize) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{prefix}-worker-{n}.log")))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    Command::new(env!("CARGO_BIN_EXE_callfleet"))
        .arg("worker")
        .env("CALLFLEET_BROKER", "rabbitmq")
        .env("CALLFLEET_STORE", "redis")
        .env("CALLFLEET_AMQP_URL", amqp_url())
        .env("CALLFLEET_REDIS_URL", redis_url())
        .env("CALLFLEET_QUEUE_PREFIX", prefix)
        .env("CALLFLEET_KEY_PREFIX", prefix)
        .env("CALLFLEET_WORKER_HTTP_ADDR", "127.0.0.1:0")
        .env("CALLFLEET_DEFAULT_AGENT", "chaos-agent")
        .env("CALLFLEET_TRUNK_MAX_CONCURRENT", "10000")
        .env("CALLFLEET_TRUNK_CPS", "10000")
        .env("CALLFLEET_DIAL_EVIDENCE_GRACE_S", "6")
        .env("CALLFLEET_SWEEP_INTERVAL_S", "1")
        .env("CALLFLEET_SWEEP_AFTER_S", "8")
        .env("CALLFLEET_LOG", "warn")
        .env("LIVEKIT_URL", fleet.emulator_url())
        .env("LIVEKIT_API_KEY", "devkey")
        .env("LIVEKIT_API_SECRET", "secret")
        .env("LIVEKIT_SIP_TRUNK_ID", crate::fleet::TRUNK)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start a worker process")
}

/// SIGKILLs the next worker in turn and starts a new one in its place.
async fn kill_and_restart(fleet: &TestFleet, prefix: &str, workers: &mut [Child], kills: usize) {
    let victim = kills % workers.len();
    let _ = workers[victim].start_kill();
    let _ = workers[victim].wait().await;
    workers[victim] = spawn_worker(fleet, prefix, victim);
}

fn restart_redis(port: u16, dir: &str) {
    let _ = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown"])
        .status();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            dir,
            "--save",
            "",
            "--daemonize",
            "yes",
        ])
        .status()
        .expect("redis-server");
    assert!(started.success(), "the AOF Redis restarts");
}

fn is_final(call: &Value) -> bool {
    matches!(
        call["status"].as_str(),
        Some("completed" | "failed" | "busy" | "no_answer" | "canceled")
    )
}

fn dead_lettered(call: &Value) -> bool {
    call["timeline"]
        .as_array()
        .is_some_and(|t| t.iter().any(|e| e["event"] == "dead_lettered"))
}

async fn run(settings: Settings) {
    let started = Instant::now();
    let mut options = FleetOptions {
        backing: Backing::RabbitRedis,
        workers: 0,
        ..Default::default()
    };
    options.emulator.webhook_retry_base = Duration::from_millis(100);
    let fleet = TestFleet::start("chaos", options).await;
    let prefix = fleet.prefix.clone().expect("rabbit prefix");
    let kinds = mix();
    for kind in &kinds {
        fleet
            .emulator
            .script(kind.number, script(kind.outcome, kind.talk_ms));
    }
    let lossy = MethodFault {
        latency_ms: 5,
        latency_max_ms: Some(60),
        error_rate: 0.03,
        drop_rate: 0.01,
        drop_after_rate: 0.03,
        ..Default::default()
    };
    fleet.emulator.set_faults(Faults {
        methods: [
            ("*".to_owned(), lossy.clone()),
            ("CreateSIPParticipant".to_owned(), lossy.clone()),
            ("CreateDispatch".to_owned(), lossy),
        ]
        .into_iter()
        .collect(),
        webhooks: WebhookFaults {
            duplicate_rate: 0.2,
            reorder_rate: 0.2,
            paused: false,
        },
    });

    let mut workers: Vec<Child> = (0..settings.workers)
        .map(|n| spawn_worker(&fleet, &prefix, n))
        .collect();

    // The broker's peak message count, sampled throughout.
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let broker = Arc::clone(&fleet.broker);
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                if let Ok(census) = broker.census().await {
                    peak.fetch_max(census.values().sum(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Submit the mix, a few at a time.
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339();
    let later = (chrono::Utc::now() + chrono::Duration::seconds(600)).to_rfc3339();
    let mut calls: Vec<(String, &'static str)> = Vec::new();
    let mut kills = 0;
    let mut last_kill = Instant::now();
    let mut connections_closed = 0;
    let mut redis_restarted = false;
    for i in 0..settings.calls {
        let kind = &kinds[i % kinds.len()];
        let mut body = json!({"to": kind.number, "idempotency_key": format!("chaos-{prefix}-{i}")});
        if let (Some(extra), Some(map)) = (kind.extra.as_object(), body.as_object_mut()) {
            for (k, v) in extra {
                let v = match v.as_str() {
                    Some("SOON") => json!(soon),
                    Some("LATER") => json!(later),
                    _ => v.clone(),
                };
                map.insert(k.clone(), v);
            }
        }
        // A 503 (broker connection being rebuilt, Redis restarting) is retried with the
        // same key, as clients are told to.
        let id = eventually(
            "the submission to be accepted",
            Duration::from_secs(30),
            || {
                let body = body.clone();
                let fleet = &fleet;
                async move {
                    let (status, call) = fleet.post("/v1/calls", &body).await;
                    matches!(status, 200 | 202).then(|| call["id"].as_str().map(str::to_owned))?
                }
            },
        )
        .await;
        if kind.cancel {
            let (status, answer) = fleet
                .post(&format!("/v1/calls/{id}/cancel"), &json!({}))
                .await;
            assert!(
                matches!(status, 200 | 409 | 503),
                "cancel: {status} {answer}"
            );
        }
        calls.push((id, kind.name));

        if last_kill.elapsed() >= settings.kill_every {
            kill_and_restart(&fleet, &prefix, &mut workers, kills).await;
            kills += 1;
            last_kill = Instant::now();
        }
        if i == settings.calls / 3 && connections_closed == 0 {
            connections_closed = close_connections_named(&prefix);
        }
        if i == settings.calls / 2 && !redis_restarted {
            if let Some((port, dir)) = &settings.redis_aof {
                let (port, dir) = (*port, dir.clone());
                tokio::task::spawn_blocking(move || restart_redis(port, &dir))
                    .await
                    .expect("restart");
                redis_restarted = true;
            }
        }
    }
    let submitted_in = started.elapsed();
    // Keep killing while the calls play out, then let the fleet settle.
    let deadline = started + settings.limit;
    let mut pending: Vec<String> = calls.iter().map(|(id, _)| id.clone()).collect();
    let mut final_calls: HashMap<String, Value> = HashMap::new();
    let mut fault_phase = true;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} calls not final after {:?}, e.g. {:?}",
            pending.len(),
            settings.limit,
            pending.first().map(|id| id.as_str())
        );
        if fault_phase && started.elapsed() > submitted_in + Duration::from_secs(10) {
            // Faults off and a last restart: what is left must finish.
            fleet.emulator.set_faults(Faults::default());
            fault_phase = false;
        }
        if fault_phase && last_kill.elapsed() >= settings.kill_every {
            kill_and_restart(&fleet, &prefix, &mut workers, kills).await;
            kills += 1;
            last_kill = Instant::now();
        }
        let mut still = Vec::new();
        for id in pending {
            let (status, call) = fleet.get(&format!("/v1/calls/{id}")).await;
            if status == 200 && (is_final(&call) || dead_lettered(&call)) {
                final_calls.insert(id, call);
            } else {
                still.push(id);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settled_in = started.elapsed();

    // From LiveKit's side: at most one executed dial per participant identity, at most
    // one executed dispatch per attempt of a call.
    let mut dials: HashMap<String, usize> = HashMap::new();
    for r in fleet.emulator.requests_of("CreateSIPParticipant") {
        if r.outcome.executed() {
            *dials
                .entry(r.identity.clone().unwrap_or_default())
                .or_default() += 1;
        }
    }
    let twice: Vec<_> = dials.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "identities dialed more than once: {twice:?}"
    );
    let mut dispatches: HashMap<String, usize> = HashMap::new();
    for r in fleet.emulator.requests_of("CreateDispatch") {
        if r.outcome.executed() {
            *dispatches
                .entry(r.room.clone().unwrap_or_default())
                .or_default() += 1;
        }
    }
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for (id, call) in &final_calls {
        let attempts = call["attempts"].as_array().map_or(0, Vec::len);
        let room = room_for_call(id);
        let dispatched = dispatches.get(&room).copied().unwrap_or(0);
        assert!(
            dispatched <= attempts.max(1),
            "{dispatched} dispatches for {attempts} attempt(s) of {id}"
        );
        for n in 1..=attempts as u32 {
            assert!(
                dials
                    .get(&participant_identity(id, n))
                    .copied()
                    .unwrap_or(0)
                    <= 1
            );
        }
        let status = if dead_lettered(call) && !is_final(call) {
            "dead_lettered".to_owned()
        } else {
            call["status"].as_str().unwrap_or("?").to_owned()
        };
        *by_status.entry(status).or_default() += 1;
    }
    let canceled_kind: Vec<_> = calls.iter().filter(|(_, k)| *k == "canceled").collect();
    for (id, _) in canceled_kind {
        assert_eq!(final_calls[id]["status"], "canceled", "{}", final_calls[id]);
    }

    // What the fleet left behind once quiet: nothing, except dead letters that say why.
    let census = eventually("the broker to drain", Duration::from_secs(60), || async {
        let census = fleet.broker.census().await.ok()?;
        let held: u64 = census
            .iter()
            .filter(|(q, _)| q.as_str() != "dead" && !q.starts_with("delay."))
            .map(|(_, n)| *n)
            .sum();
        let delayed: u64 = census
            .iter()
            .filter(|(q, _)| q.starts_with("delay."))
            .map(|(_, n)| *n)
            .sum();
        // Delayed copies of settled jobs (a retry also queued by the sweeper) expire into
        // their queue and are dropped as stale; only the 10-minute canceled calls' jobs
        // may still wait.
        let canceled_waiting = calls.iter().filter(|(_, k)| *k == "canceled").count() as u64;
        (held == 0 && delayed <= canceled_waiting).then_some(census)
    })
    .await;
    let dead = fleet
        .broker
        .list_dead_letters(100_000)
        .await
        .expect("dead letters");
    for d in &dead {
        assert!(
            !d.reason.is_empty() && d.reason != "unknown",
            "a dead letter without a reason: {d:?}"
        );
    }
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);
    for w in &mut workers {
        let _ = w.start_kill();
    }
    println!("\nchaos summary");
    println!("| what | value |\n|---|---|");
    println!("| calls | {} |", settings.calls);
    println!(
        "| worker processes / SIGKILLs | {} / {kills} |",
        settings.workers
    );
    println!("| broker connections closed | {connections_closed} |");
    println!("| Redis (AOF) restarted | {redis_restarted} |");
    println!("| submitted in / all final in | {submitted_in:.1?} / {settled_in:.1?} |");
    let mut statuses: Vec<_> = by_status.iter().collect();
    statuses.sort();
    for (status, n) in statuses {
        println!("| final: {status} | {n} |");
    }
    println!("| executed dials (identities) | {} |", dials.len());
    println!("| identities dialed twice | 0 |");
    println!("| dead letters (each with a reason) | {} |", dead.len());
    println!(
        "| peak broker messages (per call) | {peak} ({:.2}) |",
        peak as f64 / settings.calls as f64
    );
    println!("| left in queues | {census:?} |");
    assert!(
        peak <= 10 * settings.calls as u64,
        "the broker held {peak} messages for {} calls",
        settings.calls
    );
    fleet.stop().await;
}

/// A few hundred calls under every fault at once; `scripts/chaos` runs this same test
/// with `CALLFLEET_CHAOS_CALLS=10000` and a Redis on AOF to restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_at_once() {
    run(Settings::from_env(280)).await;
}
