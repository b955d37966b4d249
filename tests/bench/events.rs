//! Call events out (#11) benchmark (release build), wired by the fleet's composition root
//! on RabbitMQ + Redis:
//!
//! 1. `stream [changes_per_s=1000] [clients=50] [seconds=10]`: one ingress with `clients`
//!    Server-Sent-Events clients on `GET /v1/events`; call changes written through the
//!    call book (each update appends its event in the same atomic write) at the target
//!    rate over 200 calls by 8 writers. Latency: the moment the client parsed the event −
//!    the moment just before the change was written (epoch µs carried in the note's
//!    detail), for every event at every client; missing events are counted.
//! 2. `callbacks [seconds=10] [events_per_s=1000] [configs]`: a local receiver that
//!    answers 200 after 20 ms, one subscription to every callback type, two
//!    `fleet::worker`s delivering; outbound calls created and completed in the call book
//!    (`call.queued` + `call.completed`) at the target rate. Deliveries per second counted
//!    at the receiver until every callback arrived; event `at` → receiver p50/p99. For each
//!    `concurrency/per_receiver` in `configs` (default `64/8,64/64,256/8,256/64`).
//! 3. `isolation [seconds=10] [calls_per_s=200]`: the fleet's own outbound calls
//!    (`POST /v1/calls` → two workers → the emulator answering and hanging up at once),
//!    first with no subscription, then with one to a receiver that is down (a closed port),
//!    then to one that accepts connections and never answers: calls completed per second,
//!    accepted → final p50/p99, and what is left in the callbacks queues afterwards.
//!
//! Every run uses a unique queue and key prefix and deletes them afterwards.
//!
//! `cargo build --release --example events_bench &&
//!  target/release/examples/events_bench <stream|callbacks|isolation> [args]`

#[path = "common.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use callfleet::fleet::{self, IngressSettings, WorkerSettings};
use callfleet_core::adapters::{Backends, LiveKitApi, RabbitBroker, RabbitConfig, RedisStore};
use callfleet_core::calls::{CallBook, SystemClock};
use callfleet_core::domain::events::CallEvent;
use callfleet_core::domain::phone::parse_region;
use callfleet_core::domain::request::{CallDefaults, CallRequest};
use callfleet_core::domain::subscription::{SigningSecret, Subscription};
use callfleet_core::domain::CallStatus;
use callfleet_core::ports::{Broker, EventId};
use callfleet_workers::{CallbackSettings, InboundSettings, OutboundSettings, SweepSettings};
use common::{clean_up, Error, AMQP, REDIS};
use livekit_emulator::{CallScript, Emulator, EmulatorConfig, Outcome};
use tokio_util::sync::CancellationToken;

const KEY: &str = "bench-api-key-0123456789";
const TRUNK: &str = "ST_bench";
/// Calls the stream benchmark's changes are spread over.
const STREAM_CALLS: usize = 200;
/// Concurrent writers of call changes.
const WRITERS: usize = 8;
/// Worker runtimes (as separate processes would be, each with its own connections).
const WORKERS: usize = 2;
/// How long a run waits without progress before it gives up on what is still missing.
const STALL: Duration = Duration::from_secs(20);

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The `p` quantile of sorted microseconds, in milliseconds.
fn pct_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e3
}

fn latency_line(sorted: &[u64]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct_ms(sorted, 0.5),
        pct_ms(sorted, 0.99),
        pct_ms(sorted, 1.0)
    )
}

// --- counters: a minimal metrics recorder, to read the fleet's own counters -------------------

#[derive(Default)]
struct Counters(parking_lot::Mutex<HashMap<String, Arc<AtomicU64>>>);

static COUNTERS: OnceLock<Arc<Counters>> = OnceLock::new();

struct CountingRecorder(Arc<Counters>);

