//! Classification of LiveKit API failures (reference: livekit-facts.md §4-5). A busy callee
//! is a Twirp `resource_exhausted` (HTTP 429) *with* `sip_status_code`; the same code without
//! it is API back-pressure. Only the SIP status distinguishes the two.

use serde::{Deserialize, Serialize};

/// A failed LiveKit API call, reduced to what classification needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiFailure {
    /// Never sent: the connection could not be made (refused, unreachable, connect
    /// timeout). LiveKit cannot have acted on it.
    Transport,
    /// The connection broke after the request was sent (reset, EOF, a cut-off answer):
    /// LiveKit may have carried it out.
    Interrupted,
    /// No answer within the per-request timeout: LiveKit may still be carrying it out.
    Timeout,
    /// A Twirp error response.
    Twirp {
        code: String,
        msg: String,
        sip_status_code: Option<u16>,
        sip_status: Option<String>,
    },
    /// A response that could not be decoded (e.g. a plain-text 401).
    Protocol,
}

/// What the fleet should do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Transient; retry with backoff.
    Retryable,
    /// LiveKit is shedding load (429 without a SIP status): back off, then retry.
    BackPressure,
    /// The call was placed and the far end answered with this outcome.
    CallOutcome(SipOutcome),
    /// Will not succeed as asked.
    Permanent,
}

/// Outcome of a dial, as the call's final (or retryable) status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SipOutcome {
    Busy,
    NoAnswer,
    Unavailable,
    Declined,
    NotFound,
    Forbidden,
    /// Carrier or trunk failure (SIP 5xx and other codes).
    Failed,
}

impl SipOutcome {
    pub fn from_sip_status(code: u16) -> Self {
        match code {
            486 | 600 => SipOutcome::Busy,
            480 => SipOutcome::Unavailable,
            408 | 487 => SipOutcome::NoAnswer,
            603 => SipOutcome::Declined,
            404 | 604 => SipOutcome::NotFound,
            401 | 402 | 403 | 407 => SipOutcome::Forbidden,
            _ => SipOutcome::Failed,
        }
    }

    /// Outcomes a job's retry policy may retry by default.
    pub fn retryable_by_default(self) -> bool {
        matches!(
            self,
            SipOutcome::Busy | SipOutcome::NoAnswer | SipOutcome::Unavailable
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SipOutcome::Busy => "busy",
            SipOutcome::NoAnswer => "no_answer",
            SipOutcome::Unavailable => "unavailable",
            SipOutcome::Declined => "declined",
            SipOutcome::NotFound => "not_found",
            SipOutcome::Forbidden => "forbidden",
            SipOutcome::Failed => "failed",
        }
    }
}

impl ApiFailure {
    pub fn classify(&self) -> FailureKind {
        match self {
            ApiFailure::Transport | ApiFailure::Interrupted | ApiFailure::Timeout => {
                FailureKind::Retryable
            }
            ApiFailure::Protocol => FailureKind::Permanent,
            ApiFailure::Twirp {
                code,
                msg,
                sip_status_code,
                ..
            } => {
                if let Some(status) = sip_status_code {
                    return FailureKind::CallOutcome(SipOutcome::from_sip_status(*status));
                }
                match code.as_str() {
                    // LiveKit's own ringing timeout: `canceled` with no SIP status.
                    "canceled"
                        if msg.contains("timed out") || msg.contains("transaction failed") =>
                    {
                        FailureKind::CallOutcome(SipOutcome::NoAnswer)
                    }
                    "canceled" | "deadline_exceeded" | "unavailable" | "internal" | "unknown"
                    | "aborted" | "dataloss" => FailureKind::Retryable,
                    "resource_exhausted" => FailureKind::BackPressure,
                    _ => FailureKind::Permanent,
                }
            }
        }
    }

    /// LiveKit may have acted on the request although we got no answer: a request that is
    /// not idempotent must then be settled from evidence (GetParticipant, ListDispatch,
    /// webhooks), never sent again on the spot. Only "never sent" failures and LiveKit's
    /// own error answers say that nothing happened.
    pub fn maybe_processed(&self) -> bool {
        matches!(self, ApiFailure::Interrupted | ApiFailure::Timeout)
    }

