//! The call: identity, lifecycle and the forward-only status rule.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sip_outcome::SipOutcome;
use super::window::CallWindow;

/// How many timeline entries a call keeps (oldest dropped first).
pub const TIMELINE_LIMIT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    Queued,
    Scheduled,
    Dialing,
    SipParticipantJoined,
    AgentDispatched,
    InProgress,
    Completed,
    Failed,
    Busy,
    NoAnswer,
    Canceled,
}

impl CallStatus {
    pub const ALL: [CallStatus; 11] = [
        CallStatus::Queued,
        CallStatus::Scheduled,
        CallStatus::Dialing,
        CallStatus::SipParticipantJoined,
        CallStatus::AgentDispatched,
        CallStatus::InProgress,
        CallStatus::Completed,
        CallStatus::Failed,
        CallStatus::Busy,
        CallStatus::NoAnswer,
        CallStatus::Canceled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CallStatus::Completed
                | CallStatus::Failed
                | CallStatus::Busy
                | CallStatus::NoAnswer
                | CallStatus::Canceled
        )
    }

    /// Position in a direction's lifecycle; a status may only move to a higher rank.
    /// Outbound dispatches the agent before dialing; inbound sees the caller first.
    pub fn rank(self, direction: Direction) -> u8 {
        match (self, direction) {
            (CallStatus::Queued, _) => 0,
            (CallStatus::Scheduled, _) => 1,
            (CallStatus::AgentDispatched, Direction::Outbound) => 2,
            (CallStatus::Dialing, _) => 3,
            (CallStatus::SipParticipantJoined, _) => 4,
            (CallStatus::AgentDispatched, Direction::Inbound) => 5,
            (CallStatus::InProgress, _) => 6,
            _ => 10,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Queued => "queued",
            CallStatus::Scheduled => "scheduled",
            CallStatus::Dialing => "dialing",
            CallStatus::SipParticipantJoined => "sip_participant_joined",
            CallStatus::AgentDispatched => "agent_dispatched",
            CallStatus::InProgress => "in_progress",
            CallStatus::Completed => "completed",
            CallStatus::Failed => "failed",
            CallStatus::Busy => "busy",
            CallStatus::NoAnswer => "no_answer",
            CallStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The final status of a call whose last attempt ended with `outcome`.
    pub fn from_outcome(outcome: SipOutcome) -> Self {
        match outcome {
            SipOutcome::Busy => CallStatus::Busy,
            SipOutcome::NoAnswer | SipOutcome::Unavailable => CallStatus::NoAnswer,
            _ => CallStatus::Failed,
        }
    }
}

/// The retry policy a scheduler chose for its call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub retry_on: Vec<SipOutcome>,
    pub retry_delay_s: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            retry_on: vec![
                SipOutcome::Busy,
                SipOutcome::NoAnswer,
                SipOutcome::Unavailable,
            ],
            retry_delay_s: 300,
        }
    }
}

/// The durable step journal of one dial attempt: a redelivered job resumes at the first
/// step not recorded here, after reconciling with LiveKit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptSteps {
    pub room_created: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_id: Option<String>,
    /// Set before CreateSIPParticipant is sent: from then on a repeat must reconcile first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dial_started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant_sid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    /// Deterministic participant identity, so a repeat can find the first dial.
    pub participant_identity: String,
    #[serde(default)]
    pub steps: AttemptSteps,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_call_id: Option<String>,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at: DateTime<Utc>,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub id: String,
    pub direction: Direction,
    pub status: CallStatus,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk_id: Option<String>,
    pub agent_name: String,
    #[serde(default)]
    pub context: Value,
    #[serde(default)]
    pub tags: Vec<String>,
    pub room_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub retry: RetryPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_window: Option<CallWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ringing_timeout_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u32>,
    #[serde(default)]
    pub wait_until_answered: bool,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
}

/// Generates a call id: time-ordered (UUIDv7) so ids sort by creation.
pub fn new_call_id() -> String {
    format!("call_{}", uuid::Uuid::now_v7().simple())
}

/// The room of a call: one room per call, derived from its id.
pub fn room_for_call(call_id: &str) -> String {
    format!("cf-{}", call_id.trim_start_matches("call_"))
}

/// Deterministic SIP participant identity for attempt `n` of a call.
pub fn participant_identity(call_id: &str, attempt: u32) -> String {
    format!("sip-{}-a{attempt}", call_id.trim_start_matches("call_"))
}

/// Recovers (call id, attempt) from a participant identity made by [`participant_identity`].
pub fn parse_participant_identity(identity: &str) -> Option<(String, u32)> {
    let rest = identity.strip_prefix("sip-")?;
    let (id, attempt) = rest.rsplit_once("-a")?;
    Some((format!("call_{id}"), attempt.parse().ok()?))
}

impl Call {
    /// Appends to the bounded timeline.
    pub fn note(&mut self, at: DateTime<Utc>, event: impl Into<String>, detail: Option<String>) {
        self.timeline.push(TimelineEntry {
            at,
            event: event.into(),
            detail,
        });
        if self.timeline.len() > TIMELINE_LIMIT {
            let excess = self.timeline.len() - TIMELINE_LIMIT;
            self.timeline.drain(..excess);
        }
        self.updated_at = at;
    }

