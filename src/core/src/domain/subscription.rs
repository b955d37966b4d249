//! Callback subscriptions: who wants which call events, signed with which secrets, and the
//! log of what was delivered to them. Pure: the clock is a parameter; new ids and
//! generated secrets are the only randomness, as elsewhere in the domain.
//!
//! Network checks on a subscription's URL (DNS, private addresses) are not here: they are
//! async and live in [`crate::callback`].

use std::collections::BTreeSet;
use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::call::Direction;
use super::events::EventType;
use super::request::{bad, check_token, limits as request_limits, FieldError};

pub mod limits {
    /// Subscription ids a client chooses: `[A-Za-z0-9_-]{1,64}`.
    pub const MAX_ID_LEN: usize = 64;
    pub const MAX_URL_LEN: usize = 2_048;
    pub const MAX_DESCRIPTION_LEN: usize = 256;
    /// Secrets a subscription signs with at once (the newest and up to two it rotated out).
    pub const MAX_SECRETS: usize = 3;
    /// Decoded secret sizes the Standard Webhooks spec recommends (192 to 512 bits).
    pub const MIN_SECRET_BYTES: usize = 24;
    pub const MAX_SECRET_BYTES: usize = 64;
    /// Delivery records kept per subscription (newest first).
    pub const MAX_DELIVERIES: usize = 1_000;
}

/// The prefix of a Standard Webhooks signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The prefix of a per-call callback's pseudo subscription id (`call:<call_id>`), under
/// which deliveries to a call's own `callback_url` are logged. Subscription ids never
/// contain `:`, so the two never collide.
pub const CALL_SUBSCRIPTION_PREFIX: &str = "call:";

/// The pseudo subscription id a call's own callback deliveries are logged under.
pub fn call_subscription_id(call_id: &str) -> String {
    format!("{CALL_SUBSCRIPTION_PREFIX}{call_id}")
}

/// A fresh subscription id: `sub_` and a UUID v7 (time-ordered, so a listing by id is
/// roughly by creation).
pub fn new_subscription_id() -> String {
    format!("sub_{}", uuid::Uuid::now_v7().simple())
}

// --- signing secrets ------------------------------------------------------------------------

/// A Standard Webhooks signing secret, `whsec_` + base64 of 24 to 64 random bytes. Its
/// `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret {
    text: String,
    key: Vec<u8>,
}

/// Why a string is not a signing secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("must start with \"whsec_\" followed by base64")]
    Prefix,
    #[error("is not valid base64 after \"whsec_\"")]
    Base64,
    #[error("must decode to {min} to {max} bytes, not {0}", min = limits::MIN_SECRET_BYTES, max = limits::MAX_SECRET_BYTES)]
    Length(usize),
}

impl SigningSecret {
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::Prefix)?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::Base64)?;
        if !(limits::MIN_SECRET_BYTES..=limits::MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Self {
            text: text.to_owned(),
            key,
        })
    }

    /// A new secret of 32 random bytes.
    pub fn generate() -> Self {
        let key: [u8; 32] = rand::random();
        let text = format!(
            "{SECRET_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        Self {
            text,
            key: key.to_vec(),
        }
    }

    /// The full secret (`whsec_…`): for storage and the one answer that shows it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The HMAC key (the decoded bytes).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// `whsec_abcd…`: enough to tell secrets apart, never enough to sign.
    pub fn masked(&self) -> String {
        mask_secret(&self.text)
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningSecret({})", self.masked())
    }
}

/// `whsec_` and the first 4 characters after it, then `…`.
pub fn mask_secret(secret: &str) -> String {
    let rest = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let shown: String = rest.chars().take(4).collect();
    format!("{SECRET_PREFIX}{shown}…")
}

// --- callback URLs ----------------------------------------------------------------------------

/// Why a callback URL is refused on its syntax alone. Messages complete "callback URL …"
/// or a field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlSyntaxError {
    #[error("is not a valid absolute URL ({0})")]
    Invalid(String),
    #[error("must use http or https, not {0:?}")]
    Scheme(String),
    #[error("must not carry a user name or password (put credentials in the receiver's own checks: every callback is signed)")]
    Userinfo,
    #[error("must not contain a fragment (#…): it is never sent to the receiver")]
    Fragment,
    #[error("must name a host")]
    NoHost,
    #[error("must be at most {} characters", limits::MAX_URL_LEN)]
    TooLong,
}

