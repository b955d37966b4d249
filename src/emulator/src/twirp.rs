//! The Twirp API: `POST /twirp/livekit.<Service>/<Method>` with protobuf or JSON bodies,
//! LiveKit's auth and grants, the `X-Lk-Mock` header and global faults.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use livekit_api::access_token::{Claims, TokenVerifier};
use livekit_protocol as proto;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::{ApiRecord, RequestOutcome};
use crate::{sip, Emulator};

/// A Twirp error: `{code, msg, meta}` with the HTTP status of its code.
#[derive(Debug, Clone, PartialEq)]
pub struct TwirpError {
    pub code: String,
    pub msg: String,
    pub meta: HashMap<String, String>,
}

impl TwirpError {
    pub fn new(code: &str, msg: &str) -> Self {
        Self {
            code: code.to_owned(),
            msg: msg.to_owned(),
            meta: HashMap::new(),
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(http_status(&self.code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"code": self.code, "msg": self.msg});
        if !self.meta.is_empty() {
            body["meta"] = serde_json::to_value(&self.meta).unwrap_or_default();
        }
        (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// twirp `ServerHTTPStatusFromErrorCode`.
pub fn http_status(code: &str) -> u16 {
    match code {
        "canceled" | "deadline_exceeded" => 408,
        "invalid_argument" | "malformed" | "out_of_range" => 400,
        "not_found" | "bad_route" => 404,
        "already_exists" | "aborted" => 409,
        "permission_denied" => 403,
        "unauthenticated" => 401,
        "resource_exhausted" => 429,
        "failed_precondition" => 412,
        "unimplemented" => 501,
        "unavailable" => 503,
        _ => 500,
    }
}

/// The Twirp code a bare HTTP status stands for (X-Lk-Mock `failStatus` without a code).
fn code_for_status(status: u16) -> &'static str {
    match status {
        400 => "invalid_argument",
        401 => "unauthenticated",
        403 => "permission_denied",
        404 => "not_found",
        408 => "deadline_exceeded",
        409 => "aborted",
        412 => "failed_precondition",
        429 => "resource_exhausted",
        501 => "unimplemented",
        503 => "unavailable",
        _ => "internal",
    }
}

/// LiveKit's SDK test-server control header (reference/livekit-mock-control.md).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MockHeader {
    fail_regions: Option<Vec<u32>>,
    fail_mode: Option<FailMode>,
    fail_status: Option<u16>,
    fail_twirp_code: Option<String>,
    delay_ms: Option<u64>,
    regions_status: Option<u16>,
    response: Option<Value>,
    skip_auth: bool,
    sip_status: Option<MockSipStatus>,
    pinned_regions: Option<Vec<String>>,
}

/// `failMode`: how a request fails when this region fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FailMode {
    /// A Twirp error with `failStatus` / `failTwirpCode`, nothing carried out.
    Status,
    /// The connection is dropped without an answer, nothing carried out.
    Drop,
    /// The request is carried out, then the connection is dropped without an answer
    /// (an emulator extension: the response is lost).
    #[serde(alias = "dropAfter")]
    DropAfter,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MockSipStatus {
    code: u16,
    status: Option<String>,
}

impl MockHeader {
    fn parse(headers: &HeaderMap) -> Result<Self, TwirpError> {
        match headers.get("x-lk-mock") {
            None => Ok(Self::default()),
            Some(v) => serde_json::from_slice(v.as_bytes())
                .map_err(|e| TwirpError::new("malformed", &format!("bad X-Lk-Mock header: {e}"))),
        }
    }

    fn fails_here(&self, region: usize) -> bool {
        match &self.fail_regions {
            Some(regions) => regions.iter().any(|r| *r as usize == region),
            None => {
                self.fail_status.is_some()
                    || self.fail_twirp_code.is_some()
                    || self.fail_mode.is_some()
            }
        }
    }

    fn pinned_elsewhere(&self, region: usize) -> bool {
        let name = region_name(region);
        self.pinned_regions
            .as_ref()
            .is_some_and(|r| !r.is_empty() && !r.contains(&name))
    }
}

/// One listener's view: the shared emulator and the region index it answers as.
#[derive(Clone)]
pub struct Listener {
    emu: Emulator,
    region: usize,
}

/// The Twirp API and `/settings/regions` of the listener for region `region` (0 is the
/// primary), as LiveKit's SDK test server runs one listener per region.
pub fn router(emu: Emulator, region: usize) -> Router {
    Router::new()
        .route("/twirp/{service_method}/{method}", post(handle))
        .route("/settings/regions", get(regions))
        .with_state(Listener { emu, region })
}

/// A region's name in `/settings/regions` (`region-N`, as LiveKit's test server names them).
pub fn region_name(index: usize) -> String {
    format!("region-{index}")
}

/// `GET /settings/regions`: every listener in order, as protojson `RegionSettings`
/// (`distance` is an int64, so a string, and omitted when 0). A `pinnedRegions` mock
/// header narrows the list to those regions, as LiveKit Cloud does for a pinned project.
async fn regions(State(l): State<Listener>, headers: HeaderMap) -> Response {
    let mock = MockHeader::parse(&headers).unwrap_or_default();
    let status = mock.regions_status.unwrap_or(200);
    if status != 200 {
        return (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "regions unavailable",
        )
            .into_response();
    }
    let urls = l.emu.inner.region_urls.lock().clone();
    let regions: Vec<Value> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            mock.pinned_regions
                .as_ref()
                .is_none_or(|p| p.is_empty() || p.contains(&region_name(*i)))
        })
        .map(|(i, url)| {
            let mut r = serde_json::json!({"region": region_name(i), "url": url});
            if i > 0 {
                r["distance"] = Value::String(i.to_string());
            }
            r
        })
        .collect();
    let mut response = Json(serde_json::json!({ "regions": regions })).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=0"));
    if let Ok(v) = HeaderValue::from_str(&l.region.to_string()) {
        response.headers_mut().insert("x-lk-mock-region", v);
    }
    response
}

