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

use crate::faults::Faults;
use crate::sip::{CallScript, InboundCall};
use crate::Emulator;

pub fn router(emu: Emulator) -> Router {
    Router::new()
        .route("/requests", get(requests))
        .route("/webhooks", get(webhooks))
        .route("/webhook-urls", get(webhook_urls).post(add_webhook_url))
        .route("/rooms", get(rooms))
        .route("/scripts", get(scripts).delete(clear_scripts))
        .route("/scripts/{number}", put(put_script).delete(delete_script))
        .route("/faults", get(get_faults).put(put_faults))
        .route("/inbound", post(inbound))
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
