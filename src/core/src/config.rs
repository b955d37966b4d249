//! Typed configuration from the environment (and flags). Every option names its variable
//! and default in `--help`; [`validate`](BackendConfig::validate) checks cross-field rules
//! with messages that name the variable. Secrets are `SecretString`s: never in Debug output.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use crate::telemetry::LogFormat;

/// A configuration error naming the variable and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

/// The items of a comma-separated secret list (keys, signing secrets), blanks dropped.
fn comma_list(list: &SecretString) -> Vec<String> {
    list.expose_secret()
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn bad(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

/// Parses `key:secret,key2:secret2` (blank entries ignored); errors name `var`.
pub fn parse_key_pairs(
    var: &'static str,
    text: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            pair.split_once(':')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| bad(var, "each entry must be key:secret"))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// In-process broker (dev mode, tests): nothing survives the process.
    Memory,
    /// RabbitMQ quorum queues with publisher confirms.
    Rabbitmq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// In-process store (dev mode, tests).
    Memory,
    /// Redis.
    Redis,
}

/// Logging options shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(
        long,
        env = "CALLFLEET_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "CALLFLEET_LOG", default_value = "info", global = true)]
    pub log: String,
}

/// Broker and store selection and connection settings. Global, so a subcommand's own
/// subcommands take them after their verb too (`dead-letters list --queue-prefix x`).
#[derive(Debug, Clone, Args)]
pub struct BackendConfig {
    /// Broker adapter (default: memory for `dev`, rabbitmq otherwise).
    #[arg(long, global = true, env = "CALLFLEET_BROKER", value_enum)]
    pub broker: Option<BrokerKind>,
    /// Store adapter (default: memory for `dev`, redis otherwise).
    #[arg(long, global = true, env = "CALLFLEET_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// AMQP URL of RabbitMQ (may hold a password; never logged).
    #[arg(
        long,
        global = true,
        env = "CALLFLEET_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = false
    )]
    pub amqp_url: SecretString,
    /// Redis URL (may hold a password; never logged).
    #[arg(
        long,
        global = true,
        env = "CALLFLEET_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: SecretString,
    /// Prefix of every exchange and queue, so several fleets can share a broker.
    #[arg(
        long,
        global = true,
        env = "CALLFLEET_QUEUE_PREFIX",
        default_value = "callfleet"
    )]
    pub queue_prefix: String,
    /// Prefix of every Redis key, so several fleets can share a Redis.
    #[arg(
        long,
        global = true,
        env = "CALLFLEET_KEY_PREFIX",
        default_value = "callfleet"
    )]
    pub key_prefix: String,
    /// Deliveries of one message before it is dead-lettered (quorum `x-delivery-limit`).
    #[arg(
        long,
        global = true,
        env = "CALLFLEET_DELIVERY_LIMIT",
        default_value_t = 10
    )]
    pub delivery_limit: u32,
    /// How long a publish (connect + confirm) or a store call may take, in milliseconds.
    #[arg(
        long,
        global = true,
        env = "CALLFLEET_IO_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub io_timeout_ms: u64,
    /// Call events kept for the live stream's resume (`Last-Event-ID`) and the callback
    /// dispatcher (Redis trims approximately, never below this).
    #[arg(
        long,
        global = true,
        env = "CALLFLEET_EVENT_RETENTION",
        default_value_t = 100_000
    )]
    pub event_retention: usize,
}

impl BackendConfig {
    pub fn broker_or(&self, default: BrokerKind) -> BrokerKind {
        self.broker.unwrap_or(default)
    }

