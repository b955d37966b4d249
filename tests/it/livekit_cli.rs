//! `callfleet livekit`, run as an operator runs it (the built binary) against an emulator:
//! trunk and rule CRUD through `--json` and tables, `connect-number` twice changing nothing
//! (counted from the emulator's record), the warnings and `check` findings for a rule with
//! agents and a DID among a rule's callers, and the exit codes scripts rely on.

use std::process::Output;

use livekit_emulator::{Emulator, EmulatorConfig, RunningEmulator};
use serde_json::{json, Value};

use crate::fleet::{FleetOptions, TestFleet, API_KEY};

async fn emulator() -> RunningEmulator {
    Emulator::start(
        EmulatorConfig::default(),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("emulator starts")
}

/// Runs `callfleet livekit <args>` against `url` with dev mode's credentials.
async fn lk_with(url: &str, secret: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
        .arg("livekit")
        .args(args)
        .env("LIVEKIT_URL", url)
        .env("LIVEKIT_API_KEY", "devkey")
        .env("LIVEKIT_API_SECRET", secret)
        .env("CALLFLEET_LOG", "warn")
        .env_remove("LIVEKIT_SIP_HOST")
        .env_remove("CALLFLEET_API_URL")
        .env_remove("CALLFLEET_API_KEY")
        .env_remove("CALLFLEET_DEFAULT_REGION")
        .env_remove("CALLFLEET_LIVEKIT_TIMEOUT_MS")
        .output()
        .await
        .expect("run callfleet livekit")
}

async fn lk(e: &RunningEmulator, args: &[&str]) -> Output {
    lk_with(&e.url(), "secret", args).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Runs with `--json`, expects exit 0, returns the parsed answer.
async fn json_of(e: &RunningEmulator, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = lk(e, &all).await;
    assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{args:?} printed no JSON ({err}): {}", stdout(&out)))
}

fn id(v: &Value, key: &str) -> String {
    v[key].as_str().expect("an id").to_owned()
}

#[tokio::test]
async fn trunks_and_rules_round_trip_through_the_cli() {
    let e = emulator().await;

    // Inbound trunk: every field a user sets comes back.
    let trunk = json_of(
        &e,
        &[
            "inbound-trunks",
            "create",
            "--name",
            "main line",
            "--number",
            "+15105550100,+15105550101",
            "--allowed-address",
            "203.0.113.0/24",
            "--allowed-number",
            "+14155550199",
            "--auth-user",
            "carrier",
            "--auth-pass",
            "hunter2-secret",
            "--ringing-timeout",
            "45s",
            "--max-call-duration",
            "1h",
            "--krisp",
        ],
    )
    .await;
    let trunk_id = id(&trunk, "sip_trunk_id");
    assert!(trunk_id.starts_with("ST_"), "{trunk}");
    assert_eq!(trunk["numbers"], json!(["+15105550100", "+15105550101"]));
    assert_eq!(trunk["allowed_addresses"], json!(["203.0.113.0/24"]));
    assert_eq!(trunk["allowed_numbers"], json!(["+14155550199"]));
    assert_eq!(trunk["auth_username"], "carrier");
    assert_eq!(trunk["auth_password_set"], true);
    assert_eq!(trunk["ringing_timeout_s"], 45);
    assert_eq!(trunk["max_call_duration_s"], 3600);
    assert_eq!(trunk["krisp_enabled"], true);
    assert!(
        !trunk.to_string().contains("hunter2"),
        "secrets never print"
    );
    let got = json_of(&e, &["inbound-trunks", "get", &trunk_id]).await;
    assert_eq!(got, trunk);

    // Update: lists edited in place; what only replace can change is refused without it.
    let updated = json_of(
        &e,
        &[
            "inbound-trunks",
            "update",
            &trunk_id,
            "--name",
            "renamed",
            "--add-number",
            "+15105550102",
            "--remove-number",
            "+15105550100",
        ],
    )
    .await;
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["numbers"], json!(["+15105550101", "+15105550102"]));
    assert_eq!(updated["ringing_timeout_s"], 45, "an update keeps the rest");
    let refused = lk(
        &e,
        &[
            "inbound-trunks",
            "update",
            &trunk_id,
            "--ringing-timeout",
            "20s",
        ],
    )
    .await;
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("--ringing-timeout can only change with --replace"),
        "{}",
        stderr(&refused)
    );
    let replaced = json_of(
        &e,
        &[
            "inbound-trunks",
            "update",
            &trunk_id,
            "--replace",
            "--ringing-timeout",
            "20s",
            "--krisp",
            "false",
        ],
    )
    .await;
    assert_eq!(replaced["ringing_timeout_s"], 20);
    assert_eq!(replaced["krisp_enabled"], false);
    assert_eq!(
        replaced["name"], "renamed",
        "replace keeps what it was not told"
    );
    assert_eq!(replaced["auth_password_set"], true);

    // The table: a header, aligned columns, one row per trunk.
    let table = lk(&e, &["inbound-trunks", "list"]).await;
    assert_eq!(code(&table), 0, "{}", stderr(&table));
    let text = stdout(&table);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("ID "), "{text}");
    assert_eq!(lines[0].find("NAME"), lines[1].find("renamed"), "{text}");
    assert!(lines[1].contains("+15105550101,+15105550102"), "{text}");

    // Outbound trunk.
    let out = json_of(
        &e,
        &[
            "outbound-trunks",
            "create",
            "--name",
            "carrier out",
            "--address",
            "sip:my-trunk.pstn.example.com",
            "--number",
            "+15105550100",
            "--transport",
            "tls",
            "--auth-user",
            "u",
            "--auth-pass",
            "p",
        ],
    )
    .await;
    let out_id = id(&out, "sip_trunk_id");
    assert_eq!(out["address"], "my-trunk.pstn.example.com");
    assert_eq!(out["transport"], "tls");
    assert_eq!(out["numbers"], json!(["+15105550100"]));
    let out2 = json_of(
        &e,
        &[
            "outbound-trunks",
            "update",
            &out_id,
            "--transport",
            "udp",
            "--add-number",
            "+15105550199",
        ],
    )
    .await;
    assert_eq!(out2["transport"], "udp");
    assert_eq!(out2["numbers"], json!(["+15105550100", "+15105550199"]));
    let listed = json_of(&e, &["outbound-trunks", "list"]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(
        json_of(&e, &["outbound-trunks", "get", &out_id]).await,
        out2
    );

    // Rule: numbers (called) and inbound numbers (callers) land where they belong, which
    // livekit-api 0.10's create cannot do.
    let rule = json_of(
        &e,
        &[
            "rules",
            "create",
            "--name",
            "support",
            "--trunk",
            &trunk_id,
            "--number",
            "+15105550101",
            "--inbound-number",
            "+14155550199",
            "--kind",
            "callee",
            "--room-prefix",
            "sup-",
            "--randomize",
            "--hide-phone-number",
            "--attribute",
            "team=blue",
            "--agent",
            "support-agent:{\"lang\":\"en\"}",
            "--metadata",
            "m1",
        ],
    )
    .await;
    let rule_id = id(&rule, "sip_dispatch_rule_id");
    assert!(rule_id.starts_with("SDR_"), "{rule}");
    assert_eq!(rule["numbers"], json!(["+15105550101"]));
    assert_eq!(rule["inbound_numbers"], json!(["+14155550199"]));
    assert_eq!(rule["trunk_ids"], json!([trunk_id]));
    assert_eq!(rule["kind"], "callee");
    assert_eq!(rule["room_prefix"], "sup-");
    assert_eq!(rule["random_suffix"], true);
    assert_eq!(rule["hide_phone_number"], true);
    assert_eq!(rule["attributes"], json!({"team": "blue"}));
    assert_eq!(
        rule["agents"],
        json!([{"agent_name": "support-agent", "metadata": "{\"lang\":\"en\"}"}])
    );
    assert_eq!(json_of(&e, &["rules", "get", &rule_id]).await, rule);

    // An update changes the kind's settings and keeps the rest; agents need --replace.
    let renamed = json_of(
        &e,
        &[
            "rules",
            "update",
            &rule_id,
            "--name",
            "support 2",
            "--pin",
            "4321",
        ],
    )
    .await;
    assert_eq!(renamed["name"], "support 2");
    assert_eq!(renamed["pin_set"], true);
    assert_eq!(renamed["room_prefix"], "sup-");
    assert_eq!(renamed["agents"].as_array().map(Vec::len), Some(1));
    let refused = lk(&e, &["rules", "update", &rule_id, "--no-agents"]).await;
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    let cleared = json_of(
        &e,
        &[
            "rules",
            "update",
            &rule_id,
            "--replace",
            "--no-agents",
            "--inbound-number",
            "",
        ],
    )
    .await;
    assert_eq!(cleared["agents"], json!([]));
    assert_eq!(cleared["inbound_numbers"], json!([]));
    assert_eq!(cleared["name"], "support 2");

    let table = stdout(&lk(&e, &["rules", "list"]).await);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains(&rule_id) && table.contains("callee"),
        "{table}"
    );
    let listed = json_of(&e, &["rules", "list", "--trunk", &trunk_id]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    // Delete; then the id is gone (exit 1, said plainly).
    for (noun, id) in [
        ("rules", &rule_id),
        ("inbound-trunks", &trunk_id),
        ("outbound-trunks", &out_id),
    ] {
        assert_eq!(
            json_of(&e, &[noun, "delete", id]).await,
            json!({"deleted": id})
        );
        let gone = lk(&e, &[noun, "get", id]).await;
        assert_eq!(code(&gone), 1, "{noun}: {}", stderr(&gone));
        assert!(stderr(&gone).contains("no "), "{}", stderr(&gone));
        assert!(!stderr(&gone).contains("Twirp {"), "no debug formatting");
        let again = lk(&e, &[noun, "delete", id]).await;
        assert_eq!(code(&again), 1, "{}", stderr(&again));
    }
    let empty = lk(&e, &["rules", "list"]).await;
    assert_eq!(stdout(&empty).trim(), "no dispatch rules");
    e.shutdown().await;
}

