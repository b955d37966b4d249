//! A LiveKit server API emulator: what every callfleet test, benchmark and dev run talks to.
//!
//! It speaks LiveKit's wire protocol (Twirp over HTTP, protobuf or JSON bodies, HS256 JWT
//! auth with per-method grants), keeps rooms, participants and agent dispatches, plays out
//! scripted SIP call outcomes, sends signed webhooks exactly as LiveKit does, honours the
//! `X-Lk-Mock` control header of LiveKit's own SDK test server, injects faults, and records
//! every request and webhook so tests can assert exactly-once behaviour. The product talks
//! to it with the unmodified `livekit-api` client; nothing in the product knows it exists.

mod control;
mod faults;
mod ids;
mod sip;
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

pub use faults::{Faults, MethodFault, WebhookFaults};
pub use sip::{CallScript, Outcome};
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
    pub addr: SocketAddr,
    pub emulator: Emulator,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningEmulator {
    /// `http://<addr>`, the URL to give `livekit-api` clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
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
        Router::new()
            .merge(twirp::router(self.clone()))
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

    /// Binds `addr` (port 0 for any) and serves in the background.
    pub async fn start(
        config: EmulatorConfig,
        addr: SocketAddr,
    ) -> std::io::Result<RunningEmulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let emulator = Emulator::new(config);
        emulator.inner.set_self_url(format!("http://{addr}"));
        let stop = CancellationToken::new();
        let serve = emulator.clone().serve(listener, stop.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "emulator server failed");
            }
        });
        Ok(RunningEmulator {
            addr,
            emulator,
            stop,
            task,
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
