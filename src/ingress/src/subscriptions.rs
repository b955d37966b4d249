//! Callback subscriptions: `/v1/subscriptions` (create, list, get, update, delete), secret
//! rotation, the delivery log, and a test-send through the same queue and signing as real
//! callbacks. A new secret is shown in full once, in the answer that made it.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use callfleet_core::callback::check_callback_url;
use callfleet_core::calls::{payload, CallbackJob, Target};
use callfleet_core::domain::events::EventType;
use callfleet_core::domain::request::FieldError;
use callfleet_core::domain::subscription::{
    call_subscription_id, SigningSecret, Subscription, SubscriptionInput,
};
use serde::Deserialize;
use serde_json::json;

use crate::calls::unavailable;
use crate::{body_bytes, parse_json, ApiError, IngressState};

fn invalid(errors: Vec<FieldError>) -> ApiError {
    // The shared error shape names one field; the message lists every other one too.
    let first = errors.first().cloned().unwrap_or(FieldError {
        field: "body".into(),
        message: "is invalid".into(),
    });
    let message = if errors.len() > 1 {
        let rest: Vec<String> = errors[1..].iter().map(ToString::to_string).collect();
        format!("{} (also: {})", first.message, rest.join("; "))
    } else {
        first.message
    };
    ApiError::Invalid {
        field: first.field,
        message,
    }
}

fn sub_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|_| ApiError::NotFound("no such subscription".into()))
}

async fn load(state: &IngressState, id: &str) -> Result<Subscription, ApiError> {
    state
        .subscriptions
        .get(id)
        .await
        .map_err(|e| unavailable("store", e))?
        .ok_or_else(|| ApiError::NotFound(format!("no subscription {id}")))
}

/// Refuses a URL the fleet may not call (private addresses unless allowed).
async fn check_url(state: &IngressState, url: &str) -> Result<(), ApiError> {
    check_callback_url(url, state.callbacks.allow_private)
        .await
        .map(|_| ())
        .map_err(|e| ApiError::Invalid {
            field: "url".into(),
            message: e.to_string(),
        })
}

async fn save(state: &IngressState, sub: &Subscription) -> Result<(), ApiError> {
    state
        .subscriptions
        .put(sub)
        .await
        .map(|_| ())
        .map_err(|e| unavailable("store", e))
}

/// `POST /v1/subscriptions`: 201 with the subscription and its secret (shown this once).
pub async fn create(
    State(state): State<IngressState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input: SubscriptionInput = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    let sub = input
        .validate(None, None, state.clock.now())
        .map_err(invalid)?;
    check_url(&state, &sub.url).await?;
    save(&state, &sub).await?;
    let mut answer = serde_json::to_value(sub.public()).unwrap_or_default();
    answer["secret"] = sub.secrets.first().cloned().unwrap_or_default().into();
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `GET /v1/subscriptions`
pub async fn list(State(state): State<IngressState>) -> Result<Response, ApiError> {
    let subs = state
        .subscriptions
        .list()
        .await
        .map_err(|e| unavailable("store", e))?;
    let subs: Vec<_> = subs.iter().map(Subscription::public).collect();
    Ok(Json(json!({ "subscriptions": subs })).into_response())
}

/// `GET /v1/subscriptions/{id}`
pub async fn get_one(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let sub = load(&state, &sub_id(id)?).await?;
    Ok(Json(sub.public()).into_response())
}

/// `PATCH /v1/subscriptions/{id}`: the fields given change (re-enabling one that a 410
/// disabled is `{"enabled": true}`).
pub async fn update(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = sub_id(id)?;
    let input: SubscriptionInput = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    let existing = load(&state, &id).await?;
    let sub = input
        .validate(Some(&id), Some(&existing), state.clock.now())
        .map_err(invalid)?;
    if sub.url != existing.url {
        check_url(&state, &sub.url).await?;
    }
    save(&state, &sub).await?;
    Ok(Json(sub.public()).into_response())
}

/// `DELETE /v1/subscriptions/{id}` (with its delivery log).
pub async fn delete(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = sub_id(id)?;
    let deleted = state
        .subscriptions
        .delete(&id)
        .await
        .map_err(|e| unavailable("store", e))?;
    if deleted {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound(format!("no subscription {id}")))
    }
}