    pub fn store_or(&self, default: StoreKind) -> StoreKind {
        self.store.unwrap_or(default)
    }

    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1_000..=10_000_000).contains(&self.event_retention) {
            return Err(bad(
                "CALLFLEET_EVENT_RETENTION",
                "must be 1000 to 10000000 events",
            ));
        }
        if !(1..=1000).contains(&self.delivery_limit) {
            return Err(bad(
                "CALLFLEET_DELIVERY_LIMIT",
                format!("must be 1..=1000, got {}", self.delivery_limit),
            ));
        }
        if !(100..=120_000).contains(&self.io_timeout_ms) {
            return Err(bad(
                "CALLFLEET_IO_TIMEOUT_MS",
                format!("must be 100..=120000, got {}", self.io_timeout_ms),
            ));
        }
        let url = self.amqp_url.expose_secret();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(bad(
                "CALLFLEET_AMQP_URL",
                "must start with amqp:// or amqps://",
            ));
        }
        let url = self.redis_url.expose_secret();
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://"))
        {
            return Err(bad(
                "CALLFLEET_REDIS_URL",
                "must start with redis://, rediss:// or unix://",
            ));
        }
        for (var, prefix) in [
            ("CALLFLEET_QUEUE_PREFIX", &self.queue_prefix),
            ("CALLFLEET_KEY_PREFIX", &self.key_prefix),
        ] {
            if prefix.is_empty()
                || prefix.len() > 64
                || !prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(var, "must be 1-64 characters of [A-Za-z0-9._-]"));
            }
        }
        Ok(())
    }
}

/// What the workers do with an inbound call no profile can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UnroutedAction {
    /// Remove the caller: a clear end rather than ringing for the trunk's minutes.
    #[default]
    Hangup,
    /// Leave the caller in the room (something else may answer).
    Leave,
}

/// Inbound routing, for the ingress and the workers alike.
#[derive(Debug, Clone, Args)]
pub struct RoutingConfig {
    /// Profile that takes inbound calls nothing else can take (after fallbacks).
    #[arg(long, env = "CALLFLEET_DEFAULT_PROFILE")]
    pub default_profile: Option<String>,
}

/// Signed callbacks (Standard Webhooks): for the ingress (checking URLs, the subscriptions
/// it is configured with) and the workers (delivering).
#[derive(Debug, Clone, Args)]
pub struct CallbackConfig {
    /// The fleet's signing secrets (`whsec_…`, comma-separated, newest first) for calls'
    /// own `callback_url`s. Several during a rotation: each callback carries a signature
    /// per secret. `dev` generates one when unset.
    #[arg(long, env = "CALLFLEET_CALLBACK_SECRETS", default_value = "")]
    pub callback_secrets: SecretString,
    /// Allow callback URLs on loopback and private addresses (dev mode does).
    #[arg(long, env = "CALLFLEET_CALLBACKS_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub callbacks_allow_private: bool,
    /// Seconds one delivery attempt may take before it counts as failed.
    #[arg(long, env = "CALLFLEET_CALLBACK_TIMEOUT_S", default_value_t = 10)]
    pub callback_timeout_s: u64,
    /// Waits between attempts, in seconds, comma-separated (the default spans about a
    /// day: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; each with ±20 % jitter).
    #[arg(
        long,
        env = "CALLFLEET_CALLBACK_RETRY_SCHEDULE_S",
        default_value = "5,300,1800,7200,18000,36000,36000"
    )]
    pub callback_retry_schedule_s: String,
    /// Callbacks a worker sends at once (apart from its call jobs' own limit).
    #[arg(long, env = "CALLFLEET_CALLBACK_CONCURRENCY", default_value_t = 64)]
    pub callback_concurrency: usize,
    /// Callbacks a worker sends at once to one receiver, so a slow one cannot take every
    /// slot from the others.
    #[arg(long, env = "CALLFLEET_CALLBACK_PER_RECEIVER", default_value_t = 32)]
    pub callback_per_receiver: usize,
    /// Subscriptions to create or replace at start-up: a JSON array of subscription
    /// objects with ids (as `POST /v1/subscriptions` takes them).
    #[arg(long, env = "CALLFLEET_SUBSCRIPTIONS")]
    pub subscriptions: Option<String>,
}