/// Parses a callback URL and checks what can be checked without the network: http or
/// https, a host, no user info, no fragment, bounded length.
pub fn parse_callback_url(text: &str) -> Result<Url, UrlSyntaxError> {
    if text.len() > limits::MAX_URL_LEN {
        return Err(UrlSyntaxError::TooLong);
    }
    let url = Url::parse(text.trim()).map_err(|e| UrlSyntaxError::Invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlSyntaxError::Scheme(url.scheme().to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlSyntaxError::Userinfo);
    }
    if url.fragment().is_some() {
        return Err(UrlSyntaxError::Fragment);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlSyntaxError::NoHost);
    }
    Ok(url)
}

// --- subscriptions ---------------------------------------------------------------------------

/// Which calls a subscription hears about; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionFilter {
    /// Only calls carrying this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Only calls routed to a profile of this organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// Only inbound or only outbound calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
}

impl SubscriptionFilter {
    pub fn matches(
        &self,
        direction: Direction,
        tags: &[String],
        organization: Option<&str>,
    ) -> bool {
        self.tag.as_ref().is_none_or(|t| tags.contains(t))
            && self
                .organization
                .as_deref()
                .is_none_or(|o| organization == Some(o))
            && self.direction.is_none_or(|d| d == direction)
    }
}

/// A receiver of signed callbacks (Standard Webhooks).
/// `Debug` masks the secrets (a subscription may end up in a log line).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: String,
    /// As validated by [`parse_callback_url`] (normalised).
    pub url: String,
    /// Empty means every callback type; never [`EventType::Updated`].
    pub event_types: BTreeSet<EventType>,
    #[serde(default)]
    pub filter: SubscriptionFilter,
    /// `whsec_` secrets, newest first, 1 to [`limits::MAX_SECRETS`]; each callback is
    /// signed with all of them so a receiver can rotate without losing one.
    pub secrets: Vec<String>,
    pub enabled: bool,
    /// Why it is disabled ("410 Gone from the receiver", "disabled by operator").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("event_types", &self.event_types)
            .field("filter", &self.filter)
            .field("secrets", &self.public().secrets)
            .field("enabled", &self.enabled)
            .field("disabled_reason", &self.disabled_reason)
            .field("description", &self.description)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// Why a secret could not be removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRemovalError {
    #[error(
        "there is no secret {index} (the subscription has {count}, numbered from 0, newest first)"
    )]
    NoSuchSecret { index: usize, count: usize },
    #[error("the last secret cannot be removed: rotate in a new one first")]
    LastSecret,
}

impl Subscription {
    /// Whether this subscription gets `event` for a call with these facts: it is enabled,
    /// asks for the type (a callback type; empty = all) and its filter matches.
    pub fn wants(
        &self,
        event: EventType,
        direction: Direction,
        tags: &[String],
        organization: Option<&str>,
    ) -> bool {
        self.enabled
            && event.is_callback()
            && (self.event_types.is_empty() || self.event_types.contains(&event))
            && self.filter.matches(direction, tags, organization)
    }

    /// The secrets to sign with, newest first (a stored secret that no longer parses is
    /// skipped; validation never stores one).
    pub fn signing_secrets(&self) -> Vec<SigningSecret> {
        self.secrets
            .iter()
            .filter_map(|s| SigningSecret::parse(s).ok())
            .collect()
    }

    /// Puts `secret` first and keeps at most [`limits::MAX_SECRETS`] (the oldest go).
    /// A secret already held moves to the front instead of appearing twice.
    pub fn rotate(&mut self, secret: &SigningSecret, now: DateTime<Utc>) {
        self.secrets.retain(|s| s != secret.as_str());
        self.secrets.insert(0, secret.as_str().to_owned());
        self.secrets.truncate(limits::MAX_SECRETS);
        self.updated_at = now;
    }

    /// Removes the secret at `index` (as [`Subscription::public`] lists them, newest
    /// first), e.g. the old one once every receiver verifies with the new one. The last
    /// secret stays.
    pub fn remove_secret(
        &mut self,
        index: usize,
        now: DateTime<Utc>,
    ) -> Result<(), SecretRemovalError> {
        let count = self.secrets.len();
        if index >= count {
            return Err(SecretRemovalError::NoSuchSecret { index, count });
        }
        if count == 1 {
            return Err(SecretRemovalError::LastSecret);
        }
        self.secrets.remove(index);
        self.updated_at = now;
        Ok(())
    }

