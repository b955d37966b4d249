//! The record and control API under `/emulator/v1/`. Every error it answers is JSON:
//! `{"error": "<what>", "status": <http status>, ...}` (route-specific keys besides).

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::agents::{DispatchRecord, DispatchSource};
use crate::faults::Faults;
use crate::sip::{self, CallScript, HangupError, InboundCall, TransferScript};
use crate::Emulator;

pub fn router(emu: Emulator) -> Router {
    Router::new()
        .route("/requests", get(requests))
        .route("/webhooks", get(webhooks))
        .route("/webhook-urls", get(webhook_urls).post(add_webhook_url))
        .route("/rooms", get(rooms))
        .route("/scripts", get(scripts).delete(clear_scripts))
        .route("/scripts/{number}", put(put_script).delete(delete_script))
        .route("/transfers", get(transfers).delete(clear_transfers))
        .route(
            "/transfers/{target}",
            put(put_transfer).delete(delete_transfer),
        )
        .route("/faults", get(get_faults).put(put_faults))
        .route("/inbound", post(inbound).get(inbound_calls))
        .route("/inbound/{sip_call_id}/hangup", post(hangup))
        .route("/agents", get(agents))
        .route("/agents/{agent_name}", put(put_agent).delete(delete_agent))
        .route("/dispatches", get(dispatches))
        .route("/reset", post(reset))
        .fallback(not_found)
        .layer(middleware::from_fn(json_errors))
        .with_state(emu)
}

/// A JSON error answer.
fn error(status: StatusCode, message: &str, extra: Value) -> Response {
    let mut body = json!({"error": message, "status": status.as_u16()});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    (status, Json(body)).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such control route",
        json!({"path": uri.path()}),
    )
}

/// Turns every error answer that is not JSON yet (axum's body and query rejections, 405,
/// an empty 404) into `{"error": ..., "status": ...}`, keeping its status and `Allow`.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let mut answer = error(status, &message, Value::Null);
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Filter {
    method: Option<String>,
    room: Option<String>,
    identity: Option<String>,
    /// A request outcome (`executed`, `executed_then_dropped`, ...).
    outcome: Option<String>,
    event: Option<String>,
}

async fn requests(State(emu): State<Emulator>, Query(f): Query<Filter>) -> Json<Value> {
    let records = emu.inner.records.lock();
    let items: Vec<_> = records
        .requests
        .iter()
        .filter(|r| f.method.as_ref().is_none_or(|m| *m == r.method))
        .filter(|r| {
            f.room
                .as_ref()
                .is_none_or(|room| r.room.as_ref() == Some(room))
        })
        .filter(|r| {
            f.identity
                .as_ref()
                .is_none_or(|identity| r.identity.as_ref() == Some(identity))
        })
        .filter(|r| f.outcome.as_ref().is_none_or(|o| o == r.outcome.as_str()))
        .collect();
    Json(json!({"requests": items}))
}

