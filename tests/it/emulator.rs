//! The emulator's fidelity, proven with the unmodified `livekit-api` clients and its
//! `WebhookReceiver`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use livekit_api::access_token::{AccessToken, TokenVerifier, VideoGrants};
use livekit_api::services::agent_dispatch::AgentDispatchClient;
use livekit_api::services::room::{CreateRoomOptions, RoomClient};
use livekit_api::services::sip::{
    CreateSIPParticipantOptions, SIPClient, TransferSIPParticipantOptions,
};
use livekit_api::services::{ServerError, ServiceError, SipCallError};
use livekit_api::webhooks::WebhookReceiver;
use livekit_emulator::{
    CallScript, Emulator, EmulatorConfig, InboundCall, Outcome, RunningEmulator,
};
use livekit_protocol as proto;
use parking_lot_free::Sink;
use serde_json::{json, Value};

use crate::harness::eventually;

/// (dialled number, scripted outcome, expected Twirp code and SIP status, disconnect reason)
type OutcomeCase = (
    &'static str,
    Outcome,
    Option<(&'static str, Option<u16>)>,
    proto::DisconnectReason,
);

/// A webhook receiver that records what it got and can be told to fail.
mod parking_lot_free {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Sink {
        pub got: Arc<Mutex<Vec<(String, String)>>>,
        pub fail_next: Arc<Mutex<u32>>,
    }

    impl Sink {
        pub fn all(&self) -> Vec<(String, String)> {
            self.got.lock().map(|g| g.clone()).unwrap_or_default()
        }
    }
}

async fn sink_handler(State(sink): State<Sink>, headers: HeaderMap, body: String) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/webhook+json")
    );
    if let Ok(mut fail) = sink.fail_next.lock() {
        if *fail > 0 {
            *fail -= 1;
            if let Ok(mut g) = sink.got.lock() {
                g.push((auth, body));
            }
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    }
    if let Ok(mut g) = sink.got.lock() {
        g.push((auth, body));
    }
    StatusCode::OK
}

async fn start_sink() -> (Sink, String) {
    let sink = Sink::default();
    let app = Router::new()
        .route("/hook", post(sink_handler))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sink");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (sink, format!("http://{addr}/hook"))
}

