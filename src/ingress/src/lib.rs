//! callfleet's HTTP ingress: the call API, the LiveKit webhook endpoint, health, readiness
//! and metrics. It verifies, validates, enqueues with publisher confirms and answers fast;
//! it never calls LiveKit.

pub mod calls;
pub mod control;
pub mod error;
pub mod events;
pub mod routing;
pub mod subscriptions;
pub mod webhook;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use callfleet_core::calls::{CallBook, Clock};
use callfleet_core::domain::request::CallDefaults;
use callfleet_core::lifecycle::{health_router, Readiness};
use callfleet_core::ports::subscriptions::SubscriptionStore;
use callfleet_core::ports::Broker;
use callfleet_core::routing::RoutingCache;
use callfleet_core::telemetry::metrics as m;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

pub use error::ApiError;

/// Everything the ingress needs.
#[derive(Clone)]
pub struct IngressState {
    pub readiness: Readiness,
    pub max_body_bytes: usize,
    pub broker: Arc<dyn Broker>,
    pub calls: CallBook,
    /// Bearer keys accepted by the call API.
    pub api_keys: Arc<Vec<SecretString>>,
    /// LiveKit API keys and secrets that may sign webhooks.
    pub webhook_keys: Arc<Vec<(String, SecretString)>>,
    pub defaults: CallDefaults,
    pub clock: Arc<dyn Clock>,
    /// The routing table (profiles), kept current in memory.
    pub routing: Arc<RoutingCache>,
    /// The live event stream's tail of the event log.
    pub events: Arc<events::EventHub>,
    /// API keys that see phone numbers in full on the stream (others see them masked).
    pub number_keys: Arc<Vec<SecretString>>,
    /// Callback subscriptions (admin API).
    pub subscriptions: Arc<dyn SubscriptionStore>,
    pub callbacks: CallbackPolicy,
}

/// What the ingress checks callback URLs against.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallbackPolicy {
    /// Loopback and private addresses may receive callbacks (dev mode).
    pub allow_private: bool,
    /// The fleet has a signing secret, so a call may carry its own `callback_url`.
    pub signs_calls: bool,
}

impl CallbackPolicy {
    pub fn from_config(config: &callfleet_core::config::CallbackConfig) -> Self {
        Self {
            allow_private: config.callbacks_allow_private,
            signs_calls: !config.secrets().is_empty(),
        }
    }
}

/// The ingress app: routes, body limit (413 beyond it) and request metrics by route.
pub fn app(state: IngressState) -> Router {
    // The key is checked before anything else, the body included: an unauthenticated
    // client cannot make the ingress read (or wait for) what it sends.
    let calls = Router::new()
        .route("/v1/calls", post(calls::create_call).get(calls::list_calls))
        .route("/v1/calls/batch", post(calls::create_batch))
        .route("/v1/calls/{id}", get(calls::get_call))
        .route("/v1/calls/{id}/cancel", post(calls::cancel_call))
        .route("/v1/calls/{id}/hangup", post(control::hangup))
        .route("/v1/calls/{id}/transfer", post(control::transfer))
        .route(
            "/v1/calls/{id}/deliveries",
            get(subscriptions::call_deliveries),
        )
        .route("/v1/events", get(events::stream))
        .route(
            "/v1/subscriptions",
            post(subscriptions::create).get(subscriptions::list),
        )
        .route(
            "/v1/subscriptions/{id}",
            get(subscriptions::get_one)
                .patch(subscriptions::update)
                .delete(subscriptions::delete),
        )
        .route(
            "/v1/subscriptions/{id}/rotate-secret",
            post(subscriptions::rotate),
        )
        .route(
            "/v1/subscriptions/{id}/secrets/{index}",
            axum::routing::delete(subscriptions::remove_secret),
        )
        .route(
            "/v1/subscriptions/{id}/deliveries",
            get(subscriptions::deliveries),
        )
        .route(
            "/v1/subscriptions/{id}/test",
            post(subscriptions::test_send),
        )
        .route(
            "/v1/routing/profiles",
            post(routing::create).get(routing::list),
        )
        .route(
            "/v1/routing/profiles/{id}",
            get(routing::get_one)
                .put(routing::replace)
                .patch(routing::patch)
                .delete(routing::delete),
        )
        .route(
            "/v1/routing/profiles/{id}/activate",
            post(routing::activate),
        )
        .route(
            "/v1/routing/profiles/{id}/deactivate",
            post(routing::deactivate),
        )
        .route("/v1/routing/explain", get(routing::explain))
        .route("/v1/routing/export", get(routing::export))
        .route(
            "/v1/routing/import",
            post(routing::import).layer(DefaultBodyLimit::max(routing::IMPORT_MAX_BYTES)),
        )
        .route("/v1/routing/resolve", post(routing::resolve))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let api = Router::new()
        .merge(calls)
        .route("/v1/livekit/webhook", post(webhook::receive))
        .with_state(state.clone());
    health_router(state.readiness.clone())
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn(track_requests))
}