    /// A short, bounded label for metrics (`transport`, `timeout`, the Twirp code, `protocol`).
    pub fn code_label(&self) -> &'static str {
        match self {
            ApiFailure::Transport => "transport",
            ApiFailure::Interrupted => "interrupted",
            ApiFailure::Timeout => "timeout",
            ApiFailure::Protocol => "protocol",
            ApiFailure::Twirp { code, .. } => twirp_code_label(code),
        }
    }
}

/// Maps a Twirp code string onto a fixed label set (unknown codes become `other`).
pub fn twirp_code_label(code: &str) -> &'static str {
    const CODES: [&str; 18] = [
        "canceled",
        "unknown",
        "invalid_argument",
        "malformed",
        "deadline_exceeded",
        "not_found",
        "bad_route",
        "already_exists",
        "permission_denied",
        "unauthenticated",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "dataloss",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twirp(code: &str, sip: Option<u16>) -> ApiFailure {
        ApiFailure::Twirp {
            code: code.into(),
            msg: String::new(),
            sip_status_code: sip,
            sip_status: None,
        }
    }

    #[test]
    fn classifies_as_the_issue_table_says() {
        assert_eq!(ApiFailure::Transport.classify(), FailureKind::Retryable);
        assert_eq!(ApiFailure::Interrupted.classify(), FailureKind::Retryable);
        assert_eq!(ApiFailure::Timeout.classify(), FailureKind::Retryable);
        for code in ["unavailable", "internal", "unknown"] {
            assert_eq!(
                twirp(code, None).classify(),
                FailureKind::Retryable,
                "{code}"
            );
        }
        assert_eq!(
            twirp("resource_exhausted", None).classify(),
            FailureKind::BackPressure
        );
        assert_eq!(
            twirp("resource_exhausted", Some(486)).classify(),
            FailureKind::CallOutcome(SipOutcome::Busy)
        );
        assert_eq!(
            twirp("resource_exhausted", Some(480)).classify(),
            FailureKind::CallOutcome(SipOutcome::Unavailable)
        );
        assert_eq!(
            twirp("deadline_exceeded", Some(408)).classify(),
            FailureKind::CallOutcome(SipOutcome::NoAnswer)
        );
        assert_eq!(
            twirp("permission_denied", Some(603)).classify(),
            FailureKind::CallOutcome(SipOutcome::Declined)
        );
        assert_eq!(
            twirp("not_found", Some(404)).classify(),
            FailureKind::CallOutcome(SipOutcome::NotFound)
        );
        assert_eq!(
            twirp("failed_precondition", Some(503)).classify(),
            FailureKind::CallOutcome(SipOutcome::Failed)
        );
        let ringing = ApiFailure::Twirp {
            code: "canceled".into(),
            msg: "twirp error unknown: sip request timed out".into(),
            sip_status_code: None,
            sip_status: None,
        };
        assert_eq!(
            ringing.classify(),
            FailureKind::CallOutcome(SipOutcome::NoAnswer)
        );
        for code in [
            "invalid_argument",
            "not_found",
            "permission_denied",
            "unauthenticated",
            "failed_precondition",
        ] {
            assert_eq!(
                twirp(code, None).classify(),
                FailureKind::Permanent,
                "{code}"
            );
        }
    }

    #[test]
    fn only_failures_after_sending_may_have_been_processed() {
        assert!(ApiFailure::Interrupted.maybe_processed());
        assert!(ApiFailure::Timeout.maybe_processed());
        assert!(!ApiFailure::Transport.maybe_processed());
        assert!(!twirp("unavailable", None).maybe_processed());
        assert!(!twirp("resource_exhausted", Some(486)).maybe_processed());
    }

    #[test]
    fn retry_defaults_and_labels() {
        assert!(SipOutcome::Busy.retryable_by_default());
        assert!(!SipOutcome::Declined.retryable_by_default());
        assert_eq!(twirp_code_label("bogus"), "other");
        assert_eq!(twirp("not_found", None).code_label(), "not_found");
    }
}
