//! The README's examples, pasted as a user would: its shell blocks run against a fleet,
//! with only the address and the API key swapped for the test fleet's.

use std::time::Duration;

use serde_json::Value;

use crate::fleet::{FleetOptions, TestFleet, API_KEY};

const README: &str = include_str!("../../README.md");

/// The ```sh blocks between `heading` and the next heading of the same level.
fn shell_blocks(heading: &str) -> Vec<String> {
    let start = README
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &README[start + heading.len()..];
    let end = rest.find("\n### ").unwrap_or(rest.len());
    rest[..end]
        .split("```sh\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .map(str::to_owned)
        .collect()
}

async fn run(script: String) -> (bool, String, String) {
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .output()
        .await
        .expect("bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_readme_examples_run_as_written() {
    let fleet = TestFleet::start("readme", FleetOptions::default()).await;
    let host = fleet.base.trim_start_matches("http://").to_owned();

    let blocks = shell_blocks("### `POST /v1/calls`");
    assert_eq!(blocks.len(), 2, "the start command and the examples");
    assert!(blocks[0].contains("cargo run -- dev"));
    let key = "local-dev-key-0001";
    assert!(blocks[0].contains(key) && blocks[1].contains(key));
    let script = blocks[1]
        .replace("localhost:8080", &host)
        .replace(key, API_KEY);
    let (ok, stdout, stderr) = run(script).await;
    assert!(ok, "{stderr}");
    let answers: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("the examples answer JSON ({e}): {stdout}"));
    assert_eq!(answers.len(), 2, "{stdout}");
    assert_eq!(answers[0]["status"], "queued", "{}", answers[0]);
    assert_eq!(answers[0]["to"], "+15105550123");
    assert_eq!(answers[1]["status"], "scheduled", "{}", answers[1]);
    let id = answers[0]["id"].as_str().expect("id");
    fleet
        .wait_for(id, "completed", Duration::from_secs(20))
        .await;

    let control = shell_blocks("Control API (`/emulator/v1/`):");
    assert_eq!(control.len(), 1);
    let script = control[0].replace("http://127.0.0.1:7880", &fleet.emulator_url());
    let (ok, stdout, stderr) = run(format!("set -e\n{script}")).await;
    assert!(ok, "{stderr}\n{stdout}");
    assert!(stdout.contains("\"requests\""), "{stdout}");
    fleet.stop().await;
}

/// The inbound routing examples, pasted into a shell next to a fleet with the dev profile.
#[tokio::test]
async fn the_readme_routing_examples_run_as_written() {
    let fleet = TestFleet::start(
        "readme-routing",
        FleetOptions {
            default_profile: Some("dev-default".into()),
            ..Default::default()
        },
    )
    .await;
    crate::inbound::create_profile(
        &fleet,
        serde_json::json!({"id": "dev-default", "name": "Dev default agent",
                           "agent_name": "callfleet-agent", "numbers": ["+15105550100"]}),
    )
    .await;
    let host = fleet.base.trim_start_matches("http://").to_owned();
    let blocks = shell_blocks("### Inbound calls: routing to agent profiles");
    assert_eq!(blocks.len(), 1, "one block of examples");
    let key = "local-dev-key-0001";
    let dir = std::env::temp_dir().join(format!("readme-routing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let script = blocks[0]
        .replace("localhost:8080", &host)
        .replace("http://127.0.0.1:7880", &fleet.emulator_url())
        .replace(key, API_KEY);
    let (ok, stdout, stderr) = run(format!("set -e\ncd {}\n{script}", dir.display())).await;
    assert!(ok, "{stderr}\n{stdout}");
    let answers: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("the examples answer JSON ({e}): {stdout}"));
    // create, patch, list, deactivate, explain, activate, resolve ×2, import, inbound,
    // list calls, and the DELETE's status code (204, a JSON number).
    assert_eq!(answers.len(), 12, "{stdout}");
    assert_eq!(answers[0]["id"], "billing", "{}", answers[0]);
    assert_eq!(answers[0]["numbers"][0], "+15105550142");
    assert_eq!(answers[1]["weight"], 50);
    assert_eq!(answers[2]["profiles"][0]["id"], "billing");
    assert_eq!(answers[3]["status"], "inactive");
    assert_eq!(
        answers[4]["decision"], "inactive→fallback:dev-default",
        "{}",
        answers[4]
    );
    assert_eq!(answers[5]["status"], "active");
    assert_eq!(
        answers[6]["agent"]["profile_id"], "dev-default",
        "{}",
        answers[6]
    );
    assert_eq!(answers[7]["dispatch_action"], "accept", "{}", answers[7]);
    assert_eq!(answers[8]["unchanged"], 2, "{}", answers[8]);
    assert!(answers[9]["room_name"].is_string(), "{}", answers[9]);
    assert!(answers[10]["calls"].is_array(), "{}", answers[10]);
    assert_eq!(answers[11], 204);
    let _ = std::fs::remove_dir_all(&dir);
    fleet.stop().await;
}

/// Runs the README's block(s) under `heading` next to `fleet`, in a scratch directory,
/// with the address, the emulator, the key and the receiver port swapped for the test's.
async fn run_section(fleet: &TestFleet, heading: &str, name: &str) -> (String, String) {
    let blocks = shell_blocks(heading);
    assert!(!blocks.is_empty(), "no shell block under {heading}");
    let host = fleet.base.trim_start_matches("http://").to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let dir = std::env::temp_dir().join(format!("readme-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut out = (String::new(), String::new());
    for block in blocks {
        let script = block
            .replace("localhost:8080", &host)
            .replace("http://127.0.0.1:7880", &fleet.emulator_url())
            .replace("local-dev-key-0001", API_KEY)
            .replace("9000", &port.to_string())
            .replace("timeout 60 python3", "timeout 15 python3");
        let (ok, stdout, stderr) = run(format!("cd {}\n{script}", dir.display())).await;
        assert!(ok || heading.contains("event stream"), "{stderr}\n{stdout}");
        out.0.push_str(&stdout);
        out.1.push_str(&stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The call control, event stream and callback examples, pasted next to a fleet.
#[tokio::test]
async fn the_readme_control_stream_and_callback_examples_run_as_written() {
    let fleet = TestFleet::start("readme-out", FleetOptions::default()).await;
    let (stdout, stderr) = run_section(&fleet, "### Call control", "control").await;
    for expected in [
        "\"hung_up\"",
        "\"transfer_failed\"",
        "\"transferred\"",
        "\"conflict\"",
        "\"invalid\"",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing:\n{stdout}\n{stderr}"
        );
    }
    let (stdout, stderr) = run_section(&fleet, "### The live event stream", "stream").await;
    assert!(
        stdout.contains("event: call.queued") && stdout.contains("event: call.completed"),
        "{stdout}\n{stderr}"
    );
    let (stdout, stderr) = run_section(&fleet, "### Signed callbacks", "callbacks").await;
    for expected in [
        "subscription.test",
        "\"delivered\"",
        "call.completed",
        "/call-events",
        "204",
    ] {
        assert!(
            stdout.contains(expected) || stderr.contains(expected),
            "{expected} missing:\n{stdout}\n{stderr}"
        );
    }
    fleet.stop().await;
}
