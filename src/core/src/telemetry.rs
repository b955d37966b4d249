//! Tracing and metrics set-up, and every metric name in one place.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

/// Metric names (Prometheus conventions; labels are bounded sets, never ids or numbers).
pub mod metrics {
    pub const HTTP_REQUESTS: &str = "callfleet_http_requests_total";
    pub const HTTP_REQUEST_SECONDS: &str = "callfleet_http_request_duration_seconds";
    pub const JOBS_ENQUEUED: &str = "callfleet_jobs_enqueued_total";
    pub const JOBS_PROCESSED: &str = "callfleet_jobs_processed_total";
    pub const JOB_SECONDS: &str = "callfleet_job_duration_seconds";
    pub const JOB_RETRIES: &str = "callfleet_job_retries_total";
    pub const DEAD_LETTERS: &str = "callfleet_dead_letters_total";
    pub const QUEUE_DEPTH: &str = "callfleet_queue_depth";
    pub const BROKER_RECONNECTS: &str = "callfleet_broker_reconnects_total";
    pub const LIVEKIT_REQUESTS: &str = "callfleet_livekit_requests_total";
    pub const LIVEKIT_REQUEST_SECONDS: &str = "callfleet_livekit_request_duration_seconds";
    pub const WEBHOOKS: &str = "callfleet_webhooks_total";
    pub const DISPATCHES: &str = "callfleet_dispatches_total";
    pub const CALLS_FINISHED: &str = "callfleet_calls_finished_total";
    pub const CALL_ATTEMPTS: &str = "callfleet_call_attempts_total";
    pub const DIALS: &str = "callfleet_dials_total";
    pub const CALL_SETUP_SECONDS: &str = "callfleet_call_setup_seconds";
    pub const ACTIVE_CALLS: &str = "callfleet_active_calls";
    pub const ROUTING_DECISIONS: &str = "callfleet_routing_decisions_total";
    pub const ROUTING_RESOLVE_SECONDS: &str = "callfleet_routing_resolve_duration_seconds";
    pub const ROUTING_PROFILES: &str = "callfleet_routing_profiles";
    pub const ROUTING_TABLE_VERSION: &str = "callfleet_routing_table_version";
    pub const ROUTING_REFRESH_FAILURES: &str = "callfleet_routing_refresh_failures_total";
    /// Inbound calls holding a slot, per profile (profiles with calls only).
    pub const PROFILE_CALLS_IN_PROGRESS: &str = "callfleet_profile_calls_in_progress";
    /// Inbound: webhook received at the ingress → CreateDispatch sent.
    pub const INBOUND_DISPATCH_SECONDS: &str = "callfleet_inbound_webhook_to_dispatch_seconds";
    /// Inbound: dispatch → agent participant joined.
    pub const AGENT_JOIN_SECONDS: &str = "callfleet_agent_join_seconds";
    pub const INBOUND_CALLS: &str = "callfleet_inbound_calls_total";
    pub const INFLIGHT_JOBS: &str = "callfleet_inflight_jobs";
    /// Messages that arrived on a queue they were not published for (a routing bug).
    pub const MISROUTED: &str = "callfleet_misrouted_messages_total";
    /// Stuck calls the sweeper found, by state and what it did.
    pub const SWEEPER_REPAIRS: &str = "callfleet_sweeper_repairs_total";
    /// Hang-up and transfer commands, by kind and result.
    pub const CONTROL_COMMANDS: &str = "callfleet_control_commands_total";
    /// Clients connected to the live event stream.
    pub const STREAM_CLIENTS: &str = "callfleet_stream_clients";
    /// Events sent on the live stream.
    pub const STREAM_EVENTS: &str = "callfleet_stream_events_total";
    /// Events a client too slow to keep up missed (it is then disconnected).
    pub const STREAM_EVENTS_DROPPED: &str = "callfleet_stream_events_dropped_total";
    /// Callback delivery attempts by result (delivered, retrying, disabled, dead_lettered, skipped).
    pub const CALLBACKS: &str = "callfleet_callbacks_total";
    /// From a call event to its successful delivery to a receiver.
    pub const CALLBACK_DELAY_SECONDS: &str = "callfleet_callback_delivery_delay_seconds";
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle (`None` if
/// another recorder was installed first, e.g. by an embedding application).
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            // A callback may be retried for about a day: its delay needs buckets that far.
            let delivery = [
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 1_800.0, 7_200.0,
                21_600.0, 86_400.0, 172_800.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(metrics::CALLBACK_DELAY_SECONDS.into()),
                    &delivery,
                )
                .ok()?
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The operator's filter, plus a quiet default for lapin's returned-message warning: it
/// prints the whole message, and a call job's body carries phone numbers that logs must
/// not. callfleet reports an unroutable publish itself, without the body.
fn log_directives(filter: &str) -> String {
    let filter = if filter.trim().is_empty() {
        "info"
    } else {
        filter
    };
    if filter.contains("lapin::returned_messages") {
        filter.to_owned()
    } else {
        format!("{filter},lapin::returned_messages=error")
    }
}

/// Initialises tracing from `filter` (an `EnvFilter` directive such as `info,callfleet=debug`).
/// Calling it twice is harmless (tests).
pub fn init_tracing(format: LogFormat, filter: &str) {
    let filter =
        EnvFilter::try_new(log_directives(filter)).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init(),
        // Colour only for a person at a terminal: piped or collected logs stay plain text.
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .compact()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_message_bodies_stay_out_of_logs_unless_asked_for() {
        assert_eq!(
            log_directives("warn"),
            "warn,lapin::returned_messages=error"
        );
        assert_eq!(log_directives(""), "info,lapin::returned_messages=error");
        assert_eq!(
            log_directives("info,lapin::returned_messages=warn"),
            "info,lapin::returned_messages=warn"
        );
        assert!(EnvFilter::try_new(log_directives("debug")).is_ok());
    }
}
