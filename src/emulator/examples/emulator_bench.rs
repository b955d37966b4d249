//! Emulator throughput with recording on: concurrent `livekit-api` clients issue a mix of
//! CreateRoom (upsert), ListParticipants and CreateDispatch for a fixed time.
//!
//! `cargo run --release -p livekit-emulator --example emulator_bench -- [seconds] [clients]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livekit_api::services::agent_dispatch::AgentDispatchClient;
use livekit_api::services::room::{CreateRoomOptions, RoomClient};
use livekit_emulator::{Emulator, EmulatorConfig};
use livekit_protocol as proto;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let clients: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let running = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse()?).await?;
    let url = running.url();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let rooms = RoomClient::with_api_key(&url, "devkey", "secret").with_failover(false);
            let dispatch =
                AgentDispatchClient::with_api_key(&url, "devkey", "secret").with_failover(false);
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Each room is created, then listed, then dispatched to, so every answer is a success.
                let room = format!("bench-{c}-{}", (i / 3) % 50);
                let started = Instant::now();
                let ok = match i % 3 {
                    0 => rooms
                        .create_room(&room, CreateRoomOptions::default())
                        .await
                        .is_ok(),
                    1 => rooms.list_participants(&room).await.is_ok(),
                    _ => dispatch
                        .create_dispatch(proto::CreateAgentDispatchRequest {
                            agent_name: "a".into(),
                            room,
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                };
                latencies.push(started.elapsed());
                if !ok {
                    errors += 1;
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "emulator: {} requests in {:.1}s = {:.0} req/s with {clients} clients, recording on ({} recorded); p50 {:.2} ms, p99 {:.2} ms; errors {errors}",
        all.len(),
        elapsed,
        all.len() as f64 / elapsed,
        running.emulator.requests().len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    running.shutdown().await;
    Ok(())
}
