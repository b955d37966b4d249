//! SIP trunks, dispatch rules, routed inbound calls, agent workers and the SDK-suite gaps,
//! driven from the outside over HTTP (JSON Twirp with signed tokens, and the control API).

mod common;
use common::{admin_token_for, start_with};

use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_emulator::{EmulatorConfig, RunningEmulator};
use serde_json::{json, Value};

async fn start() -> RunningEmulator {
    start_with(EmulatorConfig {
        agent_join_after: Some(Duration::from_millis(50)),
        ..EmulatorConfig::default()
    })
    .await
}

/// A JSON Twirp call with a full token (room-scoped to the body's room); status and body.
async fn twirp(e: &RunningEmulator, service: &str, method: &str, body: Value) -> (u16, Value) {
    let room = ["room", "roomName", "room_name"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .unwrap_or("");
    call(
        e.url(),
        service,
        method,
        body.clone(),
        Some(admin_token_for(room)),
    )
    .await
}

async fn call(
    base: String,
    service: &str,
    method: &str,
    body: Value,
    bearer: Option<String>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/twirp/livekit.{service}/{method}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.expect("answered");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn control(e: &RunningEmulator, method: reqwest::Method, path: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .request(method, format!("{}/emulator/v1{path}", e.url()))
        .json(&body)
        .send()
        .await
        .expect("control answered");
    resp.json().await.unwrap_or(Value::Null)
}

async fn inbound(e: &RunningEmulator, from: &str, to: &str) -> Value {
    control(
        e,
        reqwest::Method::POST,
        "/inbound",
        json!({"from": from, "to": to}),
    )
    .await
}

async fn sip(e: &RunningEmulator, method: &str, body: Value) -> Value {
    let (status, v) = twirp(e, "SIP", method, body).await;
    assert_eq!(status, 200, "{method}: {v}");
    v
}

async fn participants(e: &RunningEmulator, room: &str) -> Vec<Value> {
    let (_, v) = twirp(e, "RoomService", "ListParticipants", json!({"room": room})).await;
    v["participants"].as_array().cloned().unwrap_or_default()
}

/// Polls `f` until it gives `Some`, for up to 5 s.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    for _ in 0..100 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn individual(prefix: &str) -> Value {
    json!({"dispatchRuleIndividual": {"roomPrefix": prefix}})
}

#[tokio::test]
async fn trunks_round_trip_with_update_replace_filters_and_delete() {
    let e = start().await;
    let a = sip(
        &e,
        "CreateSIPInboundTrunk",
        json!({"trunk": {"name": "a", "numbers": ["+15105550100"], "allowedNumbers": ["+1999"]}}),
    )
    .await;
    let id = a["sip_trunk_id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("ST_"), "{a}");
    let b = sip(
        &e,
        "CreateSIPInboundTrunk",
        json!({"trunk": {"name": "b", "numbers": ["+15105550199"]}}),
    )
    .await;
    let b_id = b["sip_trunk_id"].as_str().expect("id").to_owned();
    // Same number, no allowed numbers on either side to tell callers apart: refused.
    let (status, err) = twirp(
        &e,
        "SIP",
        "CreateSIPInboundTrunk",
        json!({"trunk": {"numbers": ["+15105550199"]}}),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument"))
    );

    // `update` changes only what it names.
    let updated = sip(
        &e,
        "UpdateSIPInboundTrunk",
        json!({"sipTrunkId": id, "update": {"name": "renamed", "numbers": {"add": ["+15105550101"]}}}),
    )
    .await;
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["numbers"], json!(["+15105550100", "+15105550101"]));
    assert_eq!(updated["allowed_numbers"], json!(["+1999"]));
    // `replace` swaps the whole trunk (what it leaves out is gone), id kept.
    let replaced = sip(
        &e,
        "UpdateSIPInboundTrunk",
        json!({"sipTrunkId": id, "replace": {"numbers": ["+15105550102"]}}),
    )
    .await;
    assert_eq!(replaced["sip_trunk_id"], id.as_str());
    assert_eq!(replaced["name"], "");
    assert_eq!(replaced["allowed_numbers"], json!([]));
    let got = sip(&e, "GetSIPInboundTrunk", json!({"sipTrunkId": id})).await;
    assert_eq!(got["trunk"]["numbers"], json!(["+15105550102"]));

    // Filters: by number (normalised), by id; paging returns everything after `after_id`.
    let by_number = sip(
        &e,
        "ListSIPInboundTrunk",
        json!({"numbers": ["+1 510 555 0199"]}),
    )
    .await;
    let ids: Vec<&str> = by_number["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|t| t["sip_trunk_id"].as_str())
        .collect();
    assert_eq!(ids, [b_id.as_str()]);
    let by_id = sip(&e, "ListSIPInboundTrunk", json!({"trunkIds": [id]})).await;
    assert_eq!(by_id["items"].as_array().map(Vec::len), Some(1));
    let first = std::cmp::min(id.clone(), b_id.clone());
    let paged = sip(
        &e,
        "ListSIPInboundTrunk",
        json!({"page": {"afterId": first, "limit": 1}}),
    )
    .await;
    assert_eq!(paged["items"].as_array().map(Vec::len), Some(1));

    // Outbound: validated, listed apart from inbound.
    let (status, _) = twirp(
        &e,
        "SIP",
        "CreateSIPOutboundTrunk",
        json!({"trunk": {"address": "sip.example.com"}}),
    )
    .await;
    assert_eq!(status, 400, "an outbound trunk needs numbers");
    let out = sip(
        &e,
        "CreateSIPOutboundTrunk",
        json!({"trunk": {"address": "sip.example.com", "numbers": ["+15105550100"]}}),
    )
    .await;
    let out_id = out["sip_trunk_id"].as_str().expect("id").to_owned();
    let outs = sip(&e, "ListSIPOutboundTrunk", json!({})).await;
    assert_eq!(outs["items"].as_array().map(Vec::len), Some(1));
    let out_updated = sip(
        &e,
        "UpdateSIPOutboundTrunk",
        json!({"sipTrunkId": out_id, "update": {"address": "sip2.example.com"}}),
    )
    .await;
    assert_eq!(out_updated["numbers"], json!(["+15105550100"]));
    assert_eq!(out_updated["address"], "sip2.example.com");

    // Delete, then it is gone.
    sip(&e, "DeleteSIPTrunk", json!({"sipTrunkId": id})).await;
    let (status, err) = twirp(&e, "SIP", "GetSIPInboundTrunk", json!({"sipTrunkId": id})).await;
    assert_eq!(status, 404);
    assert_eq!(err["msg"], "requested sip trunk does not exist");
    let (status, _) = twirp(
        &e,
        "SIP",
        "UpdateSIPInboundTrunk",
        json!({"sipTrunkId": id, "update": {"name": "x"}}),
    )
    .await;
    assert_eq!(status, 404);
    e.shutdown().await;
}

#[tokio::test]
async fn dispatch_rules_round_trip_and_duplicates_are_refused() {
    let e = start().await;
    let rule = sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": individual("call"), "numbers": ["+15105550100"],
               "inboundNumbers": ["+15105550123"], "name": "r1", "metadata": "m1"}}),
    )
    .await;
    let id = rule["sip_dispatch_rule_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert!(id.starts_with("SDR_"));
    // The same (trunk, caller, number, pin) again: invalid_argument naming the first rule.
    let (status, err) = twirp(
        &e,
        "SIP",
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": individual("other"), "numbers": ["+15105550100"],
               "inboundNumbers": ["+15105550123"]}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["code"], "invalid_argument");
    assert!(err["msg"].as_str().unwrap_or("").contains(&id), "{err}");
    // A different caller is no duplicate.
    sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": individual("other"), "numbers": ["+15105550100"],
               "trunkIds": ["ST_t"]}}),
    )
    .await;

    // `update` keeps inbound_numbers and numbers; `replace` drops what it leaves out.
    let updated = sip(
        &e,
        "UpdateSIPDispatchRule",
        json!({"sipDispatchRuleId": id, "update": {"metadata": "m2", "attributes": {"k": "v"}}}),
    )
    .await;
    assert_eq!(updated["metadata"], "m2");
    assert_eq!(updated["inbound_numbers"], json!(["+15105550123"]));
    assert_eq!(updated["attributes"], json!({"k": "v"}));
    let replaced = sip(
        &e,
        "UpdateSIPDispatchRule",
        json!({"sipDispatchRuleId": id, "replace": {"rule": individual("call")}}),
    )
    .await;
    assert_eq!(replaced["inbound_numbers"], json!([]));
    assert_eq!(replaced["metadata"], "");

    // Filters: by trunk (wildcard rules pass), by id.
    let by_trunk = sip(&e, "ListSIPDispatchRule", json!({"trunkIds": ["ST_other"]})).await;
    assert_eq!(
        by_trunk["items"].as_array().map(Vec::len),
        Some(1),
        "{by_trunk}"
    );
    let by_id = sip(&e, "ListSIPDispatchRule", json!({"dispatchRuleIds": [id]})).await;
    assert_eq!(by_id["items"].as_array().map(Vec::len), Some(1));

    sip(
        &e,
        "DeleteSIPDispatchRule",
        json!({"sipDispatchRuleId": id}),
    )
    .await;
    let (status, err) = twirp(
        &e,
        "SIP",
        "DeleteSIPDispatchRule",
        json!({"sipDispatchRuleId": id}),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    // Without sip.admin: unauthenticated.
    let weak = AccessToken::with_api_key("devkey", "secret")
        .with_grants(VideoGrants::default())
        .to_jwt()
        .expect("jwt");
    let (status, err) = call(e.url(), "SIP", "ListSIPDispatchRule", json!({}), Some(weak)).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    e.shutdown().await;
}

