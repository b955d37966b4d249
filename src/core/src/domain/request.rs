//! A scheduler's request for an outbound call, and its validation into a [`Call`]. Pure:
//! the clock and the defaults are parameters.

use chrono::{DateTime, Utc};
use rlibphonenumber::Region;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::call::{new_call_id, room_for_call, Call, CallStatus, Direction, RetryPolicy};
use super::delay::MAX_DELAY;
use super::phone::E164;
use super::sip_outcome::SipOutcome;
use super::window::CallWindow;

/// Bounds a request must respect (each one named in its 422).
pub mod limits {
    pub const MAX_ATTEMPTS: u32 = 10;
    pub const MAX_RETRY_DELAY_S: u64 = 86_400;
    pub const MAX_RINGING_TIMEOUT_S: u32 = 300;
    pub const MAX_DURATION_S: u32 = 86_400;
    pub const MAX_TAGS: usize = 16;
    pub const MAX_TAG_LEN: usize = 64;
    pub const MAX_KEY_LEN: usize = 255;
    pub const MAX_NAME_LEN: usize = 128;
    pub const MAX_CONTEXT_BYTES: usize = 16 * 1024;
    pub const MAX_BATCH: usize = 1_000;
}

/// `POST /v1/calls` body. Unknown fields are rejected so a typo never silently drops a
/// setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// A time in the past means "now".
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "rfc3339"
    )]
    pub not_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_window: Option<CallWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<SipOutcome>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ringing_timeout_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_until_answered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Where this call's events are posted, signed with the fleet's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// What the fleet fills in when a request leaves it out.
#[derive(Debug, Clone, Default)]
pub struct CallDefaults {
    pub region: Option<Region>,
    pub trunk_id: Option<String>,
}

/// A request field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub(crate) fn bad(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Identifiers we pass to LiveKit or use as labels: printable, no spaces.
pub(crate) fn check_token(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() || value.len() > max {
        return Err(bad(field, format!("must be 1 to {max} characters")));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(bad(
            field,
            "may only contain letters, digits and - _ . :".to_owned(),
        ));
    }
    Ok(())
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: Option<T>,
    min: T,
    max: T,
) -> Result<Option<T>, FieldError> {
    match value {
        Some(v) if v < min || v > max => Err(bad(field, format!("must be {min} to {max}"))),
        other => Ok(other),
    }
}

