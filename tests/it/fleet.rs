//! A whole fleet in the test process, built by the binary's own composition root
//! (`callfleet::fleet`): the ingress on a real port, workers with the real handlers, and the LiveKit emulator posting signed webhooks to the ingress.
//! Backends are in-memory or RabbitMQ + Redis on a fresh prefix.

use std::sync::Arc;
use std::time::Duration;

use callfleet::fleet::{self, IngressSettings, WorkerSettings};
use callfleet_core::adapters::{Backends, LiveKitApi};
use callfleet_core::adapters::{MemoryRouting, MemoryStore};
use callfleet_core::adapters::{MemorySubscriptions, RedisStore};
use callfleet_core::calls::ShiftedClock;
use callfleet_core::domain::phone::parse_region;
use callfleet_core::domain::request::CallDefaults;
use callfleet_core::domain::subscription::SigningSecret;
use callfleet_core::ports::SubscriptionStore;
use callfleet_core::ports::{Broker, EventLog, RoutingStore, Store};
use callfleet_core::routing::RoutingCache;
use callfleet_workers::{CallbackSettings, InboundSettings, OutboundSettings, SweepSettings};
use livekit_emulator::{ApiRecord, Emulator, EmulatorConfig, RunningEmulator};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    eventually, memory_broker, rabbit_broker, redis_events_at, redis_routing_at, redis_store_at,
    CleanOnDrop, FlakyBroker, FlakyStore, Outage,
};

pub const API_KEY: &str = "test-key";
/// A key of the call API that may not see phone numbers in full on the stream.
pub const VIEWER_KEY: &str = "viewer-key";
pub const TRUNK: &str = "ST_test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    Memory,
    RabbitRedis,
}

pub struct FleetOptions {
    pub backing: Backing,
    pub settings: OutboundSettings,
    /// Worker runtimes (each a separate consumer, as separate processes would be).
    pub workers: usize,
    pub emulator: EmulatorConfig,
    /// Replaces the broker (a broker that is down).
    pub broker: Option<Arc<dyn Broker>>,
    /// Broker-delayed retries of a job before it is dead-lettered.
    pub max_job_attempts: u32,
    /// Outages the test switches on and off (store operations, publishes).
    pub outage: Option<Arc<Outage>>,
    /// The sweeper each worker runs (a long interval keeps it out of tests that do not
    /// look at it).
    pub sweep: SweepSettings,
    pub inbound: InboundSettings,
    /// The LiveKit client's per-request timeout.
    pub livekit_timeout: Duration,
    /// The profile inbound calls fall back to last.
    pub default_profile: Option<String>,
    /// How workers deliver callbacks (and what the ingress checks callback URLs against).
    pub callbacks: CallbackSettings,
    /// Events a stream client may fall behind before it is dropped.
    pub stream_buffer: usize,
}

/// The fleet's signing secret in tests (for calls' own callback URLs).
pub const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Callbacks as tests want them: a local receiver allowed, retries within seconds.
pub fn test_callbacks() -> CallbackSettings {
    CallbackSettings {
        schedule: vec![Duration::from_millis(300); 3],
        timeout: Duration::from_secs(2),
        allow_private: true,
        default_secrets: SigningSecret::parse(SIGNING_SECRET).into_iter().collect(),
        ..CallbackSettings::default()
    }
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            backing: Backing::Memory,
            settings: OutboundSettings {
                default_agent: "test-agent".into(),
                trunk_max_concurrent: 100,
                trunk_cps: 1_000.0,
                ..OutboundSettings::default()
            },
            workers: 1,
            emulator: EmulatorConfig {
                webhook_retry_base: Duration::from_millis(50),
                outbound_trunks: vec![TRUNK.into()],
                ..EmulatorConfig::default()
            },
            broker: None,
            max_job_attempts: 5,
            outage: None,
            sweep: SweepSettings {
                every: Duration::from_secs(3_600),
                ..SweepSettings::default()
            },
            inbound: InboundSettings::default(),
            livekit_timeout: Duration::from_secs(10),
            default_profile: None,
            callbacks: test_callbacks(),
            stream_buffer: 4_096,
        }
    }
}

pub struct TestFleet {
    pub base: String,
    pub http: reqwest::Client,
    pub emulator: Emulator,
    pub broker: Arc<dyn Broker>,
    backends: Backends,
    pub clock: Arc<ShiftedClock>,
    pub prefix: Option<String>,
    running: Option<RunningEmulator>,
    livekit: Arc<LiveKitApi>,
    settings: OutboundSettings,
    max_job_attempts: u32,
    sweep: SweepSettings,
    inbound: InboundSettings,
    default_profile: Option<String>,
    callbacks: CallbackSettings,
    /// The ingress's routing table (each worker holds its own, as processes would).
    pub routing: Arc<RoutingCache>,
    /// Each worker's routing table, in start order.
    pub worker_routing: Vec<Arc<RoutingCache>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Deletes the fleet's queues and keys when the fleet goes, failed test or not.
    _clean: Option<CleanOnDrop>,
}