async fn start(webhook: Option<String>) -> RunningEmulator {
    let config = EmulatorConfig {
        webhook_urls: webhook.into_iter().collect(),
        webhook_retry_base: Duration::from_millis(50),
        outbound_trunks: vec!["ST_x".into(), "ST_t".into(), "ST_trunk".into()],
        ..Default::default()
    };
    Emulator::start(config, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("emulator starts")
}

fn rooms(e: &RunningEmulator) -> RoomClient {
    RoomClient::with_api_key(&e.url(), "devkey", "secret")
}

fn twirp_code(err: &ServiceError) -> Option<(String, std::collections::HashMap<String, String>)> {
    match err {
        ServiceError::Twirp(ServerError::Twirp(code)) => {
            Some((code.code.clone(), code.meta.clone()))
        }
        _ => None,
    }
}

#[track_caller]
fn assert_code(err: &ServiceError, code: &str) {
    assert_eq!(
        twirp_code(err).map(|c| c.0).as_deref(),
        Some(code),
        "{err:?}"
    );
}

fn verified_events(sink: &Sink) -> Vec<proto::WebhookEvent> {
    let receiver = WebhookReceiver::new(TokenVerifier::with_api_key("devkey", "secret"));
    sink.all()
        .iter()
        .map(|(auth, body)| {
            receiver
                .receive(body, auth)
                .expect("every webhook verifies with livekit-api")
        })
        .collect()
}

#[tokio::test]
async fn rooms_upsert_list_and_delete() {
    let (sink, url) = start_sink().await;
    let e = start(Some(url)).await;
    let client = rooms(&e);
    let a = client
        .create_room(
            "r1",
            CreateRoomOptions {
                metadata: "m1".into(),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    let b = client
        .create_room("r1", CreateRoomOptions::default())
        .await
        .expect("create again");
    assert_eq!(a.sid, b.sid, "CreateRoom is an upsert");
    assert!(a.sid.starts_with("RM_"));
    assert_eq!(b.metadata, "m1");
    assert_eq!(client.list_rooms(vec![]).await.expect("list").len(), 1);
    client.delete_room("r1").await.expect("delete");
    let err = client.delete_room("r1").await.expect_err("second delete");
    assert_code(&err, "not_found");
    let events = eventually(
        "room_started and room_finished",
        Duration::from_secs(5),
        || async {
            let ev = verified_events(&sink);
            (ev.len() >= 2).then_some(ev)
        },
    )
    .await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["room_started", "room_finished"]);
    assert!(events
        .iter()
        .all(|e| e.id.starts_with("EV_") && e.created_at > 0));
    e.shutdown().await;
}

#[tokio::test]
async fn dispatch_always_creates_a_new_one_and_autocreates_the_room() {
    let e = start(None).await;
    let client = AgentDispatchClient::with_api_key(&e.url(), "devkey", "secret");
    let req = |meta: &str| proto::CreateAgentDispatchRequest {
        agent_name: "agent".into(),
        room: "d1".into(),
        metadata: meta.into(),
        ..Default::default()
    };
    let first = client
        .create_dispatch(req("{\"a\":1}"))
        .await
        .expect("dispatch");
    let second = client
        .create_dispatch(req("{\"a\":2}"))
        .await
        .expect("dispatch again");
    assert!(first.id.starts_with("AD_") && second.id.starts_with("AD_"));
    assert_ne!(
        first.id, second.id,
        "no dedupe: LiveKit launches another agent"
    );
    let listed = client.list_dispatch("d1").await.expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(
        rooms(&e)
            .list_rooms(vec!["d1".into()])
            .await
            .expect("rooms")
            .len(),
        1,
        "room auto-created"
    );
    client
        .delete_dispatch(&first.id, "d1")
        .await
        .expect("delete");
    assert_eq!(client.list_dispatch("d1").await.expect("list").len(), 1);
    assert_eq!(
        e.emulator.requests_of("CreateDispatch").len(),
        2,
        "recorded"
    );
    e.shutdown().await;
}

fn dial(to: &str, wait: bool) -> CreateSIPParticipantOptions {
    CreateSIPParticipantOptions {
        participant_identity: format!("sip-{to}"),
        wait_until_answered: Some(wait),
        ringing_timeout: Some(Duration::from_millis(800)),
        sip_number: Some("+15105550100".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_sip_outcome_has_livekits_code_meta_and_disconnect_reason() {
    let (sink, url) = start_sink().await;
    let e = start(Some(url)).await;
    let sip = SIPClient::with_api_key(&e.url(), "devkey", "secret");
    let cases: [OutcomeCase; 7] = [
        (
            "+15550000001",
            Outcome::Answer,
            None,
            proto::DisconnectReason::ClientInitiated,
        ),
        (
            "+15550000002",
            Outcome::Busy,
            Some(("resource_exhausted", Some(486))),
            proto::DisconnectReason::UserRejected,
        ),
        (
            "+15550000003",
            Outcome::Unavailable,
            Some(("resource_exhausted", Some(480))),
            proto::DisconnectReason::UserUnavailable,
        ),
        (
            "+15550000004",
            Outcome::NoAnswer,
            Some(("canceled", None)),
            proto::DisconnectReason::UserUnavailable,
        ),
        (
            "+15550000005",
            Outcome::Decline,
            Some(("permission_denied", Some(603))),
            proto::DisconnectReason::UserRejected,
        ),
        (
            "+15550000006",
            Outcome::NotFound,
            Some(("not_found", Some(404))),
            proto::DisconnectReason::UserUnavailable,
        ),
        (
            "+15550000007",
            Outcome::Failed,
            Some(("failed_precondition", Some(503))),
            proto::DisconnectReason::ClientInitiated,
        ),
    ];
    for (number, outcome, _, _) in &cases {
        e.emulator.script(
            number,
            CallScript {
                outcome: *outcome,
                ring_ms: 100,
                talk_ms: Some(100),
                sip_status: None,
            },
        );
    }
    for (number, _, expected, _) in &cases {
        let room = format!("room-{number}");
        let result = sip
            .create_sip_participant(
                "ST_trunk".into(),
                (*number).into(),
                room.clone(),
                dial(number, true),
                None,
            )
            .await;
        match expected {
            None => {
                let info = result.expect("answered");
                assert!(
                    info.participant_id.starts_with("PA_") && info.sip_call_id.starts_with("SCL_")
                );
                assert_eq!(info.participant_identity, format!("sip-{number}"));
            }
            Some((code, status)) => {
                let err = result.expect_err("dial fails");
                let (got, meta) = twirp_code(&err).expect("a twirp error");
                assert_eq!(&got, code, "{number}");
                let sip_err = SipCallError::from_error(&err);
                assert_eq!(
                    sip_err.as_ref().and_then(|s| s.sip_status_code()),
                    status.map(i32::from),
                    "{number}"
                );
                if status.is_some() {
                    assert!(meta.contains_key("sip_status"), "{number}: {meta:?}");
                }
            }
        }
    }
    let events = eventually(
        "a participant_left per call",
        Duration::from_secs(10),
        || async {
            let ev = verified_events(&sink);
            (ev.iter().filter(|e| e.event == "participant_left").count() >= cases.len())
                .then_some(ev)
        },
    )
    .await;
    for (number, _, _, reason) in &cases {
        let room = format!("room-{number}");
        let joined = events
            .iter()
            .find(|e| {
                e.event == "participant_joined" && e.room.as_ref().is_some_and(|r| r.name == room)
            })
            .expect("joined at dial time");
        let p = joined.participant.as_ref().expect("participant");
        assert_eq!(p.kind, proto::participant_info::Kind::Sip as i32);
        assert_eq!(
            p.attributes.get("sip.callStatus").map(String::as_str),
            Some("dialing")
        );
        assert_eq!(
            p.attributes.get("sip.phoneNumber").map(String::as_str),
            Some(*number)
        );
        let left = events
            .iter()
            .find(|e| {
                e.event == "participant_left" && e.room.as_ref().is_some_and(|r| r.name == room)
            })
            .expect("left");
        assert_eq!(
            left.participant.as_ref().map(|p| p.disconnect_reason),
            Some(*reason as i32),
            "{number}"
        );
    }
    e.shutdown().await;
}

#[tokio::test]
async fn without_wait_the_dial_returns_at_once_and_the_outcome_follows() {
    let e = start(None).await;
    e.emulator.script(
        "+15550001000",
        CallScript {
            outcome: Outcome::Answer,
            ring_ms: 200,
            talk_ms: None,
            sip_status: None,
        },
    );
    let sip = SIPClient::with_api_key(&e.url(), "devkey", "secret");
    let room = rooms(&e);
    sip.create_sip_participant(
        "ST_t".into(),
        "+15550001000".into(),
        "w1".into(),
        dial("+15550001000", false),
        None,
    )
    .await
    .expect("dial");
    let p = room
        .get_participant("w1", "sip-+15550001000")
        .await
        .expect("participant exists at dial time");
    assert_ne!(
        p.attributes.get("sip.callStatus").map(String::as_str),
        Some("active")
    );
    eventually(
        "the call to be answered",
        Duration::from_secs(5),
        || async {
            let p = room.get_participant("w1", "sip-+15550001000").await.ok()?;
            (p.attributes.get("sip.callStatus").map(String::as_str) == Some("active")).then_some(())
        },
    )
    .await;
    // Transfer validates targets, then the caller leaves.
    let err = sip
        .transfer_sip_participant(
            "w1".into(),
            "sip-+15550001000".into(),
            "+15551112222".into(),
            TransferSIPParticipantOptions::default(),
        )
        .await
        .expect_err("bare number is not a transfer target");
    assert_code(&err, "invalid_argument");
    sip.transfer_sip_participant(
        "w1".into(),
        "sip-+15550001000".into(),
        "tel:+15551112222".into(),
        TransferSIPParticipantOptions::default(),
    )
    .await
    .expect("transfer");
    let err = room
        .get_participant("w1", "sip-+15550001000")
        .await
        .expect_err("gone after transfer");
    assert_code(&err, "not_found");
    e.shutdown().await;
}

#[tokio::test]
async fn create_sip_participant_validates_like_the_server() {
    let e = start(None).await;
    let sip = SIPClient::with_api_key(&e.url(), "devkey", "secret");
    let no_trunk = CreateSIPParticipantOptions::default();
    let err = sip
        .create_sip_participant(
            String::new(),
            "+15550002000".into(),
            "v".into(),
            no_trunk,
            None,
        )
        .await
        .expect_err("no trunk");
    assert_code(&err, "invalid_argument");
    let err = sip
        .create_sip_participant(
            "ST_x".into(),
            "a@b.c".into(),
            "v".into(),
            CreateSIPParticipantOptions::default(),
            None,
        )
        .await
        .expect_err("uri");
    assert_code(&err, "invalid_argument");
    // Default identity is sip_<number>; a second dial with the same identity replaces the first.
    let a = sip
        .create_sip_participant(
            "ST_x".into(),
            "+15550002001".into(),
            "v".into(),
            CreateSIPParticipantOptions::default(),
            None,
        )
        .await
        .expect("dial");
    assert_eq!(a.participant_identity, "sip_+15550002001");
    let b = sip
        .create_sip_participant(
            "ST_x".into(),
            "+15550002001".into(),
            "v".into(),
            CreateSIPParticipantOptions::default(),
            None,
        )
        .await
        .expect("dial");
    let list = rooms(&e).list_participants("v").await.expect("list");
    assert_eq!(
        list.len(),
        1,
        "duplicate identity replaced the older participant"
    );
    assert_eq!(list[0].sid, b.participant_id);
    e.shutdown().await;
}

fn token(grants: VideoGrants, sip_call: bool) -> String {
    let mut t = AccessToken::with_api_key("devkey", "secret").with_grants(grants);
    if sip_call {
        t = t.with_sip_grants(livekit_api::access_token::SIPGrants {
            call: true,
            ..Default::default()
        });
    }
    t.to_jwt().expect("jwt")
}

#[tokio::test]
async fn grants_are_enforced_per_method() {
    let e = start(None).await;
    let list_only = RoomClient::with_token(
        &e.url(),
        &token(
            VideoGrants {
                room_list: true,
                ..Default::default()
            },
            false,
        ),
    );
    list_only
        .list_rooms(vec![])
        .await
        .expect("roomList allows ListRooms");
    let err = list_only
        .create_room("g", CreateRoomOptions::default())
        .await
        .expect_err("needs roomCreate");
    assert_code(&err, "unauthenticated");
    rooms(&e)
        .create_room("g", CreateRoomOptions::default())
        .await
        .expect("create");
    let admin_other = RoomClient::with_token(
        &e.url(),
        &token(
            VideoGrants {
                room_admin: true,
                room: "other".into(),
                ..Default::default()
            },
            false,
        ),
    );
    let err = admin_other
        .list_participants("g")
        .await
        .expect_err("roomAdmin for another room");
    assert_code(&err, "unauthenticated");
    let admin = RoomClient::with_token(
        &e.url(),
        &token(
            VideoGrants {
                room_admin: true,
                room: "g".into(),
                ..Default::default()
            },
            false,
        ),
    );
    admin
        .list_participants("g")
        .await
        .expect("roomAdmin for the room");
    let dispatch = AgentDispatchClient::with_token(
        &e.url(),
        &token(
            VideoGrants {
                room_create: true,
                ..Default::default()
            },
            false,
        ),
    );
    let err = dispatch
        .list_dispatch("g")
        .await
        .expect_err("dispatch needs roomAdmin, not roomCreate");
    assert_code(&err, "unauthenticated");
    let sip_no_grant = SIPClient::with_token(&e.url(), &token(VideoGrants::default(), false));
    let err = sip_no_grant
        .create_sip_participant(
            "ST".into(),
            "+15550003000".into(),
            "g".into(),
            CreateSIPParticipantOptions::default(),
            None,
        )
        .await
        .expect_err("sip.call needed");
    assert_code(&err, "unauthenticated");
    let transfer_sip_only = SIPClient::with_token(&e.url(), &token(VideoGrants::default(), true));
    let err = transfer_sip_only
        .transfer_sip_participant(
            "g".into(),
            "x".into(),
            "tel:+1".into(),
            TransferSIPParticipantOptions::default(),
        )
        .await
        .expect_err("transfer also needs roomAdmin");
    assert_code(&err, "unauthenticated");

    // A missing token passes LiveKit's auth middleware without grants, so the method's
    // grant check answers a Twirp 401 `unauthenticated`; a bad secret is the middleware's
    // plain-text 401, not a Twirp body.
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/twirp/livekit.RoomService/ListRooms", e.url()))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("twirp json");
    assert_eq!(body["code"], "unauthenticated");
    let forged = RoomClient::with_api_key(&e.url(), "devkey", "wrong-secret");
    let err = forged.list_rooms(vec![]).await.expect_err("bad signature");
    assert!(
        twirp_code(&err).is_none(),
        "a plain-text 401 is not a Twirp error: {err:?}"
    );
    e.shutdown().await;
}

async fn raw(
    e: &RunningEmulator,
    method: &str,
    body: Value,
    mock: Option<Value>,
) -> reqwest::Response {
    let (service, grants) = match method {
        "CreateSIPParticipant" | "TransferSIPParticipant" => ("SIP", true),
        "CreateDispatch" | "ListDispatch" => ("AgentDispatchService", false),
        _ => ("RoomService", false),
    };
    let mut req = reqwest::Client::new()
        .post(format!("{}/twirp/livekit.{service}/{method}", e.url()))
        .header("content-type", "application/json")
        .header(
            "authorization",
            format!(
                "Bearer {}",
                token(
                    VideoGrants {
                        room_create: true,
                        room_list: true,
                        room_admin: true,
                        // roomAdmin must name the request's room, as on LiveKit.
                        room: ["room", "roomName", "room_name"]
                            .iter()
                            .find_map(|k| body.get(*k).and_then(Value::as_str))
                            .unwrap_or("")
                            .to_owned(),
                        ..Default::default()
                    },
                    grants
                )
            ),
        )
        .body(body.to_string());
    if let Some(m) = mock {
        req = req.header("X-Lk-Mock", m.to_string());
    }
    req.send().await.expect("send")
}

#[tokio::test]
async fn json_requests_get_snake_case_json_responses() {
    let e = start(None).await;
    let resp = raw(
        &e,
        "CreateRoom",
        json!({"name": "j1", "emptyTimeout": 42}),
        None,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["name"], "j1");
    assert_eq!(
        body["empty_timeout"], 42,
        "proto field names in responses: {body}"
    );
    assert!(
        body["creation_time"].is_string(),
        "int64 as a string: {body}"
    );
    let resp = raw(&e, "DeleteRoom", json!({"room": "missing"}), None).await;
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.expect("twirp json");
    assert_eq!(err["code"], "not_found");
    assert!(err["msg"]
        .as_str()
        .is_some_and(|m| m.starts_with("twirp error unknown:")));
    e.shutdown().await;
}

#[tokio::test]
async fn x_lk_mock_header_fields_are_honoured() {
    let e = start(None).await;
    // failStatus (code derived) and failTwirpCode.
    let r = raw(
        &e,
        "ListRooms",
        json!({}),
        Some(json!({"failRegions": [0], "failStatus": 400})),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "invalid_argument"
    );
    let r = raw(
        &e,
        "ListRooms",
        json!({}),
        Some(json!({"failRegions": [0], "failStatus": 503, "failTwirpCode": "unavailable"})),
    )
    .await;
    assert_eq!(r.status(), 503);
    let r = raw(
        &e,
        "ListRooms",
        json!({}),
        Some(json!({"failRegions": [1]})),
    )
    .await;
    assert_eq!(
        r.status(),
        200,
        "another region's failure does not fail region 0"
    );
    assert_eq!(
        r.headers()
            .get("x-lk-mock-region")
            .and_then(|v| v.to_str().ok()),
        Some("0")
    );
    // failMode drop: the connection is cut, so sending or reading the answer fails.
    let dropped = async {
        reqwest::Client::new()
            .post(format!("{}/twirp/livekit.RoomService/ListRooms", e.url()))
            .header("content-type", "application/json")
            .header(
                "authorization",
                format!(
                    "Bearer {}",
                    token(
                        VideoGrants {
                            room_list: true,
                            ..Default::default()
                        },
                        false
                    )
                ),
            )
            .header(
                "X-Lk-Mock",
                json!({"failRegions": [0], "failMode": "drop"}).to_string(),
            )
            .body("{}")
            .send()
            .await?
            .bytes()
            .await
    }
    .await;
    assert!(
        dropped.is_err(),
        "a dropped connection must fail the request: {dropped:?}"
    );
    // delayMs.
    let started = std::time::Instant::now();
    raw(&e, "ListRooms", json!({}), Some(json!({"delayMs": 300}))).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    // response: a canned protojson response.
    let r = raw(
        &e,
        "CreateRoom",
        json!({"name": "x"}),
        Some(json!({"response": {"sid": "RM_canned", "name": "canned"}})),
    )
    .await;
    assert_eq!(r.json::<Value>().await.expect("json")["sid"], "RM_canned");
    // sipStatus: derived like the real server.
    let r = raw(
        &e,
        "CreateSIPParticipant",
        json!({"sipTrunkId": "ST_x", "sipCallTo": "+15550004000", "roomName": "m"}),
        Some(json!({"sipStatus": {"code": 486, "status": "Busy Here"}})),
    )
    .await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], "resource_exhausted");
    assert_eq!(body["meta"]["sip_status_code"], "486");
    assert_eq!(body["meta"]["sip_status"], "Busy Here");
    // skipAuth: no token needed.
    let r = reqwest::Client::new()
        .post(format!("{}/twirp/livekit.RoomService/ListRooms", e.url()))
        .header("content-type", "application/json")
        .header("X-Lk-Mock", json!({"skipAuth": true}).to_string())
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // regionsStatus and GET /settings/regions.
    let r = reqwest::get(format!("{}/settings/regions", e.url()))
        .await
        .expect("regions");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.expect("json")["regions"][0]["url"],
        e.url()
    );
    let r = reqwest::Client::new()
        .get(format!("{}/settings/regions", e.url()))
        .header("X-Lk-Mock", "{\"regionsStatus\":500}")
        .send()
        .await
        .expect("regions");
    assert_eq!(r.status(), 500);
    // pinnedRegions elsewhere: 451 plain text.
    let r = raw(
        &e,
        "ListRooms",
        json!({}),
        Some(json!({"pinnedRegions": ["eu-west"]})),
    )
    .await;
    assert_eq!(r.status(), 451);
    e.shutdown().await;
}

#[tokio::test]
async fn global_faults_latency_errors_and_drops() {
    let e = start(None).await;
    let client = rooms(&e);
    let control = reqwest::Client::new();
    let put = control
        .put(format!("{}/emulator/v1/faults", e.url()))
        .json(&json!({"methods": {"ListRooms": {"error_rate": 1.0, "error_code": "unavailable"}, "CreateRoom": {"latency_ms": 150}}}))
        .send()
        .await
        .expect("faults");
    assert_eq!(put.status(), 204);
    let err = client.list_rooms(vec![]).await.expect_err("injected");
    assert_code(&err, "unavailable");
    let started = std::time::Instant::now();
    client
        .create_room("f", CreateRoomOptions::default())
        .await
        .expect("slow but fine");
    assert!(started.elapsed() >= Duration::from_millis(150));
    e.emulator.set_faults(livekit_emulator::Faults {
        methods: [(
            "*".to_owned(),
            livekit_emulator::MethodFault {
                drop_rate: 1.0,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    let err = client.list_rooms(vec![]).await.expect_err("dropped");
    assert!(
        twirp_code(&err).is_none(),
        "a dropped connection is a transport error: {err:?}"
    );
    let bad = control
        .put(format!("{}/emulator/v1/faults", e.url()))
        .json(&json!({"methods": {"*": {"error_rate": 2.0}}}))
        .send()
        .await
        .expect("faults");
    assert_eq!(bad.status(), 422);
    e.shutdown().await;
}

#[tokio::test]
async fn webhooks_are_retried_with_the_same_id_body_and_signature_in_room_order() {
    let (sink, url) = start_sink().await;
    if let Ok(mut f) = sink.fail_next.lock() {
        *f = 2;
    }
    let e = start(Some(url)).await;
    let call = e
        .emulator
        .inbound_call(InboundCall {
            from: "+15105550123".into(),
            to: "+15105550100".into(),
            trunk_id: "ST_in".into(),
            rule_id: "SDR_rule".into(),
            room_name: None,
            room_prefix: "call".into(),
            hangup_after_ms: Some(200),
        })
        .await;
    let all = eventually("room events delivered", Duration::from_secs(10), || async {
        let got = sink.all();
        let receiver = WebhookReceiver::new(TokenVerifier::with_api_key("devkey", "secret"));
        let ok: Vec<proto::WebhookEvent> = got
            .iter()
            .filter_map(|(a, b)| receiver.receive(b, a).ok())
            .collect();
        (ok.iter().any(|e| e.event == "participant_left")).then_some(got)
    })
    .await;
    // The first event was delivered three times (two 500s, then 200), byte-identical.
    assert_eq!(all[0], all[1]);
    assert_eq!(all[1], all[2]);
    let events = verified_events(&sink);
    let order: Vec<&str> = events.iter().skip(2).map(|e| e.event.as_str()).collect();
    assert_eq!(
        order,
        [
            "room_started",
            "participant_joined",
            "track_published",
            "participant_left"
        ]
    );
    let joined = &events[3];
    let p = joined.participant.as_ref().expect("participant");
    assert_eq!(p.identity, "sip_+15105550123");
    assert_eq!(
        p.attributes.get("sip.trunkPhoneNumber").map(String::as_str),
        Some("+15105550100")
    );
    assert_eq!(
        p.attributes.get("sip.ruleID").map(String::as_str),
        Some("SDR_rule")
    );
    assert_eq!(
        p.attributes.get("sip.callID").map(String::as_str),
        Some(call.sip_call_id.as_str())
    );
    // The body is protojson: camelCase, enums by name, int64 as strings, zero values omitted.
    let raw: Value = serde_json::from_str(
        &all.iter()
            .find(|(_, b)| b.contains("participant_joined"))
            .expect("joined")
            .1,
    )
    .expect("json");
    assert_eq!(raw["participant"]["kind"], "SIP");
    assert!(raw["createdAt"].is_string());
    assert!(raw["participant"]["joinedAt"].is_string());
    assert!(raw["participant"].get("disconnectReason").is_none());
    let record = e.emulator.webhooks();
    assert_eq!(record[0].attempts, 3);
    assert_eq!(record[0].outcome, "delivered");
    e.shutdown().await;
}

#[tokio::test]
async fn webhook_duplication_pause_and_control_api() {
    let (sink, url) = start_sink().await;
    let e = start(Some(url)).await;
    e.emulator.set_faults(livekit_emulator::Faults {
        webhooks: livekit_emulator::WebhookFaults {
            duplicate_rate: 1.0,
            paused: true,
            ..Default::default()
        },
        ..Default::default()
    });
    rooms(&e)
        .create_room("p1", CreateRoomOptions::default())
        .await
        .expect("create");
    // An absence can only be checked over a window: nothing arrives in 200 ms while paused
    // (an unpaused delivery to this local sink takes a few milliseconds).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sink.all().is_empty(), "paused: nothing delivered");
    e.emulator.set_faults(livekit_emulator::Faults {
        webhooks: livekit_emulator::WebhookFaults {
            duplicate_rate: 1.0,
            ..Default::default()
        },
        ..Default::default()
    });
    let events = eventually(
        "a duplicated room_started",
        Duration::from_secs(5),
        || async {
            let ev = verified_events(&sink);
            (ev.len() >= 2).then_some(ev)
        },
    )
    .await;
    assert_eq!(events[0].id, events[1].id, "a duplicate keeps its id");
    let http = reqwest::Client::new();
    let requests: Value = http
        .get(format!(
            "{}/emulator/v1/requests?method=CreateRoom",
            e.url()
        ))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(requests["requests"].as_array().map(Vec::len), Some(1));
    assert_eq!(requests["requests"][0]["room"], "p1");
    let hooks: Value = http
        .get(format!("{}/emulator/v1/webhooks", e.url()))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert!(hooks["webhooks"]
        .as_array()
        .is_some_and(|w| w.iter().any(|h| h["duplicate"] == true)));
    let script = http
        .put(format!("{}/emulator/v1/scripts/+15550009999", e.url()))
        .json(&json!({"outcome": "busy", "ring_ms": 50}))
        .send()
        .await
        .expect("script");
    assert_eq!(script.status(), 204);
    let reset = http
        .post(format!("{}/emulator/v1/reset", e.url()))
        .send()
        .await
        .expect("reset");
    assert_eq!(reset.status(), 204);
    assert!(e.emulator.requests().is_empty());
    e.shutdown().await;
}

#[tokio::test]
async fn empty_rooms_close_after_their_timeout() {
    let (sink, url) = start_sink().await;
    let e = start(Some(url)).await;
    rooms(&e)
        .create_room(
            "empty",
            CreateRoomOptions {
                empty_timeout: 1,
                ..Default::default()
            },
        )
        .await
        .expect("create");
    eventually(
        "room_finished for the empty room",
        Duration::from_secs(5),
        || async {
            verified_events(&sink)
                .iter()
                .any(|e| e.event == "room_finished")
                .then_some(())
        },
    )
    .await;
    assert!(rooms(&e).list_rooms(vec![]).await.expect("list").is_empty());
    e.shutdown().await;
}

/// JSON answers as LiveKit's server writes them: proto field names and every field present
/// (EmitUnpopulated), with int64 as strings and enums by name.
#[tokio::test]
async fn json_responses_carry_unpopulated_fields() {
    let e = start(None).await;
    let room: Value = raw(&e, "CreateRoom", json!({"name": "json-room"}), None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(room["name"], "json-room");
    assert_eq!(room["metadata"], "");
    assert_eq!(room["num_participants"], 0);
    assert_eq!(room["active_recording"], false);
    assert!(room["creation_time"].is_string(), "{room}");
    assert!(room["enabled_codecs"].is_array(), "{room}");
    assert!(room.get("version").is_some(), "{room}");
    let listed: Value = raw(&e, "ListParticipants", json!({"room": "json-room"}), None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(listed, json!({"participants": []}));
    e.shutdown().await;
}

/// Trunk and dispatch-rule CRUD needs the `sip.admin` grant (livekit-facts.md §4); without
/// it `unauthenticated`.
#[tokio::test]
async fn sip_admin_grant_guards_trunk_and_dispatch_rule_crud() {
    use livekit_api::services::sip::{ListSIPDispatchRuleFilter, ListSIPInboundTrunkFilter};
    let e = start(None).await;
    // The SDK signs these with sip.admin when it holds the API secret.
    let admin = SIPClient::with_api_key(&e.url(), "devkey", "secret");
    let trunks = admin
        .list_sip_inbound_trunk(ListSIPInboundTrunkFilter::All)
        .await
        .expect("admin may list trunks");
    assert!(trunks.is_empty());
    admin
        .list_sip_dispatch_rule(ListSIPDispatchRuleFilter::All)
        .await
        .expect("admin may list dispatch rules");
    // Past the grant, an unknown rule is LiveKit's `not_found`.
    let err = admin
        .delete_sip_dispatch_rule("SDR_x")
        .await
        .expect_err("no such rule");
    assert_code(&err, "not_found");
    // A token with only sip.call (and every video grant) is refused.
    let caller = SIPClient::with_token(
        &e.url(),
        &token(
            VideoGrants {
                room_admin: true,
                room_create: true,
                room_list: true,
                ..Default::default()
            },
            true,
        ),
    );
    let err = caller
        .list_sip_inbound_trunk(ListSIPInboundTrunkFilter::All)
        .await
        .expect_err("sip.admin needed");
    assert_code(&err, "unauthenticated");
    let err = caller
        .delete_sip_dispatch_rule("SDR_x")
        .await
        .expect_err("sip.admin needed");
    assert_code(&err, "unauthenticated");
    e.shutdown().await;
}