/// Where a dropped request was cut, for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropPoint {
    /// Before the request was carried out.
    Before,
    /// After the request was carried out (its answer is lost).
    After,
}

/// What a dropped answer would have said, for the record.
#[derive(Clone)]
struct LostResult(String);

/// A response whose connection is cut without an answer: a transport error for the client
/// (hyper's "connection closed before message completed"), as a dropped connection is.
/// The body fails before its first byte, so hyper abandons the connection with the head
/// still unsent in its buffer: the client reads EOF and no status line (the tests check
/// this with a raw socket).
fn dropped(point: DropPoint) -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other(
            "connection dropped by fault injection",
        ))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/protobuf")
        .header(header::CONTENT_LENGTH, "64")
        .extension(point)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Whether a fault with `rate` (0..=1) fires for this request.
fn roll(rate: f64) -> bool {
    rate > 0.0 && rand::rng().random_bool(rate.min(1.0))
}

fn plain_401(msg: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.to_owned(),
    )
        .into_response()
}

/// Verifies `Authorization: Bearer <jwt>` against the configured keys. No header at all
/// is not an error here: LiveKit's middleware lets the request through without grants, and
/// the method's grant check then answers Twirp `unauthenticated` "permissions denied".
fn authenticate(emu: &Emulator, headers: &HeaderMap) -> Result<Option<Claims>, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "invalid authorization header. Must start with Bearer ")?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or("invalid authorization header. Must start with Bearer ")?;
    let unverified = Claims::from_unverified(token).map_err(|_| "invalid authorization token")?;
    let secret = emu
        .inner
        .config
        .keys
        .iter()
        .find(|(k, _)| *k == unverified.iss)
        .map(|(_, s)| s.clone())
        .ok_or("invalid API key")?;
    TokenVerifier::with_api_key(&unverified.iss, &secret)
        .verify(token)
        .map(Some)
        .map_err(|_| "invalid authorization token")
}

/// Grant checks.
enum Grants<'a> {
    /// `skipAuth` in the mock header: every check passes.
    Skip,
    /// No Authorization header: every check fails, as on the real server.
    Anonymous,
    Token(&'a Claims),
}

impl Grants<'_> {
    /// Passes when auth is skipped or `allowed` says the token carries the grant; otherwise
    /// the real server's answer: `unauthenticated` "permissions denied".
    fn require(&self, allowed: impl FnOnce(&Claims) -> bool) -> Result<(), TwirpError> {
        let ok = match self {
            Grants::Skip => true,
            Grants::Anonymous => false,
            Grants::Token(claims) => allowed(claims),
        };
        if ok {
            Ok(())
        } else {
            Err(TwirpError::new("unauthenticated", "permissions denied"))
        }
    }
    fn room_create(&self) -> Result<(), TwirpError> {
        self.require(|c| c.video.room_create)
    }
    fn room_list(&self) -> Result<(), TwirpError> {
        self.require(|c| c.video.room_list)
    }
    /// `roomAdmin` for exactly `room`: LiveKit's `EnsureAdminPermission` compares the
    /// token's room with the request's, so a token without a room is refused.
    fn room_admin(&self, room: &str) -> Result<(), TwirpError> {
        self.require(|c| c.video.room_admin && c.video.room == room)
    }
    fn room_record(&self) -> Result<(), TwirpError> {
        self.require(|c| c.video.room_record)
    }
    fn ingress_admin(&self) -> Result<(), TwirpError> {
        self.require(|c| c.video.ingress_admin)
    }
    /// `ForwardParticipant` / `MoveParticipant`: `roomAdmin` for the source room and the
    /// token's `destinationRoom` naming the destination.
    fn dest_room(&self, room: &str, destination: &str) -> Result<(), TwirpError> {
        self.require(|c| {
            c.video.room_admin && c.video.room == room && c.video.destination_room == destination
        })
    }
    fn sip_call(&self) -> Result<(), TwirpError> {
        self.require(|c| c.sip.call)
    }
    fn sip_admin(&self) -> Result<(), TwirpError> {
        self.require(|c| c.sip.admin)
    }
}

