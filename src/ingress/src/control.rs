//! Call control: `POST /v1/calls/{id}/hangup` and `/transfer`. The command is taken on the
//! call's record (409 once the call ended, 422 for a bad target) and queued for a worker,
//! which runs it against LiveKit; the answer is 202 with the command's id. A repeat with
//! the same `Idempotency-Key` answers with the command already taken and queues nothing new.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use callfleet_core::calls::ControlJob;
use callfleet_core::domain::control::{
    new_command_id, Command, CommandKind, CommandOutcome, TransferTarget,
};
use callfleet_core::telemetry::metrics as m;
use serde::Deserialize;
use serde_json::json;

use crate::calls::unavailable;
use crate::{body_bytes, parse_json, ApiError, IngressState};

/// Longest accepted `Idempotency-Key`.
const MAX_KEY_LEN: usize = 255;
/// How long a command may wait in the queue before a repeat queues it again.
const REQUEUE_AFTER: chrono::Duration = chrono::Duration::seconds(5);
/// Longest SIP header value a transfer may add to its REFER.
const MAX_HEADER_VALUE: usize = 1_024;
/// Longest ringing time a transfer may ask for.
const MAX_RINGING_S: u32 = 600;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HangupBody {
    #[serde(default)]
    delete_room: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    to: String,
    #[serde(default)]
    play_dialtone: bool,
    ringing_timeout_s: Option<u32>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| invalid("Idempotency-Key", "must be printable ASCII"))?
        .trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(invalid(
            "Idempotency-Key",
            format!("must be 1 to {MAX_KEY_LEN} characters"),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// `POST /v1/calls/{id}/hangup` with an optional `{"delete_room": true}`.
pub async fn hangup(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, state.max_body_bytes)?;
    let parsed: HangupBody = if body.iter().all(u8::is_ascii_whitespace) {
        HangupBody::default()
    } else {
        parse_json(&body)?
    };
    let kind = CommandKind::Hangup {
        delete_room: parsed.delete_room,
    };
    take(&state, id, &headers, kind).await
}

/// `POST /v1/calls/{id}/transfer` with `{"to": "tel:+E164" | "sip:…", …}`.
pub async fn transfer(
    State(state): State<IngressState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let parsed: TransferBody = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    let to = TransferTarget::parse(&parsed.to).map_err(|e| invalid("to", e.to_string()))?;
    if let Some(s) = parsed.ringing_timeout_s {
        if !(1..=MAX_RINGING_S).contains(&s) {
            return Err(invalid(
                "ringing_timeout_s",
                format!("must be 1 to {MAX_RINGING_S} seconds"),
            ));
        }
    }
    for (name, value) in &parsed.headers {
        // A line break would end the header early and inject others into the REFER.
        if value.len() > MAX_HEADER_VALUE || value.contains(['\r', '\n']) {
            return Err(invalid(
                &format!("headers.{name}"),
                format!("must be one line of at most {MAX_HEADER_VALUE} characters"),
            ));
        }
        // A header name is a token (RFC 3261); anything else would break the REFER.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b))
        {
            return Err(invalid(
                &format!("headers.{name}"),
                "is not a valid SIP header name",
            ));
        }
    }
    let kind = CommandKind::Transfer {
        to,
        play_dialtone: parsed.play_dialtone,
        ringing_timeout_s: parsed.ringing_timeout_s,
        headers: parsed.headers,
    };
    take(&state, id, &headers, kind).await
}

async fn take(
    state: &IngressState,
    id: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    kind: CommandKind,
) -> Result<Response, ApiError> {
    let id = crate::calls::call_id(id)?;
    tracing::Span::current().record("call_id", id.as_str());
    let key = idempotency_key(headers)?;
    let label = kind.label();
    let now = state.clock.now();
    let command_id = new_command_id();
    let taken = state
        .calls
        .update(&id, |call| {
            call.request_command(kind.clone(), key.clone(), command_id.clone(), now)
        })
        .await
        .map_err(|e| unavailable("store", e))?;
    let (command, new) = match taken {
        None => return Err(ApiError::NotFound(format!("no call {id}"))),
        Some((_, Err(refused))) => {
            metrics::counter!(m::CONTROL_COMMANDS, "kind" => label, "result" => "refused")
                .increment(1);
            return Err(ApiError::Conflict(refused.to_string()));
        }
        Some((_, Ok(taken))) => taken,
    };
    // A command taken now is queued. So is a repeat of one no worker started for a while:
    // its first publish may have been lost with the ingress that took it (the worker does a
    // command once however often it is queued). A started or finished one is left alone.
    let unstarted = command.sent_at.is_none()
        && command.outcome.is_none()
        && now - command.requested_at > REQUEUE_AFTER;
    if new || unstarted {
        let job = ControlJob {
            call_id: id.clone(),
            command_id: command.id.clone(),
        };
        if let Err(e) = state.broker.publish(job.message()).await {
            // Recorded as never queued (a repeat with the same key queues it).
            let at = state.clock.now();
            let _ = state
                .calls
                .update(&id, |call| {
                    call.command_done(&command.id, CommandOutcome::NotQueued, at)
                })
                .await;
            return Err(unavailable("broker", e));
        }
        metrics::counter!(m::JOBS_ENQUEUED, "queue" => "control").increment(1);
        if new {
            metrics::counter!(m::CONTROL_COMMANDS, "kind" => label, "result" => "accepted")
                .increment(1);
        }
    }
    Ok(accepted(&id, &command))
}

fn accepted(call_id: &str, command: &Command) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "command_id": command.id,
            "call_id": call_id,
            "command": command,
        })),
    )
        .into_response()
}