impl metrics::Recorder for CountingRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut name = key.name().to_owned();
        for label in key.labels() {
            name.push_str(&format!(",{}={}", label.key(), label.value()));
        }
        let cell = Arc::clone(self.0 .0.lock().entry(name).or_default());
        metrics::Counter::from_arc(cell)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

fn install_counters() {
    let counters = Arc::new(Counters::default());
    if metrics::set_global_recorder(CountingRecorder(Arc::clone(&counters))).is_ok() {
        let _ = COUNTERS.set(counters);
    }
}

fn counters() -> BTreeMap<String, u64> {
    COUNTERS
        .get()
        .map(|c| {
            c.0.lock()
                .iter()
                .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
                .collect()
        })
        .unwrap_or_default()
}

/// What grew between two snapshots, among counters whose key contains `filter`.
fn grown(before: &BTreeMap<String, u64>, filter: &str) -> String {
    let after = counters();
    let parts: Vec<String> = after
        .iter()
        .filter(|(k, _)| k.contains(filter))
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| {
                let short = k.trim_start_matches("callfleet_").replace("_total", "");
                format!("{short}: {d}")
            })
        })
        .collect();
    parts.join("; ")
}

// --- CPU: this process, Redis and RabbitMQ, from /proc -------------------------------------

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Busy and total jiffies of the whole machine (`/proc/stat`, every core).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().sum();
    // idle and iowait
    let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU used by the bench process (fleet and load generator), Redis and RabbitMQ, and by
/// everything else on the machine (other people's builds and tests share the two cores).
struct CpuProbe {
    started: Instant,
    at_start: Vec<(&'static str, Vec<u32>, u64)>,
    machine: Option<(u64, u64)>,
}

impl CpuProbe {
    fn start() -> Self {
        let groups: [(&'static str, Vec<u32>); 3] = [
            ("bench process", vec![std::process::id()]),
            ("redis", pids_named("redis-server")),
            ("rabbitmq", pids_named("beam.smp")),
        ];
        let at_start = groups
            .into_iter()
            .map(|(name, pids)| {
                let ticks = pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
                (name, pids, ticks)
            })
            .collect();
        Self {
            started: Instant::now(),
            at_start,
            machine: machine_ticks(),
        }
    }

    /// Percent of one core each used since `start` (ticks are 1/100 s).
    fn report(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let mut ours = 0;
        let mut parts: Vec<String> = self
            .at_start
            .iter()
            .map(|(name, pids, before)| {
                let now: u64 = pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
                ours += now - before;
                format!("{name} {:.0}%", (now - before) as f64 / secs)
            })
            .collect();
        if let (Some((busy0, total0)), Some((busy1, total1))) = (self.machine, machine_ticks()) {
            let cores = (total1 - total0) as f64 / (secs * 100.0);
            let busy = (busy1 - busy0) as f64 / secs;
            parts.push(format!(
                "everything else {:.0}% (machine {:.0}% of {:.0} cores)",
                (busy - ours as f64 / secs).max(0.0),
                busy,
                cores.round()
            ));
        }
        format!("CPU (100% = one core): {}", parts.join(", "))
    }
}

// --- backends, ingress, workers, clean-up ----------------------------------------------------

/// One process's backends on `prefix`: its own RabbitMQ and Redis connections.
async fn backends(prefix: &str) -> Result<(Backends, Arc<RabbitBroker>), Error> {
    let broker = Arc::new(
        RabbitBroker::connect(RabbitConfig {
            url: AMQP.into(),
            prefix: prefix.to_owned(),
            delivery_limit: 10,
            publish_timeout: Duration::from_secs(5),
        })
        .await?,
    );
    let redis = RedisStore::connect(REDIS, prefix, Duration::from_secs(5)).await?;
    let backends = Backends {
        broker: broker.clone(),
        routing: Arc::new(redis.routing()),
        subscriptions: Arc::new(redis.subscriptions()),
        events: Arc::new(redis.events()),
        store: Arc::new(redis),
        delivery_limit: 10,
    };
    Ok((backends, broker))
}

fn defaults() -> CallDefaults {
    CallDefaults {
        region: parse_region("US").ok(),
        trunk_id: Some(TRUNK.into()),
    }
}

fn ingress_settings() -> IngressSettings {
    IngressSettings {
        max_body_bytes: 64 * 1024,
        api_keys: vec![KEY.into()],
        webhook_keys: vec![("devkey".into(), "secret".into())],
        defaults: defaults(),
        number_keys: vec![KEY.into()],
        stream: fleet::StreamSettings::default(),
        callbacks: fleet::CallbackPolicy {
            allow_private: true,
            signs_calls: false,
        },
    }
}

/// An ingress serving on `listener` until `stop`.
async fn start_ingress(
    backends: &Backends,
    listener: tokio::net::TcpListener,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let routing = fleet::routing(backends, None, stop.clone()).await?;
    let state = fleet::ingress(
        backends,
        routing,
        Arc::new(SystemClock),
        ingress_settings(),
        stop.clone(),
    );
    Ok(tokio::spawn(fleet::serve(
        listener,
        callfleet_ingress::app(state),
        stop.clone(),
    )))
}

fn worker_settings(callbacks: CallbackSettings) -> WorkerSettings {
    WorkerSettings {
        outbound: OutboundSettings {
            trunk_max_concurrent: 10_000,
            trunk_cps: 10_000.0,
            ..OutboundSettings::default()
        },
        inbound: InboundSettings::default(),
        sweep: SweepSettings {
            every: Duration::from_secs(3_600),
            ..SweepSettings::default()
        },
        prefetch: 128,
        concurrency: 128,
        max_job_attempts: 5,
        callbacks,
    }
}

/// A worker (job runtime, sweeper, callback dispatcher and delivery runtime) with its own
/// connections, talking to the emulator, until `stop`.
async fn spawn_worker(
    prefix: &str,
    livekit_url: &str,
    settings: &WorkerSettings,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let (backends, _) = backends(prefix).await?;
    let routing = fleet::routing(&backends, None, stop.clone()).await?;
    let livekit = Arc::new(LiveKitApi::new(
        livekit_url,
        "devkey",
        "secret",
        Duration::from_secs(10),
    ));
    let worker = fleet::worker(&backends, routing, livekit, Arc::new(SystemClock), settings)?;
    let stop = stop.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = worker.run(stop, Duration::from_secs(2)).await {
            eprintln!("worker stopped with {e}");
        }
    }))
}