fn no_room() -> TwirpError {
    TwirpError::new(
        "not_found",
        "twirp error unknown: requested room does not exist",
    )
}

fn no_participant() -> TwirpError {
    TwirpError::new(
        "not_found",
        "twirp error unknown: participant does not exist",
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Wire {
    Protobuf,
    Json,
}

fn decode<T: prost::Message + Default + DeserializeOwned>(
    wire: Wire,
    body: &[u8],
) -> Result<T, TwirpError> {
    match wire {
        Wire::Protobuf => T::decode(body).map_err(|e| {
            TwirpError::new(
                "malformed",
                &format!("the protobuf request could not be decoded: {e}"),
            )
        }),
        Wire::Json if body.is_empty() => Ok(T::default()),
        Wire::Json => serde_json::from_slice(body).map_err(|e| {
            TwirpError::new(
                "malformed",
                &format!("the json request could not be decoded: {e}"),
            )
        }),
    }
}

/// Map-valued fields whose keys are data, not field names (left untouched by renaming).
const MAP_FIELDS: [&str; 5] = [
    "attributes",
    "participantAttributes",
    "headers",
    "headersToAttributes",
    "attributesToHeaders",
];

fn to_snake(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The server answers JSON with proto field names (snake_case), as `UseProtoNames` does.
fn proto_names(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if MAP_FIELDS.contains(&k.as_str()) {
                        v
                    } else {
                        proto_names(v)
                    };
                    (to_snake(&k), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(proto_names).collect()),
        other => other,
    }
}

fn encode<T: prost::Message + Serialize>(wire: Wire, msg: &T) -> Response {
    match wire {
        Wire::Protobuf => (
            [(header::CONTENT_TYPE, "application/protobuf")],
            msg.encode_to_vec(),
        )
            .into_response(),
        Wire::Json => {
            let mut value = serde_json::to_value(msg)
                .map(proto_names)
                .unwrap_or(Value::Null);
            crate::unpopulated::fill(crate::unpopulated::message_name::<T>(), &mut value);
            (
                [(header::CONTENT_TYPE, "application/json")],
                value.to_string(),
            )
                .into_response()
        }
    }
}

/// A protobuf Duration as seconds (`1`, `1.5`); `0` when the request leaves it unset.
fn seconds(d: &Option<pbjson_types::Duration>) -> String {
    let Some(d) = d else {
        return "0".into();
    };
    let s = d.seconds as f64 + f64::from(d.nanos) / 1e9;
    s.to_string()
}

/// An empty message (`google.protobuf.Empty` or any message with no fields set).
fn encode_empty(wire: Wire) -> Response {
    match wire {
        Wire::Protobuf => (
            [(header::CONTENT_TYPE, "application/protobuf")],
            Vec::<u8>::new(),
        )
            .into_response(),
        Wire::Json => ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
    }
}

/// What a request did, for the record.
#[derive(Default)]
struct Summary {
    room: Option<String>,
    identity: Option<String>,
    fields: HashMap<String, String>,
    /// Set once the request is past auth and validation and its effect takes place.
    executed: bool,
}

/// Marks a request's record `client_gone` if the client hung up before it was answered
/// (the handler future is dropped then), so a timed-out call still shows in the record.
struct InFlight {
    emu: Emulator,
    seq: u64,
    done: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.emu
                .inner
                .update_record(self.seq, |r| r.client_gone = true);
        }
    }
}