impl CallRequest {
    /// A stable digest of everything that defines the call (not the idempotency key itself),
    /// so a repeated key can be told apart from a reused one.
    pub fn fingerprint(&self) -> String {
        let mut canonical = self.clone();
        canonical.idempotency_key = None;
        // serde_json maps are sorted, so equal requests serialise identically.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Validates the request and builds the call it asks for (status `queued`, or
    /// `scheduled` when it must wait for `not_before` or its call window).
    pub fn into_call(
        self,
        defaults: &CallDefaults,
        now: DateTime<Utc>,
    ) -> Result<Call, FieldError> {
        let to = E164::parse(&self.to, defaults.region).map_err(|e| bad("to", e.to_string()))?;
        let from = self
            .from
            .as_deref()
            .map(|f| E164::parse(f, defaults.region).map_err(|e| bad("from", e.to_string())))
            .transpose()?;
        let trunk_id = match self.trunk_id.clone().or_else(|| defaults.trunk_id.clone()) {
            Some(t) => {
                check_token("trunk_id", &t, limits::MAX_NAME_LEN)?;
                t
            }
            None => {
                return Err(bad(
                    "trunk_id",
                    "is required (no default LIVEKIT_SIP_TRUNK_ID is configured)",
                ))
            }
        };
        let callback_url = self
            .callback_url
            .as_deref()
            .map(|url| {
                super::subscription::parse_callback_url(url)
                    .map(|u| u.to_string())
                    .map_err(|e| bad("callback_url", e.to_string()))
            })
            .transpose()?;
        // No agent named: the worker dispatches its configured default.
        let agent_name = self.agent_name.clone();
        if let Some(agent) = &agent_name {
            check_token("agent_name", agent, limits::MAX_NAME_LEN)?;
        }
        let context = match self.context.clone() {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v @ Value::Object(_)) => {
                let size = serde_json::to_vec(&v)
                    .map(|b| b.len())
                    .unwrap_or(usize::MAX);
                if size > limits::MAX_CONTEXT_BYTES {
                    return Err(bad(
                        "context",
                        format!("must be at most {} bytes", limits::MAX_CONTEXT_BYTES),
                    ));
                }
                v
            }
            Some(_) => return Err(bad("context", "must be a JSON object")),
        };
        if let Some(key) = &self.idempotency_key {
            if key.is_empty()
                || key.len() > limits::MAX_KEY_LEN
                || key.chars().any(|c| c.is_control())
            {
                return Err(bad(
                    "idempotency_key",
                    format!("must be 1 to {} printable characters", limits::MAX_KEY_LEN),
                ));
            }
        }
        if let Some(nb) = self.not_before {
            let horizon = now + chrono::Duration::from_std(MAX_DELAY).unwrap_or_default();
            if nb > horizon {
                return Err(bad("not_before", "must be at most 7 days ahead"));
            }
        }
        if let Some(window) = &self.call_window {
            window.parse().map_err(|e| {
                let field = match &e {
                    super::window::WindowError::Timezone(_) => "call_window.timezone",
                    super::window::WindowError::Time { field, .. } => {
                        if *field == "start" {
                            "call_window.start"
                        } else {
                            "call_window.end"
                        }
                    }
                    super::window::WindowError::Day(_) => "call_window.days",
                    super::window::WindowError::Empty => "call_window",
                };
                bad(field, e.to_string())
            })?;
        }
        let defaults_policy = RetryPolicy::default();
        let max_attempts = in_range("max_attempts", self.max_attempts, 1, limits::MAX_ATTEMPTS)?
            .unwrap_or(defaults_policy.max_attempts);
        let retry_delay_s = in_range(
            "retry_delay_s",
            self.retry_delay_s,
            1,
            limits::MAX_RETRY_DELAY_S,
        )?
        .unwrap_or(defaults_policy.retry_delay_s);
        let retry_on = match self.retry_on.clone() {
            Some(list) => {
                if let Some(final_outcome) = list.iter().find(|o| !o.retryable_by_default()) {
                    return Err(bad(
                        "retry_on",
                        format!(
                            "{} is a final outcome; only busy, no_answer and unavailable can be retried",
                            final_outcome.as_str()
                        ),
                    ));
                }
                list
            }
            None => defaults_policy.retry_on,
        };
        let ringing_timeout_s = in_range(
            "ringing_timeout_s",
            self.ringing_timeout_s,
            1,
            limits::MAX_RINGING_TIMEOUT_S,
        )?;
        let max_duration_s = in_range(
            "max_duration_s",
            self.max_duration_s,
            1,
            limits::MAX_DURATION_S,
        )?;
        let tags = self.tags.clone().unwrap_or_default();
        if tags.len() > limits::MAX_TAGS {
            return Err(bad("tags", format!("at most {} tags", limits::MAX_TAGS)));
        }
        for tag in &tags {
            check_token("tags", tag, limits::MAX_TAG_LEN)?;
        }

        let id = new_call_id();
        let mut call = Call {
            room_name: room_for_call(&id),
            id,
            direction: Direction::Outbound,
            status: CallStatus::Queued,
            to,
            from,
            trunk_id: Some(trunk_id),
            agent_name,
            context,
            tags,
            dispatch_id: None,
            idempotency_key: self.idempotency_key.clone(),
            retry: RetryPolicy {
                max_attempts,
                retry_on,
                retry_delay_s,
            },
            not_before: self.not_before,
            scheduled_for: None,
            call_window: self.call_window.clone(),
            ringing_timeout_s,
            max_duration_s,
            wait_until_answered: self.wait_until_answered.unwrap_or(false),
            attempts: vec![],
            created_at: now,
            updated_at: now,
            ended_at: None,
            duration_s: None,
            end_reason: None,
            timeline: vec![],
            inbound: None,
            routing: None,
            callback_url,
            commands: Vec::new(),
        };
        call.note(now, "accepted", None);
        if let Some(due) = call.deferred_until(now) {
            // Each bound may hold alone and still, together, push the first dial too far.
            let horizon = now + chrono::Duration::from_std(MAX_DELAY).unwrap_or_default();
            if due > horizon {
                let field = if call.call_window.is_some() {
                    "call_window"
                } else {
                    "not_before"
                };
                return Err(bad(
                    field,
                    format!(
                        "puts the first dial at {}, more than 7 days ahead (with not_before and call_window together)",
                        due.to_rfc3339()
                    ),
                ));
            }
            call.schedule(due, now);
        }
        Ok(call)
    }
}