fn subscription(id: &str, url: &str) -> Subscription {
    let now = chrono::Utc::now();
    Subscription {
        id: id.into(),
        url: url.into(),
        event_types: BTreeSet::new(),
        filter: Default::default(),
        secrets: vec![SigningSecret::generate().as_str().to_owned()],
        enabled: true,
        disabled_reason: None,
        description: Some("events_bench".into()),
        created_at: now,
        updated_at: now,
    }
}

fn outbound_call(i: usize) -> Result<callfleet_core::domain::Call, Error> {
    let request = CallRequest {
        to: format!("+1510555{:04}", i % 10_000),
        tags: Some(vec!["bench".into()]),
        ..Default::default()
    };
    Ok(request.into_call(&defaults(), chrono::Utc::now())?)
}

/// Waits until `done()` reaches `target`, giving up after `STALL` without progress.
async fn wait_for(target: usize, done: impl Fn() -> usize) -> usize {
    let (mut last, mut since) = (done(), Instant::now());
    loop {
        let now = done();
        if now >= target {
            return now;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > STALL {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- 1. the live stream ----------------------------------------------------------------------

/// What one SSE client saw.
#[derive(Default)]
struct Tally {
    /// Per change sequence number: how many times it arrived.
    seen: Vec<u8>,
    latencies_us: Vec<u64>,
    errors: Vec<String>,
}

impl Tally {
    fn block(&mut self, block: &[u8], received_us: i64) {
        const MARK: &[u8] = b"\"detail\":\"bt";
        if let Some(at) = find(block, MARK) {
            let rest = &block[at + MARK.len()..];
            let end = rest.iter().position(|b| *b == b'"').unwrap_or(rest.len());
            let text = std::str::from_utf8(&rest[..end]).unwrap_or_default();
            if let Some((seq, sent)) = text.split_once('@') {
                if let (Ok(seq), Ok(sent)) = (seq.parse::<usize>(), sent.parse::<i64>()) {
                    if self.seen.len() <= seq {
                        self.seen.resize(seq + 1, 0);
                    }
                    self.seen[seq] = self.seen[seq].saturating_add(1);
                    self.latencies_us.push((received_us - sent).max(0) as u64);
                }
            }
        } else if find(block, b"event: error").is_some() {
            self.errors
                .push(String::from_utf8_lossy(block).into_owned());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A client of `GET /v1/events` tallying bench ticks until `stop`.
async fn sse_client(
    http: reqwest::Client,
    url: String,
    received: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<Tally>, Error> {
    let mut response = http.get(url).bearer_auth(KEY).send().await?;
    if response.status() != 200 {
        return Err(format!("GET /v1/events answered {}", response.status()).into());
    }
    Ok(tokio::spawn(async move {
        let mut tally = Tally::default();
        let mut buffer: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            let chunk = tokio::select! {
                _ = stop.cancelled() => break,
                chunk = response.chunk() => chunk,
            };
            let Ok(Some(chunk)) = chunk else {
                tally.errors.push("stream ended".into());
                break;
            };
            let received_us = now_us();
            buffer.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(end) = find(&buffer[start..], b"\n\n") {
                let before = tally.latencies_us.len();
                tally.block(&buffer[start..start + end], received_us);
                received.fetch_add(tally.latencies_us.len() - before, Ordering::Relaxed);
                start += end + 2;
            }
            buffer.drain(..start);
        }
        tally
    }))
}

async fn stream(rate: f64, clients: usize, seconds: u64) -> Result<(), Error> {
    let prefix = format!("bench-events-{}", uuid::Uuid::new_v4().simple());
    let stop = CancellationToken::new();
    let (ingress_backends, broker) = backends(&prefix).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = start_ingress(&ingress_backends, listener, &stop).await?;

    // The writer has its own Redis connection, as a worker process would.
    let book = CallBook::new(Arc::new(
        RedisStore::connect(REDIS, &prefix, Duration::from_secs(5)).await?,
    ));
    let mut owned: Vec<Vec<Option<callfleet_core::calls::Held>>> =
        (0..WRITERS).map(|_| Vec::new()).collect();
    for i in 0..STREAM_CALLS {
        let call = outbound_call(i)?;
        book.create(&call).await?;
        let held = book
            .get_held(&call.id)
            .await?
            .ok_or("created call missing")?;
        owned[i % WRITERS].push(Some(held));
    }

    let http = reqwest::Client::builder().build()?;
    let received = Arc::new(AtomicUsize::new(0));
    let client_stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(
            sse_client(
                http.clone(),
                format!("{base}/v1/events"),
                received.clone(),
                client_stop.clone(),
            )
            .await?,
        );
    }
    // Let the calls' own creation events pass before the measured changes start.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let total = (rate * seconds as f64) as usize;
    let cpu = CpuProbe::start();
    let started = Instant::now();
    let mut writers = Vec::new();
    for (w, mut calls) in owned.into_iter().enumerate() {
        let book = book.clone();
        writers.push(tokio::spawn(async move {
            let mut failed = 0usize;
            for (k, seq) in (w..total).step_by(WRITERS).enumerate() {
                let due = started + Duration::from_secs_f64(seq as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let slot = k % calls.len();
                let Some(held) = calls[slot].take() else {
                    failed += 1;
                    continue;
                };
                let id = held.call.id.clone();
                let sent = now_us();
                let at = chrono::Utc::now();
                let detail = format!("bt{seq}@{sent}");
                let updated = book
                    .update_held(held, |c| c.note(at, "bench_tick", Some(detail.clone())))
                    .await;
                calls[slot] = match updated {
                    Ok(Some((held, ()))) => Some(held),
                    _ => {
                        failed += 1;
                        book.get_held(&id).await.ok().flatten()
                    }
                };
            }
            failed
        }));
    }
    let mut failed = 0;
    for w in writers {
        failed += w.await?;
    }
    let written = started.elapsed();
    let achieved = (total - failed) as f64 / written.as_secs_f64();
    let expected = (total - failed) * clients;
    let got = wait_for(expected, || received.load(Ordering::Relaxed)).await;
    let cpu = cpu.report();
    client_stop.cancel();
    let mut latencies = Vec::with_capacity(got);
    let (mut complete, mut missing, mut twice, mut lo, mut hi) = (0, 0, 0, usize::MAX, 0);
    let mut errors = Vec::new();
    for t in tasks {
        let tally = t.await?;
        let distinct = tally.seen.iter().filter(|n| **n > 0).count();
        twice += tally.seen.iter().filter(|n| **n > 1).count();
        missing += total - failed - distinct.min(total - failed);
        if distinct >= total - failed {
            complete += 1;
        }
        lo = lo.min(distinct);
        hi = hi.max(distinct);
        latencies.extend(tally.latencies_us);
        errors.extend(tally.errors);
    }
    latencies.sort_unstable();
    println!(
        "stream: {achieved:.0} changes/s written for {:.1} s ({} changes over {STREAM_CALLS} calls, {WRITERS} writers, {failed} failed writes), \
         {clients} SSE clients on one ingress: each got {lo}–{hi} of {} ({complete}/{clients} complete, {missing} missing in all, {twice} twice, {} error events); \
         change written → client parsed it: {}",
        written.as_secs_f64(),
        total - failed,
        total - failed,
        errors.len(),
        latency_line(&latencies),
    );
    println!("  {cpu}");
    if let Some(e) = errors.first() {
        println!("  first error event: {}", e.replace('\n', " | "));
    }
    stop.cancel();
    let _ = server.await;
    clean_up(&broker, &prefix).await?;
    Ok(())
}

// --- 2. callbacks ----------------------------------------------------------------------------

struct Received {
    webhook_id: String,
    at_us: i64,
    body: bytes::Bytes,
}

#[derive(Clone)]
struct ReceiverState {
    log: Arc<parking_lot::Mutex<Vec<Received>>>,
    count: Arc<AtomicUsize>,
    delay: Duration,
}

async fn hook(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> StatusCode {
    let at_us = now_us();
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    state.log.lock().push(Received {
        webhook_id,
        at_us,
        body,
    });
    state.count.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(state.delay).await;
    StatusCode::OK
}

/// A receiver answering 200 after `delay`; returns its URL and what it received.
async fn start_receiver(
    delay: Duration,
    stop: &CancellationToken,
) -> Result<(String, ReceiverState), Error> {
    let state = ReceiverState {
        log: Arc::default(),
        count: Arc::default(),
        delay,
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok((url, state))
}

/// The event time a callback carries (`data.at`), in epoch µs.
fn event_at_us(body: &[u8]) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let at = value.get("data")?.get("at")?.as_str()?;
    Some(
        chrono::DateTime::parse_from_rfc3339(at)
            .ok()?
            .timestamp_micros(),
    )
}

async fn callbacks_run(
    seconds: u64,
    rate: f64,
    concurrency: usize,
    per_receiver: usize,
) -> Result<(), Error> {
    let prefix = format!("bench-callbacks-{}", uuid::Uuid::new_v4().simple());
    let stop = CancellationToken::new();
    let (bench, broker) = backends(&prefix).await?;
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse()?).await?;
    let (url, receiver) = start_receiver(Duration::from_millis(20), &stop).await?;
    bench
        .subscriptions
        .put(&subscription("bench", &url))
        .await?;
    let settings = worker_settings(CallbackSettings {
        allow_private: true,
        concurrency,
        per_receiver,
        ..CallbackSettings::default()
    });
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        workers.push(spawn_worker(&prefix, &emulator.url(), &settings, &stop).await?);
    }
    // Let a dispatcher take the lead and read its starting point before events come.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let book = CallBook::new(Arc::clone(&bench.store));
    let calls = ((rate / 2.0) * seconds as f64) as usize;
    let counters_before = counters();
    let cpu = CpuProbe::start();
    let started = Instant::now();
    let started_us = now_us();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let book = book.clone();
        writers.push(tokio::spawn(async move {
            let mut events = 0usize;
            for i in (w..calls).step_by(WRITERS) {
                let due = started + Duration::from_secs_f64(i as f64 * 2.0 / rate);
                tokio::time::sleep_until(due.into()).await;
                let Ok(call) = outbound_call(i) else { continue };
                // Accepted: `call.queued`.
                if !matches!(book.create(&call).await, Ok(Some(_))) {
                    continue;
                }
                events += 1;
                let at = chrono::Utc::now();
                // Over: `call.completed`.
                let done = book
                    .update(&call.id, |c| c.advance(CallStatus::Completed, at))
                    .await;
                if matches!(done, Ok(Some((_, true)))) {
                    events += 1;
                }
            }
            events
        }));
    }
    let mut expected = 0;
    for w in writers {
        expected += w.await?;
    }
    let produced = started.elapsed();
    let delivered_while_producing = receiver.count.load(Ordering::Relaxed);
    let count = receiver.count.clone();
    wait_for(expected, || count.load(Ordering::Relaxed)).await;
    let cpu = cpu.report();
    let census = broker.census().await.unwrap_or_default();
    let counted = grown(&counters_before, "callbacks");
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    let log = std::mem::take(&mut *receiver.log.lock());
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut latencies = Vec::with_capacity(log.len());
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for r in &log {
        *ids.entry(r.webhook_id.as_str()).or_default() += 1;
        first = first.min(r.at_us);
        last = last.max(r.at_us);
        if let Some(at) = event_at_us(&r.body) {
            latencies.push((r.at_us - at).max(0) as u64);
        }
    }
    latencies.sort_unstable();
    let distinct = ids.len();
    let twice = ids.values().filter(|n| **n > 1).count();
    let span = (last - first).max(1) as f64 / 1e6;
    let until_last = (last - started_us).max(1) as f64 / 1e6;
    println!(
        "callbacks concurrency={concurrency} per_receiver={per_receiver} ({WORKERS} workers, receiver 200 after 20 ms): \
         offered {:.0} events/s for {:.1} s → {expected} callbacks; delivered {distinct} distinct ({twice} twice, {} missing), \
         {:.0}/s sustained (first→last delivery {span:.1} s; {:.0}/s from the first event; {delivered_while_producing} by the end of production); \
         event → receiver {}",
        expected as f64 / produced.as_secs_f64(),
        produced.as_secs_f64(),
        expected.saturating_sub(distinct),
        distinct as f64 / span,
        distinct as f64 / until_last,
        latency_line(&latencies),
    );
    println!("  {cpu}");
    println!("  fleet counters: {counted}");
    let left: Vec<String> = census
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(q, n)| format!("{q}={n}"))
        .collect();
    println!("  left in the broker: {}", left.join(", "));
    emulator.shutdown().await;
    clean_up(&broker, &prefix).await?;
    Ok(())
}

// --- 3. isolation ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Receiver {
    None,
    /// A closed local port: every attempt is refused at once.
    Down,
    /// Accepts connections and never answers: every attempt waits for its timeout.
    Hanging,
}

impl Receiver {
    fn name(self) -> &'static str {
        match self {
            Receiver::None => "no subscription",
            Receiver::Down => "subscription to a DOWN receiver (closed port)",
            Receiver::Hanging => "subscription to a HANGING receiver (accepts, never answers)",
        }
    }
}

/// A listener that accepts connections and holds them without a word, until `stop`.
async fn hanging_receiver(stop: &CancellationToken) -> Result<String, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => {
                    if let Ok((socket, _)) = accepted {
                        held.push(socket);
                    }
                }
            }
        }
    });
    Ok(url)
}

