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