impl CallbackConfig {
    /// The signing secrets as given (validated by [`CallbackConfig::validate`]).
    pub fn secrets(&self) -> Vec<String> {
        comma_list(&self.callback_secrets)
    }

    /// The waits between attempts.
    pub fn schedule(&self) -> Result<Vec<std::time::Duration>, ConfigError> {
        let waits: Result<Vec<u64>, _> = self
            .callback_retry_schedule_s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse::<u64>)
            .collect();
        match waits {
            Ok(w)
                if !w.is_empty()
                    && w.len() <= 20
                    && w.iter().all(|s| (1..=7 * 86_400).contains(s)) =>
            {
                Ok(w.into_iter().map(std::time::Duration::from_secs).collect())
            }
            _ => Err(bad(
                "CALLFLEET_CALLBACK_RETRY_SCHEDULE_S",
                "must list 1 to 20 waits in seconds, each 1 to 604800 (e.g. 5,300,1800)",
            )),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for secret in self.secrets() {
            crate::domain::subscription::SigningSecret::parse(&secret)
                .map_err(|e| bad("CALLFLEET_CALLBACK_SECRETS", format!("{e}")))?;
        }
        self.schedule()?;
        if !(1..=120).contains(&self.callback_timeout_s) {
            return Err(bad(
                "CALLFLEET_CALLBACK_TIMEOUT_S",
                "must be 1 to 120 seconds",
            ));
        }
        if !(1..=4_096).contains(&self.callback_concurrency) {
            return Err(bad("CALLFLEET_CALLBACK_CONCURRENCY", "must be 1 to 4096"));
        }
        if !(1..=1_024).contains(&self.callback_per_receiver) {
            return Err(bad("CALLFLEET_CALLBACK_PER_RECEIVER", "must be 1 to 1024"));
        }
        Ok(())
    }
}

/// How to reach LiveKit.
#[derive(Debug, Clone, Args)]
pub struct LiveKitConfig {
    /// LiveKit server URL (http(s):// or ws(s)://). Unset in `dev` = start the emulator.
    #[arg(long, env = "LIVEKIT_URL")]
    pub livekit_url: Option<String>,
    /// LiveKit API key (also the key whose webhooks are accepted).
    #[arg(long, env = "LIVEKIT_API_KEY", default_value = "devkey")]
    pub livekit_api_key: String,
    /// LiveKit API secret (never logged).
    #[arg(long, env = "LIVEKIT_API_SECRET", default_value = "secret")]
    pub livekit_api_secret: SecretString,
    /// Default outbound SIP trunk (`ST_...`) for calls that do not name one.
    #[arg(long, env = "LIVEKIT_SIP_TRUNK_ID")]
    pub livekit_sip_trunk_id: Option<String>,
    /// Extra webhook signing keys accepted during rotation, `key:secret,key2:secret2`.
    #[arg(long, env = "CALLFLEET_WEBHOOK_KEYS", default_value = "")]
    pub webhook_keys: SecretString,
    /// Per-request timeout for LiveKit API calls, in milliseconds.
    #[arg(long, env = "CALLFLEET_LIVEKIT_TIMEOUT_MS", default_value_t = 10_000)]
    pub livekit_timeout_ms: u64,
}

