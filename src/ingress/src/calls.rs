//! The call API: submit (one or a batch), read, list, cancel.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use callfleet_core::calls::{wall_time, CallFilter, CallJob};
use callfleet_core::domain::request::{limits, CallRequest};
use callfleet_core::domain::{Call, CallStatus, Direction};
use callfleet_core::ports::Message;
use callfleet_core::telemetry::metrics as m;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{body_bytes, parse_json, ApiError, IngressState};

/// How long an idempotency key is remembered.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Retry-After when the broker or store is down.
const RETRY_AFTER_S: u64 = 5;

pub(crate) fn unavailable(what: &str, error: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %error, "{what} unavailable");
    ApiError::Unavailable {
        retry_after_s: RETRY_AFTER_S,
    }
}

/// A submission that passed validation and has a record.
enum Accepted {
    /// New: its job still has to be published. Carries the call's JSON as stored.
    New(Call, Bytes, Message),
    /// The idempotency key named a call stored for the same request. With a job when that
    /// call may still lack one (no worker touched it: the earlier submission's publish
    /// failed or its ingress died), to publish again; a duplicate job is harmless.
    Existing(Call, Option<Message>),
}

/// A validated submission, not yet stored.
struct Valid {
    call: Call,
    fingerprint: String,
}

impl IngressState {
    /// The first job of `call`, due when the call is.
    fn first_job(&self, call: &Call) -> Message {
        let deliver_at = call
            .scheduled_for
            .map(|due| wall_time(self.clock.as_ref(), due));
        CallJob {
            call_id: call.id.clone(),
            attempt: 1,
        }
        .message(deliver_at)
    }

    /// A stored call named by a repeated submission, with the job to publish again if it
    /// may have none: a call never picked up, or one abandoned as `not_enqueued` (queued
    /// again, since its client is retrying).
    async fn existing(&self, call: Call) -> Result<Accepted, ApiError> {
        if call.awaits_first_job() {
            let job = self.first_job(&call);
            return Ok(Accepted::Existing(call, Some(job)));
        }
        let now = self.clock.now();
        let revived = self
            .calls
            .update(&call.id, |c| c.revive_unenqueued(now))
            .await
            .map_err(|e| unavailable("store", e))?;
        Ok(match revived {
            Some((call, true)) => {
                let job = self.first_job(&call);
                Accepted::Existing(call, Some(job))
            }
            Some((call, false)) => Accepted::Existing(call, None),
            None => Accepted::Existing(call, None),
        })
    }

    /// Validates, applies the idempotency key and stores the call record; publishing the
    /// job is the caller's (so a batch can publish in one pipelined round).
    ///
    /// Every step can be repeated: the key names the call id it claimed, the record is
    /// created only if absent (under that id), and the job is published again while no
    /// worker has touched the call. A client that retries after a 503 (broker or store
    /// down at any point) ends with exactly one call, enqueued.
    async fn accept(&self, request: CallRequest) -> Result<Accepted, ApiError> {
        let valid = self.validate(request)?;
        self.check_callback(&valid.call).await?;
        self.admit(valid).await
    }

