//! Webhook delivery as LiveKit does it (livekit-facts §1-3): protojson body, a JWT in
//! `Authorization` (no `Bearer`) whose `sha256` claim is the base64 SHA-256 of the exact
//! body, valid 5 minutes, created once per event so retries are byte-identical; one FIFO
//! queue per (URL, room); retries on connection errors, 429 and 5xx (not 501) with
//! exponential backoff; events older than the max age in the queue are dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use livekit_api::access_token::AccessToken;
use livekit_protocol as proto;
use parking_lot::Mutex;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::state::WebhookRecord;
use crate::Emulator;

struct Queued {
    id: String,
    event: String,
    room: String,
    body: Arc<Vec<u8>>,
    enqueued: Instant,
}

pub struct WebhookSender {
    queues: Mutex<HashMap<(String, String), mpsc::UnboundedSender<Queued>>>,
    client: reqwest::Client,
}

impl WebhookSender {
    pub fn new() -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn reset(&self) {
        self.queues.lock().clear();
    }

    pub fn enqueue(&self, emu: &Emulator, room: &str, event: proto::WebhookEvent) {
        let urls = emu.inner.webhook_urls.lock().clone();
        if urls.is_empty() {
            return;
        }
        let body = match serde_json::to_vec(&event) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                tracing::error!(error = %e, "could not encode webhook event");
                return;
            }
        };
        for url in urls {
            let item = Queued {
                id: event.id.clone(),
                event: event.event.clone(),
                room: room.to_owned(),
                body: Arc::clone(&body),
                enqueued: Instant::now(),
            };
            let mut queues = self.queues.lock();
            let key = (url.clone(), room.to_owned());
            let item = match queues.get(&key) {
                Some(tx) => match tx.send(item) {
                    Ok(()) => continue,
                    Err(mpsc::error::SendError(item)) => item,
                },
                None => item,
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(item);
            queues.insert(key, tx);
            tokio::spawn(deliver_queue(emu.clone(), url, rx));
        }
    }
}

impl Default for WebhookSender {
    fn default() -> Self {
        Self::new()
    }
}

/// Signs `body` exactly as LiveKit's notifier does.
pub fn sign(api_key: &str, api_secret: &str, body: &[u8]) -> Option<String> {
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
    AccessToken::with_api_key(api_key, api_secret)
        .with_ttl(Duration::from_secs(300))
        .with_sha256(&digest)
        .to_jwt()
        .ok()
}

async fn deliver_queue(emu: Emulator, url: String, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut held: Option<Queued> = None;
    loop {
        // A queue with nothing to do for a minute ends; the next event starts a new one.
        let next = match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(item)) => Some(item),
            Ok(None) => None,
            Err(_) if held.is_none() => return,
            Err(_) => None,
        };
        let Some(item) = next else {
            if let Some(h) = held.take() {
                deliver(&emu, &url, h).await;
            }
            if rx.is_closed() && rx.is_empty() {
                return;
            }
            continue;
        };
        let (reorder, duplicate) = {
            let f = emu.inner.faults.lock();
            (f.webhooks.reorder_rate, f.webhooks.duplicate_rate)
        };
        if held.is_none() && reorder > 0.0 && rand::rng().random_bool(reorder.min(1.0)) {
            // Hold this one back: it goes out after the room's next event (or on idle).
            held = Some(item);
            match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                Ok(Some(next)) => {
                    deliver(&emu, &url, next).await;
                    if let Some(h) = held.take() {
                        deliver(&emu, &url, h).await;
                    }
                }
                _ => {
                    if let Some(h) = held.take() {
                        deliver(&emu, &url, h).await;
                    }
                }
            }
            continue;
        }
        let copy =
            (duplicate > 0.0 && rand::rng().random_bool(duplicate.min(1.0))).then(|| Queued {
                id: item.id.clone(),
                event: item.event.clone(),
                room: item.room.clone(),
                body: Arc::clone(&item.body),
                enqueued: item.enqueued,
            });
        deliver(&emu, &url, item).await;
        if let Some(copy) = copy {
            deliver_marked(&emu, &url, copy, true).await;
        }
    }
}

async fn deliver(emu: &Emulator, url: &str, item: Queued) {
    deliver_marked(emu, url, item, false).await;
}

async fn deliver_marked(emu: &Emulator, url: &str, item: Queued, duplicate: bool) {
    let max_age = emu.inner.config.webhook_max_age;
    // While delivery is paused, wait for the faults to change (or the event to age out).
    loop {
        let changed = emu.inner.faults_changed.notified();
        if !emu.inner.faults.lock().webhooks.paused {
            break;
        }
        let left = max_age.saturating_sub(item.enqueued.elapsed());
        if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
            break;
        }
    }
    let index = {
        let mut records = emu.inner.records.lock();
        records.webhooks.push(WebhookRecord {
            id: item.id.clone(),
            event: item.event.clone(),
            room: item.room.clone(),
            url: url.to_owned(),
            attempts: 0,
            last_status: None,
            last_error: None,
            outcome: "pending".into(),
            duplicate,
            queued_ms: crate::ids::now_ms(),
        });
        records.webhooks.len() - 1
    };
    let update = |f: &dyn Fn(&mut WebhookRecord)| {
        let mut records = emu.inner.records.lock();
        if let Some(r) = records.webhooks.get_mut(index) {
            f(r);
        }
    };
    if item.enqueued.elapsed() > max_age {
        update(&|r| r.outcome = "dropped".into());
        return;
    }
    let Some((key, secret)) = emu.inner.config.keys.first().cloned() else {
        update(&|r| r.outcome = "failed".into());
        return;
    };
    // One JWT per event: retries carry the identical Authorization header.
    let Some(token) = sign(&key, &secret, &item.body) else {
        update(&|r| r.outcome = "failed".into());
        return;
    };
    let attempts = emu.inner.config.webhook_attempts.max(1);
    let base = emu.inner.config.webhook_retry_base;
    for attempt in 0..attempts {
        let sent = emu
            .inner
            .webhooks
            .client
            .post(url)
            .header("Authorization", &token)
            .header("Content-Type", "application/webhook+json")
            .header("User-Agent", "LiveKit")
            .body(item.body.as_ref().clone())
            .send()
            .await;
        let retry = match &sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                update(&|r| {
                    r.attempts = attempt + 1;
                    r.last_status = Some(status);
                    r.last_error = None;
                });
                status == 429 || (status >= 500 && status != 501)
            }
            Err(e) => {
                let msg = e.to_string();
                update(&|r| {
                    r.attempts = attempt + 1;
                    r.last_status = None;
                    r.last_error = Some(msg.clone());
                });
                true
            }
        };
        if !retry {
            update(&|r| r.outcome = "delivered".into());
            return;
        }
        if attempt + 1 < attempts {
            tokio::time::sleep(base * 2u32.pow(attempt)).await;
        }
    }
    update(&|r| r.outcome = "failed".into());
}