async fn handle(
    State(Listener { emu, region }): State<Listener>,
    Path((service_method, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let service = service_method
        .strip_prefix("livekit.")
        .unwrap_or(&service_method)
        .to_owned();
    // Recorded on arrival: a request counts even if the client gives up before the answer.
    let seq = emu.inner.next_seq();
    emu.inner.record(ApiRecord {
        seq,
        at_ms: crate::ids::now_ms(),
        service: service.clone(),
        method: method.clone(),
        room: None,
        identity: None,
        fields: HashMap::new(),
        status: 0,
        result: "in_flight".into(),
        outcome: RequestOutcome::InFlight,
        lost_result: None,
        client_gone: false,
        duration_ms: 0,
    });
    let mut guard = InFlight {
        emu: emu.clone(),
        seq,
        done: false,
    };
    // As on a real server, a request that arrived is carried out even if its client hangs
    // up (a worker killed mid-call): the work runs in its own task.
    let work = tokio::spawn(process(emu, region, service, method, headers, body, seq));
    let response = match work.await {
        Ok(r) => r,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    guard.done = true;
    response
}

async fn process(
    emu: Emulator,
    region: usize,
    service: String,
    method: String,
    headers: HeaderMap,
    body: Bytes,
    seq: u64,
) -> Response {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut response = serve(
        &emu,
        region,
        &service,
        &method,
        &headers,
        &body,
        &mut summary,
    )
    .await;
    // LiveKit's test server names the answering region on answers, and leaves it empty on
    // its Twirp errors.
    let answered_by = if response.extensions().get::<TwirpCode>().is_some() {
        String::new()
    } else {
        region.to_string()
    };
    if let Ok(v) = HeaderValue::from_str(&answered_by) {
        response.headers_mut().insert("x-lk-mock-region", v);
    }
    let drop_point = response.extensions().get::<DropPoint>().copied();
    let (status, result, lost_result) = match drop_point {
        // No answer was sent: never recorded as a status or `ok`.
        Some(_) => (
            0,
            "dropped".to_owned(),
            response
                .extensions()
                .get::<LostResult>()
                .map(|l| l.0.clone()),
        ),
        None => (response.status().as_u16(), result_of(&response), None),
    };
    let outcome = match (drop_point, summary.executed) {
        (Some(DropPoint::After), true) => RequestOutcome::ExecutedThenDropped,
        (Some(_), _) => RequestOutcome::DroppedBefore,
        (None, true) => RequestOutcome::Executed,
        (None, false) => RequestOutcome::Rejected,
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    emu.inner.update_record(seq, |r| {
        r.room = summary.room.take();
        r.identity = summary.identity.take();
        r.fields = std::mem::take(&mut summary.fields);
        r.status = status;
        r.result = result;
        r.outcome = outcome;
        r.lost_result = lost_result;
        r.duration_ms = duration_ms;
    });
    response
}

/// `ok`, the Twirp code, or `http_<status>` of an answer.
fn result_of(response: &Response) -> String {
    let status = response.status().as_u16();
    match response.extensions().get::<TwirpCode>() {
        Some(TwirpCode(code)) => code.clone(),
        None if status == 200 => "ok".into(),
        None => format!("http_{status}"),
    }
}

/// The Twirp code a response carries, for the request record.
#[derive(Clone)]
struct TwirpCode(String);

fn twirp_response(e: TwirpError) -> Response {
    let code = TwirpCode(e.code.clone());
    let mut r = e.into_response();
    r.extensions_mut().insert(code);
    r
}

async fn serve(
    emu: &Emulator,
    region: usize,
    service: &str,
    method: &str,
    headers: &HeaderMap,
    body: &[u8],
    summary: &mut Summary,
) -> Response {
    let mock = match MockHeader::parse(headers) {
        Ok(m) => m,
        Err(e) => return twirp_response(e),
    };
    if mock.pinned_elsewhere(region) {
        return (
            StatusCode::from_u16(451).unwrap_or(StatusCode::FORBIDDEN),
            "project not allowed in this region.",
        )
            .into_response();
    }
    let claims = if mock.skip_auth {
        None
    } else {
        match authenticate(emu, headers) {
            Ok(c) => c,
            Err(msg) => return plain_401(msg),
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let wire = match content_type.split(';').next().map(str::trim) {
        Some("application/protobuf") => Wire::Protobuf,
        Some("application/json") => Wire::Json,
        _ => {
            return twirp_response(TwirpError::new(
                "bad_route",
                &format!("unexpected Content-Type: {content_type:?}"),
            ))
        }
    };

    // Latency comes before the request is carried out, so a client that gives up during
    // it sees nothing done yet; the request still runs afterwards (in its own task).
    // X-Lk-Mock delayMs overrides the per-method setting.
    let fault = emu.inner.faults.lock().for_method(method);
    let delay = match mock.delay_ms {
        Some(ms) => Duration::from_millis(ms),
        None => {
            let min = fault.latency_ms;
            let max = fault.latency_max_ms.unwrap_or(min).max(min);
            Duration::from_millis(rand::rng().random_range(min..=max))
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    // An X-Lk-Mock failure decides this request's fate; the global faults apply otherwise.
    let drop_after = if mock.fails_here(region) {
        match mock.fail_mode.unwrap_or(FailMode::Status) {
            FailMode::Drop => return dropped(DropPoint::Before),
            FailMode::DropAfter => true,
            FailMode::Status => {
                let status = mock.fail_status.unwrap_or(503);
                let code = mock
                    .fail_twirp_code
                    .clone()
                    .unwrap_or_else(|| code_for_status(status).to_owned());
                let mut r = twirp_response(TwirpError::new(&code, "injected failure (X-Lk-Mock)"));
                *r.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return r;
            }
        }
    } else {
        if roll(fault.drop_rate) {
            return dropped(DropPoint::Before);
        }
        if roll(fault.error_rate) {
            let code = fault
                .error_code
                .clone()
                .unwrap_or_else(|| "unavailable".into());
            return twirp_response(TwirpError::new(&code, "injected failure (emulator faults)"));
        }
        roll(fault.drop_after_rate)
    };

    let forced_sip = mock.sip_status.as_ref().map(|s| (s.code, s.status.clone()));
    let call = Call {
        service,
        method,
        wire,
        body,
        grants: match (&claims, mock.skip_auth) {
            (_, true) => Grants::Skip,
            (Some(c), false) => Grants::Token(c),
            (None, false) => Grants::Anonymous,
        },
        forced_sip,
        canned: mock.response,
    };
    let response = execute(emu, call, summary).await;
    if drop_after {
        // Carried out (or refused); either way the answer never reaches the client.
        let mut r = dropped(DropPoint::After);
        r.extensions_mut().insert(LostResult(result_of(&response)));
        return r;
    }
    response
}

/// A request past auth, content type and injected failures.
struct Call<'a> {
    service: &'a str,
    method: &'a str,
    wire: Wire,
    body: &'a [u8],
    grants: Grants<'a>,
    forced_sip: Option<(u16, Option<String>)>,
    canned: Option<Value>,
}

/// Carries out a request. `summary.executed` is set once it is past its grant and
/// validation checks, where its effect takes place.
async fn execute(emu: &Emulator, call: Call<'_>, summary: &mut Summary) -> Response {
    let Call {
        service,
        method,
        wire,
        body,
        grants,
        forced_sip,
        canned,
    } = call;
    macro_rules! reply {
        ($resp_ty:ty, $result:expr) => {{
            match canned {
                Some(v) => match serde_json::from_value::<$resp_ty>(v) {
                    Ok(r) => encode(wire, &r),
                    Err(e) => twirp_response(TwirpError::new(
                        "malformed",
                        &format!("bad X-Lk-Mock response: {e}"),
                    )),
                },
                None => match $result {
                    Ok(r) => encode::<$resp_ty>(wire, &r),
                    Err(e) => twirp_response(e),
                },
            }
        }};
    }
    macro_rules! req {
        ($ty:ty) => {
            match decode::<$ty>(wire, body) {
                Ok(r) => r,
                Err(e) => return twirp_response(e),
            }
        };
    }

    match (service, method) {
        ("RoomService", "CreateRoom") => {
            let r = req!(proto::CreateRoomRequest);
            summary.room = Some(r.name.clone());
            let result = grants.room_create().and_then(|_| {
                if r.name.is_empty() || r.name.len() > 256 {
                    return Err(TwirpError::new("invalid_argument", "room name is invalid"));
                }
                summary.executed = true;
                Ok(emu.upsert_room(&r))
            });
            reply!(proto::Room, result)
        }
        ("RoomService", "ListRooms") => {
            let r = req!(proto::ListRoomsRequest);
            let result = grants.room_list().map(|_| {
                summary.executed = true;
                let rooms = emu.inner.rooms.lock();
                let mut list: Vec<proto::Room> = rooms
                    .values()
                    .filter(|room| r.names.is_empty() || r.names.contains(&room.info.name))
                    .map(|room| room.info.clone())
                    .collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                proto::ListRoomsResponse { rooms: list }
            });
            reply!(proto::ListRoomsResponse, result)
        }
        ("RoomService", "DeleteRoom") => {
            let r = req!(proto::DeleteRoomRequest);
            summary.room = Some(r.room.clone());
            let result = grants.room_create().and_then(|_| {
                summary.executed = true;
                if emu.close_room(&r.room, proto::DisconnectReason::RoomDeleted) {
                    Ok(proto::DeleteRoomResponse {})
                } else {
                    Err(no_room())
                }
            });
            reply!(proto::DeleteRoomResponse, result)
        }
        ("RoomService", "ListParticipants") => {
            let r = req!(proto::ListParticipantsRequest);
            summary.room = Some(r.room.clone());
            let result = grants.room_admin(&r.room).map(|_| {
                summary.executed = true;
                // LiveKit's store answers an empty list for a room it does not have.
                let rooms = emu.inner.rooms.lock();
                proto::ListParticipantsResponse {
                    participants: rooms
                        .get(&r.room)
                        .map(|room| room.participants.clone())
                        .unwrap_or_default(),
                }
            });
            reply!(proto::ListParticipantsResponse, result)
        }
        ("RoomService", "GetParticipant") => {
            let r = req!(proto::RoomParticipantIdentity);
            summary.room = Some(r.room.clone());
            summary.identity = Some(r.identity.clone());
            let result = grants.room_admin(&r.room).and_then(|_| {
                summary.executed = true;
                let rooms = emu.inner.rooms.lock();
                let room = rooms.get(&r.room).ok_or_else(no_room)?;
                room.participants
                    .iter()
                    .find(|p| p.identity == r.identity)
                    .cloned()
                    .ok_or_else(no_participant)
            });
            reply!(proto::ParticipantInfo, result)
        }
        ("RoomService", "RemoveParticipant") => {
            let r = req!(proto::RoomParticipantIdentity);
            summary.room = Some(r.room.clone());
            summary.identity = Some(r.identity.clone());
            let result = grants.room_admin(&r.room).and_then(|_| {
                summary.executed = true;
                // LiveKit asks its store whether the participant is there, so a room that
                // does not exist is "participant does not exist" too (livekit
                // `RoomService.RemoveParticipant` → `ErrParticipantNotFound`).
                let p = emu
                    .participant(&r.room, &r.identity)
                    .ok_or_else(no_participant)?;
                if p.kind == proto::participant_info::Kind::Sip as i32 {
                    emu.set_attribute(&r.room, &p.sid, "sip.callStatus", "hangup");
                }
                emu.leave(
                    &r.room,
                    &r.identity,
                    proto::DisconnectReason::ParticipantRemoved,
                    None,
                );
                Ok(proto::RemoveParticipantResponse {})
            });
            reply!(proto::RemoveParticipantResponse, result)
        }
        ("AgentDispatchService", "CreateDispatch") => {
            let r = req!(proto::CreateAgentDispatchRequest);
            summary.room = Some(r.room.clone());
            summary
                .fields
                .insert("agent_name".into(), r.agent_name.clone());
            let result = grants.room_admin(&r.room).and_then(|_| {
                if r.room.is_empty() {
                    return Err(TwirpError::new("invalid_argument", "room name is required"));
                }
                summary.executed = true;
                emu.ensure_room(&r.room);
                let dispatch = proto::RoomAgentDispatch {
                    agent_name: r.agent_name.clone(),
                    metadata: r.metadata.clone(),
                    restart_policy: r.restart_policy,
                    deployment: r.deployment.clone(),
                    attributes: r.attributes.clone(),
                };
                emu.add_dispatch(&r.room, dispatch, crate::agents::DispatchSource::Api)
                    .ok_or_else(no_room)
            });
            if let Ok(d) = &result {
                summary.fields.insert("dispatch_id".into(), d.id.clone());
            }
            reply!(proto::AgentDispatch, result)
        }
        ("AgentDispatchService", "ListDispatch") => {
            let r = req!(proto::ListAgentDispatchRequest);
            summary.room = Some(r.room.clone());
            let result = grants.room_admin(&r.room).map(|_| {
                summary.executed = true;
                let rooms = emu.inner.rooms.lock();
                let agent_dispatches = rooms
                    .get(&r.room)
                    .map(|room| {
                        room.dispatches
                            .iter()
                            .filter(|d| r.dispatch_id.is_empty() || d.id == r.dispatch_id)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                proto::ListAgentDispatchResponse { agent_dispatches }
            });
            reply!(proto::ListAgentDispatchResponse, result)
        }
        ("AgentDispatchService", "DeleteDispatch") => {
            let r = req!(proto::DeleteAgentDispatchRequest);
            summary.room = Some(r.room.clone());
            let result = grants.room_admin(&r.room).and_then(|_| {
                summary.executed = true;
                let mut rooms = emu.inner.rooms.lock();
                let room = rooms.get_mut(&r.room).ok_or_else(no_room)?;
                let pos = room
                    .dispatches
                    .iter()
                    .position(|d| d.id == r.dispatch_id)
                    .ok_or_else(|| {
                        TwirpError::new("not_found", "twirp error unknown: dispatch not found")
                    })?;
                let mut d = room.dispatches.remove(pos);
                if let Some(state) = d.state.as_mut() {
                    state.deleted_at = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
                }
                Ok(d)
            });
            reply!(proto::AgentDispatch, result)
        }
        ("SIP", "CreateSIPParticipant") => {
            let r = req!(proto::CreateSipParticipantRequest);
            summary.room = Some(r.room_name.clone());
            summary.identity = Some(sip::dial_identity(&r));
            summary
                .fields
                .insert("sip_call_to".into(), r.sip_call_to.clone());
            summary
                .fields
                .insert("sip_trunk_id".into(), r.sip_trunk_id.clone());
            summary.fields.insert(
                "wait_until_answered".into(),
                r.wait_until_answered.to_string(),
            );
            let result = match grants.sip_call().and_then(|_| {
                sip::check_dial(
                    &r,
                    |id| emu.inner.sip.lock().outbound.contains_key(id),
                    forced_sip,
                )
            }) {
                Ok(()) => {
                    summary.executed = true;
                    sip::dial(emu, r).await
                }
                Err(e) => Err(e),
            };
            reply!(proto::SipParticipantInfo, result)
        }
        ("SIP", "TransferSIPParticipant") => {
            let r = req!(proto::TransferSipParticipantRequest);
            summary.room = Some(r.room_name.clone());
            summary.identity = Some(r.participant_identity.clone());
            summary
                .fields
                .insert("transfer_to".into(), r.transfer_to.clone());
            summary
                .fields
                .insert("play_dialtone".into(), r.play_dialtone.to_string());
            summary
                .fields
                .insert("ringing_timeout".into(), seconds(&r.ringing_timeout));
            summary
                .fields
                .insert("headers_count".into(), r.headers.len().to_string());
            let checked = grants
                .sip_call()
                .and_then(|_| grants.room_admin(&r.room_name))
                .and_then(|_| sip::check_transfer(&r));
            let result = match (checked, forced_sip) {
                (Err(e), _) => Err(e),
                // An `X-Lk-Mock` `sipStatus` fails the transfer at once, nothing carried out.
                (Ok(()), Some((code, text))) => {
                    summary
                        .fields
                        .insert("transfer_outcome".into(), "mock_sip_status".into());
                    Err(sip::sip_error(code, text.as_deref()))
                }
                (Ok(()), None) => {
                    summary.executed = true;
                    let done = sip::transfer(emu, r).await;
                    summary
                        .fields
                        .insert("transfer_outcome".into(), done.outcome.into());
                    if done.repeat {
                        summary
                            .fields
                            .insert("transfer_repeat".into(), "true".into());
                    }
                    done.result
                }
            };
            match result {
                Ok(()) => encode_empty(wire),
                Err(e) => twirp_response(e),
            }
        }
        ("SIP", "CreateSIPInboundTrunk") => {
            let r = req!(proto::CreateSipInboundTrunkRequest);
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().create_inbound(r)
            });
            reply!(proto::SipInboundTrunkInfo, result)
        }
        ("SIP", "CreateSIPOutboundTrunk") => {
            let r = req!(proto::CreateSipOutboundTrunkRequest);
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().create_outbound(r)
            });
            reply!(proto::SipOutboundTrunkInfo, result)
        }
        ("SIP", "UpdateSIPInboundTrunk") => {
            let r = req!(proto::UpdateSipInboundTrunkRequest);
            summary
                .fields
                .insert("sip_trunk_id".into(), r.sip_trunk_id.clone());
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().update_inbound(r)
            });
            reply!(proto::SipInboundTrunkInfo, result)
        }
        ("SIP", "UpdateSIPOutboundTrunk") => {
            let r = req!(proto::UpdateSipOutboundTrunkRequest);
            summary
                .fields
                .insert("sip_trunk_id".into(), r.sip_trunk_id.clone());
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().update_outbound(r)
            });
            reply!(proto::SipOutboundTrunkInfo, result)
        }
        ("SIP", "GetSIPInboundTrunk") => {
            let r = req!(proto::GetSipInboundTrunkRequest);
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                let trunk = emu.inner.sip.lock().get_inbound(&r.sip_trunk_id)?;
                Ok(proto::GetSipInboundTrunkResponse { trunk: Some(trunk) })
            });
            reply!(proto::GetSipInboundTrunkResponse, result)
        }
        ("SIP", "GetSIPOutboundTrunk") => {
            let r = req!(proto::GetSipOutboundTrunkRequest);
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                let trunk = emu.inner.sip.lock().get_outbound(&r.sip_trunk_id)?;
                Ok(proto::GetSipOutboundTrunkResponse { trunk: Some(trunk) })
            });
            reply!(proto::GetSipOutboundTrunkResponse, result)
        }
        ("SIP", "ListSIPInboundTrunk") => {
            let r = req!(proto::ListSipInboundTrunkRequest);
            let result = grants.sip_admin().map(|_| {
                summary.executed = true;
                proto::ListSipInboundTrunkResponse {
                    items: emu.inner.sip.lock().list_inbound(&r),
                }
            });
            reply!(proto::ListSipInboundTrunkResponse, result)
        }
        ("SIP", "ListSIPOutboundTrunk") => {
            let r = req!(proto::ListSipOutboundTrunkRequest);
            let result = grants.sip_admin().map(|_| {
                summary.executed = true;
                proto::ListSipOutboundTrunkResponse {
                    items: emu.inner.sip.lock().list_outbound(&r),
                }
            });
            reply!(proto::ListSipOutboundTrunkResponse, result)
        }
        ("SIP", "DeleteSIPTrunk") => {
            let r = req!(proto::DeleteSipTrunkRequest);
            summary
                .fields
                .insert("sip_trunk_id".into(), r.sip_trunk_id.clone());
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().delete_trunk(&r.sip_trunk_id)
            });
            reply!(proto::SipTrunkInfo, result)
        }
        ("SIP", "CreateSIPDispatchRule") => {
            let r = req!(proto::CreateSipDispatchRuleRequest);
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().create_rule(r)
            });
            reply!(proto::SipDispatchRuleInfo, result)
        }
        ("SIP", "UpdateSIPDispatchRule") => {
            let r = req!(proto::UpdateSipDispatchRuleRequest);
            summary.fields.insert(
                "sip_dispatch_rule_id".into(),
                r.sip_dispatch_rule_id.clone(),
            );
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().update_rule(r)
            });
            reply!(proto::SipDispatchRuleInfo, result)
        }
        ("SIP", "ListSIPDispatchRule") => {
            let r = req!(proto::ListSipDispatchRuleRequest);
            let result = grants.sip_admin().map(|_| {
                summary.executed = true;
                proto::ListSipDispatchRuleResponse {
                    items: emu.inner.sip.lock().list_rules(&r),
                }
            });
            reply!(proto::ListSipDispatchRuleResponse, result)
        }
        ("SIP", "DeleteSIPDispatchRule") => {
            let r = req!(proto::DeleteSipDispatchRuleRequest);
            summary.fields.insert(
                "sip_dispatch_rule_id".into(),
                r.sip_dispatch_rule_id.clone(),
            );
            let result = grants.sip_admin().and_then(|_| {
                summary.executed = true;
                emu.inner.sip.lock().delete_rule(&r.sip_dispatch_rule_id)
            });
            reply!(proto::SipDispatchRuleInfo, result)
        }
        _ => {
            // Not modelled: the method's grant is checked as LiveKit does, then Twirp
            // `unimplemented` (an empty 200 would pass for success). A path no LiveKit
            // service has is Twirp's `bad_route`.
            let check = match unmodelled_grant(service, method) {
                None => {
                    return twirp_response(TwirpError::new(
                        "bad_route",
                        &format!("no handler for path \"/twirp/livekit.{service}/{method}\""),
                    ))
                }
                Some(g) => g,
            };
            let room = || request_room(wire, body);
            let result = match check {
                Needs::RoomCreate => grants.room_create(),
                Needs::RoomRecord => grants.room_record(),
                Needs::IngressAdmin => grants.ingress_admin(),
                Needs::SipAdmin => grants.sip_admin(),
                Needs::RoomAdmin => grants.room_admin(&room().0),
                Needs::DestRoom => {
                    let (room, destination) = room();
                    grants.dest_room(&room, &destination)
                }
            };
            match result {
                Err(e) => twirp_response(e),
                Ok(()) => twirp_response(TwirpError::new(
                    "unimplemented",
                    &format!("{service}.{method} is not implemented by the emulator"),
                )),
            }
        }
    }
}