impl LiveKitConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.livekit_timeout_ms)
    }

    /// Every (key, secret) pair whose signatures are accepted on webhooks.
    pub fn webhook_keys(&self) -> Result<Vec<(String, SecretString)>, ConfigError> {
        let mut keys = vec![(
            self.livekit_api_key.clone(),
            self.livekit_api_secret.clone(),
        )];
        let extra = parse_key_pairs("CALLFLEET_WEBHOOK_KEYS", self.webhook_keys.expose_secret())?;
        keys.extend(extra.into_iter().map(|(k, v)| (k, SecretString::from(v))));
        Ok(keys)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.livekit_url {
            if !["http://", "https://", "ws://", "wss://"]
                .iter()
                .any(|p| url.starts_with(p))
            {
                return Err(bad(
                    "LIVEKIT_URL",
                    "must start with http://, https://, ws:// or wss://",
                ));
            }
        }
        if self.livekit_api_key.is_empty() {
            return Err(bad("LIVEKIT_API_KEY", "must not be empty"));
        }
        if self.livekit_api_secret.expose_secret().is_empty() {
            return Err(bad("LIVEKIT_API_SECRET", "must not be empty"));
        }
        if !(100..=120_000).contains(&self.livekit_timeout_ms) {
            return Err(bad(
                "CALLFLEET_LIVEKIT_TIMEOUT_MS",
                format!("must be 100..=120000, got {}", self.livekit_timeout_ms),
            ));
        }
        self.webhook_keys()?;
        Ok(())
    }
}

/// Ingress (HTTP API) settings.
#[derive(Debug, Clone, Args)]
pub struct IngressConfig {
    /// Address the ingress listens on.
    #[arg(long, env = "CALLFLEET_HTTP_ADDR", default_value = "127.0.0.1:8080", value_parser = listen_addr)]
    pub http_addr: SocketAddr,
    /// API keys accepted as `Authorization: Bearer <key>`, comma-separated (never logged).
    /// `dev` generates one when unset.
    #[arg(long, env = "CALLFLEET_API_KEYS", default_value = "")]
    pub api_keys: SecretString,
    /// Largest request body accepted, in bytes (larger gets 413).
    #[arg(long, env = "CALLFLEET_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// Region for phone numbers written without a country code (ISO 3166 alpha-2).
    #[arg(long, env = "CALLFLEET_DEFAULT_REGION", default_value = "US")]
    pub default_region: String,
    /// API keys (also listed in CALLFLEET_API_KEYS) that see phone numbers in full on the
    /// live event stream; other keys see them masked. `dev` lets its key see them.
    #[arg(long, env = "CALLFLEET_NUMBER_KEYS", default_value = "")]
    pub number_keys: SecretString,
    /// Events a stream client may fall behind before it is disconnected as too slow.
    #[arg(long, env = "CALLFLEET_STREAM_BUFFER", default_value_t = 4_096)]
    pub stream_buffer: usize,
    /// Seconds between keep-alive comments on an idle event stream.
    #[arg(long, env = "CALLFLEET_STREAM_HEARTBEAT_S", default_value_t = 15)]
    pub stream_heartbeat_s: u64,
    /// Stream clients one ingress serves at once (more are answered 503 with Retry-After).
    #[arg(long, env = "CALLFLEET_STREAM_MAX_CLIENTS", default_value_t = 1_000)]
    pub stream_max_clients: usize,
}

impl IngressConfig {
    pub fn number_keys(&self) -> Vec<String> {
        comma_list(&self.number_keys)
    }

    pub fn api_keys(&self) -> Vec<String> {
        comma_list(&self.api_keys)
    }