#[tokio::test]
async fn connect_number_twice_changes_nothing() {
    let e = emulator().await;
    let first = json_of(&e, &["connect-number", "+1 (510) 555-0100"]).await;
    assert_eq!(first["number"], "+15105550100");
    assert_eq!(first["trunk"], "created");
    assert_eq!(first["rule"], "created");
    assert_eq!(first["changed"], true);
    assert_eq!(first["sip_uri"], "sip:+15105550100@127.0.0.1");
    assert_eq!(first["warnings"], json!([]));
    let (trunk_id, rule_id) = (id(&first, "trunk_id"), id(&first, "rule_id"));

    let rule = json_of(&e, &["rules", "get", &rule_id]).await;
    assert_eq!(rule["numbers"], json!(["+15105550100"]));
    assert_eq!(rule["inbound_numbers"], json!([]));
    assert_eq!(rule["trunk_ids"], json!([trunk_id]));
    assert_eq!(rule["kind"], "individual");
    assert_eq!(
        rule["agents"],
        json!([]),
        "callfleet dispatches, not the rule"
    );
    let trunk = json_of(&e, &["inbound-trunks", "get", &trunk_id]).await;
    assert_eq!(trunk["numbers"], json!(["+15105550100"]));

    let second = json_of(&e, &["connect-number", "+15105550100"]).await;
    assert_eq!(second["changed"], false);
    assert_eq!(second["trunk"], "unchanged");
    assert_eq!(second["rule"], "unchanged");
    assert_eq!(
        (id(&second, "trunk_id"), id(&second, "rule_id")),
        (trunk_id.clone(), rule_id.clone())
    );
    let text = lk(
        &e,
        &[
            "connect-number",
            "5105550100",
            "--sip-host",
            "sip.example.com",
        ],
    )
    .await;
    assert_eq!(code(&text), 0, "{}", stderr(&text));
    let said = stdout(&text);
    assert!(said.contains("Nothing changed"), "{said}");
    assert!(said.contains("sip:+15105550100@sip.example.com"), "{said}");
    assert!(
        said.contains(&trunk_id) && said.contains(&rule_id),
        "{said}"
    );

    // The emulator's record: one create each, no updates, one trunk and one rule.
    let emu = &e.emulator;
    assert_eq!(emu.requests_of("CreateSIPInboundTrunk").len(), 1);
    assert_eq!(emu.requests_of("CreateSIPDispatchRule").len(), 1);
    assert_eq!(emu.requests_of("UpdateSIPInboundTrunk").len(), 0);
    assert_eq!(emu.requests_of("UpdateSIPDispatchRule").len(), 0);
    let trunks = json_of(&e, &["inbound-trunks", "list"]).await;
    let rules = json_of(&e, &["rules", "list"]).await;
    assert_eq!(trunks.as_array().map(Vec::len), Some(1));
    assert_eq!(rules.as_array().map(Vec::len), Some(1));

    // A second number on the same trunk: added to it, with its own rule.
    let other = json_of(
        &e,
        &["connect-number", "+15105550101", "--trunk", &trunk_id],
    )
    .await;
    assert_eq!(other["trunk"], "number_added");
    assert_eq!(other["rule"], "created");
    let trunk = json_of(&e, &["inbound-trunks", "get", &trunk_id]).await;
    assert_eq!(trunk["numbers"], json!(["+15105550100", "+15105550101"]));

    let check = lk(&e, &["check"]).await;
    assert_eq!(code(&check), 0, "{}{}", stdout(&check), stderr(&check));
    assert!(
        stdout(&check).starts_with("no problems"),
        "{}",
        stdout(&check)
    );
    e.shutdown().await;
}

