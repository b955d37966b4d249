//! Process lifecycle: shutdown signals and the health endpoints every process serves.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::ports::{Broker, Store};
use crate::telemetry;

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {},
                        _ = term.recv() => {},
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}

/// What readiness checks.
#[derive(Clone)]
pub struct Readiness {
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn Store>,
    /// How long each dependency may take to answer.
    pub timeout: Duration,
}

/// `/healthz` (alive), `/readyz` (broker and store reachable) and `/metrics`.
pub fn health_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn readyz(State(r): State<Readiness>) -> Response {
    let broker = tokio::time::timeout(r.timeout, r.broker.ping()).await;
    let store = tokio::time::timeout(r.timeout, r.store.ping()).await;
    let broker_ok = matches!(broker, Ok(Ok(())));
    let store_ok = matches!(store, Ok(Ok(())));
    let body = json!({
        "status": if broker_ok && store_ok { "ready" } else { "unavailable" },
        "broker": if broker_ok { "ok" } else { "unreachable" },
        "store": if store_ok { "ok" } else { "unreachable" },
    });
    let status = if broker_ok && store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics() -> Response {
    match telemetry::prometheus() {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed",
        )
            .into_response(),
    }
}