/// `POST /v1/subscriptions/{id}/rotate-secret`: a new secret signs first; the old ones keep
/// signing (each callback carries every signature) until removed, so receivers switch
/// without losing a callback.
pub async fn rotate(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let mut sub = load(&state, &sub_id(id)?).await?;
    let secret = SigningSecret::generate();
    sub.rotate(&secret, state.clock.now());
    save(&state, &sub).await?;
    Ok(Json(json!({"secret": secret.as_str(), "subscription": sub.public()})).into_response())
}

/// `DELETE /v1/subscriptions/{id}/secrets/{index}`: retires an old secret (0 = newest).
pub async fn remove_secret(
    State(state): State<IngressState>,
    path: Result<Path<(String, usize)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((id, index)) = path.map_err(|_| ApiError::Invalid {
        field: "index".into(),
        message: "must be the secret's position, 0 for the newest".into(),
    })?;
    let mut sub = load(&state, &id).await?;
    sub.remove_secret(index, state.clock.now())
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    save(&state, &sub).await?;
    Ok(Json(sub.public()).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    limit: Option<usize>,
}

/// `GET /v1/subscriptions/{id}/deliveries?limit=`: attempts, newest first.
pub async fn deliveries(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<DeliveryParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = sub_id(id)?;
    let params = crate::routing::query(params)?;
    let limit = delivery_limit(params.limit)?;
    load(&state, &id).await?;
    let records = state
        .subscriptions
        .deliveries(&id, limit)
        .await
        .map_err(|e| unavailable("store", e))?;
    Ok(Json(json!({ "deliveries": records })).into_response())
}

/// `GET /v1/calls/{id}/deliveries?limit=`: the attempts to the call's own `callback_url`.
pub async fn call_deliveries(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<DeliveryParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = crate::calls::call_id(id)?;
    let params = crate::routing::query(params)?;
    let limit = delivery_limit(params.limit)?;
    let call = state
        .calls
        .get(&id)
        .await
        .map_err(|e| unavailable("store", e))?
        .ok_or_else(|| ApiError::NotFound(format!("no call {id}")))?;
    if call.callback_url.is_none() {
        return Err(ApiError::NotFound(format!(
            "call {id} has no callback_url (subscriptions keep their own delivery logs)"
        )));
    }
    let records = state
        .subscriptions
        .deliveries(&call_subscription_id(&id), limit)
        .await
        .map_err(|e| unavailable("store", e))?;
    Ok(Json(json!({ "deliveries": records })).into_response())
}

fn delivery_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(50);
    if (1..=1_000).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::Invalid {
            field: "limit".into(),
            message: "must be 1 to 1000".into(),
        })
    }
}

/// `POST /v1/subscriptions/{id}/test`: a `subscription.test` callback, queued, signed and
/// retried like any other; its attempts show in the delivery log.
pub async fn test_send(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let sub = load(&state, &sub_id(id)?).await?;
    let now = state.clock.now();
    let webhook_id = format!("msg_test_{}", uuid::Uuid::now_v7().simple());
    let job = CallbackJob {
        webhook_id: webhook_id.clone(),
        target: Target::Subscription { id: sub.id.clone() },
        event_type: EventType::Test,
        call_id: "test".into(),
        event_at: now,
        payload: payload(
            EventType::Test,
            now,
            json!({"subscription_id": sub.id, "message": "a test callback from callfleet"}),
        ),
        attempt: 1,
    };
    state
        .broker
        .publish(job.message(None))
        .await
        .map_err(|e| unavailable("broker", e))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"webhook_id": webhook_id, "subscription_id": sub.id})),
    )
        .into_response())
}