/// The grant an unmodelled method needs (livekit `pkg/service/*` `Ensure*Permission`,
/// as LiveKit's SDK test server lists them).
#[derive(Clone, Copy)]
enum Needs {
    RoomCreate,
    RoomRecord,
    IngressAdmin,
    SipAdmin,
    RoomAdmin,
    DestRoom,
}

fn unmodelled_grant(service: &str, method: &str) -> Option<Needs> {
    Some(match (service, method) {
        (
            "RoomService",
            "MutePublishedTrack"
            | "UpdateParticipant"
            | "UpdateSubscriptions"
            | "SendData"
            | "UpdateRoomMetadata"
            | "PerformRpc",
        ) => Needs::RoomAdmin,
        ("RoomService", "ForwardParticipant" | "MoveParticipant") => Needs::DestRoom,
        (
            "Egress",
            "StartEgress"
            | "StartRoomCompositeEgress"
            | "StartWebEgress"
            | "StartParticipantEgress"
            | "StartTrackCompositeEgress"
            | "StartTrackEgress"
            | "UpdateLayout"
            | "UpdateStream"
            | "ListEgress"
            | "StopEgress",
        ) => Needs::RoomRecord,
        ("Ingress", "CreateIngress" | "UpdateIngress" | "ListIngress" | "DeleteIngress") => {
            Needs::IngressAdmin
        }
        ("SIP", "ListSIPTrunk" | "CreateSIPTrunk") => Needs::SipAdmin,
        (
            "Connector",
            "DialWhatsAppCall"
            | "DisconnectWhatsAppCall"
            | "ConnectWhatsAppCall"
            | "AcceptWhatsAppCall"
            | "ConnectTwilioCall",
        ) => Needs::RoomCreate,
        _ => return None,
    })
}

