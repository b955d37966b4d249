//! LiveKit webhooks: verification exactly as LiveKit signs them (livekit-facts.md §1) and a
//! tolerant reading of the event (§2): unknown fields and enum values never reject an event,
//! because a newer LiveKit must not make the fleet drop its events.

use std::collections::BTreeMap;

use base64::Engine;
use livekit_api::access_token::{Claims, TokenVerifier};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::sip_outcome::SipOutcome;

/// Why a webhook request was refused (a bounded metrics label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WebhookRejection {
    #[error("missing Authorization header")]
    MissingAuth,
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token names an unknown API key")]
    UnknownKey,
    #[error("the token's signature, issuer or validity period is wrong")]
    InvalidToken,
    #[error("the body does not match the token's sha256 claim")]
    BodyMismatch,
}

impl WebhookRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookRejection::MissingAuth => "missing_auth",
            WebhookRejection::Malformed => "malformed_token",
            WebhookRejection::UnknownKey => "unknown_key",
            WebhookRejection::InvalidToken => "invalid_token",
            WebhookRejection::BodyMismatch => "body_mismatch",
        }
    }
}

/// Verifies a webhook: the raw JWT (a `Bearer ` prefix is accepted too), HS256 with the
/// secret of the key named by `iss` (several keys allow rotation), `exp`/`nbf` with the JWT
/// library's small leeway, and the `sha256` claim against the exact raw body in constant
/// time. Returns the API key that signed it.
pub fn verify_webhook(
    authorization: Option<&str>,
    body: &[u8],
    keys: &[(String, SecretString)],
) -> Result<String, WebhookRejection> {
    let header = authorization
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or(WebhookRejection::MissingAuth)?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or(header)
        .trim();
    let unverified = Claims::from_unverified(token).map_err(|_| WebhookRejection::Malformed)?;
    let (key, secret) = keys
        .iter()
        .find(|(k, _)| *k == unverified.iss)
        .ok_or(WebhookRejection::UnknownKey)?;
    let claims = TokenVerifier::with_api_key(key, secret.expose_secret())
        .verify(token)
        .map_err(|_| WebhookRejection::InvalidToken)?;
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
    if claims.sha256.is_empty() || !bool::from(claims.sha256.as_bytes().ct_eq(digest.as_bytes())) {
        return Err(WebhookRejection::BodyMismatch);
    }
    Ok(key.clone())
}

/// The room an event is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomRef {
    pub name: String,
    pub sid: String,
}

/// The participant an event is about (only what the fleet uses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParticipantRef {
    pub identity: String,
    pub sid: String,
    /// `SIP`, `AGENT`, ...; absent for STANDARD (protojson omits zero values).
    pub kind: Option<String>,
    pub attributes: BTreeMap<String, String>,
    /// Enum name; absent for UNKNOWN_REASON.
    pub disconnect_reason: Option<String>,
    pub joined_at_ms: Option<i64>,
}

impl ParticipantRef {
    /// A SIP participant: kind `SIP` (protojson) or `3` (the enum's number, which some
    /// encoders write), or `sip.*` attributes when the kind is missing.
    pub fn is_sip(&self) -> bool {
        matches!(self.kind.as_deref(), Some("SIP") | Some("3"))
            || self.attributes.keys().any(|k| k.starts_with("sip."))
    }

    /// An agent participant: kind `AGENT` or `4`.
    pub fn is_agent(&self) -> bool {
        matches!(self.kind.as_deref(), Some("AGENT") | Some("4"))
    }

    pub fn sip_call_status(&self) -> Option<&str> {
        self.attributes.get("sip.callStatus").map(String::as_str)
    }

    /// The callee answered at some point (`active`, or `hangup` which only follows an
    /// answered call; failed dials keep `dialing`/`ringing`).
    pub fn was_answered(&self) -> bool {
        matches!(
            self.sip_call_status(),
            Some("active") | Some("automation") | Some("hangup")
        )
    }
}

/// The kind of a LiveKit webhook event (livekit-facts.md §2); kinds this version does not
/// know are kept by name, never refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    RoomStarted,
    RoomFinished,
    ParticipantJoined,
    ParticipantLeft,
    ParticipantConnectionAborted,
    TrackPublished,
    TrackUnpublished,
    /// Any other event (egress, ingress, …), by its name.
    Other(String),
}