    /// Moves the call to `next` if that is forward; returns whether it moved. Terminal
    /// statuses never change; a lower rank is a late or out-of-order event and is ignored.
    pub fn advance(&mut self, next: CallStatus, at: DateTime<Utc>) -> bool {
        if self.status.is_terminal() || self.status == next {
            return false;
        }
        if !next.is_terminal() && next.rank(self.direction) < self.status.rank(self.direction) {
            return false;
        }
        self.status = next;
        self.note(at, next.as_str(), None);
        if next.is_terminal() {
            self.ended_at.get_or_insert(at);
        }
        true
    }

    /// Starts a new dial attempt (a retry may move a call from its previous attempt's
    /// progress back to dialing, which is forward for the new attempt).
    pub fn begin_attempt(&mut self, at: DateTime<Utc>) -> &mut Attempt {
        let number = self.attempts.len() as u32 + 1;
        self.attempts.push(Attempt {
            number,
            participant_identity: participant_identity(&self.id, number),
            steps: AttemptSteps::default(),
            outcome: None,
            sip_status_code: None,
            disconnect_reason: None,
            sip_call_id: None,
            started_at: at,
            answered_at: None,
            ended_at: None,
        });
        self.status = CallStatus::Queued;
        self.note(at, "attempt_started", Some(format!("attempt {number}")));
        let last = self.attempts.len() - 1;
        &mut self.attempts[last]
    }

    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    pub fn current_attempt_mut(&mut self) -> Option<&mut Attempt> {
        self.attempts.last_mut()
    }

    /// Whether another attempt is allowed after `outcome`.
    pub fn should_retry(&self, outcome: SipOutcome) -> bool {
        (self.attempts.len() as u32) < self.retry.max_attempts
            && self.retry.retry_on.contains(&outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(direction: Direction) -> Call {
        let now = Utc::now();
        let id = new_call_id();
        Call {
            room_name: room_for_call(&id),
            id,
            direction,
            status: CallStatus::Queued,
            to: "+15105550123".into(),
            from: None,
            trunk_id: None,
            agent_name: "agent".into(),
            context: Value::Null,
            tags: vec![],
            dispatch_id: None,
            idempotency_key: None,
            retry: RetryPolicy::default(),
            not_before: None,
            call_window: None,
            ringing_timeout_s: None,
            max_duration_s: None,
            wait_until_answered: false,
            attempts: vec![],
            created_at: now,
            updated_at: now,
            ended_at: None,
            duration_s: None,
            end_reason: None,
            timeline: vec![],
        }
    }

    #[test]
    fn statuses_only_move_forward() {
        let mut call = sample(Direction::Outbound);
        let now = Utc::now();
        assert!(call.advance(CallStatus::AgentDispatched, now));
        assert!(call.advance(CallStatus::Dialing, now));
        assert!(
            !call.advance(CallStatus::AgentDispatched, now),
            "late event regressed"
        );
        assert!(call.advance(CallStatus::InProgress, now));
        assert!(call.advance(CallStatus::Completed, now));
        assert!(
            !call.advance(CallStatus::InProgress, now),
            "ended call revived"
        );
        assert!(
            !call.advance(CallStatus::Failed, now),
            "terminal status replaced"
        );
        assert!(call.ended_at.is_some());
    }

    #[test]
    fn inbound_dispatch_follows_the_caller() {
        let mut call = sample(Direction::Inbound);
        let now = Utc::now();
        assert!(call.advance(CallStatus::SipParticipantJoined, now));
        assert!(call.advance(CallStatus::AgentDispatched, now));
        assert!(!call.advance(CallStatus::SipParticipantJoined, now));
    }

    #[test]
    fn identities_round_trip_and_timeline_is_bounded() {
        let mut call = sample(Direction::Outbound);
        let identity = participant_identity(&call.id, 3);
        assert_eq!(
            parse_participant_identity(&identity),
            Some((call.id.clone(), 3))
        );
        assert_eq!(parse_participant_identity("sip_+15105550123"), None);
        for i in 0..200 {
            call.note(Utc::now(), format!("e{i}"), None);
        }
        assert_eq!(call.timeline.len(), TIMELINE_LIMIT);
        assert_eq!(call.timeline.last().map(|e| e.event.as_str()), Some("e199"));
    }

    #[test]
    fn retry_policy_is_bounded() {
        let mut call = sample(Direction::Outbound);
        call.retry.max_attempts = 2;
        call.begin_attempt(Utc::now());
        assert!(call.should_retry(SipOutcome::Busy));
        assert!(!call.should_retry(SipOutcome::Declined));
        call.begin_attempt(Utc::now());
        assert!(!call.should_retry(SipOutcome::Busy));
        assert_eq!(
            CallStatus::from_outcome(SipOutcome::Unavailable),
            CallStatus::NoAnswer
        );
    }
}