#[tokio::test]
async fn calls_are_routed_by_trunk_rule_and_priority() {
    let e = start().await;
    let trunk = sip(
        &e,
        "CreateSIPInboundTrunk",
        json!({"trunk": {"numbers": ["+15105550100"]}}),
    )
    .await;
    let trunk_id = trunk["sip_trunk_id"].as_str().expect("id").to_owned();
    let wildcard = sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": individual("call")}}),
    )
    .await;
    let specific = sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": {"dispatchRuleDirect": {"roomName": "front-desk"}},
               "trunkIds": [trunk_id]}}),
    )
    .await;
    // A rule for one DID only, on the wildcard side, more specific than the catch-all.
    let by_did = sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": {"dispatchRuleCallee": {"roomPrefix": "did"}},
               "numbers": ["+15105550177"]}}),
    )
    .await;
    // A DID put in inbound_numbers (callers) by mistake matches nobody dialling it.
    sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": {"dispatchRuleDirect": {"roomName": "never"}},
               "inboundNumbers": ["+15105550188"], "trunkIds": ["ST_none"]}}),
    )
    .await;

    // On the trunk: the trunk-specific rule beats the wildcard.
    let call = inbound(&e, "+15105550123", "+15105550100").await;
    assert_eq!(call["trunk_id"], trunk_id.as_str());
    assert_eq!(call["rule_id"], specific["sip_dispatch_rule_id"]);
    assert_eq!(call["room_name"], "front-desk");
    // No trunk for this DID: the wildcard rules decide; `numbers` beats the catch-all.
    let call = inbound(&e, "+15105550123", "+15105550177").await;
    assert_eq!(call["trunk_id"], Value::Null);
    assert_eq!(call["rule_id"], by_did["sip_dispatch_rule_id"]);
    assert_eq!(call["room_name"], "did_+15105550177");
    let call = inbound(&e, "+15105550123", "+15105550150").await;
    assert_eq!(call["rule_id"], wildcard["sip_dispatch_rule_id"]);
    let room = call["room_name"].as_str().expect("room");
    let suffix = room
        .strip_prefix("call_+15105550123_")
        .expect("individual room name");
    assert_eq!(suffix.len(), 12, "{room}");

    // Remove the catch-all: an unmatched DID is rejected (486), recorded, no room.
    sip(
        &e,
        "DeleteSIPDispatchRule",
        json!({"sipDispatchRuleId": wildcard["sip_dispatch_rule_id"]}),
    )
    .await;
    let rejected = inbound(&e, "+15105550123", "+15105550188").await;
    assert_eq!(rejected["accepted"], false);
    assert_eq!(rejected["sip_status"], 486);
    assert_eq!(rejected["room_name"], "");
    let listed = control(&e, reqwest::Method::GET, "/inbound", Value::Null).await;
    let calls = listed["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[3]["status"], "rejected");
    let (_, rooms) = twirp(&e, "RoomService", "ListRooms", json!({})).await;
    assert_eq!(rooms["rooms"].as_array().map(Vec::len), Some(3), "{rooms}");
    e.shutdown().await;
}

