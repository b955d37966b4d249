//! Subcommands and their wiring.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use callfleet::fleet::{self, IngressSettings, WorkerSettings};
use callfleet_core::adapters::{Backends, LiveKitApi, LiveKitSip, RabbitBroker, RabbitConfig};
use callfleet_core::calls::SystemClock;
use callfleet_core::config::{
    parse_key_pairs, BackendConfig, BrokerKind, CallbackConfig, IngressConfig, LiveKitConfig,
    LogConfig, RoutingConfig, StoreKind, WorkerConfig,
};
use callfleet_core::domain::phone::parse_region;
use callfleet_core::domain::request::CallDefaults;
use callfleet_core::domain::routing::{Profile, ProfileInput};
use callfleet_core::domain::subscription::SigningSecret;
use callfleet_core::lifecycle::{cancel_on_signal, health_router};
use callfleet_core::ports::{Broker, WorkQueue};
use callfleet_core::routing::RoutingCache;
use callfleet_core::telemetry;
use clap::{Parser, Subcommand};
use livekit_emulator::{Emulator, EmulatorConfig};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "callfleet",
    version,
    about = "Queue-driven worker fleet for phone calls on LiveKit SIP"
)]
pub struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process: ingress + workers on the in-memory broker and store, and
    /// the LiveKit emulator when LIVEKIT_URL is unset.
    Dev {
        #[command(flatten)]
        backend: BackendConfig,
        #[command(flatten)]
        livekit: LiveKitConfig,
        #[command(flatten)]
        ingress: IngressConfig,
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        routing: RoutingConfig,
        #[command(flatten)]
        callbacks: CallbackConfig,
        /// Address of the embedded LiveKit emulator.
        #[arg(
            long,
            env = "CALLFLEET_EMULATOR_ADDR",
            default_value = "127.0.0.1:7880",
            value_parser = callfleet_core::config::listen_addr
        )]
        emulator_addr: SocketAddr,
    },
    /// The HTTP ingress (RabbitMQ + Redis by default).
    Ingress {
        #[command(flatten)]
        backend: BackendConfig,
        #[command(flatten)]
        livekit: LiveKitConfig,
        #[command(flatten)]
        ingress: IngressConfig,
        #[command(flatten)]
        routing: RoutingConfig,
        #[command(flatten)]
        callbacks: CallbackConfig,
    },
    /// A worker process (RabbitMQ + Redis by default).
    Worker {
        #[command(flatten)]
        backend: BackendConfig,
        #[command(flatten)]
        livekit: LiveKitConfig,
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        routing: RoutingConfig,
        #[command(flatten)]
        callbacks: CallbackConfig,
    },
    /// The LiveKit API emulator on its own.
    Emulator {
        /// Address to listen on.
        #[arg(
            long,
            env = "CALLFLEET_EMULATOR_ADDR",
            default_value = "127.0.0.1:7880",
            value_parser = callfleet_core::config::listen_addr
        )]
        addr: SocketAddr,
        /// API keys, `key:secret,key2:secret2`; the first signs webhooks.
        #[arg(long, env = "CALLFLEET_EMULATOR_KEYS", default_value = "devkey:secret")]
        keys: String,
        /// Webhook URLs, comma-separated.
        #[arg(long, env = "CALLFLEET_EMULATOR_WEBHOOK_URLS", default_value = "")]
        webhook_urls: String,
        /// Listeners, one per region (`region-0` on --addr, the others on free ports), as
        /// LiveKit's SDK test server runs them, for SDK failover tests.
        #[arg(long, env = "CALLFLEET_EMULATOR_REGIONS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
        regions: u8,
    },
    /// LiveKit SIP set-up: inbound and outbound trunks, dispatch rules, connect-number and
    /// check (LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET).
    Livekit(crate::livekit_cli::LivekitArgs),
    /// Inspect, replay or purge the dead-letter queue.
    DeadLetters {
        #[command(flatten)]
        backend: BackendConfig,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterAction {
    /// Print up to N dead letters as JSON lines, without removing them.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Move dead letters back to their work queue.
    Replay {
        /// Only this message id.
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Delete every dead letter.
    Purge,
}

async fn connect(
    backend: &BackendConfig,
    broker: BrokerKind,
    store: StoreKind,
) -> Result<Backends> {
    backend.validate()?;
    Backends::connect(backend, broker, store)
        .await
        .context("connecting to the broker and store")
}

async fn serve(
    addr: SocketAddr,
    app: axum::Router,
    stop: CancellationToken,
    what: &str,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} to {addr}"))?;
    Ok(tokio::spawn(fleet::serve(listener, app, stop)))
}

/// `callfleet dead-letters …`: attaches to the fleet's existing queues (declaring nothing)
/// and says plainly when there is nothing to show or the id is unknown (exit code 1).
async fn dead_letters(backend: &BackendConfig, action: DeadLetterAction) -> Result<()> {
    backend.validate()?;
    if backend.broker_or(BrokerKind::Rabbitmq) == BrokerKind::Memory {
        anyhow::bail!(
            "dead letters live in RabbitMQ: the memory broker keeps them inside its own dev \
             process only (use --broker rabbitmq, the default here)"
        );
    }
    let broker = RabbitBroker::attach(RabbitConfig {
        url: backend.amqp_url.expose_secret().to_owned(),
        prefix: backend.queue_prefix.clone(),
        delivery_limit: backend.delivery_limit,
        publish_timeout: backend.io_timeout(),
    })
    .await?;
    match action {
        DeadLetterAction::List { limit } => {
            let listed = broker.list_dead_letters(limit).await?;
            if listed.is_empty() {
                eprintln!("no dead letters in {}", broker.dead_queue_name());
            }
            for dead in listed {
                println!("{}", serde_json_line(&dead));
            }
        }
        DeadLetterAction::Replay { id, limit } => {
            let n = broker.replay_dead_letters(id.as_deref(), limit).await?;
            match (n, &id) {
                (0, Some(id)) => anyhow::bail!("no dead letter with id {id}"),
                (0, None) => println!("no dead letters to replay"),
                (n, _) => println!("replayed {n} dead letter(s)"),
            }
        }
        DeadLetterAction::Purge => {
            let n = broker.purge_dead_letters().await?;
            println!("purged {n} dead letter(s)");
        }
    }
    Ok(())
}

/// The routing profile dev mode creates, and the number it serves (the emulator's
/// default inbound number).
const DEV_PROFILE: &str = "dev-default";
const DEV_NUMBER: &str = "+15105550100";
/// How long dev mode's emulated callers stay on the line.
const DEV_CALLER_STAYS: Duration = Duration::from_secs(20);

/// The trunk dev mode dials through when none is configured (the emulator takes any).
const DEV_TRUNK: &str = "ST_callfleet_dev";

pub async fn run(cli: Cli) -> Result<()> {
    telemetry::init_tracing(cli.log.log_format, &cli.log.log);
    telemetry::prometheus();
    let stop = CancellationToken::new();
    match cli.command {
        Command::Emulator {
            addr,
            keys,
            webhook_urls,
            regions,
        } => {
            let config = EmulatorConfig {
                keys: parse_key_pairs("CALLFLEET_EMULATOR_KEYS", &keys)?,
                webhook_urls: webhook_urls
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect(),
                regions,
                // Dev mode's trunk exists, so what dials it works against this emulator too.
                outbound_trunks: vec![DEV_TRUNK.to_owned()],
                ..Default::default()
            };
            anyhow::ensure!(
                !config.keys.is_empty(),
                "CALLFLEET_EMULATOR_KEYS: at least one key:secret is required"
            );
            let running = Emulator::start(config, addr)
                .await
                .with_context(|| format!("binding the emulator to {addr}"))?;
            println!("LiveKit emulator listening on {} (API key devkey unless CALLFLEET_EMULATOR_KEYS says otherwise)", running.url());
            cancel_on_signal(stop.clone());
            stop.cancelled().await;
            running.shutdown().await;
            Ok(())
        }
        Command::DeadLetters { backend, action } => dead_letters(&backend, action).await,
        Command::Livekit(args) => Ok(crate::livekit_cli::run(args).await?),
        Command::Ingress {
            backend,
            livekit,
            ingress,
            routing,
            callbacks,
        } => {
            livekit.validate()?;
            ingress.validate(true)?;
            callbacks.validate()?;
            let backends = connect(
                &backend,
                backend.broker_or(BrokerKind::Rabbitmq),
                backend.store_or(StoreKind::Redis),
            )
            .await?;
            cancel_on_signal(stop.clone());
            let table = routing_table(&backends, &routing, stop.clone()).await?;
            let server = start_ingress(
                &backends,
                table,
                &ingress,
                &livekit,
                &callbacks,
                stop.clone(),
            )
            .await?;
            tracing::info!(addr = %ingress.http_addr, "ingress listening");
            let _ = server.await;
            Ok(())
        }
        Command::Worker {
            backend,
            livekit,
            worker,
            routing,
            callbacks,
        } => {
            livekit.validate()?;
            worker.validate()?;
            callbacks.validate()?;
            let url = livekit.livekit_url.clone().context(
                "LIVEKIT_URL: required for a worker (dev mode starts an emulator instead)",
            )?;
            let backends = connect(
                &backend,
                backend.broker_or(BrokerKind::Rabbitmq),
                backend.store_or(StoreKind::Redis),
            )
            .await?;
            let api = livekit_client(&url, &livekit);
            cancel_on_signal(stop.clone());
            let health = serve(
                worker.worker_http_addr,
                health_router(fleet::readiness(&backends)),
                stop.clone(),
                "worker health",
            )
            .await?;
            tracing::info!(addr = %worker.worker_http_addr, "worker health and metrics listening");
            let settings =
                WorkerSettings::from_config(&worker, api.timeout()).with_callbacks(&callbacks)?;
            let table = routing_table(&backends, &routing, stop.clone()).await?;
            fleet::worker(&backends, table, api, Arc::new(SystemClock), &settings)?
                .run(stop.clone(), worker.shutdown_deadline())
                .await?;
            let _ = health.await;
            tracing::info!("worker stopped");
            Ok(())
        }
        Command::Dev {
            backend,
            mut livekit,
            mut ingress,
            worker,
            mut routing,
            mut callbacks,
            emulator_addr,
        } => {
            livekit.validate()?;
            worker.validate()?;
            // A local receiver works out of the box, and calls' callback URLs are signed.
            callbacks.callbacks_allow_private = true;
            let generated_secret = if callbacks.secrets().is_empty() {
                let secret = SigningSecret::generate();
                callbacks.callback_secrets = secret.as_str().to_owned().into();
                Some(secret.as_str().to_owned())
            } else {
                None
            };
            callbacks.validate()?;
            let generated_key = if ingress.api_keys().is_empty() {
                let key = format!("dev_{}", uuid_simple());
                ingress.api_keys = key.clone().into();
                Some(key)
            } else {
                None
            };
            // Dev mode's keys see full numbers on the stream unless told otherwise.
            if ingress.number_keys().is_empty() {
                ingress.number_keys = ingress.api_keys.clone();
            }
            ingress.validate(true)?;
            let broker_kind = backend.broker_or(BrokerKind::Memory);
            let store_kind = backend.store_or(StoreKind::Memory);
            let backends = connect(&backend, broker_kind, store_kind).await?;
            cancel_on_signal(stop.clone());

            if livekit.livekit_url.is_none() && livekit.livekit_sip_trunk_id.is_none() {
                livekit.livekit_sip_trunk_id = Some(DEV_TRUNK.to_owned());
            }
            let (livekit_url, emulator) = match &livekit.livekit_url {
                Some(url) => (url.clone(), None),
                None => {
                    let config = EmulatorConfig {
                        keys: vec![(
                            livekit.livekit_api_key.clone(),
                            livekit.livekit_api_secret.expose_secret().to_owned(),
                        )],
                        webhook_urls: vec![format!(
                            "http://{}/v1/livekit/webhook",
                            ingress.http_addr
                        )],
                        // The trunk dev mode dials through exists in its emulator.
                        outbound_trunks: livekit.livekit_sip_trunk_id.iter().cloned().collect(),
                        // Emulated callers hang up by themselves, so a call ends alone.
                        inbound_hangup_after: Some(DEV_CALLER_STAYS),
                        ..Default::default()
                    };
                    let running = Emulator::start(config, emulator_addr)
                        .await
                        .with_context(|| format!("binding the emulator to {emulator_addr}"))?;
                    (running.url(), Some(running))
                }
            };
            let api = livekit_client(&livekit_url, &livekit);
            let dev_profile = seed_dev_profile(&backends, &mut routing).await?;
            let dev_sip = match &emulator {
                Some(e) => Some(seed_dev_sip(&e.url(), &livekit).await?),
                None => None,
            };
            let table = routing_table(&backends, &routing, stop.clone()).await?;
            let server = start_ingress(
                &backends,
                Arc::clone(&table),
                &ingress,
                &livekit,
                &callbacks,
                stop.clone(),
            )
            .await?;
            let settings =
                WorkerSettings::from_config(&worker, api.timeout()).with_callbacks(&callbacks)?;
            let fleet_worker =
                fleet::worker(&backends, table, api, Arc::new(SystemClock), &settings)?;
            let worker_stop = stop.clone();
            let deadline = worker.shutdown_deadline();
            let workers =
                tokio::spawn(async move { fleet_worker.run(worker_stop, deadline).await });

            let base = format!("http://{}", ingress.http_addr);
            println!("callfleet dev fleet is up");
            println!("  ingress        {base}  (health {base}/healthz, readiness {base}/readyz, metrics {base}/metrics)");
            println!(
                "  workers        in-process, queues: {}",
                WorkQueue::ALL.map(|q| q.as_str()).join(", ")
            );
            println!(
                "  broker/store   {} / {}",
                format!("{broker_kind:?}").to_lowercase(),
                format!("{store_kind:?}").to_lowercase()
            );
            if let Some((trunk, rule)) = &dev_sip {
                println!(
                    "  inbound        {DEV_NUMBER} → emulator trunk {trunk} and room-per-caller rule {rule} (no agents: callfleet dispatches); callers hang up after {} s",
                    DEV_CALLER_STAYS.as_secs()
                );
            }
            match &emulator {
                Some(e) => {
                    println!("  LiveKit        emulator at {} (key {}), webhooks → {base}/v1/livekit/webhook", e.url(), livekit.livekit_api_key);
                    println!("  emulator API   {}/emulator/v1 (scripts, faults, inbound calls, records; see the README)", e.url());
                }
                None => println!("  LiveKit        {livekit_url}"),
            }
            match &generated_key {
                Some(key) => {
                    println!("  API key        {key}  (set CALLFLEET_API_KEYS to choose your own)")
                }
                None => println!(
                    "  API key        from CALLFLEET_API_KEYS (the examples read it from $KEY: KEY=<one of them>)"
                ),
            }
            match &generated_secret {
                Some(secret) => println!(
                    "  signing secret {secret}  (signs calls' callback_url; set CALLFLEET_CALLBACK_SECRETS to choose your own)"
                ),
                None => println!("  signing secret from CALLFLEET_CALLBACK_SECRETS"),
            }
            println!();
            println!("Try it:");
            // With keys from the environment, the example expects one of them in $KEY.
            let key = generated_key.as_deref().unwrap_or("$KEY");
            println!("  curl -s {base}/readyz");
            println!(
                "  curl -s -X POST {base}/v1/calls -H \"authorization: Bearer {key}\" -H 'content-type: application/json' -d '{{\"to\":\"+15105550123\",\"agent_name\":\"reminder-agent\",\"context\":{{\"customerName\":\"Ada\",\"amountDue\":\"42.00\"}}}}'"
            );
            println!("  curl -s {base}/v1/calls -H \"authorization: Bearer {key}\"   # then GET /v1/calls/<id>");
            println!("  curl -sN {base}/v1/events -H \"authorization: Bearer {key}\"   # every call change, live (SSE)");
            if let Some(p) = &dev_profile {
                println!(
                    "Inbound: profile {} routes {} to agent {}; place a call with",
                    p.id, DEV_NUMBER, p.agent_name
                );
            }
            if let Some(e) = &emulator {
                println!(
                    "  curl -s -X POST {}/emulator/v1/inbound -H 'content-type: application/json' -d '{{\"from\":\"+15105550123\",\"to\":\"{DEV_NUMBER}\"}}'",
                    e.url()
                );
                println!("  curl -s '{base}/v1/calls?direction=inbound' -H \"authorization: Bearer {key}\"");
            }
            println!("Press Ctrl-C to stop.");

            let _ = server.await;
            match tokio::time::timeout(deadline + Duration::from_secs(1), workers).await {
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "workers stopped with an error"),
                Err(_) => tracing::warn!("workers did not stop within the deadline"),
                _ => {}
            }
            if let Some(e) = emulator {
                e.shutdown().await;
            }
            println!("callfleet dev stopped");
            Ok(())
        }
    }
}