fn ingress_settings(callbacks: &CallbackSettings, stream_buffer: usize) -> IngressSettings {
    IngressSettings {
        max_body_bytes: 64 * 1024,
        api_keys: vec![API_KEY.into(), VIEWER_KEY.into()],
        webhook_keys: vec![("devkey".into(), "secret".into())],
        defaults: CallDefaults {
            region: parse_region("US").ok(),
            trunk_id: Some(TRUNK.into()),
        },
        number_keys: vec![API_KEY.into()],
        // Heartbeats a test can wait for.
        stream: fleet::StreamSettings {
            buffer: stream_buffer,
            heartbeat: Duration::from_secs(1),
            max_clients: 8,
        },
        callbacks: fleet::CallbackPolicy {
            allow_private: callbacks.allow_private,
            signs_calls: !callbacks.default_secrets.is_empty(),
        },
    }
}

/// Broker, store, routing store, event log, and the RabbitMQ/Redis prefix when real.
type Backing5 = (
    Arc<dyn Broker>,
    Arc<dyn Store>,
    Arc<dyn RoutingStore>,
    Arc<dyn EventLog>,
    Option<String>,
);

/// The subscriptions store: in memory, or on Redis under the fleet's prefix.
async fn subscriptions_for(prefix: Option<&str>) -> Arc<dyn SubscriptionStore> {
    match prefix {
        None => Arc::new(MemorySubscriptions::new()),
        Some(prefix) => Arc::new(
            RedisStore::connect(&crate::harness::redis_url(), prefix, Duration::from_secs(5))
                .await
                .expect("Redis must be reachable for a RabbitMQ + Redis fleet")
                .subscriptions(),
        ),
    }
}

impl TestFleet {
    pub async fn start(name: &str, options: FleetOptions) -> Self {
        let (broker, store, routing, events, prefix): Backing5 = match options.backing {
            Backing::Memory => {
                let memory = MemoryStore::new();
                let events = Arc::new(memory.events());
                (
                    memory_broker(10),
                    Arc::new(memory),
                    Arc::new(MemoryRouting::new()),
                    events,
                    None,
                )
            }
            Backing::RabbitRedis => {
                let (broker, prefix) = rabbit_broker(name, 10).await;
                (
                    broker,
                    redis_store_at(&prefix).await,
                    redis_routing_at(&prefix).await,
                    redis_events_at(&prefix).await,
                    Some(prefix),
                )
            }
        };

        let subscriptions = subscriptions_for(prefix.as_deref()).await;
        let broker = options.broker.clone().unwrap_or(broker);
        let (broker, store): (Arc<dyn Broker>, Arc<dyn Store>) = match &options.outage {
            Some(outage) => (
                Arc::new(FlakyBroker {
                    inner: broker,
                    outage: Arc::clone(outage),
                }),
                Arc::new(FlakyStore {
                    inner: store,
                    outage: Arc::clone(outage),
                }),
            ),
            None => (broker, store),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ingress");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let mut emulator_config = options.emulator;
        emulator_config
            .webhook_urls
            .push(format!("{base}/v1/livekit/webhook"));
        let running = Emulator::start(emulator_config, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("start emulator");
        let clock = Arc::new(ShiftedClock::default());
        let backends = Backends {
            broker: Arc::clone(&broker),
            store: Arc::clone(&store),
            routing,
            events,
            subscriptions,
            delivery_limit: 10,
        };
        let stop = CancellationToken::new();
        let routing = fleet::routing(&backends, options.default_profile.clone(), stop.clone())
            .await
            .expect("routing table loads");
        // Wired by the same composition root as the binary.
        let state = fleet::ingress(
            &backends,
            Arc::clone(&routing),
            clock.clone(),
            ingress_settings(&options.callbacks, options.stream_buffer),
            stop.clone(),
        );
        let tasks = vec![tokio::spawn(fleet::serve(
            listener,
            callfleet_ingress::app(state),
            stop.clone(),
        ))];
        let livekit = Arc::new(LiveKitApi::new(
            &running.url(),
            "devkey",
            "secret",
            options.livekit_timeout,
        ));
        let clean = prefix.clone().map(CleanOnDrop);
        let mut test_fleet = Self {
            base,
            http: reqwest::Client::new(),
            emulator: running.emulator.clone(),
            backends,
            broker,
            clock,
            prefix,
            running: Some(running),
            livekit,
            settings: options.settings,
            max_job_attempts: options.max_job_attempts,
            sweep: options.sweep,
            inbound: options.inbound,
            default_profile: options.default_profile,
            callbacks: options.callbacks.clone(),
            routing,
            worker_routing: Vec::new(),
            stop,
            tasks,
            _clean: clean,
        };
        for _ in 0..options.workers {
            test_fleet.spawn_worker().await;
        }
        test_fleet
    }

    /// Starts one more worker (runtime and sweeper) on the fleet's broker and store, wired
    /// by the same composition root as the binary's.
    pub async fn spawn_worker(&mut self) -> CancellationToken {
        let settings = WorkerSettings {
            outbound: self.settings.clone(),
            inbound: self.inbound.clone(),
            sweep: self.sweep.clone(),
            prefetch: 64,
            concurrency: 64,
            max_job_attempts: self.max_job_attempts,
            callbacks: self.callbacks.clone(),
        };
        // Its own token, so a test can stop this worker alone (as a crash would).
        let stop = self.stop.child_token();
        let routing = fleet::routing(&self.backends, self.default_profile.clone(), stop.clone())
            .await
            .expect("routing table loads");
        self.worker_routing.push(Arc::clone(&routing));
        let worker = fleet::worker(
            &self.backends,
            routing,
            self.livekit.clone(),
            self.clock.clone(),
            &settings,
        )
        .expect("worker builds");
        let worker_stop = stop.clone();
        self.tasks.push(tokio::spawn(async move {
            let _ = worker.run(worker_stop, Duration::from_millis(500)).await;
        }));
        stop
    }

    /// Starts one more ingress (its own routing table, as another process would have)
    /// on the fleet's backends; returns its base URL.
    pub async fn spawn_ingress(&mut self) -> String {
        let routing = fleet::routing(
            &self.backends,
            self.default_profile.clone(),
            self.stop.clone(),
        )
        .await
        .expect("routing table loads");
        let state = fleet::ingress(
            &self.backends,
            routing,
            self.clock.clone(),
            ingress_settings(&self.callbacks, 4_096),
            self.stop.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ingress");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        self.tasks.push(tokio::spawn(fleet::serve(
            listener,
            callfleet_ingress::app(state),
            self.stop.clone(),
        )));
        base
    }

