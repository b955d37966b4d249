//! The callback receiver: `tests/receiver/receiver.py`, which verifies Standard Webhooks
//! signatures with the official `standardwebhooks` Python library (installed, pinned, by
//! `scripts/test` into `target/pyenv`, whose python is `$CALLFLEET_TEST_PYTHON`), records
//! every request and injects faults per path. The tests here prove the harness itself: a
//! payload signed in Rust exactly per the spec verifies, tampering does not, rotation does,
//! and every fault mode, stop and restart are seen from the client side.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running receiver; dropping it kills the process.
pub struct Receiver {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    secrets: Vec<String>,
    http: reqwest::Client,
}

/// One request the receiver got, as it recorded it.
#[derive(Debug, Clone, Deserialize)]
pub struct Received {
    /// The request path, without the query string.
    pub path: String,
    pub query: String,
    pub webhook_id: Option<String>,
    pub timestamp: Option<String>,
    pub signature: Option<String>,
    /// Whether `Webhook(secret).verify` passed for any configured secret.
    pub verified: bool,
    /// The library's errors (one per distinct message) when not verified.
    pub error: Option<String>,
    /// The body parsed as JSON, or the raw body as a JSON string when it is not JSON.
    pub body: serde_json::Value,
    pub answered: Answered,
    /// Arrival, seconds since the epoch.
    pub received_at: f64,
}

/// What the receiver answered to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub enum Answered {
    Status(u16),
    /// The connection was closed without an answer.
    Dropped,
}

impl TryFrom<serde_json::Value> for Answered {
    type Error = String;

