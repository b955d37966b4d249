//! The composition root: how the fleet's parts are put together from adapters and settings.
//! The binary's subcommands, dev mode and the integration tests all build the fleet here,
//! so what the tests run is wired exactly as what ships.

use std::sync::Arc;
use std::time::Duration;

use callfleet_core::adapters::Backends;
use callfleet_core::calls::{CallBook, Clock};
use callfleet_core::config::WorkerConfig;
use callfleet_core::domain::request::CallDefaults;
use callfleet_core::domain::subscription::SigningSecret;
use callfleet_core::lifecycle::Readiness;
use callfleet_core::ports::LiveKit;
use callfleet_core::routing::RoutingCache;
use callfleet_ingress::events::EventHub;
use callfleet_ingress::IngressState;
use callfleet_workers::{
    CallDeps, CallbackHandler, CallbackSettings, ControlHandler, Dispatcher, Inbound,
    InboundSettings, OutboundCallHandler, OutboundSettings, SweepSettings, Sweeper,
    WebhookEventHandler, WorkerRuntime,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

/// How long a readiness probe waits for the broker and the store.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// `/readyz` for a process on these backends.
pub fn readiness(backends: &Backends) -> Readiness {
    Readiness {
        broker: Arc::clone(&backends.broker),
        store: Arc::clone(&backends.store),
        timeout: READINESS_TIMEOUT,
    }
}

/// The routing table this process holds, loaded from the backends' routing store and
/// kept current until `stop` (every instance sees a change within a second).
pub async fn routing(
    backends: &Backends,
    default_profile: Option<String>,
    stop: CancellationToken,
) -> Result<Arc<RoutingCache>, callfleet_core::ports::StoreError> {
    let cache = RoutingCache::load(Arc::clone(&backends.routing), default_profile).await?;
    cache.spawn_refresher(callfleet_core::routing::REFRESH_EVERY, stop);
    Ok(cache)
}

/// What the ingress is configured with.
pub struct IngressSettings {
    pub max_body_bytes: usize,
    /// Bearer keys of the call API.
    pub api_keys: Vec<SecretString>,
    /// LiveKit API keys whose signatures webhooks may carry.
    pub webhook_keys: Vec<(String, SecretString)>,
    pub defaults: CallDefaults,
    /// API keys that see phone numbers in full on the live stream.
    pub number_keys: Vec<SecretString>,
    pub stream: StreamSettings,
    pub callbacks: CallbackPolicy,
}

pub use callfleet_ingress::CallbackPolicy;

/// Creates or replaces the subscriptions configuration lists (`CALLFLEET_SUBSCRIPTIONS`).
pub async fn configured_subscriptions(
    backends: &Backends,
    config: &callfleet_core::config::CallbackConfig,
) -> Result<usize, SubscriptionsConfigError> {
    let Some(json) = config
        .subscriptions
        .as_deref()
        .filter(|j| !j.trim().is_empty())
    else {
        return Ok(0);
    };
    let inputs: Vec<serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| SubscriptionsConfigError(format!("not a JSON array: {e}")))?;
    let now = chrono::Utc::now();
    let mut count = 0;
    for (i, mut value) in inputs.into_iter().enumerate() {
        let id = value
            .as_object_mut()
            .and_then(|o| o.remove("id"))
            .and_then(|id| id.as_str().map(str::to_owned))
            .ok_or_else(|| SubscriptionsConfigError(format!("[{i}].id: is required")))?;
        // A secret made up here would be shown to no one (and differ per instance).
        if value.get("secret").is_none_or(serde_json::Value::is_null) {
            return Err(SubscriptionsConfigError(format!(
                "[{i}].secret: is required here (whsec_…, the receiver's verifying secret)"
            )));
        }
        let input: callfleet_core::domain::subscription::SubscriptionInput =
            serde_json::from_value(value)
                .map_err(|e| SubscriptionsConfigError(format!("[{i}]: {e}")))?;
        let existing = backends
            .subscriptions
            .get(&id)
            .await
            .map_err(|e| SubscriptionsConfigError(e.to_string()))?;
        let sub = input
            .validate(Some(&id), existing.as_ref(), now)
            .map_err(|errors| {
                let text: Vec<String> = errors.iter().map(|e| format!("[{i}].{e}")).collect();
                SubscriptionsConfigError(text.join("; "))
            })?;
        callfleet_core::callback::check_callback_url(&sub.url, config.callbacks_allow_private)
            .await
            .map_err(|e| SubscriptionsConfigError(format!("[{i}].url: {e}")))?;
        backends
            .subscriptions
            .put(&sub)
            .await
            .map_err(|e| SubscriptionsConfigError(e.to_string()))?;
        count += 1;
    }
    Ok(count)
}