/// `not_before` as RFC 3339, with an error that says so (chrono's says "input contains
/// invalid characters").
fn rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| {
        DateTime::parse_from_rfc3339(&t)
            .map(|at| at.with_timezone(&Utc))
            .map_err(|_| {
                serde::de::Error::custom(
                    "must be an RFC 3339 time with its offset, such as 2026-11-23T14:00:00Z",
                )
            })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::phone::parse_region;

    fn defaults() -> CallDefaults {
        CallDefaults {
            region: parse_region("US").ok(),
            trunk_id: Some("ST_default".into()),
        }
    }

    fn request(to: &str) -> CallRequest {
        CallRequest {
            to: to.into(),
            ..Default::default()
        }
    }

    fn field_of(r: CallRequest) -> String {
        match r.into_call(&defaults(), Utc::now()) {
            Err(e) => e.field,
            Ok(_) => "accepted".into(),
        }
    }

    #[test]
    fn national_numbers_use_the_default_region() {
        let call = request("(510) 555-0123")
            .into_call(&defaults(), Utc::now())
            .expect("valid");
        assert_eq!(call.to.as_str(), "+15105550123");
        assert_eq!(call.trunk_id.as_deref(), Some("ST_default"));
        assert_eq!(call.status, CallStatus::Queued);
        assert!(call.room_name.starts_with("cf-"));
    }

    #[test]
    fn each_invalid_field_is_named() {
        assert_eq!(field_of(request("12")), "to");
        let mut r = request("+15105550123");
        r.from = Some("nope".into());
        assert_eq!(field_of(r), "from");
        let mut r = request("+15105550123");
        r.max_attempts = Some(0);
        assert_eq!(field_of(r), "max_attempts");
        let mut r = request("+15105550123");
        r.retry_on = Some(vec![SipOutcome::Declined]);
        assert_eq!(field_of(r), "retry_on");
        let mut r = request("+15105550123");
        r.context = Some(Value::String("x".into()));
        assert_eq!(field_of(r), "context");
        let mut r = request("+15105550123");
        r.tags = Some(vec!["has space".into()]);
        assert_eq!(field_of(r), "tags");
        let mut r = request("+15105550123");
        r.call_window = Some(CallWindow {
            timezone: "Nowhere/City".into(),
            start: "09:00".into(),
            end: "17:00".into(),
            days: None,
        });
        assert_eq!(field_of(r), "call_window.timezone");
        let mut r = request("+15105550123");
        r.not_before = Some(Utc::now() + chrono::Duration::days(30));
        assert_eq!(field_of(r), "not_before");
        let no_trunk = CallDefaults {
            trunk_id: None,
            ..defaults()
        };
        assert_eq!(
            request("+15105550123")
                .into_call(&no_trunk, Utc::now())
                .map_err(|e| e.field),
            Err("trunk_id".to_owned())
        );
    }

    #[test]
    fn future_not_before_schedules_the_call() {
        let now = Utc::now();
        let mut r = request("+15105550123");
        r.not_before = Some(now + chrono::Duration::minutes(5));
        let call = r.into_call(&defaults(), now).expect("valid");
        assert_eq!(call.status, CallStatus::Scheduled);
        assert_eq!(call.scheduled_for, call.not_before);
    }

    #[test]
    fn a_window_that_pushes_the_first_dial_past_seven_days_is_refused() {
        let now = Utc::now();
        let mut r = request("+15105550123");
        // Six and a half days ahead, but the window only opens on a day that comes later.
        r.not_before = Some(now + chrono::Duration::hours(156));
        let late_day = (now + chrono::Duration::days(8))
            .format("%a")
            .to_string()
            .to_lowercase();
        r.call_window = Some(CallWindow {
            timezone: "UTC".into(),
            start: "00:00".into(),
            end: "23:59".into(),
            days: Some(vec![late_day]),
        });
        let err = r.into_call(&defaults(), now).expect_err("too far");
        assert_eq!(err.field, "call_window");
        assert!(err.message.contains("7 days"), "{}", err.message);
    }

    #[test]
    fn not_before_must_be_rfc3339_and_says_so() {
        let err = serde_json::from_value::<CallRequest>(
            serde_json::json!({"to": "+15105550123", "not_before": "tomorrow at nine"}),
        )
        .expect_err("not a time");
        assert!(err.to_string().contains("RFC 3339"), "{err}");
        let ok = serde_json::from_value::<CallRequest>(
            serde_json::json!({"to": "+15105550123", "not_before": "2026-11-23T14:00:00+01:00"}),
        )
        .expect("a time");
        assert_eq!(
            ok.not_before.map(|t| t.to_rfc3339()),
            Some("2026-11-23T13:00:00+00:00".into())
        );
    }

    #[test]
    fn fingerprint_ignores_the_key_but_not_the_call() {
        let mut a = request("+15105550123");
        a.context = Some(serde_json::json!({"b": 1, "a": 2}));
        let mut b = a.clone();
        b.idempotency_key = Some("k1".into());
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.to = "+15105550124".into();
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