    fn try_from(value: serde_json::Value) -> Result<Self, String> {
        match &value {
            serde_json::Value::String(s) if s == "dropped" => Ok(Answered::Dropped),
            serde_json::Value::Number(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .map(Answered::Status)
                .ok_or_else(|| format!("bad status {n}")),
            other => Err(format!("bad answered value {other}")),
        }
    }
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with the base64-decoded key of a
/// `whsec_<base64>` secret, exactly as the Standard Webhooks spec signs.
pub fn sign(secret: &str, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .expect("secret is whsec_<base64>");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{webhook_id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", b64.encode(mac.finalize().into_bytes()))
}

fn python() -> String {
    std::env::var("CALLFLEET_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CALLFLEET_TEST_PYTHON is not set: run the suite with scripts/test, which installs \
             the receiver's Python library (standardwebhooks) into target/pyenv"
        )
    })
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/receiver/receiver.py")
}

/// Spawns the receiver on `port` (0: any) and waits for its `LISTENING <port>` line.
async fn spawn(port: u16, secrets: &[String]) -> Result<(Child, u16), String> {
    let python = python();
    let mut command = Command::new(&python);
    command
        .arg(script())
        .args(["--port", &port.to_string(), "--exit-on-stdin-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for secret in secrets {
        command.args(["--secret", secret]);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {python} (CALLFLEET_TEST_PYTHON): {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    let listening = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse::<u16>().ok());
    match (read, listening) {
        (Ok(Ok(_)), Some(port)) => Ok((child, port)),
        (read, _) => {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            Err(format!(
                "receiver did not start on port {port}: read {read:?}, first line {line:?}, \
                 exit {status:?} (its stderr is above)"
            ))
        }
    }
}

impl Receiver {
    /// Starts a receiver on a free port that verifies with any of `secrets` (`whsec_...`).
    pub async fn start(secrets: &[&str]) -> Receiver {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        let (child, port) = spawn(0, &secrets).await.unwrap_or_else(|e| panic!("{e}"));
        let receiver = Receiver {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child: Some(child),
            secrets,
            // No pooled connections: none goes stale across stop and restart.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        };
        receiver.wait_healthy().await;
        receiver
    }

    /// The URL of `path` on this receiver.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.http.get(self.endpoint("/_health")).send().await {
                Ok(r) if r.status().is_success() => return,
                other if Instant::now() > deadline => {
                    panic!("receiver on {} is not healthy: {other:?}", self.url)
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// From now on `path` answers `status` after `delay_ms`, or closes the connection
    /// without an answer when `drop`; for the next `times` requests only (then 200 at
    /// once again), or until changed when `None`.
    pub async fn set_mode(
        &self,
        path: &str,
        status: u16,
        delay_ms: u64,
        drop: bool,
        times: Option<u32>,
    ) {
        let body = json!({"path": path, "status": status, "delay_ms": delay_ms, "drop": drop, "times": times});
        let response = self
            .http
            .put(self.endpoint("/_mode"))
            .json(&body)
            .send()
            .await
            .expect("PUT /_mode");
        let status = response.status();
        assert!(
            status.is_success(),
            "PUT /_mode {body}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// Every path answers 200 at once again.
    pub async fn reset_modes(&self) {
        let response = self
            .http
            .delete(self.endpoint("/_mode"))
            .send()
            .await
            .expect("DELETE /_mode");
        assert!(
            response.status().is_success(),
            "DELETE /_mode: {response:?}"
        );
    }

    /// The requests received (on `path`, or on all paths), in arrival order.
    pub async fn received(&self, path: Option<&str>) -> Vec<Received> {
        let mut request = self.http.get(self.endpoint("/_received"));
        if let Some(path) = path {
            request = request.query(&[("path", path)]);
        }
        let response = request.send().await.expect("GET /_received");
        assert!(
            response.status().is_success(),
            "GET /_received: {response:?}"
        );
        response.json().await.expect("records")
    }

    /// Forgets the requests received so far.
    pub async fn clear(&self) {
        let response = self
            .http
            .delete(self.endpoint("/_received"))
            .send()
            .await
            .expect("DELETE /_received");
        assert!(
            response.status().is_success(),
            "DELETE /_received: {response:?}"
        );
    }

    /// SIGKILLs the receiver and waits for it to be gone: connections are refused until
    /// [`Receiver::restart`]. Its records and modes are lost.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) {
                assert!(Instant::now() < deadline, "receiver survived SIGKILL");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Starts the receiver again on the same port with the same secrets (stopping it
    /// first if it runs); records and modes start empty.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        let child = loop {
            match spawn(self.port, &self.secrets).await {
                Ok((child, _)) => break child,
                // The port may be briefly held (another process may even have taken it).
                Err(e) if Instant::now() > deadline => panic!("restart: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.child = Some(child);
        self.wait_healthy().await;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

// ---- self-tests of the harness ----

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_c2VjcmV0LW9sZC0wMTIzNDU2Nzg5YWJjZGVm";
const UNKNOWN_SECRET: &str = "whsec_dW5rbm93bi1zZWNyZXQtMDEyMzQ1Njc4OWFi";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// POSTs `body` with the three Standard Webhooks headers.
async fn post(
    url: &str,
    id: &str,
    timestamp: i64,
    signature: &str,
    body: &[u8],
) -> reqwest::Result<reqwest::Response> {
    client()
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.to_vec())
        .send()
        .await
}

async fn post_signed(url: &str, secret: &str, id: &str, body: &[u8]) -> reqwest::Response {
    let ts = now();
    post(url, id, ts, &sign(secret, id, ts, body), body)
        .await
        .expect("receiver answers")
}

#[tokio::test]
async fn receiver_verifies_a_payload_signed_in_rust_per_the_spec() {
    let receiver = Receiver::start(&[SECRET]).await;
    let body = br#"{"type":"call.completed","data":{"call_id":"c1","outcome":"answered"}}"#;
    let ts = now();
    let signature = sign(SECRET, "msg_2b9", ts, body);
    let response = post(
        &receiver.endpoint("/hooks/call"),
        "msg_2b9",
        ts,
        &signature,
        body,
    )
    .await
    .expect("post");
    assert_eq!(response.status(), 200);

    let records = receiver.received(None).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert!(r.verified, "{r:?}");
    assert_eq!(r.error, None);
    assert_eq!(r.path, "/hooks/call");
    assert_eq!(r.query, "");
    assert_eq!(r.webhook_id.as_deref(), Some("msg_2b9"));
    assert_eq!(r.timestamp.as_deref(), Some(ts.to_string().as_str()));
    assert_eq!(r.signature.as_deref(), Some(signature.as_str()));
    assert_eq!(r.body["data"]["call_id"], "c1");
    assert_eq!(r.answered, Answered::Status(200));
    assert!((r.received_at - ts as f64).abs() < 60.0, "{r:?}");
}

#[tokio::test]
async fn receiver_rejects_tampering_a_wrong_secret_stale_timestamps_and_missing_headers() {
    let receiver = Receiver::start(&[SECRET]).await;
    let url = receiver.endpoint("/hooks/call");
    let body = br#"{"amount":1}"#;
    let ts = now();
    let signature = sign(SECRET, "msg_1", ts, body);
    // The body changed after signing.
    post(&url, "msg_1", ts, &signature, br#"{"amount":9}"#)
        .await
        .expect("post");
    // The id changed after signing.
    post(&url, "msg_other", ts, &signature, body)
        .await
        .expect("post");
    // Signed with a secret the receiver does not know.
    post_signed(&url, UNKNOWN_SECRET, "msg_2", body).await;
    // Ten minutes old (the library's tolerance is five), correctly signed.
    let old = ts - 600;
    post(&url, "msg_3", old, &sign(SECRET, "msg_3", old, body), body)
        .await
        .expect("post");
    // No signature headers at all; not JSON either.
    client()
        .post(&url)
        .body("plain text")
        .send()
        .await
        .expect("post");

    let records = receiver.received(Some("/hooks/call")).await;
    assert_eq!(records.len(), 5, "{records:?}");
    assert!(records.iter().all(|r| !r.verified), "{records:?}");
    let errors: Vec<&str> = records
        .iter()
        .map(|r| r.error.as_deref().expect("an error"))
        .collect();
    assert!(errors[0].contains("No matching signature"), "{errors:?}");
    assert!(errors[1].contains("No matching signature"), "{errors:?}");
    assert!(errors[2].contains("No matching signature"), "{errors:?}");
    assert!(errors[3].contains("too old"), "{errors:?}");
    assert!(errors[4].contains("Missing required headers"), "{errors:?}");
    assert_eq!(records[0].body, json!({"amount": 9}));
    assert_eq!(records[4].body, json!("plain text"));
    assert_eq!(records[4].webhook_id, None);
}

#[tokio::test]
async fn receiver_verifies_during_secret_rotation() {
    // The endpoint knows the old and the new secret.
    let receiver = Receiver::start(&[OLD_SECRET, SECRET]).await;
    let url = receiver.endpoint("/hooks/rotating");
    let body = br#"{"n":1}"#;
    let ts = now();
    // The sender signs with a secret unknown here and with the new one: two `v1,` entries.
    let both = format!(
        "{} {}",
        sign(UNKNOWN_SECRET, "msg_r1", ts, body),
        sign(SECRET, "msg_r1", ts, body)
    );
    post(&url, "msg_r1", ts, &both, body).await.expect("post");
    // Only the second configured secret signed it.
    post_signed(&url, SECRET, "msg_r2", body).await;
    // Only the first.
    post_signed(&url, OLD_SECRET, "msg_r3", body).await;
    // Two entries, neither for a configured secret.
    let neither = format!(
        "{} {}",
        sign(UNKNOWN_SECRET, "msg_r4", ts, body),
        sign(SECRET, "msg_r4", ts, b"other")
    );
    post(&url, "msg_r4", ts, &neither, body)
        .await
        .expect("post");

    let verified: Vec<(Option<String>, bool)> = receiver
        .received(Some("/hooks/rotating"))
        .await
        .into_iter()
        .map(|r| (r.webhook_id, r.verified))
        .collect();
    assert_eq!(
        verified,
        vec![
            (Some("msg_r1".into()), true),
            (Some("msg_r2".into()), true),
            (Some("msg_r3".into()), true),
            (Some("msg_r4".into()), false),
        ]
    );
}

#[tokio::test]
async fn receiver_modes_fail_n_times_delay_and_drop_per_path() {
    let receiver = Receiver::start(&[SECRET]).await;
    let body = br#"{"k":"v"}"#;

    // 500 twice, then 200 again by itself.
    receiver.set_mode("/flaky", 500, 0, false, Some(2)).await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let url = receiver.endpoint("/flaky");
        let response = post_signed(&url, SECRET, &format!("msg_f{i}"), body).await;
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [500, 500, 200, 200]);
    // Other paths are untouched.
    let other = post_signed(&receiver.endpoint("/steady"), SECRET, "msg_s", body).await;
    assert_eq!(other.status(), 200);

    // A delay holds the answer.
    receiver.set_mode("/slow", 202, 600, false, None).await;
    let started = Instant::now();
    let slow = post_signed(&receiver.endpoint("/slow"), SECRET, "msg_slow", body).await;
    assert_eq!(slow.status(), 202);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );

    // Drop: the connection closes without an answer, until the modes are reset.
    receiver.set_mode("/void", 200, 0, true, None).await;
    for i in 0..2 {
        let ts = now();
        let id = format!("msg_v{i}");
        let error = post(
            &receiver.endpoint("/void"),
            &id,
            ts,
            &sign(SECRET, &id, ts, body),
            body,
        )
        .await
        .expect_err("no answer");
        assert!(!error.is_connect() && !error.is_timeout(), "{error:?}");
    }
    receiver.reset_modes().await;
    let back = post_signed(&receiver.endpoint("/void"), SECRET, "msg_v2", body).await;
    assert_eq!(back.status(), 200);

    let answered = |records: Vec<Received>| -> Vec<Answered> {
        assert!(records.iter().all(|r| r.verified), "{records:?}");
        records.into_iter().map(|r| r.answered).collect()
    };
    assert_eq!(
        answered(receiver.received(Some("/flaky")).await),
        [500, 500, 200, 200].map(Answered::Status)
    );
    assert_eq!(
        answered(receiver.received(Some("/void")).await),
        [Answered::Dropped, Answered::Dropped, Answered::Status(200)]
    );
    let all = receiver.received(None).await;
    let paths: Vec<&str> = all.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/flaky", "/flaky", "/flaky", "/flaky", "/steady", "/slow", "/void", "/void", "/void"]
    );
    assert!(all.windows(2).all(|w| w[0].received_at <= w[1].received_at));

    receiver.clear().await;
    assert!(receiver.received(None).await.is_empty());
}

#[tokio::test]
async fn receiver_stop_refuses_connections_and_restart_serves_the_same_url() {
    let mut receiver = Receiver::start(&[OLD_SECRET, SECRET]).await;
    let url = receiver.endpoint("/hooks/call");
    let body = br#"{"up":true}"#;
    assert_eq!(post_signed(&url, SECRET, "msg_1", body).await.status(), 200);

    receiver.stop();
    let ts = now();
    let error = post(&url, "msg_2", ts, &sign(SECRET, "msg_2", ts, body), body)
        .await
        .expect_err("receiver is down");
    assert!(error.is_connect(), "expected connection refused: {error:?}");

    let before = receiver.url.clone();
    receiver.restart().await;
    assert_eq!(receiver.url, before);
    assert_eq!(
        post_signed(&url, OLD_SECRET, "msg_3", body).await.status(),
        200
    );
    let records = receiver.received(None).await;
    assert_eq!(
        records.len(),
        1,
        "a restarted receiver starts empty: {records:?}"
    );
    assert!(
        records[0].verified,
        "same secrets after restart: {records:?}"
    );
}