#[tokio::test]
async fn rules_with_agents_and_dids_among_callers_are_warned_about_and_checked() {
    let e = emulator().await;
    const DID: &str = "+15105550100";
    let trunk = json_of(&e, &["inbound-trunks", "create", "--number", DID]).await;
    let trunk_id = id(&trunk, "sip_trunk_id");
    // A rule dispatching its own agent for some callers of the number, and one with the
    // DID put among the callers by mistake.
    let agent_rule = json_of(
        &e,
        &[
            "rules",
            "create",
            "--trunk",
            &trunk_id,
            "--number",
            DID,
            "--inbound-number",
            "+14155550199",
            "--agent",
            "support-agent",
        ],
    )
    .await;
    let mistaken = json_of(
        &e,
        &[
            "rules",
            "create",
            "--trunk",
            &trunk_id,
            "--inbound-number",
            DID,
        ],
    )
    .await;

    let connected = lk(&e, &["connect-number", DID, "--json"]).await;
    assert_eq!(code(&connected), 0, "{}", stderr(&connected));
    let answer: Value = serde_json::from_slice(&connected.stdout).expect("json");
    let kinds: Vec<&str> = answer["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(|w| w["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["two_agents", "did_in_inbound_numbers"], "{answer}");
    let warned = stderr(&connected);
    assert!(
        warned.contains(&id(&agent_rule, "sip_dispatch_rule_id")),
        "{warned}"
    );
    assert!(warned.contains("two agents"), "{warned}");
    assert!(warned.contains("filters callers"), "{warned}");
    assert!(
        warned.contains(&id(&mistaken, "sip_dispatch_rule_id")),
        "{warned}"
    );

    let check = lk(&e, &["check", "--json"]).await;
    assert_eq!(code(&check), 1, "{}", stderr(&check));
    let found: Value = serde_json::from_slice(&check.stdout).expect("json");
    let kinds: Vec<&str> = found["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"two_agents"), "{found}");
    assert!(kinds.contains(&"did_in_inbound_numbers"), "{found}");
    let text = lk(&e, &["check"]).await;
    assert_eq!(code(&text), 1);
    assert!(stdout(&text).contains("[two_agents]"), "{}", stdout(&text));
    assert!(
        stderr(&text).contains("problem(s) found"),
        "{}",
        stderr(&text)
    );
    e.shutdown().await;
}

#[tokio::test]
async fn a_rule_with_agents_holding_the_number_blocks_connect_until_fixed() {
    let e = emulator().await;
    const DID: &str = "+15105550100";
    let trunk = json_of(&e, &["inbound-trunks", "create", "--number", DID]).await;
    let trunk_id = id(&trunk, "sip_trunk_id");
    let rule = json_of(
        &e,
        &[
            "rules",
            "create",
            "--trunk",
            &trunk_id,
            "--number",
            DID,
            "--agent",
            "old-agent",
        ],
    )
    .await;
    let rule_id = id(&rule, "sip_dispatch_rule_id");

    let blocked = lk(&e, &["connect-number", DID]).await;
    assert_eq!(code(&blocked), 1, "{}", stderr(&blocked));
    let said = stderr(&blocked);
    assert!(
        said.contains(&rule_id) && said.contains("old-agent"),
        "{said}"
    );
    assert!(said.contains("--no-agents"), "says how to fix it: {said}");
    assert_eq!(
        e.emulator.requests_of("CreateSIPDispatchRule").len(),
        1,
        "nothing created"
    );

    json_of(
        &e,
        &["rules", "update", &rule_id, "--replace", "--no-agents"],
    )
    .await;
    let connected = json_of(&e, &["connect-number", DID]).await;
    assert_eq!(
        connected["rule_id"],
        rule_id.as_str(),
        "the fixed rule is reused"
    );
    assert_eq!(connected["changed"], false);
    e.shutdown().await;
}

#[tokio::test]
async fn exit_codes_say_what_went_wrong() {
    let e = emulator().await;
    let bad_number = lk(&e, &["connect-number", "not-a-number"]).await;
    assert_eq!(code(&bad_number), 2, "{}", stderr(&bad_number));
    assert!(
        stderr(&bad_number).contains("E.164"),
        "{}",
        stderr(&bad_number)
    );
    let direct = lk(&e, &["rules", "create", "--kind", "direct"]).await;
    assert_eq!(code(&direct), 2);
    assert!(stderr(&direct).contains("--room"), "{}", stderr(&direct));
    let usage = lk(&e, &["rules", "frobnicate"]).await;
    assert_eq!(code(&usage), 2);

    let wrong_secret = lk_with(&e.url(), "not-the-secret", &["rules", "list"]).await;
    assert_eq!(code(&wrong_secret), 3, "{}", stderr(&wrong_secret));
    assert!(
        stderr(&wrong_secret).contains("LIVEKIT_API_SECRET"),
        "{}",
        stderr(&wrong_secret)
    );

    // A port nothing listens on: LiveKit unreachable, nothing sent.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let unreachable = lk_with(&format!("http://{closed}"), "secret", &["check"]).await;
    assert_eq!(code(&unreachable), 3, "{}", stderr(&unreachable));
    assert!(
        stderr(&unreachable).contains("cannot reach LiveKit"),
        "{}",
        stderr(&unreachable)
    );

    // A callfleet API key with no API behind it: check does not pass over the profiles.
    let no_api = tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
        .args(["livekit", "check"])
        .env("LIVEKIT_URL", e.url())
        .env("LIVEKIT_API_KEY", "devkey")
        .env("LIVEKIT_API_SECRET", "secret")
        .env("CALLFLEET_API_URL", format!("http://{closed}"))
        .env("CALLFLEET_API_KEY", "some-key")
        .env("CALLFLEET_LOG", "warn")
        .output()
        .await
        .expect("run");
    assert_eq!(code(&no_api), 3, "{}", stderr(&no_api));
    assert!(
        stderr(&no_api).contains("cannot reach the callfleet API"),
        "{}",
        stderr(&no_api)
    );

    let no_url = tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
        .args(["livekit", "check"])
        .env_remove("LIVEKIT_URL")
        .output()
        .await
        .expect("run");
    assert_eq!(code(&no_url), 2);
    assert!(
        stderr(&no_url).contains("LIVEKIT_URL"),
        "{}",
        stderr(&no_url)
    );

    let clean = lk(&e, &["check"]).await;
    assert_eq!(code(&clean), 0, "{}", stderr(&clean));
    let help = lk(&e, &["--help"]).await;
    assert!(stdout(&help).contains("Exit codes:"), "{}", stdout(&help));
    e.shutdown().await;
}

#[tokio::test]
async fn connect_number_adds_the_number_to_a_routing_profile() {
    let fleet = TestFleet::start("lk-profile", FleetOptions::default()).await;
    let (status, _) = fleet
        .post(
            "/v1/routing/profiles",
            &json!({"id": "support", "name": "Support", "agent_name": "support-agent",
                    "numbers": ["+15105550111"]}),
        )
        .await;
    assert_eq!(status, 201);
    let run = |args: Vec<String>| {
        let url = fleet.emulator_url();
        let api = fleet.base.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"))
                .arg("livekit")
                .args(&args)
                .env("LIVEKIT_URL", url)
                .env("LIVEKIT_API_KEY", "devkey")
                .env("LIVEKIT_API_SECRET", "secret")
                .env("CALLFLEET_API_URL", api)
                .env("CALLFLEET_API_KEY", API_KEY)
                .env("CALLFLEET_LOG", "warn")
                .output()
                .await
                .expect("run")
        }
    };
    let args = |extra: &[&str]| {
        ["connect-number", "+15105550100", "--json"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let missing = run(args(&["--profile", "nobody"])).await;
    assert_eq!(code(&missing), 1, "{}", stderr(&missing));
    assert_eq!(
        fleet.emulator.requests_of("CreateSIPInboundTrunk").len(),
        0,
        "a wrong profile changes nothing in LiveKit"
    );

    let added = run(args(&["--profile", "support"])).await;
    assert_eq!(code(&added), 0, "{}", stderr(&added));
    let answer: Value = serde_json::from_slice(&added.stdout).expect("json");
    assert_eq!(
        answer["profile"],
        json!({"id": "support", "number": "number_added"})
    );
    let (_, profile) = fleet.get("/v1/routing/profiles/support").await;
    assert_eq!(profile["numbers"], json!(["+15105550111", "+15105550100"]));

    let again = run(args(&["--profile", "support"])).await;
    let answer: Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(answer["profile"]["number"], "unchanged");
    assert_eq!(answer["changed"], false);
    fleet.stop().await;
}

/// `callfleet livekit <args>` against a fleet's emulator, with the fleet's callfleet API
/// configured (`api`) or not.
async fn lk_fleet(fleet: &TestFleet, api: bool, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_callfleet"));
    command
        .arg("livekit")
        .args(args)
        .env("LIVEKIT_URL", fleet.emulator_url())
        .env("LIVEKIT_API_KEY", "devkey")
        .env("LIVEKIT_API_SECRET", "secret")
        .env("CALLFLEET_LOG", "warn")
        .env_remove("LIVEKIT_SIP_HOST")
        .env_remove("CALLFLEET_API_URL")
        .env_remove("CALLFLEET_API_KEY")
        .env_remove("CALLFLEET_DEFAULT_REGION");
    if api {
        command
            .env("CALLFLEET_API_URL", &fleet.base)
            .env("CALLFLEET_API_KEY", API_KEY);
    }
    command.output().await.expect("run callfleet livekit")
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|err| panic!("no JSON ({err}): {}{}", stdout(o), stderr(o)))
}

fn of_kind<'a>(found: &'a Value, key: &str, kind: &str) -> Vec<&'a Value> {
    found[key]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|p| p["kind"] == kind)
        .collect()
}