/// Final statuses and when they were reached, by call id, from the event log.
type Finals = Arc<parking_lot::Mutex<HashMap<String, (CallStatus, i64)>>>;

fn tail_finals(backends: &Backends, stop: &CancellationToken) -> Finals {
    let finals: Finals = Arc::default();
    let (log, sink, stop) = (Arc::clone(&backends.events), finals.clone(), stop.clone());
    tokio::spawn(async move {
        let mut after: Option<EventId> = None;
        loop {
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                read = log.read(after, 1_000, Some(Duration::from_millis(500))) => read,
            };
            let Ok(events) = read else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            for logged in events {
                after = Some(logged.id);
                let Ok(event) = serde_json::from_slice::<CallEvent>(&logged.data) else {
                    continue;
                };
                if event.status.is_terminal() {
                    sink.lock()
                        .entry(event.call_id)
                        .or_insert((event.status, event.at.timestamp_micros()));
                }
            }
        }
    });
    finals
}

struct IsolationResult {
    submitted: usize,
    completed_per_s: f64,
    summary: String,
}

async fn isolation_run(
    seconds: u64,
    rate: f64,
    receiver: Receiver,
) -> Result<IsolationResult, Error> {
    let prefix = format!("bench-isolation-{}", uuid::Uuid::new_v4().simple());
    let stop = CancellationToken::new();
    let (ingress_backends, broker) = backends(&prefix).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let emulator = Emulator::start(
        EmulatorConfig {
            webhook_urls: vec![format!("{base}/v1/livekit/webhook")],
            outbound_trunks: vec![TRUNK.into()],
            default_script: CallScript {
                outcome: Outcome::Answer,
                ring_ms: 0,
                talk_ms: Some(0),
                sip_status: None,
            },
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let server = start_ingress(&ingress_backends, listener, &stop).await?;
    let receiver_url = match receiver {
        Receiver::None => None,
        Receiver::Down => {
            let closed = std::net::TcpListener::bind("127.0.0.1:0")?;
            let url = format!("http://{}/hook", closed.local_addr()?);
            drop(closed);
            Some(url)
        }
        Receiver::Hanging => Some(hanging_receiver(&stop).await?),
    };
    if let Some(url) = &receiver_url {
        ingress_backends
            .subscriptions
            .put(&subscription("down", url))
            .await?;
    }
    let settings = worker_settings(CallbackSettings {
        allow_private: true,
        ..CallbackSettings::default()
    });
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        workers.push(spawn_worker(&prefix, &emulator.url(), &settings, &stop).await?);
    }
    let (watcher, _) = backends(&prefix).await?;
    let finals = tail_finals(&watcher, &stop);
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let total = (rate * seconds as f64) as usize;
    let counters_before = counters();
    let cpu = CpuProbe::start();
    let started = Instant::now();
    let started_us = now_us();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let http = http.clone();
        let url = format!("{base}/v1/calls");
        tasks.push(tokio::spawn(async move {
            let sent = now_us();
            let response = http
                .post(url)
                .bearer_auth(KEY)
                .json(&serde_json::json!({"to": format!("+1510555{:04}", i % 10_000)}))
                .send()
                .await
                .ok()?;
            if response.status() != 202 {
                return None;
            }
            let body: serde_json::Value = response.json().await.ok()?;
            Some((body["id"].as_str()?.to_owned(), sent))
        }));
    }
    let mut submitted = HashMap::with_capacity(total);
    for t in tasks {
        if let Some((id, sent)) = t.await? {
            submitted.insert(id, sent);
        }
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    let ours = {
        let submitted = &submitted;
        let finals = finals.clone();
        move || {
            let finals = finals.lock();
            submitted
                .keys()
                .filter(|id| finals.contains_key(*id))
                .count()
        }
    };
    wait_for(submitted.len(), ours).await;
    let cpu = cpu.report();
    let mut by_status: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut last = started_us;
    {
        let finals = finals.lock();
        for (id, sent) in &submitted {
            if let Some((status, at)) = finals.get(id) {
                *by_status.entry(status.as_str()).or_default() += 1;
                latencies.push((at - sent).max(0) as u64);
                last = last.max(*at);
            }
        }
    }
    latencies.sort_unstable();
    let finished = latencies.len();
    let completed_per_s = finished as f64 / ((last - started_us) as f64 / 1e6);
    // What the callbacks left behind once the calls are done (a few seconds on).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let census = broker.census().await.unwrap_or_default();
    let counted = grown(&counters_before, "callbacks");
    let statuses: Vec<String> = by_status.iter().map(|(s, n)| format!("{s} {n}")).collect();
    let left: Vec<String> = census
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(q, n)| format!("{q}={n}"))
        .collect();
    let summary = format!(
        "{}: {offered:.0} calls/s offered, {} accepted, {finished} final ({}), {} not final; \
         {completed_per_s:.0} calls final/s (first submit → last final); accepted → final {}\n  {cpu}\n  \
         fleet counters: {}\n  left in the broker afterwards: {}",
        receiver.name(),
        submitted.len(),
        statuses.join(", "),
        submitted.len() - finished,
        latency_line(&latencies),
        if counted.is_empty() { "none".into() } else { counted },
        if left.is_empty() { "nothing".into() } else { left.join(", ") },
    );
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    let _ = server.await;
    emulator.shutdown().await;
    clean_up(&broker, &prefix).await?;
    Ok(IsolationResult {
        submitted: submitted.len(),
        completed_per_s,
        summary,
    })
}