    /// Stops deliveries, saying why (kept until [`Subscription::enable`]).
    pub fn disable(&mut self, reason: impl Into<String>, now: DateTime<Utc>) {
        self.enabled = false;
        self.disabled_reason = Some(reason.into());
        self.updated_at = now;
    }

    pub fn enable(&mut self, now: DateTime<Utc>) {
        self.enabled = true;
        self.disabled_reason = None;
        self.updated_at = now;
    }

    /// What the API shows: everything but the secrets, which appear masked.
    pub fn public(&self) -> PublicSubscription {
        PublicSubscription {
            id: self.id.clone(),
            url: self.url.clone(),
            event_types: self.event_types.clone(),
            filter: self.filter.clone(),
            secrets: self.secrets.iter().map(|s| mask_secret(s)).collect(),
            enabled: self.enabled,
            disabled_reason: self.disabled_reason.clone(),
            description: self.description.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A subscription as the API shows it: secrets masked (`whsec_abcd…`), newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublicSubscription {
    pub id: String,
    pub url: String,
    pub event_types: BTreeSet<EventType>,
    pub filter: SubscriptionFilter,
    pub secrets: Vec<String>,
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A subscription as clients write it. On create `url` is required; on update every
/// absent field keeps its current value.
/// `Debug` masks the secret.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Empty means every callback type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
    /// Replaces the whole filter when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<SubscriptionFilter>,
    /// A `whsec_` secret to sign with; generated on create when absent. On update a new
    /// secret is rotated in ([`Subscription::rotate`]): the older ones keep signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// An empty string clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `false` disables ("disabled by operator"); `true` re-enables and clears the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

impl fmt::Debug for SubscriptionInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionInput")
            .field("url", &self.url)
            .field("event_types", &self.event_types)
            .field("filter", &self.filter)
            .field("secret", &self.secret.as_deref().map(mask_secret))
            .field("description", &self.description)
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// The reason [`SubscriptionInput`] gives when a client disables a subscription.
pub const DISABLED_BY_OPERATOR: &str = "disabled by operator";

fn check_subscription_id(id: &str) -> Result<(), FieldError> {
    if id.is_empty() || id.len() > limits::MAX_ID_LEN {
        return Err(bad(
            "id",
            format!("must be 1 to {} characters", limits::MAX_ID_LEN),
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad("id", "may only contain letters, digits, _ and -"));
    }
    Ok(())
}

fn parse_event_types(types: &[String], errors: &mut Vec<FieldError>) -> BTreeSet<EventType> {
    let mut out = BTreeSet::new();
    let expected: Vec<&str> = EventType::ALL
        .iter()
        .filter(|t| t.is_callback())
        .map(|t| t.as_str())
        .collect();
    for (i, name) in types.iter().enumerate() {
        let field = format!("event_types[{i}]");
        match EventType::parse(name) {
            Some(t) if t.is_callback() => {
                out.insert(t);
            }
            Some(EventType::Test) => errors.push(bad(
                &field,
                format!(
                    "{name:?} is only sent by POST /v1/subscriptions/{{id}}/test, never \
                     subscribed to; expected one of {}",
                    expected.join(", ")
                ),
            )),
            Some(_) => errors.push(bad(
                &field,
                format!(
                    "{name:?} is the live stream's catch-all, not a callback type; leave \
                     event_types empty to receive every callback type, or name some of {}",
                    expected.join(", ")
                ),
            )),
            None => {
                errors.push(bad(
                    &field,
                    format!(
                        "unknown event type {name:?}; expected one of {}",
                        expected.join(", ")
                    ),
                ));
            }
        }
    }
    out
}

fn check_filter(filter: &SubscriptionFilter, errors: &mut Vec<FieldError>) {
    if let Some(tag) = &filter.tag {
        if let Err(e) = check_token("filter.tag", tag, request_limits::MAX_TAG_LEN) {
            errors.push(e);
        }
    }
    if let Some(org) = &filter.organization {
        if let Err(e) = check_token("filter.organization", org, request_limits::MAX_NAME_LEN) {
            errors.push(e);
        }
    }
}

impl SubscriptionInput {
    /// Validates into a subscription with `id` (a new `sub_…` id when `None`); with
    /// `existing` it is an update: absent fields keep their value, `created_at` stays.
    /// Every wrong field is reported, each named by its path.
    pub fn validate(
        self,
        id: Option<&str>,
        existing: Option<&Subscription>,
        now: DateTime<Utc>,
    ) -> Result<Subscription, Vec<FieldError>> {
        let mut errors = Vec::new();
        let id = match id {
            Some(id) => {
                if let Err(e) = check_subscription_id(id) {
                    errors.push(e);
                }
                id.to_owned()
            }
            None => existing.map_or_else(new_subscription_id, |e| e.id.clone()),
        };

        let url = match (&self.url, existing) {
            (Some(text), _) => match parse_callback_url(text) {
                Ok(url) => Some(url.to_string()),
                Err(e) => {
                    errors.push(bad("url", e.to_string()));
                    None
                }
            },
            (None, Some(existing)) => Some(existing.url.clone()),
            (None, None) => {
                errors.push(bad(
                    "url",
                    "is required: the http(s) endpoint that receives the callbacks",
                ));
                None
            }
        };

        let event_types = match &self.event_types {
            Some(types) => parse_event_types(types, &mut errors),
            None => existing.map(|e| e.event_types.clone()).unwrap_or_default(),
        };

        let filter = match self.filter {
            Some(filter) => {
                check_filter(&filter, &mut errors);
                filter
            }
            None => existing.map(|e| e.filter.clone()).unwrap_or_default(),
        };

        let new_secret = match self.secret.as_deref().map(SigningSecret::parse) {
            Some(Ok(secret)) => Some(secret),
            Some(Err(e)) => {
                errors.push(bad(
                    "secret",
                    format!("{e}; leave it out to have one generated"),
                ));
                None
            }
            None => None,
        };

        let description = match self.description {
            Some(d) if d.trim().is_empty() => None,
            Some(d) if d.chars().count() > limits::MAX_DESCRIPTION_LEN => {
                errors.push(bad(
                    "description",
                    format!("must be at most {} characters", limits::MAX_DESCRIPTION_LEN),
                ));
                None
            }
            Some(d) => Some(d),
            None => existing.and_then(|e| e.description.clone()),
        };

        if !errors.is_empty() {
            return Err(errors);
        }
        let url = url.unwrap_or_default();

        let mut sub = match existing {
            Some(existing) => {
                let mut sub = existing.clone();
                sub.id = id;
                sub.url = url;
                sub.event_types = event_types;
                sub.filter = filter;
                sub.description = description;
                sub.updated_at = now;
                if let Some(secret) = &new_secret {
                    if sub.secrets.first().map(String::as_str) != Some(secret.as_str()) {
                        sub.rotate(secret, now);
                    }
                }
                sub
            }
            None => Subscription {
                id,
                url,
                event_types,
                filter,
                secrets: vec![new_secret
                    .unwrap_or_else(SigningSecret::generate)
                    .as_str()
                    .to_owned()],
                enabled: true,
                disabled_reason: None,
                description,
                created_at: now,
                updated_at: now,
            },
        };
        match self.enabled {
            Some(true) if !sub.enabled => sub.enable(now),
            Some(false) if sub.enabled => sub.disable(DISABLED_BY_OPERATOR, now),
            _ => {}
        }
        Ok(sub)
    }
}

// --- delivery log ------------------------------------------------------------------------------

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed; another attempt is scheduled.
    Retrying,
    /// The receiver answered 410 Gone: the subscription was disabled.
    Disabled,
    /// Every attempt failed; the callback went to the dead-letter queue.
    DeadLettered,
    /// Not sent: the subscription was disabled or deleted meanwhile.
    Skipped,
}

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retrying => "retrying",
            DeliveryOutcome::Disabled => "disabled",
            DeliveryOutcome::DeadLettered => "dead_lettered",
            DeliveryOutcome::Skipped => "skipped",
        }
    }
}

/// One delivery attempt of one callback to one receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// The Standard Webhooks `webhook-id` (the same on every attempt of one callback).
    pub webhook_id: String,
    pub event_type: EventType,
    pub call_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// What went wrong (connection refused, timeout, refused address…), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
    pub outcome: DeliveryOutcome,
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("valid time")
    }

    fn input(v: serde_json::Value) -> SubscriptionInput {
        serde_json::from_value(v).expect("input deserializes")
    }

    fn create(v: serde_json::Value) -> Subscription {
        input(v).validate(None, None, t(0)).expect("valid")
    }

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn create_fills_in_id_secret_and_times() {
        let sub = create(json!({"url": "https://hooks.example.com/calls"}));
        assert!(
            sub.id.starts_with("sub_") && sub.id.len() == 36,
            "{}",
            sub.id
        );
        assert_eq!(sub.url, "https://hooks.example.com/calls");
        assert!(sub.event_types.is_empty());
        assert_eq!(sub.secrets.len(), 1);
        assert!(SigningSecret::parse(&sub.secrets[0]).is_ok());
        assert!(sub.enabled && sub.disabled_reason.is_none());
        assert_eq!((sub.created_at, sub.updated_at), (t(0), t(0)));
        // Two creations never share a secret or an id.
        let other = create(json!({"url": "https://hooks.example.com/calls"}));
        assert_ne!(other.secrets, sub.secrets);
        assert_ne!(other.id, sub.id);
    }

    #[test]
    fn create_keeps_what_was_given() {
        let sub = input(json!({
            "url": "http://Hooks.Example.com:8080/a?b=c",
            "event_types": ["call.completed", "call.failed", "call.completed"],
            "filter": {"tag": "reminders", "direction": "outbound"},
            "secret": SECRET,
            "description": "billing team",
            "enabled": false,
        }))
        .validate(Some("billing-1"), None, t(0))
        .expect("valid");
        assert_eq!(sub.id, "billing-1");
        assert_eq!(sub.url, "http://hooks.example.com:8080/a?b=c");
        assert_eq!(
            sub.event_types,
            BTreeSet::from([EventType::Completed, EventType::Failed])
        );
        assert_eq!(sub.filter.tag.as_deref(), Some("reminders"));
        assert_eq!(sub.filter.direction, Some(Direction::Outbound));
        assert_eq!(sub.secrets, vec![SECRET.to_owned()]);
        assert!(!sub.enabled);
        assert_eq!(sub.disabled_reason.as_deref(), Some(DISABLED_BY_OPERATOR));
        assert_eq!(sub.description.as_deref(), Some("billing team"));
    }

    #[test]
    fn every_wrong_field_is_named() {
        let errors = input(json!({
            "event_types": ["call.completed", "call.updated", "call.foo"],
            "filter": {"tag": "has space"},
            "secret": "not-a-secret",
            "description": "x".repeat(300),
        }))
        .validate(Some("bad id!"), None, t(0))
        .expect_err("invalid");
        assert_eq!(
            fields(errors.clone()),
            vec![
                "id",
                "url",
                "event_types[1]",
                "event_types[2]",
                "filter.tag",
                "secret",
                "description"
            ]
        );
        let unknown = errors[3].to_string();
        assert!(
            unknown.starts_with(
                "event_types[2]: unknown event type \"call.foo\"; expected one of call.queued, "
            ),
            "{unknown}"
        );
        assert!(!unknown.contains("call.updated"), "{unknown}");
        assert!(
            errors[2].message.contains("not a callback type"),
            "{}",
            errors[2]
        );
        assert!(errors[5].message.contains("whsec_"), "{}", errors[5]);
    }

    #[test]
    fn urls_must_be_plain_http_or_https() {
        for (url, why) in [
            ("ftp://example.com/x", "http or https"),
            ("file:///etc/passwd", "http or https"),
            ("https://user:pw@example.com/", "user name or password"),
            ("https://user@example.com/", "user name or password"),
            ("https://example.com/#frag", "fragment"),
            ("example.com/hook", "valid absolute URL"),
            ("", "valid absolute URL"),
        ] {
            let errors = input(json!({ "url": url }))
                .validate(None, None, t(0))
                .expect_err(url);
            assert_eq!(errors.len(), 1, "{url}");
            assert_eq!(errors[0].field, "url");
            assert!(errors[0].message.contains(why), "{url}: {}", errors[0]);
        }
        let long = format!("https://example.com/{}", "a".repeat(limits::MAX_URL_LEN));
        assert_eq!(parse_callback_url(&long), Err(UrlSyntaxError::TooLong));
        assert!(parse_callback_url("https://[::1]:8443/x").is_ok());
    }

    #[test]
    fn secrets_must_be_whsec_base64_of_24_to_64_bytes() {
        assert!(SigningSecret::parse(SECRET).is_ok());
        assert_eq!(
            SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::Prefix)
        );
        assert_eq!(SigningSecret::parse("whsec_!!!"), Err(SecretError::Base64));
        assert_eq!(
            SigningSecret::parse("whsec_c2hvcnQ="),
            Err(SecretError::Length(5))
        );
        let generated = SigningSecret::generate();
        assert_eq!(generated.key().len(), 32);
        assert_eq!(
            SigningSecret::parse(generated.as_str()),
            Ok(generated.clone())
        );
        let debug = format!("{generated:?}");
        assert!(!debug.contains(&generated.as_str()[6..]), "{debug}");
        let sub = create(json!({"url": "https://a.example.com/", "secret": SECRET}));
        let debug = format!("{sub:?}");
        assert!(
            debug.contains("whsec_MfKQ…") && !debug.contains(SECRET),
            "{debug}"
        );
        let debug = format!("{:?}", input(json!({"secret": SECRET})));
        assert!(
            debug.contains("whsec_MfKQ…") && !debug.contains(SECRET),
            "{debug}"
        );
        assert_eq!(mask_secret(SECRET), "whsec_MfKQ…");
    }

    #[test]
    fn update_keeps_absent_fields_and_creation_time() {
        let sub = create(json!({
            "url": "https://a.example.com/",
            "event_types": ["call.completed"],
            "filter": {"organization": "acme"},
            "description": "first",
        }));
        let updated = input(json!({"url": "https://b.example.com/"}))
            .validate(None, Some(&sub), t(60))
            .expect("valid");
        assert_eq!(updated.id, sub.id);
        assert_eq!(updated.url, "https://b.example.com/");
        assert_eq!(updated.event_types, sub.event_types);
        assert_eq!(updated.filter, sub.filter);
        assert_eq!(updated.secrets, sub.secrets);
        assert_eq!(updated.description.as_deref(), Some("first"));
        assert_eq!((updated.created_at, updated.updated_at), (t(0), t(60)));

        // Clearing: an empty list means every type, an empty description none.
        let cleared = input(json!({"event_types": [], "description": "", "filter": {}}))
            .validate(None, Some(&updated), t(61))
            .expect("valid");
        assert!(cleared.event_types.is_empty());
        assert_eq!(cleared.description, None);
        assert_eq!(cleared.filter, SubscriptionFilter::default());

        // A given secret rotates in; the old one keeps signing.
        let rotated = input(json!({"secret": SECRET}))
            .validate(None, Some(&cleared), t(62))
            .expect("valid");
        assert_eq!(
            rotated.secrets,
            vec![SECRET.to_owned(), sub.secrets[0].clone()]
        );
        // Sent again (a retried request), it changes nothing.
        let again = input(json!({"secret": SECRET}))
            .validate(None, Some(&rotated), t(63))
            .expect("valid");
        assert_eq!(again.secrets, rotated.secrets);
    }

    #[test]
    fn enabling_and_disabling_through_input() {
        let mut sub = create(json!({"url": "https://a.example.com/"}));
        sub.disable("410 Gone from the receiver", t(5));
        let still = input(json!({"enabled": false}))
            .validate(None, Some(&sub), t(6))
            .expect("valid");
        assert_eq!(
            still.disabled_reason.as_deref(),
            Some("410 Gone from the receiver"),
            "an already disabled subscription keeps its reason"
        );
        let on = input(json!({"enabled": true}))
            .validate(None, Some(&sub), t(7))
            .expect("valid");
        assert!(on.enabled && on.disabled_reason.is_none());
    }

    #[test]
    fn unknown_input_fields_are_refused() {
        let r: Result<SubscriptionInput, _> =
            serde_json::from_value(json!({"url": "https://a.example.com/", "events": []}));
        assert!(r.is_err());
        let r: Result<SubscriptionInput, _> = serde_json::from_value(
            json!({"url": "https://a.example.com/", "filter": {"tags": ["x"]}}),
        );
        assert!(r.is_err());
    }

    #[test]
    fn wants_matches_type_and_filters() {
        let tags = vec!["reminders".to_owned(), "vip".to_owned()];
        let all = create(json!({"url": "https://a.example.com/"}));
        assert!(all.wants(EventType::Completed, Direction::Outbound, &[], None));
        assert!(all.wants(EventType::Started, Direction::Inbound, &[], Some("acme")));
        assert!(
            !all.wants(EventType::Updated, Direction::Outbound, &[], None),
            "call.updated is never a callback"
        );

        let some = create(json!({
            "url": "https://a.example.com/",
            "event_types": ["call.completed", "call.failed"],
            "filter": {"tag": "vip", "organization": "acme", "direction": "outbound"},
        }));
        assert!(some.wants(
            EventType::Completed,
            Direction::Outbound,
            &tags,
            Some("acme")
        ));
        assert!(!some.wants(EventType::Queued, Direction::Outbound, &tags, Some("acme")));
        assert!(!some.wants(
            EventType::Completed,
            Direction::Inbound,
            &tags,
            Some("acme")
        ));
        assert!(!some.wants(EventType::Completed, Direction::Outbound, &[], Some("acme")));
        assert!(!some.wants(EventType::Completed, Direction::Outbound, &tags, None));
        assert!(!some.wants(
            EventType::Completed,
            Direction::Outbound,
            &tags,
            Some("other")
        ));

        let mut off = some.clone();
        off.disable(DISABLED_BY_OPERATOR, t(1));
        assert!(!off.wants(
            EventType::Completed,
            Direction::Outbound,
            &tags,
            Some("acme")
        ));
        off.enable(t(2));
        assert!(off.wants(
            EventType::Completed,
            Direction::Outbound,
            &tags,
            Some("acme")
        ));
    }

    #[test]
    fn rotation_keeps_the_newest_three() {
        let mut sub = create(json!({"url": "https://a.example.com/", "secret": SECRET}));
        let new: Vec<SigningSecret> = (0..3).map(|_| SigningSecret::generate()).collect();
        sub.rotate(&new[0], t(1));
        assert_eq!(sub.secrets, vec![new[0].as_str(), SECRET]);
        assert_eq!(sub.updated_at, t(1));
        sub.rotate(&new[1], t(2));
        sub.rotate(&new[2], t(3));
        assert_eq!(
            sub.secrets,
            vec![new[2].as_str(), new[1].as_str(), new[0].as_str()],
            "the oldest goes"
        );
        // Rotating a held secret back in moves it to the front, never duplicates it.
        sub.rotate(&new[0], t(4));
        assert_eq!(
            sub.secrets,
            vec![new[0].as_str(), new[2].as_str(), new[1].as_str()]
        );
        assert_eq!(sub.signing_secrets().len(), 3);

        assert_eq!(
            sub.remove_secret(3, t(5)),
            Err(SecretRemovalError::NoSuchSecret { index: 3, count: 3 })
        );
        sub.remove_secret(2, t(5)).expect("removed");
        sub.remove_secret(1, t(6)).expect("removed");
        assert_eq!(sub.secrets, vec![new[0].as_str()]);
        assert_eq!(
            sub.remove_secret(0, t(7)),
            Err(SecretRemovalError::LastSecret)
        );
        assert_eq!(sub.updated_at, t(6));
    }

    #[test]
    fn the_public_view_masks_every_secret() {
        let mut sub = create(json!({"url": "https://a.example.com/", "secret": SECRET}));
        sub.rotate(&SigningSecret::generate(), t(1));
        let shown = serde_json::to_value(sub.public()).expect("serializes");
        let text = shown.to_string();
        for secret in &sub.secrets {
            assert!(!text.contains(&secret[6..]), "{text}");
        }
        assert_eq!(shown["secrets"][1], "whsec_MfKQ…");
        assert_eq!(shown["id"], sub.id.as_str());
        assert_eq!(shown["enabled"], true);
    }

    #[test]
    fn records_and_subscriptions_round_trip_as_json() {
        let sub = create(json!({
            "url": "https://a.example.com/",
            "event_types": ["call.no_answer"],
            "filter": {"direction": "inbound"},
        }));
        let json = serde_json::to_value(&sub).expect("serializes");
        assert_eq!(json["event_types"], json!(["call.no_answer"]));
        assert_eq!(
            serde_json::from_value::<Subscription>(json).expect("back"),
            sub
        );

        let record = DeliveryRecord {
            webhook_id: "msg_1".into(),
            event_type: EventType::Completed,
            call_id: "call_1".into(),
            attempt: 2,
            at: t(0),
            status_code: Some(503),
            error: None,
            duration_ms: 120,
            outcome: DeliveryOutcome::DeadLettered,
        };
        let json = serde_json::to_value(&record).expect("serializes");
        assert_eq!(json["outcome"], "dead_lettered");
        assert_eq!(json["event_type"], "call.completed");
        assert!(json.get("error").is_none());
        assert_eq!(
            serde_json::from_value::<DeliveryRecord>(json).expect("back"),
            record
        );
        assert_eq!(call_subscription_id("call_1"), "call:call_1");
    }
}
