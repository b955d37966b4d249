//! Lost and late answers as a client sees them, and what the request record says about
//! them; the control API's errors, script numbers and webhook URLs.

mod common;
use common::{admin_token_for, start_with};

use std::future::Future;
use std::time::{Duration, Instant};

use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_api::services::agent_dispatch::AgentDispatchClient;
use livekit_api::services::room::{CreateRoomOptions, RoomClient};
use livekit_api::services::{ServerError, ServiceError};
use livekit_emulator::{
    ApiRecord, EmulatorConfig, Faults, MethodFault, RequestOutcome, RunningEmulator,
};
use livekit_protocol as proto;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start() -> RunningEmulator {
    start_with(EmulatorConfig {
        outbound_trunks: vec!["ST_x".into()],
        ..EmulatorConfig::default()
    })
    .await
}

/// The room a JSON request names (`room` or `roomName`), for its token.
fn room_of(body: &Value) -> &str {
    body.get("room")
        .or_else(|| body.get("roomName"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn twirp_url(e: &RunningEmulator, service: &str, method: &str) -> String {
    format!("{}/twirp/livekit.{service}/{method}", e.url())
}

/// A JSON Twirp request with an admin token and an optional `X-Lk-Mock` header.
fn twirp(
    client: &reqwest::Client,
    e: &RunningEmulator,
    service: &str,
    method: &str,
    body: Value,
    mock: Option<Value>,
) -> reqwest::RequestBuilder {
    let mut request = client
        .post(twirp_url(e, service, method))
        .header("content-type", "application/json")
        .header(
            "authorization",
            format!("Bearer {}", admin_token_for(room_of(&body))),
        )
        .body(body.to_string());
    if let Some(mock) = mock {
        request = request.header("x-lk-mock", mock.to_string());
    }
    request
}

fn dial_body(room: &str, identity: &str) -> Value {
    json!({"sipTrunkId": "ST_x", "sipCallTo": "+15105550100", "roomName": room,
           "participantIdentity": identity})
}

/// What a bare HTTP/1.1 client reads after sending a whole request (until EOF).
async fn raw_exchange(e: &RunningEmulator, method: &str, body: Value, mock: Value) -> Vec<u8> {
    let token = admin_token_for(room_of(&body));
    let body = body.to_string();
    let request = format!(
        "POST /twirp/livekit.SIP/{method} HTTP/1.1\r\nhost: emulator\r\n\
         content-type: application/json\r\nauthorization: Bearer {}\r\nx-lk-mock: {mock}\r\n\
         content-length: {}\r\n\r\n{body}",
        token,
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(e.addr)
        .await
        .expect("connect");
    socket.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    // A reset instead of a FIN is a dropped connection too: what was read so far counts.
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection");
    answer
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn only(e: &RunningEmulator, method: &str) -> ApiRecord {
    let mut records = e.emulator.requests_of(method);
    assert_eq!(records.len(), 1, "{records:?}");
    records.remove(0)
}

/// Whether `identity` is in `room`, asked through the SDK's GetParticipant.
async fn has_participant(e: &RunningEmulator, room: &str, identity: &str) -> bool {
    RoomClient::with_api_key(&e.url(), "devkey", "secret")
        .with_failover(false)
        .get_participant(room, identity)
        .await
        .is_ok()
}

fn set_faults(e: &RunningEmulator, method: &str, fault: MethodFault) {
    e.emulator.set_faults(Faults {
        methods: [(method.to_owned(), fault)].into_iter().collect(),
        ..Default::default()
    });
}

/// A transport error: the request went out and no HTTP answer came back.
#[track_caller]
fn assert_transport_error(err: &ServiceError) {
    match err {
        ServiceError::Twirp(ServerError::Request(e)) => {
            assert!(e.status().is_none(), "no HTTP status: {e:?}");
            assert!(!e.is_connect(), "the request was sent: {e:?}");
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[tokio::test]
async fn drop_and_drop_after_both_close_the_connection_without_a_status_line() {
    let e = start().await;
    for (mode, identity) in [("drop", "raw-before"), ("drop_after", "raw-after")] {
        let answer = raw_exchange(
            &e,
            "CreateSIPParticipant",
            dial_body("raw", identity),
            json!({"failRegions": [0], "failMode": mode}),
        )
        .await;
        assert!(
            answer.is_empty(),
            "{mode}: EOF with nothing sent, got {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Same for reqwest: the send itself fails, there is no response to look at.
    for mode in ["drop", "drop_after"] {
        let err = twirp(
            &reqwest::Client::new(),
            &e,
            "RoomService",
            "ListRooms",
            json!({}),
            Some(json!({"failMode": mode})),
        )
        .send()
        .await
        .expect_err("dropped");
        assert!(
            err.is_request() && err.status().is_none(),
            "{mode}: {err:?}"
        );
    }
    e.shutdown().await;
}

#[tokio::test]
async fn x_lk_mock_drop_after_dials_then_loses_the_answer() {
    let e = start().await;
    let http = reqwest::Client::new();
    let dropped = twirp(
        &http,
        &e,
        "SIP",
        "CreateSIPParticipant",
        dial_body("after", "sip-after"),
        Some(json!({"failRegions": [0], "failMode": "drop_after"})),
    )
    .send()
    .await;
    assert!(dropped.is_err(), "{dropped:?}");
    // The dial happened: the participant is in the room.
    assert!(has_participant(&e, "after", "sip-after").await);
    let record = only(&e, "CreateSIPParticipant");
    assert_eq!(record.outcome, RequestOutcome::ExecutedThenDropped);
    assert_eq!((record.status, record.result.as_str()), (0, "dropped"));
    assert_eq!(record.lost_result.as_deref(), Some("ok"));
    assert_eq!(record.room.as_deref(), Some("after"));
    assert_eq!(record.identity.as_deref(), Some("sip-after"));
    assert_eq!(
        record.fields.get("sip_call_to").map(String::as_str),
        Some("+15105550100")
    );

    // failMode drop: nothing happens.
    let dropped = twirp(
        &http,
        &e,
        "SIP",
        "CreateSIPParticipant",
        dial_body("before", "sip-before"),
        Some(json!({"failRegions": [0], "failMode": "drop"})),
    )
    .send()
    .await;
    assert!(dropped.is_err());
    assert!(!has_participant(&e, "before", "sip-before").await);
    let record = e.emulator.requests_of("CreateSIPParticipant").remove(1);
    assert_eq!(record.outcome, RequestOutcome::DroppedBefore);
    assert_eq!((record.status, record.result.as_str()), (0, "dropped"));
    assert_eq!(record.lost_result, None);

    // failRegions without this region: answered normally.
    let answered = twirp(
        &http,
        &e,
        "SIP",
        "CreateSIPParticipant",
        dial_body("elsewhere", "sip-elsewhere"),
        Some(json!({"failRegions": [1], "failMode": "drop_after"})),
    )
    .send()
    .await
    .expect("answered");
    assert_eq!(answered.status(), 200);
    let record = e.emulator.requests_of("CreateSIPParticipant").remove(2);
    assert_eq!(record.outcome, RequestOutcome::Executed);
    assert_eq!((record.status, record.result.as_str()), (200, "ok"));

    // An unknown failMode is refused, not guessed.
    let r = twirp(
        &http,
        &e,
        "RoomService",
        "ListRooms",
        json!({}),
        Some(json!({"failMode": "explode"})),
    )
    .send()
    .await
    .expect("answered");
    assert_eq!(r.status(), 400);

    // Counting executed dials per identity over the control API.
    let listed: Value = http
        .get(format!(
            "{}/emulator/v1/requests?method=CreateSIPParticipant&outcome=executed_then_dropped",
            e.url()
        ))
        .send()
        .await
        .expect("requests")
        .json()
        .await
        .expect("json");
    let listed = listed["requests"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["outcome"], "executed_then_dropped");
    assert_eq!(listed[0]["identity"], "sip-after");
    assert_eq!(listed[0]["status"], 0);
    assert_eq!(listed[0]["result"], "dropped");
    assert_eq!(listed[0]["lost_result"], "ok");
    e.shutdown().await;
}

#[tokio::test]
async fn drop_after_rate_creates_the_dispatch_and_the_sdk_sees_a_transport_error() {
    let e = start().await;
    let put = reqwest::Client::new()
        .put(format!("{}/emulator/v1/faults", e.url()))
        .json(&json!({"methods": {"CreateDispatch": {"drop_after_rate": 1.0}}}))
        .send()
        .await
        .expect("faults");
    assert_eq!(put.status(), 204);
    let dispatch =
        AgentDispatchClient::with_api_key(&e.url(), "devkey", "secret").with_failover(false);
    let err = dispatch
        .create_dispatch(proto::CreateAgentDispatchRequest {
            agent_name: "agent".into(),
            room: "r1".into(),
            ..Default::default()
        })
        .await
        .expect_err("the answer is lost");
    assert_transport_error(&err);
    let listed = dispatch.list_dispatch("r1").await.expect("list");
    assert_eq!(listed.len(), 1, "the dispatch was created");
    let record = only(&e, "CreateDispatch");
    assert_eq!(record.outcome, RequestOutcome::ExecutedThenDropped);
    assert_eq!(
        record.fields.get("dispatch_id"),
        Some(&listed[0].id),
        "the record names the dispatch the client never saw"
    );
    assert_eq!(record.status, 0);

    // drop_rate: dropped before, nothing created.
    set_faults(
        &e,
        "CreateDispatch",
        MethodFault {
            drop_rate: 1.0,
            ..Default::default()
        },
    );
    let err = dispatch
        .create_dispatch(proto::CreateAgentDispatchRequest {
            agent_name: "agent".into(),
            room: "r2".into(),
            ..Default::default()
        })
        .await
        .expect_err("dropped");
    assert_transport_error(&err);
    assert!(dispatch.list_dispatch("r2").await.expect("list").is_empty());
    let record = e.emulator.requests_of("CreateDispatch").remove(1);
    assert_eq!(record.outcome, RequestOutcome::DroppedBefore);
    assert_ne!(record.result, "ok");
    assert_eq!(record.status, 0);

    let bad = reqwest::Client::new()
        .put(format!("{}/emulator/v1/faults", e.url()))
        .json(&json!({"methods": {"*": {"drop_after_rate": 1.5}}}))
        .send()
        .await
        .expect("faults");
    assert_eq!(bad.status(), 422);
    e.shutdown().await;
}

#[tokio::test]
async fn a_method_fault_combines_with_star() {
    let e = start().await;
    e.emulator.set_faults(Faults {
        methods: [
            (
                "*".to_owned(),
                MethodFault {
                    latency_ms: 300,
                    ..Default::default()
                },
            ),
            (
                "CreateRoom".to_owned(),
                MethodFault {
                    drop_after_rate: 1.0,
                    ..Default::default()
                },
            ),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    let rooms = RoomClient::with_api_key(&e.url(), "devkey", "secret").with_failover(false);
    let started = Instant::now();
    let err = rooms
        .create_room("combined", CreateRoomOptions::default())
        .await
        .expect_err("answer lost");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "`*` latency applies"
    );
    assert_transport_error(&err);
    let listed = rooms.list_rooms(vec![]).await.expect("list");
    assert_eq!(listed.len(), 1, "the room was created");
    assert_eq!(
        only(&e, "CreateRoom").outcome,
        RequestOutcome::ExecutedThenDropped
    );
    e.shutdown().await;
}

#[tokio::test]
async fn records_say_rejected_or_executed() {
    let e = start().await;
    let http = reqwest::Client::new();
    // No token: the grant check refuses it with a Twirp 401, rejected.
    let r = http
        .post(twirp_url(&e, "RoomService", "ListRooms"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 401);
    // A token without the grant: rejected.
    let weak = AccessToken::with_api_key("devkey", "secret")
        .with_grants(VideoGrants::default())
        .to_jwt()
        .expect("jwt");
    let r = http
        .post(twirp_url(&e, "RoomService", "CreateRoom"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {weak}"))
        .body(json!({"name": "x"}).to_string())
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 401);
    // Invalid request, injected X-Lk-Mock status, injected sipStatus: rejected.
    for (body, mock) in [
        (json!({"sipCallTo": "+15105550100", "roomName": "v"}), None),
        (
            dial_body("v", "sip-v"),
            Some(json!({"failRegions": [0], "failStatus": 503})),
        ),
        (
            dial_body("v", "sip-v"),
            Some(json!({"sipStatus": {"code": 486}})),
        ),
    ] {
        let r = twirp(&http, &e, "SIP", "CreateSIPParticipant", body, mock)
            .send()
            .await
            .expect("answered");
        assert!(r.status().is_client_error() || r.status().is_server_error());
    }
    // A lookup that finds nothing was still carried out.
    let r = twirp(
        &http,
        &e,
        "RoomService",
        "GetParticipant",
        json!({"room": "nope", "identity": "x"}),
        None,
    )
    .send()
    .await
    .expect("answered");
    assert_eq!(r.status(), 404);
    let outcomes: Vec<(String, RequestOutcome, String)> = e
        .emulator
        .requests()
        .into_iter()
        .map(|r| (r.method, r.outcome, r.result))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (
                "ListRooms".into(),
                RequestOutcome::Rejected,
                "unauthenticated".into()
            ),
            (
                "CreateRoom".into(),
                RequestOutcome::Rejected,
                "unauthenticated".into()
            ),
            (
                "CreateSIPParticipant".into(),
                RequestOutcome::Rejected,
                "invalid_argument".into()
            ),
            (
                "CreateSIPParticipant".into(),
                RequestOutcome::Rejected,
                "unavailable".into()
            ),
            (
                "CreateSIPParticipant".into(),
                RequestOutcome::Rejected,
                "resource_exhausted".into()
            ),
            (
                "GetParticipant".into(),
                RequestOutcome::Executed,
                "not_found".into()
            ),
        ]
    );
    // The serialized names.
    let json = serde_json::to_value(e.emulator.requests()).expect("json");
    assert_eq!(json[0]["outcome"], "rejected");
    assert_eq!(json[5]["outcome"], "executed");
    assert!(
        !has_participant(&e, "v", "sip-v").await,
        "rejected dials did nothing"
    );
    e.shutdown().await;
}

/// Latency runs before the effect: a client that times out sees nothing done yet, the
/// request is still carried out afterwards, and the record says so.
#[tokio::test]
async fn a_timed_out_request_is_carried_out_after_the_client_gave_up() {
    let e = start().await;
    set_faults(
        &e,
        "CreateDispatch",
        MethodFault {
            latency_ms: 1_500,
            ..Default::default()
        },
    );
    let dispatch = AgentDispatchClient::with_api_key(&e.url(), "devkey", "secret")
        .with_failover(false)
        .with_request_timeout(Duration::from_millis(200));
    let err = dispatch
        .create_dispatch(proto::CreateAgentDispatchRequest {
            agent_name: "agent".into(),
            room: "late".into(),
            ..Default::default()
        })
        .await
        .expect_err("timed out");
    match &err {
        ServiceError::Twirp(ServerError::Request(e)) => assert!(e.is_timeout(), "{e:?}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let patient = AgentDispatchClient::with_api_key(&e.url(), "devkey", "secret");
    assert!(
        patient
            .list_dispatch("late")
            .await
            .expect("list")
            .is_empty(),
        "nothing done during the latency"
    );
    let record = only(&e, "CreateDispatch");
    assert_eq!(record.outcome, RequestOutcome::InFlight);
    eventually("the dispatch", Duration::from_secs(5), || {
        let patient = &patient;
        async move {
            let listed = patient.list_dispatch("late").await.ok()?;
            (listed.len() == 1).then_some(())
        }
    })
    .await;
    let record = eventually("the record", Duration::from_secs(5), || {
        let record = only(&e, "CreateDispatch");
        async move { (record.outcome != RequestOutcome::InFlight).then_some(record) }
    })
    .await;
    assert!(record.client_gone);
    assert_eq!(record.outcome, RequestOutcome::Executed);
    assert_eq!(record.result, "ok");
    assert_eq!(record.room.as_deref(), Some("late"));

    // The same with X-Lk-Mock delayMs on a dial: GetParticipant sees it only later.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let err = twirp(
        &http,
        &e,
        "SIP",
        "CreateSIPParticipant",
        dial_body("late-dial", "sip-late"),
        Some(json!({"delayMs": 1_500})),
    )
    .send()
    .await
    .expect_err("timed out");
    assert!(err.is_timeout());
    let lookup = twirp(
        &reqwest::Client::new(),
        &e,
        "RoomService",
        "GetParticipant",
        json!({"room": "late-dial", "identity": "sip-late"}),
        None,
    )
    .send()
    .await
    .expect("answered");
    assert_eq!(lookup.status(), 404, "not dialled yet");
    eventually("the dial", Duration::from_secs(5), || async {
        has_participant(&e, "late-dial", "sip-late")
            .await
            .then_some(())
    })
    .await;
    let record = eventually("the dial's record", Duration::from_secs(5), || {
        let record = only(&e, "CreateSIPParticipant");
        async move { (record.outcome != RequestOutcome::InFlight).then_some(record) }
    })
    .await;
    assert!(record.client_gone);
    assert_eq!(record.outcome, RequestOutcome::Executed);
    assert_eq!(record.identity.as_deref(), Some("sip-late"));
    e.shutdown().await;
}

async fn control(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let r = request.send().await.expect("answered");
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = r.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, content_type, value)
}

#[tokio::test]
async fn control_api_errors_are_json() {
    let e = start().await;
    let http = reqwest::Client::new();
    let v1 = format!("{}/emulator/v1", e.url());
    use reqwest::Method;
    let cases = [
        // Body rejections: bad syntax, unknown field, wrong type, no content type.
        (Method::PUT, format!("{v1}/faults"), Some("{"), 400),
        (
            Method::PUT,
            format!("{v1}/faults"),
            Some(r#"{"methods": {"*": {"drop_later": 1}}}"#),
            422,
        ),
        (
            Method::POST,
            format!("{v1}/inbound"),
            Some(r#"{"from": 1}"#),
            422,
        ),
        (Method::POST, format!("{v1}/webhook-urls"), None, 415),
        // Unknown route, wrong method.
        (Method::GET, format!("{v1}/nope"), None, 404),
        (Method::GET, format!("{v1}/reset"), None, 405),
        (Method::DELETE, format!("{v1}/faults"), None, 405),
        // Route validation.
        (
            Method::PUT,
            format!("{v1}/faults"),
            Some(r#"{"methods": {"*": {"error_rate": 2}}}"#),
            422,
        ),
        (
            Method::POST,
            format!("{v1}/inbound"),
            Some(r#"{"from": "", "to": ""}"#),
            422,
        ),
    ];
    for (method, url, body, status) in cases {
        let (got, content_type, value) = control(&http, method.clone(), url.clone(), body).await;
        assert_eq!(got, status, "{method} {url}: {value}");
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "{method} {url}"
        );
        assert!(
            value["error"].as_str().is_some_and(|s| !s.is_empty()),
            "{method} {url}: {value}"
        );
        assert_eq!(value["status"], status, "{method} {url}: {value}");
    }
    e.shutdown().await;
}

#[tokio::test]
async fn script_numbers_are_validated() {
    let e = start().await;
    let http = reqwest::Client::new();
    let v1 = format!("{}/emulator/v1", e.url());
    let script = r#"{"outcome": "busy"}"#;
    for bad in ["15105550123", "+1234", "+1510555012x", "+1234567890123456"] {
        let (status, _, value) = control(
            &http,
            reqwest::Method::PUT,
            format!("{v1}/scripts/{bad}"),
            Some(script),
        )
        .await;
        assert_eq!(status, 422, "{bad}: {value}");
        assert_eq!(value["number"], bad);
        assert!(value["error"].as_str().is_some_and(|m| m.contains(bad)));
    }
    let (status, _, _) = control(
        &http,
        reqwest::Method::PUT,
        format!("{v1}/scripts/+15105550123"),
        Some(script),
    )
    .await;
    assert_eq!(status, 204);
    // Percent-encoded `+` is the same number.
    let (status, _, _) = control(
        &http,
        reqwest::Method::PUT,
        format!("{v1}/scripts/%2B15105550124"),
        Some(script),
    )
    .await;
    assert_eq!(status, 204);
    let (_, _, listed) = control(&http, reqwest::Method::GET, format!("{v1}/scripts"), None).await;
    let mut numbers: Vec<&str> = listed["scripts"]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    numbers.sort_unstable();
    assert_eq!(numbers, ["+15105550123", "+15105550124"]);
    e.shutdown().await;
}

#[tokio::test]
async fn webhook_urls_are_listed_deduplicated_and_reset_to_the_configured_ones() {
    let configured = "http://127.0.0.1:9/configured".to_owned();
    let e = start_with(EmulatorConfig {
        webhook_urls: vec![configured.clone(), configured.clone()],
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::new();
    let v1 = format!("{}/emulator/v1", e.url());
    let list = || async {
        let (status, _, value) = control(
            &http,
            reqwest::Method::GET,
            format!("{v1}/webhook-urls"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        value["urls"].clone()
    };
    assert_eq!(list().await, json!([configured]));
    let added = r#"{"url": "http://127.0.0.1:9/added"}"#;
    for _ in 0..2 {
        let (status, _, _) = control(
            &http,
            reqwest::Method::POST,
            format!("{v1}/webhook-urls"),
            Some(added),
        )
        .await;
        assert_eq!(status, 204);
    }
    assert_eq!(
        list().await,
        json!([configured, "http://127.0.0.1:9/added"]),
        "added once"
    );
    let (status, _, value) = control(
        &http,
        reqwest::Method::POST,
        format!("{v1}/webhook-urls"),
        Some(r#"{"url": "not a url"}"#),
    )
    .await;
    assert_eq!((status, value["url"].clone()), (422, json!("not a url")));
    let (status, _, _) = control(&http, reqwest::Method::POST, format!("{v1}/reset"), None).await;
    assert_eq!(status, 204);
    assert_eq!(list().await, json!([configured]));
    e.shutdown().await;
}