/// The routing table for this process, kept current until `stop`.
async fn routing_table(
    backends: &Backends,
    routing: &RoutingConfig,
    stop: CancellationToken,
) -> Result<Arc<RoutingCache>> {
    fleet::routing(backends, routing.default_profile.clone(), stop)
        .await
        .context("loading the routing table")
}

/// The profile dev mode routes inbound calls to (the emulator's default number to the
/// default agent), created unless it exists (a Redis store keeps it across runs), and the
/// default profile unless one is configured. Returns it.
async fn seed_dev_profile(
    backends: &Backends,
    routing: &mut RoutingConfig,
) -> Result<Option<Profile>> {
    let store = &backends.routing;
    routing
        .default_profile
        .get_or_insert_with(|| DEV_PROFILE.to_owned());
    if let Some(existing) = store.get(DEV_PROFILE).await? {
        return Ok(Some(existing));
    }
    let input: ProfileInput = serde_json::from_value(serde_json::json!({
        "id": DEV_PROFILE,
        "name": "Dev default agent",
        "agent_name": "callfleet-agent",
        "numbers": [DEV_NUMBER],
        "metadata": {"greeting": "Hello from callfleet dev mode"},
    }))?;
    let profile = input
        .into_profile(
            None,
            None,
            None,
            callfleet_core::calls::Clock::now(&SystemClock),
        )
        .map_err(|e| anyhow::anyhow!("dev profile: {e}"))?;
    store.put(&profile).await?;
    Ok(Some(profile))
}