impl Default for EventKind {
    fn default() -> Self {
        EventKind::Other(String::new())
    }
}

impl EventKind {
    const NAMED: [(&'static str, EventKind); 7] = [
        ("room_started", EventKind::RoomStarted),
        ("room_finished", EventKind::RoomFinished),
        ("participant_joined", EventKind::ParticipantJoined),
        ("participant_left", EventKind::ParticipantLeft),
        (
            "participant_connection_aborted",
            EventKind::ParticipantConnectionAborted,
        ),
        ("track_published", EventKind::TrackPublished),
        ("track_unpublished", EventKind::TrackUnpublished),
    ];

    pub fn parse(name: &str) -> Self {
        Self::NAMED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, kind)| kind.clone())
            .unwrap_or_else(|| EventKind::Other(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            EventKind::Other(name) => name,
            known => Self::NAMED
                .iter()
                .find(|(_, kind)| kind == known)
                .map_or("", |(n, _)| n),
        }
    }

    /// The participant is gone from the room.
    pub fn is_departure(&self) -> bool {
        matches!(
            self,
            EventKind::ParticipantLeft | EventKind::ParticipantConnectionAborted
        )
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A webhook event, read tolerantly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookEvent {
    pub event: EventKind,
    pub id: Option<String>,
    pub created_at: Option<i64>,
    pub room: Option<RoomRef>,
    pub participant: Option<ParticipantRef>,
}

/// protojson writes int64 as strings; accept numbers too.
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl WebhookEvent {
    /// Reads an event body. Only a body that is not a JSON object, or has no `event`, is
    /// refused; everything else unknown is ignored.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let obj = value.as_object().ok_or("not a JSON object")?;
        let event = EventKind::parse(&text(obj.get("event")).ok_or("no event name")?);
        let room = obj.get("room").and_then(Value::as_object).map(|r| RoomRef {
            name: text(r.get("name")).unwrap_or_default(),
            sid: text(r.get("sid")).unwrap_or_default(),
        });
        let participant =
            obj.get("participant")
                .and_then(Value::as_object)
                .map(|p| ParticipantRef {
                    identity: text(p.get("identity")).unwrap_or_default(),
                    sid: text(p.get("sid")).unwrap_or_default(),
                    // protojson writes the enum's name; some encoders its number.
                    kind: text(p.get("kind"))
                        .or_else(|| p.get("kind").and_then(Value::as_i64).map(|n| n.to_string())),
                    attributes: p
                        .get("attributes")
                        .and_then(Value::as_object)
                        .map(|a| {
                            a.iter()
                                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                                .collect()
                        })
                        .unwrap_or_default(),
                    disconnect_reason: text(p.get("disconnectReason")),
                    joined_at_ms: int(p.get("joinedAtMs"))
                        .or_else(|| int(p.get("joinedAt")).map(|s| s * 1000)),
                });
        Ok(Self {
            event,
            id: text(obj.get("id")),
            created_at: int(obj.get("createdAt")),
            room,
            participant,
        })
    }

    /// The id to dedupe on: the event id, or a digest of the body when LiveKit sent none.
    pub fn dedupe_id(&self, body: &[u8]) -> String {
        self.id.clone().unwrap_or_else(|| {
            let digest = Sha256::digest(body);
            format!(
                "body-{}",
                digest
                    .iter()
                    .take(16)
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        })
    }
}

/// Best guess at an unanswered dial's outcome from the leave reason alone: LiveKit's
/// webhooks carry no SIP status (livekit-facts.md §2), so a call placed without
/// `wait_until_answered` learns only this much. USER_REJECTED covers busy as well as
/// decline; busy is by far the common case, so it is read as busy.
pub fn outcome_from_disconnect(reason: Option<&str>) -> SipOutcome {
    match reason {
        Some("USER_REJECTED") => SipOutcome::Busy,
        Some("USER_UNAVAILABLE") | Some("CONNECTION_TIMEOUT") => SipOutcome::NoAnswer,
        _ => SipOutcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_api::access_token::AccessToken;

    fn keys() -> Vec<(String, SecretString)> {
        vec![
            ("old".into(), SecretString::from("old-secret")),
            ("devkey".into(), SecretString::from("secret")),
        ]
    }

    fn sign(key: &str, secret: &str, body: &[u8]) -> String {
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
        AccessToken::with_api_key(key, secret)
            .with_sha256(&digest)
            .to_jwt()
            .expect("jwt")
    }

    #[test]
    fn verification_matrix() {
        let body = br#"{"event":"room_started","id":"EV_1"}"#;
        let jwt = sign("devkey", "secret", body);
        assert_eq!(
            verify_webhook(Some(&jwt), body, &keys()),
            Ok("devkey".into())
        );
        assert!(verify_webhook(Some(&format!("Bearer {jwt}")), body, &keys()).is_ok());
        assert_eq!(
            verify_webhook(Some(&sign("old", "old-secret", body)), body, &keys()),
            Ok("old".into()),
            "a rotated key still verifies"
        );
        assert_eq!(
            verify_webhook(None, body, &keys()),
            Err(WebhookRejection::MissingAuth)
        );
        assert_eq!(
            verify_webhook(Some("garbage"), body, &keys()),
            Err(WebhookRejection::Malformed)
        );
        assert_eq!(
            verify_webhook(Some(&sign("devkey", "wrong", body)), body, &keys()),
            Err(WebhookRejection::InvalidToken)
        );
        assert_eq!(
            verify_webhook(Some(&sign("stranger", "secret", body)), body, &keys()),
            Err(WebhookRejection::UnknownKey)
        );
        let mut tampered = body.to_vec();
        tampered[10] ^= 1;
        assert_eq!(
            verify_webhook(Some(&jwt), &tampered, &keys()),
            Err(WebhookRejection::BodyMismatch)
        );
    }

    #[test]
    fn unknown_enum_values_and_fields_are_tolerated() {
        let body = br#"{"event":"participant_left","id":"EV_2","createdAt":"1755878402",
            "room":{"name":"cf-1","sid":"RM_1","brandNew":{"x":1}},
            "participant":{"identity":"sip-1-a1","sid":"PA_1","kind":"HOLOGRAM",
              "state":"TELEPORTED","disconnectReason":"SOLAR_FLARE",
              "attributes":{"sip.callStatus":"hangup"},"joinedAtMs":"1755878400123"}}"#;
        let event = WebhookEvent::parse(body).expect("tolerant");
        assert_eq!(event.event, EventKind::ParticipantLeft);
        assert_eq!(event.event.as_str(), "participant_left");
        assert_eq!(
            EventKind::parse("egress_started"),
            EventKind::Other("egress_started".into())
        );
        assert_eq!(event.created_at, Some(1_755_878_402));
        let p = event.participant.expect("participant");
        assert_eq!(p.kind.as_deref(), Some("HOLOGRAM"));
        assert_eq!(p.disconnect_reason.as_deref(), Some("SOLAR_FLARE"));
        assert_eq!(p.joined_at_ms, Some(1_755_878_400_123));
        assert!(p.was_answered());
        assert!(WebhookEvent::parse(b"[1,2]").is_err());
        assert!(WebhookEvent::parse(b"{\"id\":\"EV\"}").is_err());
    }

    #[test]
    fn leave_reasons_map_to_outcomes() {
        assert_eq!(
            outcome_from_disconnect(Some("USER_REJECTED")),
            SipOutcome::Busy
        );
        assert_eq!(
            outcome_from_disconnect(Some("USER_UNAVAILABLE")),
            SipOutcome::NoAnswer
        );
        assert_eq!(outcome_from_disconnect(None), SipOutcome::Failed);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]
        /// Whatever arrives in a (verified) webhook body, reading it answers, never panics.
        #[test]
        fn any_webhook_body_is_read_or_refused(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            event in "\\PC{0,20}",
            identity in "\\PC{0,20}",
        ) {
            let _ = WebhookEvent::parse(&body);
            let shaped = serde_json::json!({
                "event": event, "id": identity, "createdAt": "x",
                "room": {"name": identity, "sid": 5},
                "participant": {"identity": identity, "attributes": {"sip.callStatus": event}, "joinedAt": "12"}
            });
            let _ = WebhookEvent::parse(shaped.to_string().as_bytes());
        }
    }
}
