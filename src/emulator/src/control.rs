//! The record and control API under `/emulator/v1/`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
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
        .route("/webhook-urls", post(add_webhook_url))
        .route("/rooms", get(rooms))
        .route("/scripts", get(scripts).delete(clear_scripts))
        .route("/scripts/{number}", put(put_script).delete(delete_script))
        .route("/faults", get(get_faults).put(put_faults))
        .route("/inbound", post(inbound))
        .route("/reset", post(reset))
        .with_state(emu)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Filter {
    method: Option<String>,
    room: Option<String>,
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

async fn add_webhook_url(State(emu): State<Emulator>, Json(body): Json<UrlBody>) -> StatusCode {
    emu.add_webhook_url(&body.url);
    StatusCode::NO_CONTENT
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

async fn put_script(
    State(emu): State<Emulator>,
    Path(number): Path<String>,
    Json(script): Json<CallScript>,
) -> StatusCode {
    emu.script(&number, script);
    StatusCode::NO_CONTENT
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
        .flat_map(|m| [m.error_rate, m.drop_rate])
        .chain([faults.webhooks.duplicate_rate, faults.webhooks.reorder_rate]);
    for rate in rates {
        if !(0.0..=1.0).contains(&rate) {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "rates must be between 0 and 1"})),
            )
                .into_response();
        }
    }
    emu.set_faults(faults);
    StatusCode::NO_CONTENT.into_response()
}

async fn inbound(State(emu): State<Emulator>, Json(call): Json<InboundCall>) -> Response {
    if call.from.is_empty() || call.to.is_empty() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "from and to are required"})),
        )
            .into_response();
    }
    (StatusCode::CREATED, Json(emu.inbound_call(call).await)).into_response()
}

async fn reset(State(emu): State<Emulator>) -> StatusCode {
    emu.reset();
    StatusCode::NO_CONTENT
}