    /// `require_keys`: the standalone ingress refuses to start without API keys.
    pub fn validate(&self, require_keys: bool) -> Result<(), ConfigError> {
        if require_keys && self.api_keys().is_empty() {
            return Err(bad("CALLFLEET_API_KEYS", "must list at least one API key"));
        }
        if self.api_keys().iter().any(|k| k.len() < 16) {
            return Err(bad(
                "CALLFLEET_API_KEYS",
                "each key must be at least 16 characters",
            ));
        }
        let keys = self.api_keys();
        if self.number_keys().iter().any(|k| !keys.contains(k)) {
            return Err(bad(
                "CALLFLEET_NUMBER_KEYS",
                "every key listed must also be in CALLFLEET_API_KEYS",
            ));
        }
        if !(16..=1_000_000).contains(&self.stream_buffer) {
            return Err(bad(
                "CALLFLEET_STREAM_BUFFER",
                "must be 16 to 1000000 events",
            ));
        }
        if !(1..=100_000).contains(&self.stream_max_clients) {
            return Err(bad("CALLFLEET_STREAM_MAX_CLIENTS", "must be 1 to 100000"));
        }
        if !(1..=300).contains(&self.stream_heartbeat_s) {
            return Err(bad(
                "CALLFLEET_STREAM_HEARTBEAT_S",
                "must be 1 to 300 seconds",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(bad(
                "CALLFLEET_MAX_BODY_BYTES",
                "must be between 1024 and 67108864",
            ));
        }
        crate::domain::phone::parse_region(&self.default_region)
            .map_err(|e| bad("CALLFLEET_DEFAULT_REGION", e.to_string()))?;
        Ok(())
    }
}

/// Worker settings.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    /// Address of the worker's health and metrics endpoints.
    #[arg(
        long,
        env = "CALLFLEET_WORKER_HTTP_ADDR",
        default_value = "127.0.0.1:9090",
        value_parser = listen_addr
    )]
    pub worker_http_addr: SocketAddr,
    /// Unacked messages the broker may hand each consumer at once.
    #[arg(long, env = "CALLFLEET_PREFETCH", default_value_t = 32)]
    pub prefetch: u16,
    /// Jobs a worker process runs at once, across all queues.
    #[arg(long, env = "CALLFLEET_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds in-flight jobs get to finish after SIGTERM before they are handed back.
    #[arg(long, env = "CALLFLEET_SHUTDOWN_DEADLINE_S", default_value_t = 30)]
    pub shutdown_deadline_s: u64,
    /// Agent dispatched when a call names none.
    #[arg(
        long,
        env = "CALLFLEET_DEFAULT_AGENT",
        default_value = "callfleet-agent"
    )]
    pub default_agent: String,
    /// Maximum concurrent calls per SIP trunk, across all workers.
    #[arg(long, env = "CALLFLEET_TRUNK_MAX_CONCURRENT", default_value_t = 50)]
    pub trunk_max_concurrent: u32,
    /// Calls started per second per SIP trunk, across all workers.
    #[arg(long, env = "CALLFLEET_TRUNK_CPS", default_value_t = 10.0)]
    pub trunk_cps: f64,
    /// Seconds a call's concurrency lease lives if its end-of-call event never arrives.
    #[arg(long, env = "CALLFLEET_LEASE_TTL_S", default_value_t = 3_600)]
    pub lease_ttl_s: u64,
    /// Delivery attempts of a job failing transiently before it is dead-lettered.
    #[arg(long, env = "CALLFLEET_MAX_JOB_ATTEMPTS", default_value_t = 8)]
    pub max_job_attempts: u32,
    /// How long a dial whose answer was lost may wait for evidence (the participant in
    /// LiveKit, a webhook) before its attempt ends as unknown rather than being redialed.
    #[arg(long, env = "CALLFLEET_DIAL_EVIDENCE_GRACE_S", default_value_t = 60)]
    pub dial_evidence_grace_s: u64,
    /// How often a worker looks for calls that stopped moving (one worker at a time).
    #[arg(long, env = "CALLFLEET_SWEEP_INTERVAL_S", default_value_t = 30)]
    pub sweep_interval_s: u64,
    /// How long a call may stay quiet past its due time before the sweeper repairs it.
    #[arg(long, env = "CALLFLEET_SWEEP_AFTER_S", default_value_t = 120)]
    pub sweep_after_s: u64,
    /// Inbound calls no profile can take: `hangup` removes the caller, `leave` leaves
    /// them in the room.
    #[arg(long, env = "CALLFLEET_UNROUTED", value_enum, default_value_t = UnroutedAction::Hangup)]
    pub unrouted: UnroutedAction,
    /// Delete an inbound call's room once the call ended (removing its agent at once).
    #[arg(long, env = "CALLFLEET_INBOUND_DELETE_ROOM", default_value_t = false)]
    pub inbound_delete_room: bool,
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.prefetch == 0 || self.prefetch > 2000 {
            return Err(bad(
                "CALLFLEET_PREFETCH",
                format!("must be 1..=2000, got {}", self.prefetch),
            ));
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(bad(
                "CALLFLEET_CONCURRENCY",
                format!("must be 1..=10000, got {}", self.concurrency),
            ));
        }
        if self.default_agent.trim().is_empty() {
            return Err(bad("CALLFLEET_DEFAULT_AGENT", "must not be empty"));
        }
        if self.trunk_max_concurrent == 0 {
            return Err(bad("CALLFLEET_TRUNK_MAX_CONCURRENT", "must be at least 1"));
        }
        if !(self.trunk_cps > 0.0 && self.trunk_cps <= 10_000.0) {
            return Err(bad(
                "CALLFLEET_TRUNK_CPS",
                format!("must be in (0, 10000], got {}", self.trunk_cps),
            ));
        }
        if self.max_job_attempts == 0 {
            return Err(bad("CALLFLEET_MAX_JOB_ATTEMPTS", "must be at least 1"));
        }
        Ok(())
    }

    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs(self.shutdown_deadline_s)
    }
}