#[tokio::test]
async fn check_reads_callfleet_profiles_and_finds_a_rule_giving_a_second_agent() {
    const DID: &str = "+15105550100";
    const UNCONNECTED: &str = "+15105550122";
    let fleet = TestFleet::start("lk-check-profiles", FleetOptions::default()).await;
    let (status, _) = fleet
        .post(
            "/v1/routing/profiles",
            &json!({"id": "billing", "name": "Billing", "agent_name": "billing-agent",
                    "numbers": [DID, UNCONNECTED]}),
        )
        .await;
    assert_eq!(status, 201);
    // More than a page of profiles (500), so check has to follow next_cursor.
    let many: Vec<Value> = (0..600)
        .map(|i| json!({"id": format!("bulk-{i:03}"), "name": "bulk", "agent_name": "bulk-agent"}))
        .collect();
    let (status, body) = fleet
        .post("/v1/routing/import?mode=merge", &Value::Array(many))
        .await;
    assert_eq!(status, 200, "{body}");

    // In LiveKit: the number's trunk and a rule that dispatches its own agent for it.
    let trunk = lk_fleet(
        &fleet,
        false,
        &["inbound-trunks", "create", "--number", DID, "--json"],
    )
    .await;
    assert_eq!(code(&trunk), 0, "{}", stderr(&trunk));
    let trunk_id = id(&json_out(&trunk), "sip_trunk_id");
    let rule = lk_fleet(
        &fleet,
        false,
        &[
            "rules",
            "create",
            "--trunk",
            &trunk_id,
            "--number",
            DID,
            "--agent",
            "old-agent",
            "--json",
        ],
    )
    .await;
    assert_eq!(code(&rule), 0, "{}", stderr(&rule));
    let rule_id = id(&json_out(&rule), "sip_dispatch_rule_id");

    // Without callfleet's profiles the rule is alone on its number: fine to LiveKit, and
    // the output says what was not consulted.
    let blind = lk_fleet(&fleet, false, &["check"]).await;
    assert_eq!(code(&blind), 0, "{}{}", stdout(&blind), stderr(&blind));
    assert!(
        stdout(&blind).starts_with("no problems"),
        "{}",
        stdout(&blind)
    );
    assert!(
        stdout(&blind).contains("profiles were not consulted"),
        "{}",
        stdout(&blind)
    );

    // With them: a problem naming the rule, the number, the profile and both agents (exit
    // 1), and a warning for the routed number no trunk accepts.
    let found = lk_fleet(&fleet, true, &["check", "--json"]).await;
    assert_eq!(code(&found), 1, "{}{}", stdout(&found), stderr(&found));
    let answer = json_out(&found);
    assert_eq!(answer["routing_profiles"], 601, "every page read: {answer}");
    let two = of_kind(&answer, "problems", "two_agents");
    assert_eq!(two.len(), 1, "{answer}");
    assert_eq!(two[0]["rule_id"], rule_id.as_str());
    assert_eq!(two[0]["number"], DID);
    assert_eq!(two[0]["profile_id"], "billing");
    let message = two[0]["message"].as_str().expect("message");
    assert!(
        message.contains("old-agent") && message.contains("billing-agent"),
        "{message}"
    );
    let unconnected = of_kind(&answer, "warnings", "routed_number_without_trunk");
    assert_eq!(unconnected.len(), 1, "{answer}");
    assert_eq!(unconnected[0]["number"], UNCONNECTED);
    let text = lk_fleet(&fleet, true, &["check"]).await;
    assert_eq!(code(&text), 1);
    let said = stdout(&text);
    let line = said
        .lines()
        .find(|l| l.starts_with("- [two_agents] "))
        .unwrap_or_else(|| panic!("no two_agents line: {said}"));
    for named in [
        rule_id.as_str(),
        DID,
        "profile billing",
        "old-agent",
        "billing-agent",
    ] {
        assert!(line.contains(named), "{named}: {line}");
    }
    assert!(
        said.contains("[routed_number_without_trunk] warning:") && said.contains(UNCONNECTED),
        "{said}"
    );
    assert!(!said.contains("not consulted"), "{said}");

    // The rule's agents removed: exit 0; the warning stays and does not fail the check.
    let fixed = lk_fleet(
        &fleet,
        false,
        &["rules", "update", &rule_id, "--replace", "--no-agents"],
    )
    .await;
    assert_eq!(code(&fixed), 0, "{}", stderr(&fixed));
    let clean = lk_fleet(&fleet, true, &["check"]).await;
    assert_eq!(code(&clean), 0, "{}{}", stdout(&clean), stderr(&clean));
    let said = stdout(&clean);
    assert!(
        said.starts_with("no problems in 1 inbound trunk(s), 1 dispatch rule(s) and 601 routing profile(s) (601 active); 1 warning(s)"),
        "{said}"
    );
    assert!(said.contains(UNCONNECTED), "{said}");

    // connect-number with the API: a profile narrowed to another trunk is warned about.
    let (status, body) = fleet
        .send_json(
            reqwest::Method::PATCH,
            "/v1/routing/profiles/billing",
            &json!({"trunk_ids": ["ST_elsewhere"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let connected = lk_fleet(&fleet, true, &["connect-number", UNCONNECTED, "--json"]).await;
    assert_eq!(code(&connected), 0, "{}", stderr(&connected));
    let answer = json_out(&connected);
    let narrowed = of_kind(&answer, "warnings", "profile_scope_excludes");
    assert_eq!(narrowed.len(), 1, "{answer}");
    assert_eq!(narrowed[0]["profile_id"], "billing");
    assert_eq!(narrowed[0]["trunk_id"], answer["trunk_id"]);
    assert!(
        stderr(&connected).contains("ST_elsewhere"),
        "{}",
        stderr(&connected)
    );
    // A number no active profile serves gets a note saying where its calls go.
    let stray = lk_fleet(&fleet, true, &["connect-number", "+15105550133", "--json"]).await;
    assert_eq!(code(&stray), 0, "{}", stderr(&stray));
    let notes = json_out(&stray)["notes"].to_string();
    assert!(
        notes.contains("no active callfleet routing profile"),
        "{notes}"
    );
    fleet.stop().await;
}

/// The README's set-up examples, pasted as a user would, against an emulator in place of
/// dev mode's (only the address and `cargo run` swapped for the built binary).
#[tokio::test]
async fn the_readme_set_up_examples_run_as_written() {
    const README: &str = include_str!("../../README.md");
    let heading = "### LiveKit SIP set-up";
    let start = README.find(heading).expect("README has the section");
    let section = &README[start + heading.len()..];
    let section = &section[..section.find("\n### ").unwrap_or(section.len())];
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block");
    assert!(block.contains("http://127.0.0.1:7880"), "{block}");
    let e = emulator().await;
    let script = block
        .replace("http://127.0.0.1:7880", &e.url())
        .replace("cargo run -q --", env!("CARGO_BIN_EXE_callfleet"));
    let out = tokio::process::Command::new("bash")
        .args(["-e", "-c", &script])
        .env("CALLFLEET_LOG", "warn")
        .env_remove("LIVEKIT_SIP_HOST")
        .output()
        .await
        .expect("bash");
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("\"changed\": false"), "{said}");
    assert!(said.contains("sip:+15105550142@127.0.0.1"), "{said}");
    assert!(said.contains("no problems"), "{said}");
    assert_eq!(e.emulator.requests_of("CreateSIPDispatchRule").len(), 1);
    e.shutdown().await;
}