async fn require_api_key(
    State(state): State<IngressState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    authorize(&state, request.headers())?;
    Ok(next.run(request).await)
}

/// Checks `Authorization: Bearer <key>` against every configured key in constant time.
pub(crate) fn authorize(state: &IngressState, headers: &HeaderMap) -> Result<(), ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(
            "missing Authorization header: send `Authorization: Bearer <API key>`",
        ))?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <API key>`",
        ))?;
    let mut ok = subtle::Choice::from(0u8);
    for key in state.api_keys.iter() {
        ok |= key.expose_secret().as_bytes().ct_eq(presented.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("unknown API key"))
    }
}

/// Whether the request's (already authorized) key may see phone numbers in full.
pub(crate) fn sees_numbers(state: &IngressState, headers: &HeaderMap) -> bool {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return false;
    };
    let mut ok = subtle::Choice::from(0u8);
    for key in state.number_keys.iter() {
        ok |= key.expose_secret().as_bytes().ct_eq(presented.as_bytes());
    }
    bool::from(ok)
}

/// The raw body, with an oversized one answered 413 in the shared error shape.
pub(crate) fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::Invalid {
                field: "body".into(),
                message: "the request body could not be read in full".into(),
            }
        }
    })
}

/// Turns a serde error at `path` into a 422 naming the field (unknown fields by their own
/// name).
fn field_error(path: String, error: &(impl std::fmt::Display + ?Sized)) -> ApiError {
    let message = error.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_owned();
    // serde names our Rust types ("expected struct CallRequest"); say it in API terms.
    let message = match message.split_once(", expected struct ") {
        Some((got, _)) => format!(
            "must be a JSON object, not {}",
            got.trim_start_matches("invalid type: ")
        ),
        None => message,
    };
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    // The path already ends at an unknown field's own name.
    let field = match (unknown, path.as_str()) {
        (Some(name), "." | "") => name.to_owned(),
        (None, "." | "") => "body".to_owned(),
        (_, p) => p.to_owned(),
    };
    ApiError::Invalid { field, message }
}

/// Parses a JSON body, naming the offending field on failure, or where the JSON itself
/// breaks (line and column).
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::Invalid {
                field: "body".into(),
                message: format!(
                    "is not valid JSON (line {}, column {})",
                    inner.line(),
                    inner.column()
                ),
            };
        }
        field_error(e.path().to_string(), inner)
    })
}

/// Like [`parse_json`], for an item already parsed as JSON (batch items).
pub(crate) fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| field_error(e.path().to_string(), e.inner()))
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
    // One span per request; handlers record the call it concerns, which the job's span in
    // the worker carries too (from the message's trace header).
    let span = tracing::info_span!(
        "request",
        method = %method,
        route = %route,
        call_id = tracing::field::Empty
    );
    let response = tracing::Instrument::instrument(next.run(request), span).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod fuzz {
    use callfleet_core::domain::phone::parse_region;
    use callfleet_core::domain::request::{CallDefaults, CallRequest};
    use proptest::prelude::*;

    use super::parse_json;

    fn defaults() -> CallDefaults {
        CallDefaults {
            region: parse_region("US").ok(),
            trunk_id: Some("ST_x".into()),
        }
    }

    /// JSON values shaped like call requests: the known fields with values of any type,
    /// nested a little, plus strays.
    fn request_like() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            "\\PC{0,24}".prop_map(serde_json::Value::from),
            "[+]?[0-9 ()-]{0,16}".prop_map(serde_json::Value::from),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        let field = prop_oneof![
            Just("to"),
            Just("from"),
            Just("trunk_id"),
            Just("agent_name"),
            Just("context"),
            Just("idempotency_key"),
            Just("not_before"),
            Just("call_window"),
            Just("max_attempts"),
            Just("retry_on"),
            Just("retry_delay_s"),
            Just("ringing_timeout_s"),
            Just("max_duration_s"),
            Just("wait_until_answered"),
            Just("tags"),
            Just("stray"),
        ];
        prop::collection::btree_map(field, value, 0..8).prop_map(|m| {
            serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Any bytes: an answer (a request or a 4xx naming a field), never a panic.
        #[test]
        fn any_body_is_answered(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_json::<CallRequest>(&body);
        }

        /// Request-shaped JSON: parsed or refused with a field named, and a parsed one is
        /// turned into a call or refused, never a panic.
        #[test]
        fn request_shaped_json_is_validated(value in request_like()) {
            let body = serde_json::to_vec(&value).unwrap_or_default();
            match parse_json::<CallRequest>(&body) {
                Ok(request) => {
                    let _ = request.into_call(&defaults(), chrono::Utc::now());
                }
                Err(super::ApiError::Invalid { field, .. }) => prop_assert!(!field.is_empty()),
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}
