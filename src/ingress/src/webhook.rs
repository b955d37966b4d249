//! `POST /v1/livekit/webhook`: verify exactly as LiveKit signs, enqueue with a publisher
//! confirm, and only then answer 200 (503 when the broker is down, so LiveKit retries).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use callfleet_core::domain::call_for_room;
use callfleet_core::domain::inbound::inbound_call_id;
use callfleet_core::domain::webhook::{verify_webhook, WebhookEvent};
use callfleet_core::ports::broker::headers as h;
use callfleet_core::ports::{Message, WorkQueue};
use callfleet_core::telemetry::metrics as m;

use crate::{body_bytes, ApiError, IngressState};

/// Header carrying the event name, so a dead letter says what it was.
pub const EVENT_HEADER: &str = "x-callfleet-event";

fn rejected(reason: &'static str) {
    metrics::counter!(m::WEBHOOKS, "result" => "rejected", "reason" => reason).increment(1);
}

pub async fn receive(
    State(state): State<IngressState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(rejection) = verify_webhook(authorization, &body, &state.webhook_keys) {
        rejected(rejection.as_str());
        tracing::warn!(reason = rejection.as_str(), "webhook refused");
        return Err(ApiError::Unauthorized(
            "the webhook is not signed by a configured LiveKit API key",
        ));
    }
    let event = WebhookEvent::parse(&body).map_err(|reason| {
        rejected("unreadable");
        ApiError::Invalid {
            field: "body".into(),
            message: reason,
        }
    })?;
    let mut message = Message::new(WorkQueue::WebhookEvents, body.clone())
        .with_id(event.dedupe_id(&body))
        .with_header(EVENT_HEADER, event.event.as_str())
        .with_header(
            h::RECEIVED_MS,
            chrono::Utc::now().timestamp_millis().to_string(),
        );
    // The worker's job span names the call the event is about: the room's outbound call,
    // or the inbound call keyed by the room.
    if let Some(room) = event.room.as_ref().filter(|r| !r.name.is_empty()) {
        let call_id = call_for_room(&room.name).unwrap_or_else(|| inbound_call_id(room));
        message = message.with_header(h::TRACE_ID, call_id);
    }
    match state.broker.publish(message).await {
        Ok(()) => {
            metrics::counter!(m::WEBHOOKS, "result" => "accepted", "reason" => "none").increment(1);
            metrics::counter!(m::JOBS_ENQUEUED, "queue" => "webhook_events").increment(1);
            Ok(StatusCode::OK)
        }
        Err(e) => {
            tracing::warn!(error = %e, "webhook not enqueued; answering 503 so LiveKit retries");
            metrics::counter!(m::WEBHOOKS, "result" => "unavailable", "reason" => "broker")
                .increment(1);
            Err(ApiError::Unavailable { retry_after_s: 1 })
        }
    }
}