    /// A `callfleet worker` process on this fleet's RabbitMQ + Redis prefix and emulator
    /// (killed when dropped): a worker a test can SIGKILL.
    pub fn worker_process(&self) -> tokio::process::Child {
        let prefix = self
            .prefix
            .clone()
            .expect("a worker process needs RabbitMQ + Redis");
        tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
            .arg("worker")
            .env("CALLFLEET_BROKER", "rabbitmq")
            .env("CALLFLEET_STORE", "redis")
            .env("CALLFLEET_AMQP_URL", crate::harness::amqp_url())
            .env("CALLFLEET_REDIS_URL", crate::harness::redis_url())
            .env("CALLFLEET_QUEUE_PREFIX", &prefix)
            .env("CALLFLEET_KEY_PREFIX", &prefix)
            .env("CALLFLEET_WORKER_HTTP_ADDR", "127.0.0.1:0")
            .env("LIVEKIT_URL", self.emulator_url())
            .env("LIVEKIT_API_KEY", "devkey")
            .env("LIVEKIT_API_SECRET", "secret")
            .env("CALLFLEET_CALLBACKS_ALLOW_PRIVATE", "true")
            .env("CALLFLEET_CALLBACK_SECRETS", SIGNING_SECRET)
            .env("CALLFLEET_CALLBACK_RETRY_SCHEDULE_S", "1,1,1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start a worker process")
    }

    /// The backends the fleet runs on.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The fleet's call records (to make changes without going through LiveKit).
    pub fn calls(&self) -> callfleet_core::calls::CallBook {
        callfleet_core::calls::CallBook::new(Arc::clone(&self.backends.store))
    }

    pub fn emulator_url(&self) -> String {
        self.running.as_ref().map(|r| r.url()).unwrap_or_default()
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("ingress reachable");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .bearer_auth(API_KEY)
                .json(body),
        )
        .await
    }

    /// A request with any method and a JSON body (`null`: none).
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(API_KEY);
        if !body.is_null() {
            request = request.json(body);
        }
        self.send(request).await
    }

    /// GET on the emulator's control API.
    pub async fn get_emulator(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.emulator_url())))
            .await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(API_KEY),
        )
        .await
    }

    /// Submits a call and returns its id (asserting 202).
    pub async fn submit(&self, body: Value) -> String {
        let (status, call) = self.post("/v1/calls", &body).await;
        assert_eq!(status, 202, "submit answered {status}: {call}");
        call["id"].as_str().expect("call id").to_owned()
    }

    /// Waits until the call reaches `status`, and returns it.
    pub async fn wait_for(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let what = format!("call {id} to reach {status}");
        eventually(&what, timeout, || async {
            let (code, call) = self.get(&format!("/v1/calls/{id}")).await;
            (code == 200 && call["status"] == status).then_some(call)
        })
        .await
    }

    /// The emulator's CreateSIPParticipant requests that dialed `number`.
    pub fn dials_to(&self, number: &str) -> Vec<ApiRecord> {
        self.emulator
            .requests_of("CreateSIPParticipant")
            .into_iter()
            .filter(|r| r.fields.get("sip_call_to").map(String::as_str) == Some(number))
            .collect()
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        // Dropping the fleet deletes its queues and keys (`_clean`).
    }
}
