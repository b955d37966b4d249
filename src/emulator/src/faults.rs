//! Global fault injection, set at run time through the control API.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Faults for one Twirp method (or `*` for all).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodFault {
    /// Fixed latency added before answering, in milliseconds.
    pub latency_ms: u64,
    /// With `latency_max_ms`, latency is uniform in `latency_ms..=latency_max_ms`.
    pub latency_max_ms: Option<u64>,
    /// Fraction (0..=1) of requests answered with `error_code`.
    pub error_rate: f64,
    /// Twirp code of injected errors (default `unavailable`).
    pub error_code: Option<String>,
    /// Fraction (0..=1) of requests whose connection is dropped without an answer.
    pub drop_rate: f64,
}

/// Faults on webhook delivery.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookFaults {
    /// Fraction (0..=1) of events delivered twice (same id, same body).
    pub duplicate_rate: f64,
    /// Fraction (0..=1) of events held back and delivered after the room's next event.
    pub reorder_rate: f64,
    /// While true, nothing is delivered (events wait, and may age out after 30 s).
    pub paused: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Per Twirp method name (`CreateSIPParticipant`) or `*`.
    pub methods: HashMap<String, MethodFault>,
    pub webhooks: WebhookFaults,
}

impl Faults {
    pub fn for_method(&self, method: &str) -> Option<&MethodFault> {
        self.methods.get(method).or_else(|| self.methods.get("*"))
    }
}