/// A listen address, `host:port`; a host name (`localhost:8081`) is resolved.
pub fn listen_addr(value: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let mut addrs = value
        .to_socket_addrs()
        .map_err(|e| format!("{value:?} is not a host:port address ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{value:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        backend: BackendConfig,
        #[command(flatten)]
        livekit: LiveKitConfig,
        #[command(flatten)]
        ingress: IngressConfig,
        #[command(flatten)]
        worker: WorkerConfig,
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).expect("parses")
    }

    #[test]
    fn defaults_are_valid_and_secrets_do_not_print() {
        let cli = parse(&[
            "--livekit-api-secret",
            "hunter2-very-secret",
            "--amqp-url",
            "amqp://u:pw-xyz@h/%2f",
        ]);
        cli.backend.validate().expect("backend");
        cli.livekit.validate().expect("livekit");
        cli.ingress.validate(false).expect("ingress");
        cli.worker.validate().expect("worker");
        let debug = format!("{cli:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("pw-xyz"), "{debug}");
    }

    #[test]
    fn errors_name_the_variable() {
        let cli = parse(&["--prefetch", "0"]);
        let e = cli.worker.validate().expect_err("invalid");
        assert_eq!(e.var, "CALLFLEET_PREFETCH");
        assert!(e.to_string().starts_with("CALLFLEET_PREFETCH: must be"));
        let cli = parse(&["--livekit-url", "ftp://x"]);
        assert_eq!(
            cli.livekit.validate().expect_err("invalid").var,
            "LIVEKIT_URL"
        );
        let cli = parse(&["--default-region", "ZZ"]);
        assert_eq!(
            cli.ingress.validate(false).expect_err("invalid").var,
            "CALLFLEET_DEFAULT_REGION"
        );
        let cli = parse(&[]);
        assert_eq!(
            cli.ingress.validate(true).expect_err("no keys").var,
            "CALLFLEET_API_KEYS"
        );
        let cli = parse(&["--webhook-keys", "nocolon"]);
        assert_eq!(
            cli.livekit.validate().expect_err("invalid").var,
            "CALLFLEET_WEBHOOK_KEYS"
        );
        let cli = parse(&["--queue-prefix", "has space"]);
        assert_eq!(
            cli.backend.validate().expect_err("invalid").var,
            "CALLFLEET_QUEUE_PREFIX"
        );
    }

    #[test]
    fn listen_addresses_take_host_names() {
        assert_eq!(
            super::listen_addr("localhost:8081").map(|a| a.port()),
            Ok(8081)
        );
        assert!(super::listen_addr("127.0.0.1:8080").is_ok());
        assert!(super::listen_addr("8080").is_err());
    }
}