/// The emulator's inbound trunk for the dev number and its dispatch rule: a room per
/// caller and no agents in the rule (callfleet dispatches them), as
/// `callfleet livekit connect-number` sets a number up. Returns (trunk id, rule id).
async fn seed_dev_sip(url: &str, livekit: &LiveKitConfig) -> Result<(String, String)> {
    use livekit_protocol as proto;
    let sip = LiveKitSip::new(
        url,
        &livekit.livekit_api_key,
        livekit.livekit_api_secret.expose_secret(),
        livekit.timeout(),
    )?;
    let trunk = sip
        .create_inbound_trunk(proto::SipInboundTrunkInfo {
            name: "callfleet dev".into(),
            numbers: vec![DEV_NUMBER.into()],
            ..Default::default()
        })
        .await
        .context("creating the emulator's inbound trunk")?;
    let rule = sip
        .create_dispatch_rule(proto::SipDispatchRuleInfo {
            name: format!("callfleet {DEV_NUMBER}"),
            trunk_ids: vec![trunk.sip_trunk_id.clone()],
            numbers: vec![DEV_NUMBER.into()],
            rule: Some(proto::SipDispatchRule {
                rule: Some(proto::sip_dispatch_rule::Rule::DispatchRuleIndividual(
                    proto::SipDispatchRuleIndividual {
                        room_prefix: "call".into(),
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .context("creating the emulator's dispatch rule")?;
    Ok((trunk.sip_trunk_id, rule.sip_dispatch_rule_id))
}

async fn start_ingress(
    backends: &Backends,
    routing: Arc<RoutingCache>,
    ingress: &IngressConfig,
    livekit: &LiveKitConfig,
    callbacks: &CallbackConfig,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    fleet::configured_subscriptions(backends, callbacks).await?;
    let state = fleet::ingress(
        backends,
        routing,
        Arc::new(SystemClock),
        IngressSettings {
            max_body_bytes: ingress.max_body_bytes,
            api_keys: ingress.api_keys().into_iter().map(Into::into).collect(),
            webhook_keys: livekit.webhook_keys()?,
            defaults: CallDefaults {
                region: Some(parse_region(&ingress.default_region)?),
                trunk_id: livekit.livekit_sip_trunk_id.clone(),
            },
            number_keys: ingress.number_keys().into_iter().map(Into::into).collect(),
            stream: fleet::StreamSettings {
                buffer: ingress.stream_buffer,
                heartbeat: Duration::from_secs(ingress.stream_heartbeat_s),
                max_clients: ingress.stream_max_clients,
            },
            callbacks: fleet::CallbackPolicy::from_config(callbacks),
        },
        stop.clone(),
    );
    serve(
        ingress.http_addr,
        callfleet_ingress::app(state),
        stop,
        "ingress",
    )
    .await
}

fn livekit_client(url: &str, livekit: &LiveKitConfig) -> Arc<LiveKitApi> {
    Arc::new(LiveKitApi::new(
        url,
        &livekit.livekit_api_key,
        livekit.livekit_api_secret.expose_secret(),
        livekit.timeout(),
    ))
}

fn uuid_simple() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn serde_json_line(dead: &callfleet_core::ports::DeadLetter) -> String {
    serde_json::to_string(dead)
        .unwrap_or_else(|_| format!("{{\"message_id\":{:?}}}", dead.message_id))
}