    /// A call's own callback URL must reach a receiver the fleet may call (no private
    /// address unless allowed), and the fleet must have a secret to sign with.
    async fn check_callback(&self, call: &Call) -> Result<(), ApiError> {
        let Some(url) = &call.callback_url else {
            return Ok(());
        };
        if !self.callbacks.signs_calls {
            return Err(ApiError::Invalid {
                field: "callback_url".into(),
                message: "needs a signing secret: set CALLFLEET_CALLBACK_SECRETS on the fleet"
                    .into(),
            });
        }
        callfleet_core::callback::check_callback_url(url, self.callbacks.allow_private)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::Invalid {
                field: "callback_url".into(),
                message: e.to_string(),
            })
    }

    /// Turns a request into the call it asks for, touching nothing (a batch validates
    /// every item before it stores any).
    fn validate(&self, request: CallRequest) -> Result<Valid, ApiError> {
        // Only a keyed request is ever compared with another.
        let fingerprint = if request.idempotency_key.is_some() {
            request.fingerprint()
        } else {
            String::new()
        };
        let call = request
            .into_call(&self.defaults, self.clock.now())
            .map_err(|e| ApiError::Invalid {
                field: e.field,
                message: e.message,
            })?;
        Ok(Valid { call, fingerprint })
    }

    /// Applies the idempotency key and stores a validated call.
    async fn admit(&self, valid: Valid) -> Result<Accepted, ApiError> {
        let Valid {
            mut call,
            fingerprint,
        } = valid;
        if let Some(key) = call.idempotency_key.clone() {
            let claim = format!("{} {fingerprint}", call.id);
            let existing = self
                .calls
                .store()
                .claim_key(&idempotency_key(&key), &claim, IDEMPOTENCY_TTL)
                .await
                .map_err(|e| unavailable("store", e))?;
            if let Some(existing) = existing {
                let (existing_id, existing_fp) =
                    existing.split_once(' ').unwrap_or((existing.as_str(), ""));
                if existing_fp != fingerprint {
                    return Err(ApiError::Conflict(
                        "idempotency_key was already used for a different request".into(),
                    ));
                }
                match self
                    .calls
                    .get(existing_id)
                    .await
                    .map_err(|e| unavailable("store", e))?
                {
                    Some(stored) => return self.existing(stored).await,
                    // The claim outlived its record (the claiming request died, or the
                    // store failed, before the call was stored): store it now, under the
                    // claimed id, so concurrent retries converge on one call.
                    None => call.assign_id(existing_id),
                }
            }
        }
        match self
            .calls
            .create(&call)
            .await
            .map_err(|e| unavailable("store", e))?
        {
            Some(json) => {
                let job = self.first_job(&call);
                Ok(Accepted::New(call, json, job))
            }
            None if call.idempotency_key.is_some() => {
                // A concurrent retry of the same submission stored it first.
                match self
                    .calls
                    .get(&call.id)
                    .await
                    .map_err(|e| unavailable("store", e))?
                {
                    Some(stored) => self.existing(stored).await,
                    None => Err(ApiError::Internal(format!("call {} vanished", call.id))),
                }
            }
            None => Err(ApiError::Internal(format!(
                "call id collision: {}",
                call.id
            ))),
        }
    }

    /// The job could not be enqueued: the caller got a 503, so the record must not look
    /// like a live call. Marked `failed`/`not_enqueued` unless a worker took it after all;
    /// the key stays, so the client's retry revives this very call. If the store is down
    /// too, the call stays `queued` without a job: a retry with the key enqueues it, and
    /// without one the sweeper does after `CALLFLEET_SWEEP_AFTER_S` (retrying the mark in
    /// the background instead could fail a call its client has meanwhile resubmitted).
    async fn abandon(&self, call: &Call) {
        let now = self.clock.now();
        if let Err(e) = self
            .calls
            .update(&call.id, |c| c.abandon_unenqueued(now))
            .await
        {
            tracing::warn!(call_id = %call.id, error = %e, "could not mark an unenqueued call; it stays queued");
        }
    }
}

/// The call id from the path; one that is not even text (`%ff`) names no call.
pub(crate) fn call_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|_| ApiError::NotFound("no such call: call ids look like call_0123…".into()))
}

fn idempotency_key(key: &str) -> String {
    format!("idem:{key}")
}