/// The `room` (or `room_name`) and `destination_room` of a request the emulator has no
/// type for, read from its JSON body or its protobuf fields 1 (room) and 3 (destination
/// room), which is where every room-scoped RoomService request keeps them.
fn request_room(wire: Wire, body: &[u8]) -> (String, String) {
    match wire {
        Wire::Json => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let get = |keys: &[&str]| {
                keys.iter()
                    .find_map(|k| v.get(*k).and_then(Value::as_str))
                    .unwrap_or("")
                    .to_owned()
            };
            (
                get(&["room", "room_name", "roomName"]),
                get(&["destination_room", "destinationRoom"]),
            )
        }
        Wire::Protobuf => {
            let fields = proto_string_fields(body);
            let get = |tag| fields.get(&tag).cloned().unwrap_or_default();
            (get(1), get(3))
        }
    }
}

/// Top-level length-delimited fields of a protobuf message that are valid UTF-8.
fn proto_string_fields(mut buf: &[u8]) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    while !buf.is_empty() {
        let Ok(key) = prost::encoding::decode_varint(&mut buf) else {
            break;
        };
        let (tag, wire_type) = ((key >> 3) as u32, key & 7);
        match wire_type {
            0 => {
                if prost::encoding::decode_varint(&mut buf).is_err() {
                    break;
                }
            }
            1 if buf.len() >= 8 => buf = &buf[8..],
            5 if buf.len() >= 4 => buf = &buf[4..],
            2 => {
                let Ok(len) = prost::encoding::decode_varint(&mut buf) else {
                    break;
                };
                let len = len as usize;
                if buf.len() < len {
                    break;
                }
                if let Ok(s) = std::str::from_utf8(&buf[..len]) {
                    out.entry(tag).or_insert_with(|| s.to_owned());
                }
                buf = &buf[len..];
            }
            _ => break,
        }
    }
    out
}