/// A subscription in `CALLFLEET_SUBSCRIPTIONS` that is wrong.
#[derive(Debug, thiserror::Error)]
#[error("CALLFLEET_SUBSCRIPTIONS: {0}")]
pub struct SubscriptionsConfigError(String);

/// The live stream's bounds.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Events a client may fall behind before it is disconnected.
    pub buffer: usize,
    /// Keep-alive comment interval on an idle stream.
    pub heartbeat: Duration,
    /// Clients served at once.
    pub max_clients: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            buffer: 4_096,
            heartbeat: Duration::from_secs(15),
            max_clients: 1_000,
        }
    }
}

/// The ingress's state (serve it with `callfleet_ingress::app`). `stop` ends its live
/// streams (they would otherwise hold a graceful shutdown open for its whole drain time).
pub fn ingress(
    backends: &Backends,
    routing: Arc<RoutingCache>,
    clock: Arc<dyn Clock>,
    settings: IngressSettings,
    stop: CancellationToken,
) -> IngressState {
    IngressState {
        routing,
        readiness: readiness(backends),
        max_body_bytes: settings.max_body_bytes,
        broker: Arc::clone(&backends.broker),
        calls: CallBook::new(Arc::clone(&backends.store)),
        api_keys: Arc::new(settings.api_keys),
        webhook_keys: Arc::new(settings.webhook_keys),
        defaults: settings.defaults,
        clock,
        events: EventHub::start(
            Arc::clone(&backends.events),
            settings.stream.buffer,
            settings.stream.heartbeat,
            settings.stream.max_clients,
            stop,
        ),
        number_keys: Arc::new(settings.number_keys),
        subscriptions: Arc::clone(&backends.subscriptions),
        callbacks: settings.callbacks,
    }
}

/// What a worker process is configured with.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub outbound: OutboundSettings,
    pub inbound: InboundSettings,
    pub sweep: SweepSettings,
    pub prefetch: u16,
    pub concurrency: usize,
    /// Broker-delayed retries of a job before it is dead-lettered.
    pub max_job_attempts: u32,
    pub callbacks: CallbackSettings,
}

impl WorkerSettings {
    /// From the worker's configuration; `livekit_timeout` is the LiveKit client's
    /// per-request timeout (a request that timed out may still be running in LiveKit for
    /// about as long again).
    pub fn from_config(worker: &WorkerConfig, livekit_timeout: Duration) -> Self {
        Self {
            outbound: OutboundSettings {
                default_agent: worker.default_agent.clone(),
                trunk_max_concurrent: worker.trunk_max_concurrent,
                trunk_cps: worker.trunk_cps,
                lease_ttl: Duration::from_secs(worker.lease_ttl_s),
                livekit_settle: livekit_timeout + Duration::from_secs(5),
                dial_evidence_grace: Duration::from_secs(worker.dial_evidence_grace_s.max(1)),
                ..OutboundSettings::default()
            },
            inbound: InboundSettings {
                unrouted: worker.unrouted,
                delete_room_after: worker.inbound_delete_room,
                ..InboundSettings::default()
            },
            sweep: SweepSettings {
                every: Duration::from_secs(worker.sweep_interval_s.max(1)),
                quiet: Duration::from_secs(worker.sweep_after_s.max(1)),
                ..SweepSettings::default()
            },
            prefetch: worker.prefetch,
            concurrency: worker.concurrency,
            max_job_attempts: worker.max_job_attempts,
            callbacks: CallbackSettings::default(),
        }
    }

    /// With callbacks delivered as `config` says.
    pub fn with_callbacks(
        mut self,
        config: &callfleet_core::config::CallbackConfig,
    ) -> Result<Self, callfleet_core::config::ConfigError> {
        config.validate()?;
        self.callbacks = CallbackSettings {
            schedule: config.schedule()?,
            timeout: Duration::from_secs(config.callback_timeout_s),
            allow_private: config.callbacks_allow_private,
            default_secrets: config
                .secrets()
                .iter()
                .filter_map(|s| SigningSecret::parse(s).ok())
                .collect(),
            concurrency: config.callback_concurrency,
            per_receiver: config.callback_per_receiver,
        };
        Ok(self)
    }
}