/// `POST /v1/calls`: 202 with the call once the broker confirmed its job; 200 with the
/// existing call for a repeated idempotency key.
pub async fn create_call(
    State(state): State<IngressState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CallRequest = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    let accepted = state.accept(request).await?;
    let call_id = match &accepted {
        Accepted::Existing(call, _) | Accepted::New(call, ..) => call.id.clone(),
    };
    tracing::Span::current().record("call_id", call_id.as_str());
    match accepted {
        Accepted::Existing(call, None) => Ok((StatusCode::OK, Json(call)).into_response()),
        Accepted::Existing(call, Some(job)) => match state.broker.publish(job).await {
            Ok(()) => Ok((StatusCode::OK, Json(call)).into_response()),
            Err(e) => Err(unavailable("broker", e)),
        },
        Accepted::New(call, json, message) => match state.broker.publish(message).await {
            Ok(()) => {
                metrics::counter!(m::JOBS_ENQUEUED, "queue" => "call_jobs").increment(1);
                // Per call on the hot path: debug, not info (the request span names it).
                tracing::debug!(call_id = %call_id, "call accepted");
                Ok((
                    StatusCode::ACCEPTED,
                    [(header::CONTENT_TYPE, "application/json")],
                    json,
                )
                    .into_response())
            }
            Err(e) => {
                state.abandon(&call).await;
                Err(unavailable("broker", e))
            }
        },
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    calls: Vec<Value>,
}

/// One item's result in a batch answer.
#[derive(Debug, Serialize)]
pub struct BatchItem {
    index: usize,
    /// 202 accepted, 200 existing (idempotency key), or the error's status.
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    call: Option<Call>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct BatchResponse {
    accepted: usize,
    rejected: usize,
    results: Vec<BatchItem>,
}

fn error_item(index: usize, error: &ApiError) -> BatchItem {
    BatchItem {
        index,
        status: error.status().as_u16(),
        call: None,
        error: Some(error.item_json()),
    }
}

/// `POST /v1/calls/batch`: each item validated and accepted or rejected on its own; the
/// accepted ones are published in one pipelined round of confirms.
pub async fn create_batch(
    State(state): State<IngressState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<BatchResponse>), ApiError> {
    let batch: BatchRequest = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    if batch.calls.is_empty() || batch.calls.len() > limits::MAX_BATCH {
        return Err(ApiError::Invalid {
            field: "calls".into(),
            message: format!("must hold 1 to {} calls", limits::MAX_BATCH),
        });
    }
    let mut results: Vec<Option<BatchItem>> = (0..batch.calls.len()).map(|_| None).collect();
    // Every item is validated before any is stored, so a bad item cannot leave the ones
    // before it half-accepted.
    let mut valid = Vec::new();
    for (index, item) in batch.calls.into_iter().enumerate() {
        let checked = match crate::from_value::<CallRequest>(item).and_then(|r| state.validate(r)) {
            Ok(v) => state.check_callback(&v.call).await.map(|()| v),
            Err(e) => Err(e),
        };
        match checked {
            Ok(v) => valid.push((index, v)),
            Err(e) => results[index] = Some(error_item(index, &e)),
        }
    }
    let mut pending = Vec::new();
    for (index, v) in valid {
        match state.admit(v).await {
            Ok(Accepted::Existing(call, None)) => {
                results[index] = Some(BatchItem {
                    index,
                    status: 200,
                    call: Some(call),
                    error: None,
                })
            }
            Ok(Accepted::Existing(call, Some(job))) => pending.push((index, call, job, false)),
            Ok(Accepted::New(call, _, message)) => pending.push((index, call, message, true)),
            Err(e @ ApiError::Unavailable { .. }) => {
                // The store went away mid-batch: what was stored is not enqueued.
                for (_, call, _, new) in &pending {
                    if *new {
                        state.abandon(call).await;
                    }
                }
                return Err(e);
            }
            Err(e) => results[index] = Some(error_item(index, &e)),
        }
    }
    if !pending.is_empty() {
        let messages = pending.iter().map(|(_, _, m, _)| m.clone()).collect();
        let outcomes = state.broker.publish_many(messages).await;
        let published = outcomes.iter().filter(|r| r.is_ok()).count();
        if published == 0 {
            // The broker is down: nothing was enqueued, so the whole batch is retryable.
            for (_, call, _, new) in &pending {
                if *new {
                    state.abandon(call).await;
                }
            }
            let reason = outcomes
                .into_iter()
                .find_map(Result::err)
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(unavailable("broker", reason));
        }
        metrics::counter!(m::JOBS_ENQUEUED, "queue" => "call_jobs").increment(published as u64);
        for ((index, call, _, new), outcome) in pending.into_iter().zip(outcomes) {
            results[index] = Some(match outcome {
                Ok(()) => BatchItem {
                    index,
                    status: if new { 202 } else { 200 },
                    call: Some(call),
                    error: None,
                },
                Err(e) => {
                    if new {
                        state.abandon(&call).await;
                    }
                    error_item(index, &unavailable("broker", e))
                }
            });
        }
    }
    let results: Vec<BatchItem> = results.into_iter().flatten().collect();
    let accepted = results.iter().filter(|r| r.status < 300).count();
    Ok((
        StatusCode::OK,
        Json(BatchResponse {
            accepted,
            rejected: results.len() - accepted,
            results,
        }),
    ))
}

/// `GET /v1/calls/{id}`.
pub async fn get_call(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Call>, ApiError> {
    let id = call_id(id)?;
    state
        .calls
        .get(&id)
        .await
        .map_err(|e| unavailable("store", e))?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no call {id}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    direction: Option<String>,
    tag: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListResponse {
    calls: Vec<Call>,
    next_cursor: Option<String>,
}

/// `GET /v1/calls?status=&direction=&tag=&limit=&cursor=`: newest first.
pub async fn list_calls(
    State(state): State<IngressState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::Invalid {
        field: "query".into(),
        message: e.body_text(),
    })?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            CallStatus::parse(s).ok_or_else(|| ApiError::Invalid {
                field: "status".into(),
                message: format!(
                    "is not a status; use one of {}",
                    CallStatus::ALL.map(CallStatus::as_str).join(", ")
                ),
            })
        })
        .transpose()?;
    let direction = match params.direction.as_deref() {
        None => None,
        Some("outbound") => Some(Direction::Outbound),
        Some("inbound") => Some(Direction::Inbound),
        Some(_) => {
            return Err(ApiError::Invalid {
                field: "direction".into(),
                message: "must be inbound or outbound".into(),
            })
        }
    };
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::Invalid {
            field: "limit".into(),
            message: "must be 1 to 200".into(),
        });
    }
    let filter = CallFilter {
        status,
        direction,
        tag: params.tag,
    };
    let page = state
        .calls
        .list(&filter, limit, params.cursor.as_deref())
        .await
        .map_err(|e| unavailable("store", e))?;
    Ok(Json(ListResponse {
        calls: page.calls,
        next_cursor: page.next_cursor,
    }))
}

/// `POST /v1/calls/{id}/cancel`: only before the call is dialed (409 after).
pub async fn cancel_call(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Call>, ApiError> {
    let id = call_id(id)?;
    let now = state.clock.now();
    let updated = state
        .calls
        .update(&id, |call| call.cancel(now))
        .await
        .map_err(|e| unavailable("store", e))?;
    match updated {
        None => Err(ApiError::NotFound(format!("no call {id}"))),
        Some((_, Err(refused))) => Err(ApiError::Conflict(refused.to_string())),
        Some((call, Ok(()))) => {
            metrics::counter!(m::CALLS_FINISHED, "direction" => "outbound", "status" => "canceled")
                .increment(1);
            Ok(Json(call))
        }
    }
}