async fn webhooks(State(emu): State<Emulator>, Query(f): Query<Filter>) -> Json<Value> {
    let records = emu.inner.records.lock();
    let items: Vec<_> = records
        .webhooks
        .iter()
        .filter(|r| f.event.as_ref().is_none_or(|e| *e == r.event))
        .filter(|r| f.room.as_ref().is_none_or(|room| *room == r.room))
        .collect();
    Json(json!({"webhooks": items}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlBody {
    url: String,
}

async fn webhook_urls(State(emu): State<Emulator>) -> Json<Value> {
    Json(json!({"urls": emu.webhook_urls()}))
}

/// Adds a webhook URL; adding one already there changes nothing (still 204).
async fn add_webhook_url(State(emu): State<Emulator>, Json(body): Json<UrlBody>) -> Response {
    let valid = reqwest::Url::parse(&body.url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
    if !valid {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "webhook url must be an absolute http(s) URL",
            json!({"url": body.url}),
        );
    }
    emu.add_webhook_url(&body.url);
    StatusCode::NO_CONTENT.into_response()
}

async fn rooms(State(emu): State<Emulator>) -> Json<Value> {
    let rooms = emu.inner.rooms.lock();
    let list: Vec<Value> = rooms
        .values()
        .map(
            |r| json!({"room": r.info, "participants": r.participants, "dispatches": r.dispatches}),
        )
        .collect();
    Json(json!({"rooms": list}))
}

async fn scripts(State(emu): State<Emulator>) -> Json<Value> {
    Json(json!({"scripts": *emu.inner.scripts.lock(), "default": emu.inner.config.default_script}))
}

async fn clear_scripts(State(emu): State<Emulator>) -> StatusCode {
    emu.inner.scripts.lock().clear();
    StatusCode::NO_CONTENT
}

/// An E.164-looking number: `+` then 8 to 15 digits.
fn e164(number: &str) -> bool {
    number
        .strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

async fn put_script(
    State(emu): State<Emulator>,
    Path(number): Path<String>,
    Json(script): Json<CallScript>,
) -> Response {
    if !e164(&number) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("script number {number:?} is not E.164 (+ and 8 to 15 digits)"),
            json!({"number": number}),
        );
    }
    emu.script(&number, script);
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_script(State(emu): State<Emulator>, Path(number): Path<String>) -> StatusCode {
    emu.inner.scripts.lock().remove(&number);
    StatusCode::NO_CONTENT
}

/// `GET /transfers`: every transfer target's script, by `transfer_to`.
async fn transfers(State(emu): State<Emulator>) -> Json<Value> {
    Json(json!({
        "transfers": *emu.inner.transfer_scripts.lock(),
        "default_after_ms": sip::DEFAULT_TRANSFER_AFTER_MS,
        "default_ringing_timeout_ms": sip::DEFAULT_TRANSFER_TIMEOUT.as_millis() as u64,
    }))
}

async fn clear_transfers(State(emu): State<Emulator>) -> StatusCode {
    emu.inner.transfer_scripts.lock().clear();
    StatusCode::NO_CONTENT
}

/// `PUT /transfers/{target}` (the exact `transfer_to`, URL-encoded): what a transfer to it
/// does. Unknown fields and bad values are 422 naming the field.
async fn put_transfer(
    State(emu): State<Emulator>,
    Path(target): Path<String>,
    Json(script): Json<TransferScript>,
) -> Response {
    if !sip::transfer_target_ok(&target) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("transfer target {target:?} must start with tel:, sip: or sips:"),
            json!({"target": target}),
        );
    }
    if let Err((field, message)) = script.check() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &message,
            json!({"field": field}),
        );
    }
    emu.inner.transfer_scripts.lock().insert(target, script);
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_transfer(State(emu): State<Emulator>, Path(target): Path<String>) -> StatusCode {
    emu.inner.transfer_scripts.lock().remove(&target);
    StatusCode::NO_CONTENT
}

async fn get_faults(State(emu): State<Emulator>) -> Json<Faults> {
    Json(emu.inner.faults.lock().clone())
}

async fn put_faults(State(emu): State<Emulator>, Json(faults): Json<Faults>) -> Response {
    let rates = faults
        .methods
        .values()
        .flat_map(|m| m.rates())
        .chain([faults.webhooks.duplicate_rate, faults.webhooks.reorder_rate]);
    for rate in rates {
        if !(0.0..=1.0).contains(&rate) {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "rates must be between 0 and 1",
                json!({"rate": rate}),
            );
        }
    }
    emu.set_faults(faults);
    StatusCode::NO_CONTENT.into_response()
}

async fn inbound(State(emu): State<Emulator>, Json(call): Json<InboundCall>) -> Response {
    if call.from.is_empty() || call.to.is_empty() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "from and to are required",
            Value::Null,
        );
    }
    (StatusCode::CREATED, Json(emu.inbound_call(call).await)).into_response()
}

/// `GET /inbound`: every inbound call, oldest first.
async fn inbound_calls(State(emu): State<Emulator>) -> Json<Value> {
    Json(json!({"calls": emu.inbound_calls()}))
}