#[tokio::test]
async fn the_caller_gets_the_rules_attributes_and_hidden_numbers() {
    let e = start().await;
    sip(
        &e,
        "CreateSIPInboundTrunk",
        json!({"trunk": {"numbers": ["+15105550100"]}}),
    )
    .await;
    let rule = sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": {"dispatchRuleIndividual": {"roomPrefix": "p", "noRandomness": true}},
               "numbers": ["+15105550100"], "hidePhoneNumber": true, "metadata": "{\"tier\":1}",
               "attributes": {"team": "sales", "sip.callID": "overwritten"}}}),
    )
    .await;
    let call = inbound(&e, "+15105550123", "+15105550100").await;
    // Hidden: the room uses the last 4 digits, identity the sha256 prefix.
    assert_eq!(call["room_name"], "p_0123");
    let p = &participants(&e, "p_0123").await[0];
    let digest = {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(b"+15105550123");
        d[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(p["identity"], format!("sip_{digest}"));
    assert_eq!(p["name"], "Phone 0123");
    assert_eq!(p["kind"], "SIP");
    assert_eq!(p["metadata"], "{\"tier\":1}");
    let attrs = &p["attributes"];
    assert_eq!(attrs["team"], "sales");
    assert_eq!(attrs["sip.callID"], call["sip_call_id"]);
    assert_eq!(attrs["sip.ruleID"], rule["sip_dispatch_rule_id"]);
    assert_eq!(attrs["sip.callStatus"], "ringing");
    for hidden in ["sip.phoneNumber", "sip.trunkPhoneNumber", "sip.hostname"] {
        assert!(attrs.get(hidden).is_none(), "{hidden} shown: {attrs}");
    }
    assert!(attrs["sip.trunkID"]
        .as_str()
        .is_some_and(|t| t.starts_with("ST_")));

    // Not hidden: the numbers are there.
    sip(
        &e,
        "UpdateSIPDispatchRule",
        json!({"sipDispatchRuleId": rule["sip_dispatch_rule_id"], "replace": {
            "rule": {"dispatchRuleCallee": {"roomPrefix": "c", "randomize": true}}}}),
    )
    .await;
    let call = inbound(&e, "+15105550123", "+15105550100").await;
    let room = call["room_name"].as_str().expect("room").to_owned();
    assert!(room.starts_with("c_+15105550100_") && room.len() == "c_+15105550100_".len() + 12);
    let p = &participants(&e, &room).await[0];
    assert_eq!(p["identity"], "sip_+15105550123");
    assert_eq!(p["name"], "Phone +15105550123");
    assert_eq!(p["attributes"]["sip.phoneNumber"], "+15105550123");
    assert_eq!(p["attributes"]["sip.trunkPhoneNumber"], "+15105550100");
    assert!(p["attributes"]["sip.hostname"].is_string());
    e.shutdown().await;
}

async fn dispatches(e: &RunningEmulator, query: &str) -> Vec<Value> {
    control(
        e,
        reqwest::Method::GET,
        &format!("/dispatches{query}"),
        Value::Null,
    )
    .await["dispatches"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn rule_agents_are_dispatched_once_join_answer_and_leave_with_the_caller() {
    let e = start().await;
    sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": {"dispatchRuleDirect": {"roomName": "desk"}},
               "roomConfig": {"agents": [{"agentName": "receptionist", "metadata": "{\"x\":1}"}]}}}),
    )
    .await;
    let first = inbound(&e, "+15105550123", "+15105550100").await;
    let second = inbound(&e, "+15105550124", "+15105550100").await;
    assert_eq!(first["room_name"], "desk");
    assert_eq!(second["room_name"], "desk");
    // Only the join that created the room applied room_config.
    let rule_dispatches = dispatches(&e, "?source=rule").await;
    assert_eq!(rule_dispatches.len(), 1, "{rule_dispatches:?}");
    assert_eq!(rule_dispatches[0]["agent_name"], "receptionist");
    assert_eq!(rule_dispatches[0]["metadata"], "{\"x\":1}");
    // The agent joins as an AGENT participant; the callers are answered.
    let agent = eventually("the agent", || async {
        participants(&e, "desk")
            .await
            .into_iter()
            .find(|p| p["kind"] == "AGENT")
    })
    .await;
    assert!(agent["identity"]
        .as_str()
        .is_some_and(|i| i.starts_with("agent-AJ_")));
    assert_eq!(agent["attributes"]["lk.agent_name"], "receptionist");
    eventually("answered", || async {
        let ps = participants(&e, "desk").await;
        ps.iter()
            .filter(|p| p["kind"] == "SIP")
            .all(|p| p["attributes"]["sip.callStatus"] == "active")
            .then_some(())
    })
    .await;
    // Both callers hang up: the agent leaves after the last one.
    for c in [&first, &second] {
        let path = format!(
            "/inbound/{}/hangup",
            c["sip_call_id"].as_str().expect("call id")
        );
        let resp = reqwest::Client::new()
            .post(format!("{}/emulator/v1{path}", e.url()))
            .send()
            .await
            .expect("hangup");
        assert_eq!(resp.status(), 204);
    }
    eventually("everyone gone", || async {
        participants(&e, "desk").await.is_empty().then_some(())
    })
    .await;
    let d = &dispatches(&e, "").await[0];
    assert_eq!(d["job_state"], "left");
    // The emulator's record agrees (Rust accessors).
    assert_eq!(e.emulator.dispatches_in("desk").len(), 1);
    e.shutdown().await;
}