/// A worker: the runtime serving the job handlers, the sweeper beside it, and the
/// callbacks (their own runtime, so receivers never take the call jobs' slots, and the
/// dispatcher that queues them while this worker leads).
pub struct Worker {
    pub runtime: WorkerRuntime,
    pub sweeper: Sweeper,
    pub callbacks: WorkerRuntime,
    pub dispatcher: Dispatcher,
}

impl Worker {
    /// Runs everything until `stop`, then drains in-flight jobs for at most `deadline`.
    pub async fn run(
        self,
        stop: CancellationToken,
        deadline: Duration,
    ) -> Result<(), callfleet_core::ports::BrokerError> {
        let sweeping = tokio::spawn(self.sweeper.run(stop.clone()));
        let dispatching = tokio::spawn(self.dispatcher.run(stop.clone()));
        let delivering = tokio::spawn(self.callbacks.run(stop.clone(), deadline));
        let result = self.runtime.run(stop, deadline).await;
        let _ = sweeping.await;
        let _ = dispatching.await;
        if let Ok(Err(e)) = delivering.await {
            return Err(e);
        }
        result
    }
}

/// A worker on `backends`, talking to LiveKit through `livekit`.
pub fn worker(
    backends: &Backends,
    routing: Arc<RoutingCache>,
    livekit: Arc<dyn LiveKit>,
    clock: Arc<dyn Clock>,
    settings: &WorkerSettings,
) -> Result<Worker, reqwest::Error> {
    let deps = CallDeps {
        calls: CallBook::new(Arc::clone(&backends.store)),
        broker: Arc::clone(&backends.broker),
        livekit,
        clock,
        settings: settings.outbound.clone(),
    };
    let inbound = Arc::new(Inbound::new(
        deps.clone(),
        routing,
        settings.inbound.clone(),
    ));
    let runtime = WorkerRuntime::new(
        Arc::clone(&backends.broker),
        settings.prefetch,
        settings.concurrency,
        settings.max_job_attempts,
    )
    .with_delivery_limit(backends.delivery_limit)
    .with_handler(Arc::new(
        OutboundCallHandler::new(deps.clone()).with_inbound(Arc::clone(&inbound)),
    ))
    .with_handler(Arc::new(
        WebhookEventHandler::new(deps.clone()).with_inbound(inbound),
    ))
    .with_handler(Arc::new(ControlHandler::new(deps.clone())));
    let delivery = CallbackHandler::new(
        Arc::clone(&backends.store),
        Arc::clone(&backends.subscriptions),
        Arc::clone(&backends.broker),
        Arc::clone(&deps.clock),
        settings.callbacks.clone(),
    )?;
    let callbacks = WorkerRuntime::new(
        Arc::clone(&backends.broker),
        settings.callbacks.concurrency.min(u16::MAX as usize) as u16,
        settings.callbacks.concurrency,
        settings.max_job_attempts,
    )
    .with_delivery_limit(backends.delivery_limit)
    .with_handler(Arc::new(delivery));
    let dispatcher = Dispatcher {
        events: Arc::clone(&backends.events),
        store: Arc::clone(&backends.store),
        subscriptions: Arc::clone(&backends.subscriptions),
        broker: Arc::clone(&backends.broker),
    };
    Ok(Worker {
        runtime,
        sweeper: Sweeper::new(deps, settings.sweep.clone()),
        callbacks,
        dispatcher,
    })
}

/// How long a client may take to send a request's headers, which is also how long a
/// kept-alive connection may sit idle, before the connection is closed.
pub const HEADER_READ_TIMEOUT: std::time::Duration = Duration::from_secs(10);
/// How long a request's body may take to arrive (a body shorter than its Content-Length
/// would otherwise hold the request open for ever).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// How long in-flight requests get to finish once the server is told to stop.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop`, with bounded header, idle and body times (which
/// `axum::serve` does not bound), then lets in-flight requests finish for a while.
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router, stop: CancellationToken) {
    let service = tower::ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_READ_TIMEOUT,
        ))
        .service(app);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let hyper_service = hyper_util::service::TowerToHyperService::new(service.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), hyper_service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain time; closing them");
    }
}
