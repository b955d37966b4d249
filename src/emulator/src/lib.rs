//! A LiveKit server API emulator: what every callfleet test, benchmark and dev run talks to.
//!
//! It speaks LiveKit's wire protocol (Twirp over HTTP, protobuf or JSON bodies, HS256 JWT
//! auth with per-method grants), keeps rooms, participants and agent dispatches, plays out
//! scripted SIP call outcomes, sends signed webhooks exactly as LiveKit does, honours the
//! `X-Lk-Mock` control header of LiveKit's own SDK test server, injects faults, and records
//! every request and webhook so tests can assert exactly-once behaviour. The product talks
//! to it with the unmodified `livekit-api` client; nothing in the product knows it exists.

mod agents;
mod control;
mod faults;
mod ids;
mod sip;
mod sip_admin;
mod state;
mod twirp;
mod unpopulated;
mod unpopulated_table;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use agents::{DispatchRecord, DispatchSource, JobState};
pub use faults::{Faults, MethodFault, WebhookFaults};
pub use sip::{CallScript, HangupError, InboundStatus, Outcome};
pub use state::{ApiRecord, RequestOutcome, WebhookRecord};

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// API key → secret pairs accepted on the API; the first signs webhooks.
    pub keys: Vec<(String, String)>,
    /// Where webhooks are posted (every event to every URL).
    pub webhook_urls: Vec<String>,
    /// Delay between webhook delivery retries, doubling each time (LiveKit: 1 s).
    pub webhook_retry_base: Duration,
    /// Delivery attempts per webhook (LiveKit: 5).
    pub webhook_attempts: u32,
    /// How long an event may wait in a room's queue before it is dropped (LiveKit: 30 s).
    pub webhook_max_age: Duration,
    /// Seconds an empty room lives when CreateRoom does not say (LiveKit: 300).
    pub default_empty_timeout: u32,
    /// What an unscripted outbound dial does.
    pub default_script: CallScript,
    /// Whether requests are recorded (on by default; benchmarks measure with it on).
    pub record: bool,
    /// Outbound trunk ids that exist from the start (CreateSIPParticipant refuses a trunk
    /// id that does not exist, as LiveKit does): the ids tests and dev mode dial through.
    pub outbound_trunks: Vec<String>,
    /// How long an agent worker takes to join a dispatched room, unless set per agent name
    /// (`None`: no worker ever joins).
    pub agent_join_after: Option<Duration>,
    /// How long an inbound caller stays before hanging up when the request does not say
    /// (`hangup_after_ms`); `None`: until removed. Dev mode sets it so a call ends alone.
    pub inbound_hangup_after: Option<Duration>,
    /// Listeners started by [`Emulator::start`], one per region (`region-0` is the one
    /// asked for, the others on ports the OS picks), as LiveKit's SDK test server runs.
    pub regions: u8,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            keys: vec![("devkey".into(), "secret".into())],
            webhook_urls: Vec::new(),
            webhook_retry_base: Duration::from_secs(1),
            webhook_attempts: 5,
            webhook_max_age: Duration::from_secs(30),
            default_empty_timeout: 300,
            default_script: CallScript::default(),
            record: true,
            outbound_trunks: Vec::new(),
            agent_join_after: Some(Duration::from_millis(300)),
            inbound_hangup_after: None,
            regions: 1,
        }
    }
}

/// Shared handle on the emulator's state.
#[derive(Clone)]
pub struct Emulator {
    pub(crate) inner: Arc<state::Inner>,
}

/// A running emulator.
pub struct RunningEmulator {
    /// The primary listener (`region-0`).
    pub addr: SocketAddr,
    /// Every region's listener, `region-0` first.
    pub region_addrs: Vec<SocketAddr>,
    pub emulator: Emulator,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningEmulator {
    /// `http://<addr>`, the URL to give `livekit-api` clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://<addr>` of every region, `region-0` first.
    pub fn region_urls(&self) -> Vec<String> {
        self.region_addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect()
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Self {
        Self {
            inner: state::Inner::new(config),
        }
    }

    /// The HTTP app: Twirp API, `/settings/regions`, and the `/emulator/v1` control API.
    pub fn router(&self) -> Router {
        self.region_router(0)
    }

    /// The app of region `region`'s listener: the same emulator answering as `region-N`.
    pub fn region_router(&self, region: usize) -> Router {
        Router::new()
            .merge(twirp::router(self.clone(), region))
            .nest("/emulator/v1", control::router(self.clone()))
    }

    /// Serves on `listener` until `stop` is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let app = self.router();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    }

    /// Binds `addr` (port 0 for any) and serves in the background; with `regions` > 1 also
    /// one listener per extra region on the same host.
    pub async fn start(
        config: EmulatorConfig,
        addr: SocketAddr,
    ) -> std::io::Result<RunningEmulator> {
        let mut listeners = vec![TcpListener::bind(addr).await?];
        for _ in 1..config.regions.max(1) {
            listeners.push(TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?);
        }
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()?;
        let emulator = Emulator::new(config);
        emulator
            .inner
            .set_region_urls(addrs.iter().map(|a| format!("http://{a}")).collect());
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for (region, listener) in listeners.into_iter().enumerate() {
            let app = emulator.region_router(region);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, region, "emulator server failed");
                }
            }));
        }
        Ok(RunningEmulator {
            addr: addrs[0],
            region_addrs: addrs,
            emulator,
            stop,
            tasks,
        })
    }

    /// Every API request served so far, oldest first.
    pub fn requests(&self) -> Vec<ApiRecord> {
        self.inner.records.lock().requests.clone()
    }

    /// Requests of one method (`CreateSIPParticipant`, ...).
    pub fn requests_of(&self, method: &str) -> Vec<ApiRecord> {
        self.inner
            .records
            .lock()
            .requests
            .iter()
            .filter(|r| r.method == method)
            .cloned()
            .collect()
    }

    /// Every webhook delivery so far.
    pub fn webhooks(&self) -> Vec<WebhookRecord> {
        self.inner.records.lock().webhooks.clone()
    }

    /// Scripts what a dial to `number` does.
    pub fn script(&self, number: &str, script: CallScript) {
        self.inner.scripts.lock().insert(number.to_owned(), script);
    }

    /// Replaces the global fault settings.
    pub fn set_faults(&self, faults: Faults) {
        *self.inner.faults.lock() = faults;
        self.inner.faults_changed.notify_waiters();
    }

    /// Adds a webhook URL at run time; returns false if it was already there (each URL
    /// gets every event once).
    pub fn add_webhook_url(&self, url: &str) -> bool {
        let mut urls = self.inner.webhook_urls.lock();
        if urls.iter().any(|u| u == url) {
            return false;
        }
        urls.push(url.to_owned());
        true
    }

    /// The webhook URLs events go to.
    pub fn webhook_urls(&self) -> Vec<String> {
        self.inner.webhook_urls.lock().clone()
    }

    /// Simulates a PSTN call arriving on a trunk.
    pub async fn inbound_call(&self, call: sip::InboundCall) -> sip::InboundCallResult {
        sip::inbound_call(self, call).await
    }

    /// Clears rooms, records, scripts and faults, and forgets webhook URLs added at run time
    /// (the configured ones stay).
    pub fn reset(&self) {
        self.inner.reset();
    }
}

pub use sip::{InboundCall, InboundCallResult};