#[tokio::test]
async fn an_api_dispatch_joins_after_the_agents_delay_or_never() {
    let e = start().await;
    let resp = reqwest::Client::new()
        .put(format!("{}/emulator/v1/agents/slow", e.url()))
        .json(&json!({"join_after_ms": 400}))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 204);
    control(
        &e,
        reqwest::Method::PUT,
        "/agents/absent",
        json!({"join_after_ms": null}),
    )
    .await;
    let agents = control(&e, reqwest::Method::GET, "/agents", Value::Null).await;
    assert_eq!(agents["agents"]["slow"]["join_after_ms"], 400);
    assert_eq!(agents["agents"]["absent"]["join_after_ms"], Value::Null);

    for (room, agent) in [("r-slow", "slow"), ("r-absent", "absent")] {
        twirp(&e, "RoomService", "CreateRoom", json!({"name": room})).await;
        let (status, _) = twirp(
            &e,
            "AgentDispatchService",
            "CreateDispatch",
            json!({"room": room, "agentName": agent}),
        )
        .await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(participants(&e, "r-slow").await.is_empty(), "not yet");
    eventually("the slow agent", || async {
        (!participants(&e, "r-slow").await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(participants(&e, "r-absent").await.is_empty());
    let absent = dispatches(&e, "?agent_name=absent").await;
    assert_eq!(absent[0]["job_state"], "no_worker");
    assert_eq!(absent[0]["source"], "api");
    e.shutdown().await;
}

#[tokio::test]
async fn an_unanswered_call_ends_at_the_trunks_ringing_timeout() {
    let e = start_with(EmulatorConfig {
        agent_join_after: None,
        ..EmulatorConfig::default()
    })
    .await;
    sip(
        &e,
        "CreateSIPInboundTrunk",
        json!({"trunk": {"numbers": ["+15105550100"], "ringingTimeout": "1s"}}),
    )
    .await;
    sip(
        &e,
        "CreateSIPDispatchRule",
        json!({"dispatchRule": {"rule": individual("call"),
               "roomConfig": {"agents": [{"agentName": "nobody"}]}}}),
    )
    .await;
    let call = inbound(&e, "+15105550123", "+15105550100").await;
    assert_eq!(call["status"], "ringing");
    let room = call["room_name"].as_str().expect("room").to_owned();
    assert_eq!(participants(&e, &room).await.len(), 1);
    let ended = eventually("the ringing timeout", || async {
        let listed = control(&e, reqwest::Method::GET, "/inbound", Value::Null).await;
        let c = listed["calls"][0].clone();
        (c["status"] == "ended").then_some(c)
    })
    .await;
    assert_eq!(ended["reason"], "ringing_timeout");
    assert_eq!(ended["sip_status"], 486);
    assert!(participants(&e, &room).await.is_empty());
    e.shutdown().await;
}

#[tokio::test]
async fn dialling_an_unknown_outbound_trunk_is_not_found() {
    let e = start_with(EmulatorConfig {
        outbound_trunks: vec!["ST_known".into()],
        ..EmulatorConfig::default()
    })
    .await;
    let dial =
        |trunk: &str| json!({"sipTrunkId": trunk, "sipCallTo": "+15105550123", "roomName": "out"});
    let (status, err) = twirp(&e, "SIP", "CreateSIPParticipant", dial("ST_unknown")).await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "not_found");
    assert_eq!(err["msg"], "requested sip trunk does not exist");
    let (status, _) = twirp(&e, "SIP", "CreateSIPParticipant", dial("ST_known")).await;
    assert_eq!(status, 200);
    e.shutdown().await;
}

#[tokio::test]
async fn sdk_suite_gaps_are_answered_as_livekit_does() {
    let e = start_with(EmulatorConfig {
        regions: 2,
        ..EmulatorConfig::default()
    })
    .await;
    // roomAdmin without a room is refused.
    let roomless = AccessToken::with_api_key("devkey", "secret")
        .with_grants(VideoGrants {
            room_admin: true,
            ..Default::default()
        })
        .to_jwt()
        .expect("jwt");
    let (status, err) = call(
        e.url(),
        "RoomService",
        "ListParticipants",
        json!({"room": "r"}),
        Some(roomless),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    // No Authorization: a Twirp JSON unauthenticated.
    let (status, err) = call(e.url(), "RoomService", "ListRooms", json!({}), None).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    assert_eq!(err["msg"], "permissions denied");
    // Unmodelled methods check their grant, then answer unimplemented.
    let (status, err) = twirp(
        &e,
        "RoomService",
        "UpdateRoomMetadata",
        json!({"room": "r", "metadata": "m"}),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (501, Some("unimplemented")));
    let (status, err) = call(
        e.url(),
        "Egress",
        "ListEgress",
        json!({}),
        Some(admin_token_for("")),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    // ListParticipants on a missing room: an empty list.
    let (status, listed) = twirp(
        &e,
        "RoomService",
        "ListParticipants",
        json!({"room": "nope"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(listed["participants"], json!([]));

    // Regions: two listeners, listed in order, each naming itself on answers.
    let urls = e.region_urls();
    assert_eq!(urls.len(), 2);
    let regions: Value = reqwest::get(format!("{}/settings/regions", urls[1]))
        .await
        .expect("regions")
        .json()
        .await
        .expect("json");
    assert_eq!(regions["regions"][0]["region"], "region-0");
    assert_eq!(regions["regions"][1]["region"], "region-1");
    assert_eq!(regions["regions"][1]["url"], urls[1].as_str());
    let failing = |base: &str| {
        reqwest::Client::new()
            .post(format!("{base}/twirp/livekit.RoomService/ListRooms"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", admin_token_for("")))
            .header("x-lk-mock", r#"{"failRegions":[0]}"#)
            .body("{}")
            .send()
    };
    let primary = failing(&urls[0]).await.expect("answered");
    assert_eq!(primary.status(), 503);
    let secondary = failing(&urls[1]).await.expect("answered");
    assert_eq!(secondary.status(), 200);
    assert_eq!(
        secondary
            .headers()
            .get("x-lk-mock-region")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    e.shutdown().await;
}

/// Once everyone has left, a room lives its `departure_timeout` (LiveKit: 20 s by
/// default), not its `empty_timeout`, which is the wait for a first participant.
#[tokio::test]
async fn an_emptied_room_closes_after_its_departure_timeout() {
    let e = start().await;
    let (status, room) = twirp(
        &e,
        "RoomService",
        "CreateRoom",
        json!({"name": "leaving", "empty_timeout": 300, "departure_timeout": 1}),
    )
    .await;
    assert_eq!(status, 200, "{room}");
    assert_eq!(room["departure_timeout"], 1);
    let placed = control(
        &e,
        reqwest::Method::POST,
        "/inbound",
        json!({"from": "+15105550123", "to": "+15105550100", "room_name": "leaving", "hangup_after_ms": 100}),
    )
    .await;
    assert_eq!(placed["room_name"], "leaving", "{placed}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rooms = control(&e, reqwest::Method::GET, "/rooms", Value::Null).await;
        let open = rooms["rooms"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["room"]["name"] == "leaving"));
        if !open {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the emptied room is still open after 5 s (its departure timeout is 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    e.shutdown().await;
}