/// `POST /inbound/{sip_call_id}/hangup`: the caller hangs up (204; 404 unknown, 409 ended).
async fn hangup(State(emu): State<Emulator>, Path(sip_call_id): Path<String>) -> Response {
    match emu.hangup_inbound(&sip_call_id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ HangupError::NotFound(_)) => error(
            StatusCode::NOT_FOUND,
            &e.to_string(),
            json!({"sip_call_id": sip_call_id}),
        ),
        Err(e @ HangupError::AlreadyEnded(_)) => error(
            StatusCode::CONFLICT,
            &e.to_string(),
            json!({"sip_call_id": sip_call_id}),
        ),
    }
}

fn millis(d: Option<std::time::Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_millis() as u64))
}

/// `GET /agents`: the default join delay and the per-agent ones (`null`: never joins).
async fn agents(State(emu): State<Emulator>) -> Json<Value> {
    let agents: serde_json::Map<String, Value> = emu
        .agent_settings()
        .into_iter()
        .map(|(name, after)| (name, json!({"join_after_ms": millis(after)})))
        .collect();
    Json(json!({
        "default_join_after_ms": millis(emu.inner.config.agent_join_after),
        "agents": agents,
    }))
}

/// `PUT /agents/{agent_name}` `{"join_after_ms": 200}` or `{"join_after_ms": null}` (no
/// worker ever joins). The key is required, so a typo cannot mean "never".
async fn put_agent(
    State(emu): State<Emulator>,
    Path(agent_name): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let Some(object) = body.as_object() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "body must be a JSON object",
            Value::Null,
        );
    };
    if let Some(other) = object.keys().find(|k| *k != "join_after_ms") {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("unknown field {other:?}; expected join_after_ms"),
            Value::Null,
        );
    }
    let after = match object.get("join_after_ms") {
        None => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "join_after_ms is required (milliseconds, or null for never)",
                Value::Null,
            )
        }
        Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(ms) => Some(std::time::Duration::from_millis(ms)),
            None => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "join_after_ms must be a non-negative integer or null",
                    json!({"join_after_ms": v}),
                )
            }
        },
    };
    emu.set_agent_join_after(&agent_name, after);
    StatusCode::NO_CONTENT.into_response()
}

/// `DELETE /agents/{agent_name}`: back to the default delay.
async fn delete_agent(State(emu): State<Emulator>, Path(agent_name): Path<String>) -> StatusCode {
    emu.clear_agent_join_after(&agent_name);
    StatusCode::NO_CONTENT
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DispatchFilter {
    room: Option<String>,
    agent_name: Option<String>,
    /// `api` or `rule`.
    source: Option<String>,
}

/// `GET /dispatches`: every dispatch ever created (API or rule), oldest first.
async fn dispatches(State(emu): State<Emulator>, Query(f): Query<DispatchFilter>) -> Json<Value> {
    let items: Vec<DispatchRecord> = emu
        .dispatches()
        .into_iter()
        .filter(|d| f.room.as_ref().is_none_or(|r| *r == d.room))
        .filter(|d| f.agent_name.as_ref().is_none_or(|a| *a == d.agent_name))
        .filter(|d| {
            f.source.as_ref().is_none_or(|s| {
                matches!(
                    (s.as_str(), d.source),
                    ("api", DispatchSource::Api) | ("rule", DispatchSource::Rule)
                )
            })
        })
        .collect();
    Json(json!({"dispatches": items}))
}

async fn reset(State(emu): State<Emulator>) -> StatusCode {
    emu.reset();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::e164;

    #[test]
    fn script_numbers_must_look_e164() {
        for good in ["+15105550123", "+12345678", "+123456789012345"] {
            assert!(e164(good), "{good}");
        }
        for bad in [
            "15105550123",
            "+1234567",
            "+1234567890123456",
            "+1510555012a",
            "+1 510 555 0123",
            "",
            "+",
        ] {
            assert!(!e164(bad), "{bad}");
        }
    }
}