async fn isolation(seconds: u64, rate: f64) -> Result<(), Error> {
    let mut baseline = None;
    for receiver in [Receiver::None, Receiver::Down, Receiver::Hanging] {
        let result = isolation_run(seconds, rate, receiver).await?;
        println!("isolation, {}", result.summary);
        match baseline {
            None => baseline = Some(result.completed_per_s),
            Some(base) => println!(
                "  → {:.2} of the no-subscription rate ({} calls)",
                result.completed_per_s / base,
                result.submitted
            ),
        }
    }
    Ok(())
}

// --- main ------------------------------------------------------------------------------------

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    install_counters();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("stream") => {
            stream(arg(&args, 1, 1_000.0), arg(&args, 2, 50), arg(&args, 3, 10)).await
        }
        Some("callbacks") => {
            let seconds = arg(&args, 1, 10);
            let rate = arg(&args, 2, 1_000.0);
            let configs = args
                .get(3)
                .cloned()
                .unwrap_or_else(|| "64/8,64/64,256/8,256/64".into());
            for config in configs.split(',') {
                let (c, p) = config
                    .split_once('/')
                    .ok_or("configs are concurrency/per_receiver, comma-separated")?;
                callbacks_run(seconds, rate, c.trim().parse()?, p.trim().parse()?).await?;
            }
            Ok(())
        }
        Some("isolation") => isolation(arg(&args, 1, 10), arg(&args, 2, 200.0)).await,
        _ => Err(
            "usage: events_bench stream [changes_per_s] [clients] [seconds] | \
                  callbacks [seconds] [events_per_s] [c/p,…] | isolation [seconds] [calls_per_s]"
                .into(),
        ),
    }
}
