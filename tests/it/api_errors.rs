//! What a client that gets something wrong is told: one JSON error shape everywhere, in
//! the API's own words (never Rust type names or library texts), with what to fix.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{json, Value};

use crate::fleet::{FleetOptions, TestFleet, API_KEY};

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: not JSON ({e}): {text:?}"));
    (status, body)
}

#[tokio::test]
async fn every_error_is_json_and_says_what_to_fix() {
    let fleet = TestFleet::start("api-errors", FleetOptions::default()).await;
    let url = |path: &str| format!("{}{path}", fleet.base);
    let http = &fleet.http;

    // 401 says whether the key is missing, not a Bearer token, or unknown.
    let cases = [
        (None, "missing Authorization"),
        (Some(format!("Basic {API_KEY}")), "Bearer"),
        (
            Some("Bearer not-a-key-we-know-of".to_owned()),
            "unknown API key",
        ),
    ];
    for (header, says) in cases {
        let mut request = http.get(url("/v1/calls"));
        if let Some(h) = header {
            request = request.header("authorization", h);
        }
        let (status, body) = answer(request.send().await.expect("send")).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(says),
            "{body}"
        );
    }

    // Malformed JSON names where it breaks; a non-object names no Rust type.
    let post = |body: &'static str| {
        http.post(url("/v1/calls"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body)
    };
    let (status, body) = answer(
        post("{\n  \"to\": \"+15105550161\",\n  oops\n}")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "body");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("line 3") && message.contains("column"),
        "{message}"
    );
    let (status, body) = answer(post("[]").send().await.expect("send")).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("JSON object") && !message.contains("struct"),
        "{message}"
    );

    // 413 states the limit.
    let huge = json!({"to": "+15105550161", "context": {"blob": "x".repeat(100_000)}});
    let (status, body) = answer(
        http.post(url("/v1/calls"))
            .bearer_auth(API_KEY)
            .json(&huge)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 413);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("65536-byte"),
        "{body}"
    );

    // A wrong method gets 405 in the same shape; an id that is not text gets 404, after
    // the key is checked.
    let (status, body) = answer(
        http.put(url("/v1/calls"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (405, json!("method_not_allowed")),
        "{body}"
    );
    let (status, body) = answer(http.delete(url("/healthz")).send().await.expect("send")).await;
    assert_eq!(status, 405, "{body}");
    let (status, body) = answer(http.get(url("/v1/calls/%ff")).send().await.expect("send")).await;
    assert_eq!(status, 401, "the key is checked first: {body}");
    let (status, body) = answer(
        http.get(url("/v1/calls/%ff"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("not_found")),
        "{body}"
    );
    fleet.stop().await;
}

/// An unauthenticated request is refused before its body is read: a client that
/// announces a large body and never sends it gets its 401 at once.
#[tokio::test]
async fn unauthenticated_requests_are_refused_before_the_body_is_read() {
    let fleet = TestFleet::start("api-auth-first", FleetOptions::default()).await;
    let addr = fleet.base.trim_start_matches("http://").to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"POST /v1/calls HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"to\":")
            .expect("write");
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .expect("join");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    fleet.stop().await;
}

/// Reads until the server closes the connection (or `limit` passes); what it sent.
fn read_until_closed(stream: &mut std::net::TcpStream, limit: Duration) -> (String, bool) {
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&seen).into_owned(), true),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&seen).into_owned(), false),
        }
    }
}

/// Connections cannot be held open for free: half-sent headers, an idle keep-alive
/// connection and a body shorter than its Content-Length all end within the server's
/// bounds (10 s for headers and idleness, 15 s for a body), not after minutes.
#[tokio::test]
async fn slow_and_idle_connections_are_closed() {
    let fleet = TestFleet::start("api-timeouts", FleetOptions::default()).await;
    let addr = fleet.base.trim_start_matches("http://").to_owned();
    let limit = Duration::from_secs(25);
    let half_headers = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                .expect("write");
            read_until_closed(&mut s, limit)
        })
    };
    let idle = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                .expect("write");
            read_until_closed(&mut s, limit)
        })
    };
    let short_body = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let head = format!(
            "POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"to\":"
        );
        s.write_all(head.as_bytes()).expect("write");
        read_until_closed(&mut s, limit)
    });
    let (sent, closed) = half_headers.await.expect("join");
    assert!(
        closed && sent.is_empty(),
        "half-sent headers: {sent:?} closed={closed}"
    );
    let (sent, closed) = idle.await.expect("join");
    assert!(
        closed && sent.starts_with("HTTP/1.1 200"),
        "idle keep-alive: {sent:?} closed={closed}"
    );
    let (sent, closed) = short_body.await.expect("join");
    assert!(
        sent.starts_with("HTTP/1.1 4"),
        "a body that never comes: {sent:?} closed={closed}"
    );
    fleet.stop().await;
}
