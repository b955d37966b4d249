//! callfleet's HTTP ingress: health, readiness and metrics today; the call API and the
//! LiveKit webhook endpoint build on [`app`] and [`error::ApiError`].

pub mod error;

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use callfleet_core::lifecycle::{health_router, Readiness};
use callfleet_core::telemetry::metrics as m;
use tower_http::limit::RequestBodyLimitLayer;

pub use error::ApiError;

/// Everything the ingress needs.
#[derive(Clone)]
pub struct IngressState {
    pub readiness: Readiness,
    pub max_body_bytes: usize,
}

/// The ingress app: routes, body limit (413 beyond it) and request metrics by route.
pub fn app(state: IngressState) -> Router {
    health_router(state.readiness.clone())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(RequestBodyLimitLayer::new(state.max_body_bytes))
        .layer(middleware::from_fn(track_requests))
}

/// Counts requests and their latency by matched route (never the raw path: bounded labels).
async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
