//! The call: identity, lifecycle and the forward-only status rule.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::inbound::InboundLeg;
use super::phone::E164;
use super::routing::RoutingRecord;
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
    /// Inbound: no profile could take the call.
    Unrouted,
}

impl CallStatus {
    pub const ALL: [CallStatus; 12] = [
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
        CallStatus::Unrouted,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CallStatus::Completed
                | CallStatus::Failed
                | CallStatus::Busy
                | CallStatus::NoAnswer
                | CallStatus::Canceled
                | CallStatus::Unrouted
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
            CallStatus::Unrouted => "unrouted",
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
    /// Set before CreateDispatch is sent; kept when its answer was lost, so the next try
    /// looks for the dispatch (ListDispatch) long enough before creating another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_started_at: Option<DateTime<Utc>>,
    /// Set before CreateSIPParticipant is sent: from then on a repeat must reconcile first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dial_started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant_sid: Option<String>,
    /// The room instance this attempt dialed into, so a late `room_finished` of an earlier
    /// instance of the same room name cannot end this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_sid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    /// Deterministic participant identity, so a repeat can find the first dial.
    pub participant_identity: String,
    #[serde(default)]
    pub steps: AttemptSteps,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_call_id: Option<String>,
    pub started_at: DateTime<Utc>,
    /// The callee picked up (known from `wait_until_answered`, or from `sip.callStatus`
    /// `active`/`hangup` in a webhook even when the exact moment is unknown).
    #[serde(default)]
    pub answered: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_at: Option<DateTime<Utc>>,
    /// When a webhook reported the participant gone (evidence for reconciling a dial
    /// whose own result was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
}

impl Attempt {
    /// The dial request may have reached LiveKit (it was sent, or its result is recorded).
    pub fn dial_started(&self) -> bool {
        self.steps.dial_started_at.is_some() || self.steps.participant_sid.is_some()
    }

    pub fn is_over(&self) -> bool {
        self.ended_at.is_some()
    }
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
    /// Validated E.164, stored as a type (a record can only hold a valid number).
    pub to: E164,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<E164>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk_id: Option<String>,
    /// The agent to dispatch; `None` means the worker's configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
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
    /// When a deferred call is due (not_before, call window or retry delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<DateTime<Utc>>,
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
    /// Inbound calls: the caller's leg as LiveKit reported it, and the agent dispatches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundLeg>,
    /// Inbound calls: which profile took the call, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingRecord>,
    /// Where this call's events are posted (signed with the fleet's default secret), as
    /// well as to the subscriptions that want them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Hang-up and transfer commands, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<super::control::Command>,
}

/// Generates a call id: time-ordered (UUIDv7) so ids sort by creation.
pub fn new_call_id() -> String {
    format!("call_{}", uuid::Uuid::now_v7().simple())
}

/// The room of a call: one room per call, derived from its id.
pub fn room_for_call(call_id: &str) -> String {
    format!("cf-{}", call_id.trim_start_matches("call_"))
}

/// The call a room belongs to (rooms are named after their call); `None` for rooms the
/// fleet did not name.
pub fn call_for_room(room: &str) -> Option<String> {
    room.strip_prefix("cf-").map(|rest| format!("call_{rest}"))
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
            answered: false,
            answered_at: None,
            joined_at: None,
            left_at: None,
            ended_at: None,
        });
        self.scheduled_for = None;
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

/// How a dial attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    /// The callee answered and the call has now ended.
    Completed,
    /// The dial did not connect; the SIP outcome says why.
    Unanswered(SipOutcome),
    /// The attempt could not be made (permanent API error, unknown state after a crash).
    Error(String),
}

/// What a call-job delivery should do, decided from the call record alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobTriage {
    /// Nothing: the call is final, or the job is for an attempt already past.
    Stale,
    /// The job's attempt is settled; make sure its successor's job exists.
    EnsureNext,
    /// A job that cannot belong to this call (an attempt number from nowhere).
    Corrupt(String),
    /// Not due yet: come back at this time.
    Wait(DateTime<Utc>),
    /// Run the attempt: `resuming` an attempt that has begun (its journal says how far),
    /// whose dial may already be out (`dial_started`).
    Run { resuming: bool, dial_started: bool },
}

impl Call {
    /// Decides what a job for attempt `attempt` does with this call at `now`: the call-job
    /// worker's first step, pure so every case is unit-tested.
    pub fn triage_job(&self, attempt: u32, now: DateTime<Utc>) -> JobTriage {
        if self.status.is_terminal() {
            return JobTriage::Stale;
        }
        let existing = self.attempts.len() as u32;
        if attempt < existing {
            return JobTriage::Stale;
        }
        if attempt > existing + 1 {
            return JobTriage::Corrupt(format!(
                "job for attempt {attempt} but the call has {existing} attempt(s)"
            ));
        }
        let resuming = attempt == existing;
        let current = self.current_attempt();
        if resuming && current.is_some_and(Attempt::is_over) {
            return JobTriage::EnsureNext;
        }
        if !resuming && current.is_some_and(|a| !a.is_over()) {
            // A job for the next attempt while the current one is live: a stray duplicate.
            return JobTriage::Stale;
        }
        let dial_started = resuming && current.is_some_and(Attempt::dial_started);
        if !dial_started {
            if let Some(due) = self.deferred_until(now) {
                return JobTriage::Wait(due);
            }
        }
        JobTriage::Run {
            resuming,
            dial_started,
        }
    }
}

/// How an attempt ended, as the API and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Completed,
    Busy,
    NoAnswer,
    Unavailable,
    Declined,
    NotFound,
    Forbidden,
    Failed,
    /// The attempt could not be made, or its result cannot be known.
    Error,
}

impl AttemptOutcome {
    pub fn of(end: &AttemptEnd) -> Self {
        match end {
            AttemptEnd::Completed => AttemptOutcome::Completed,
            AttemptEnd::Unanswered(o) => match o {
                SipOutcome::Busy => AttemptOutcome::Busy,
                SipOutcome::NoAnswer => AttemptOutcome::NoAnswer,
                SipOutcome::Unavailable => AttemptOutcome::Unavailable,
                SipOutcome::Declined => AttemptOutcome::Declined,
                SipOutcome::NotFound => AttemptOutcome::NotFound,
                SipOutcome::Forbidden => AttemptOutcome::Forbidden,
                SipOutcome::Failed => AttemptOutcome::Failed,
            },
            AttemptEnd::Error(_) => AttemptOutcome::Error,
        }
    }

    /// A bounded metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Busy => "busy",
            AttemptOutcome::NoAnswer => "no_answer",
            AttemptOutcome::Unavailable => "unavailable",
            AttemptOutcome::Declined => "declined",
            AttemptOutcome::NotFound => "not_found",
            AttemptOutcome::Forbidden => "forbidden",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Error => "error",
        }
    }
}

/// What the details of an ended attempt were.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndDetails {
    pub sip_status_code: Option<u16>,
    pub disconnect_reason: Option<String>,
    pub reason: Option<String>,
}

/// What follows an ended attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Dial again (attempt `attempt`) at `at`.
    Retry { attempt: u32, at: DateTime<Utc> },
    /// The call is over with this status.
    Final(CallStatus),
}

/// Why a call cannot be canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("the call has already been dialed")]
    AlreadyDialed,
    #[error("the call has already ended")]
    AlreadyEnded,
}

impl Call {
    /// The earliest instant at or after `earliest` when this call may be dialed: after
    /// `not_before` and inside the call window. An invalid window (impossible after
    /// validation) is treated as always open rather than blocking the call forever.
    pub fn next_dial_time(&self, earliest: DateTime<Utc>) -> DateTime<Utc> {
        let mut at = earliest;
        if let Some(nb) = self.not_before {
            at = at.max(nb);
        }
        if let Some(window) = self.call_window.as_ref().and_then(|w| w.parse().ok()) {
            at = window.next_open(at);
        }
        at
    }

    /// `Some(due)` when the call must not be dialed yet at `now`.
    pub fn deferred_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let earliest = self.scheduled_for.map_or(now, |s| s.max(now));
        let due = self.next_dial_time(earliest);
        (due > now).then_some(due)
    }

    /// Whether the call may still be canceled: nothing is ringing and nothing ended it.
    pub fn cancelable(&self) -> Result<(), CancelRefused> {
        if self.status.is_terminal() {
            return Err(CancelRefused::AlreadyEnded);
        }
        match self.current_attempt() {
            Some(a) if a.dial_started() && !a.is_over() => Err(CancelRefused::AlreadyDialed),
            _ => Ok(()),
        }
    }

    /// Cancels the call if [`Call::cancelable`].
    pub fn cancel(&mut self, at: DateTime<Utc>) -> Result<(), CancelRefused> {
        self.cancelable()?;
        self.end_reason = Some("canceled".into());
        self.advance(CallStatus::Canceled, at);
        Ok(())
    }

    /// The current attempt's callee left, or its room closed. An answered attempt
    /// completes; an unanswered one ends as `unanswered`, unless a dial request waiting for
    /// the answer is still out (no participant recorded yet): that request brings the exact
    /// SIP outcome, so the leave is only kept as evidence for it (`None`).
    pub fn callee_gone(
        &mut self,
        unanswered: SipOutcome,
        details: EndDetails,
        at: DateTime<Utc>,
    ) -> Option<AfterAttempt> {
        let waiting_dial = self.wait_until_answered;
        let attempt = self.attempts.last_mut()?;
        if attempt.is_over() {
            return None;
        }
        attempt.left_at.get_or_insert(at);
        if details.disconnect_reason.is_some() {
            attempt.disconnect_reason = details.disconnect_reason.clone();
        }
        let end = if attempt.answered {
            AttemptEnd::Completed
        } else if !waiting_dial || attempt.steps.participant_sid.is_some() {
            AttemptEnd::Unanswered(unanswered)
        } else {
            return None;
        };
        self.end_attempt(end, details, at)
    }

    /// Records how the current attempt ended and decides what follows: another attempt
    /// (per the retry policy and call window) or a final status. `None` when the attempt
    /// had already ended (a repeated or late report changes nothing).
    pub fn end_attempt(
        &mut self,
        end: AttemptEnd,
        details: EndDetails,
        at: DateTime<Utc>,
    ) -> Option<AfterAttempt> {
        if self.status.is_terminal() {
            return None;
        }
        let attempt = self.attempts.last_mut()?;
        if attempt.is_over() {
            return None;
        }
        attempt.ended_at = Some(at);
        attempt.sip_status_code = details.sip_status_code.or(attempt.sip_status_code);
        if details.disconnect_reason.is_some() {
            attempt.disconnect_reason = details.disconnect_reason.clone();
        }
        let number = attempt.number;
        let answered_from = attempt.answered_at.or(attempt.joined_at);
        let outcome = AttemptOutcome::of(&end);
        attempt.outcome = Some(outcome);
        let detail = details
            .reason
            .clone()
            .or_else(|| details.disconnect_reason.clone())
            .or_else(|| details.sip_status_code.map(|c| format!("SIP {c}")));
        self.note(at, format!("attempt_{}", outcome.as_str()), detail);
        let after = match end {
            AttemptEnd::Completed => {
                self.duration_s =
                    answered_from.map(|from| (at - from).num_milliseconds().max(0) as f64 / 1e3);
                self.end_reason = details.disconnect_reason.or(details.reason);
                AfterAttempt::Final(CallStatus::Completed)
            }
            // Hung up by an operator before the callee answered: nothing to retry.
            AttemptEnd::Unanswered(_) if self.hangup_requested() => {
                self.end_reason = Some("hung_up".to_owned());
                AfterAttempt::Final(CallStatus::Canceled)
            }
            AttemptEnd::Unanswered(outcome) if self.should_retry(outcome) => {
                let earliest = at + chrono::Duration::seconds(self.retry.retry_delay_s as i64);
                let due = self.next_dial_time(earliest);
                self.status = CallStatus::Scheduled;
                self.scheduled_for = Some(due);
                self.note(
                    at,
                    "retry_scheduled",
                    Some(format!("attempt {} at {}", number + 1, due.to_rfc3339())),
                );
                return Some(AfterAttempt::Retry {
                    attempt: number + 1,
                    at: due,
                });
            }
            AttemptEnd::Unanswered(outcome) => {
                self.end_reason = Some(outcome.as_str().to_owned());
                AfterAttempt::Final(CallStatus::from_outcome(outcome))
            }
            AttemptEnd::Error(reason) => {
                self.end_reason = Some(reason);
                AfterAttempt::Final(CallStatus::Failed)
            }
        };
        if let AfterAttempt::Final(status) = after {
            self.advance(status, at);
        }
        Some(after)
    }
}

/// Why a call never reached a worker: the broker refused its job and the client was told
/// to retry (503).
pub const NOT_ENQUEUED: &str = "not_enqueued";

impl Call {
    /// Puts a call that has not started dialing on hold until `due` (its `not_before`, call
    /// window or retry time); false if it is past that point or already waits for `due`.
    pub fn schedule(&mut self, due: DateTime<Utc>, at: DateTime<Utc>) -> bool {
        if self.status.rank(self.direction) > CallStatus::Scheduled.rank(self.direction)
            || self.scheduled_for == Some(due)
        {
            return false;
        }
        self.status = CallStatus::Scheduled;
        self.scheduled_for = Some(due);
        self.note(at, "scheduled", Some(due.to_rfc3339()));
        true
    }

    /// Gives the call another id (and so its room): a retried submission adopts the id
    /// its idempotency key already claimed.
    pub fn assign_id(&mut self, id: &str) {
        self.id = id.to_owned();
        self.room_name = room_for_call(id);
    }

    /// No worker has touched the call yet, so its first job may never have been published
    /// (a submission whose publish failed, or whose ingress died before publishing).
    pub fn awaits_first_job(&self) -> bool {
        self.status == CallStatus::Queued && self.attempts.is_empty()
    }

    /// Marks a call whose job could not be enqueued as failed (`not_enqueued`), unless a
    /// worker already took it (a publish whose confirm was lost may still have arrived).
    pub fn abandon_unenqueued(&mut self, at: DateTime<Utc>) -> bool {
        if !self.awaits_first_job() {
            return false;
        }
        self.end_reason = Some(NOT_ENQUEUED.into());
        self.advance(CallStatus::Failed, at)
    }

    /// Brings back a call abandoned as `not_enqueued` when its client retries the same
    /// submission: it is queued again, as if the first publish had worked.
    pub fn revive_unenqueued(&mut self, at: DateTime<Utc>) -> bool {
        if self.status != CallStatus::Failed
            || self.end_reason.as_deref() != Some(NOT_ENQUEUED)
            || !self.attempts.is_empty()
        {
            return false;
        }
        self.status = CallStatus::Queued;
        self.end_reason = None;
        self.ended_at = None;
        self.note(at, "resubmitted", None);
        true
    }
}

/// What the sweeper does about a call that has been quiet for too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stuck {
    /// The job of this attempt may never have been published (the worker died between
    /// recording the previous attempt's end and queueing the retry; a first job lost):
    /// publish it again. A duplicate job is harmless.
    QueueAttempt(u32),
    /// This attempt stopped before its dial was settled (a worker died mid-step): publish
    /// its job again; the job resumes from the journal and reconciles with LiveKit.
    ResumeAttempt(u32),
    /// This attempt's participant joined and no end was heard: ask LiveKit whether it is
    /// still there.
    CheckLive(u32),
    /// An inbound call that has been quiet: its job resumes an interrupted dispatch or
    /// hang-up, and asks LiveKit whether a caller no event said goodbye for is still there.
    CheckInbound,
}

impl Stuck {
    pub fn as_str(self) -> &'static str {
        match self {
            Stuck::QueueAttempt(_) => "queue_attempt",
            Stuck::ResumeAttempt(_) => "resume_attempt",
            Stuck::CheckLive(_) => "check_live",
            Stuck::CheckInbound => "check_inbound",
        }
    }
}

impl Call {
    /// When this call is next due to move: its due time, or its last change. The sweeper
    /// looks at it once it has been quiet for a while past that. `None` once it is final
    /// An inbound call is looked at while it lasts: its job resumes an interrupted
    /// dispatch and asks LiveKit whether a caller no event said goodbye for is still there.
    pub fn look_at(&self) -> Option<DateTime<Utc>> {
        if self.status.is_terminal() {
            return None;
        }
        Some(
            self.scheduled_for
                .unwrap_or(self.updated_at)
                .max(self.updated_at),
        )
    }

    /// What is stuck about this call at `now`, if it has been quiet for `quiet` past its
    /// due time (a dial waiting for its answer gets its ringing time on top).
    pub fn stuck(&self, now: DateTime<Utc>, quiet: chrono::Duration) -> Option<Stuck> {
        let since = self.look_at()? + quiet;
        if self.direction == Direction::Inbound {
            return (now >= since).then_some(Stuck::CheckInbound);
        }
        let attempt = self.current_attempt();
        let ringing = match attempt {
            Some(a)
                if self.wait_until_answered
                    && a.dial_started()
                    && a.steps.participant_sid.is_none()
                    && !a.is_over() =>
            {
                chrono::Duration::seconds(i64::from(self.ringing_timeout_s.unwrap_or(30)))
            }
            _ => chrono::Duration::zero(),
        };
        if now < since + ringing {
            return None;
        }
        Some(match attempt {
            None => Stuck::QueueAttempt(1),
            Some(a) if a.is_over() => Stuck::QueueAttempt(a.number + 1),
            Some(a) if a.steps.participant_sid.is_some() => Stuck::CheckLive(a.number),
            Some(a) => Stuck::ResumeAttempt(a.number),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(direction: Direction) -> Call {
        let now = Utc::now();
        let id = new_call_id();
        Call {
            room_name: room_for_call(&id),
            id,
            direction,
            status: CallStatus::Queued,
            to: E164::parse("+15105550123", None).expect("valid"),
            from: None,
            trunk_id: None,
            agent_name: Some("agent".into()),
            context: Value::Null,
            tags: vec![],
            dispatch_id: None,
            idempotency_key: None,
            retry: RetryPolicy::default(),
            not_before: None,
            scheduled_for: None,
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
            inbound: None,
            routing: None,
            callback_url: None,
            commands: Vec::new(),
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

    fn dialed(call: &mut Call, at: DateTime<Utc>) {
        let attempt = call.begin_attempt(at);
        attempt.steps.dial_started_at = Some(at);
        call.advance(CallStatus::Dialing, at);
    }

    #[test]
    fn busy_is_retried_inside_the_window_then_final() {
        let mut call = sample(Direction::Outbound);
        call.retry.max_attempts = 2;
        call.retry.retry_delay_s = 60;
        call.call_window = Some(CallWindow {
            timezone: "UTC".into(),
            start: "09:00".into(),
            end: "17:00".into(),
            days: None,
        });
        let at: DateTime<Utc> = "2026-11-20T16:59:30Z".parse().expect("time");
        dialed(&mut call, at);
        let after = call.end_attempt(
            AttemptEnd::Unanswered(SipOutcome::Busy),
            EndDetails {
                sip_status_code: Some(486),
                ..Default::default()
            },
            at,
        );
        let next_morning: DateTime<Utc> = "2026-11-21T09:00:00Z".parse().expect("time");
        assert_eq!(
            after,
            Some(AfterAttempt::Retry {
                attempt: 2,
                at: next_morning
            })
        );
        assert_eq!(call.status, CallStatus::Scheduled);
        assert_eq!(call.deferred_until(at), Some(next_morning));
        assert!(
            call.cancelable().is_ok(),
            "a scheduled retry can be canceled"
        );
        // A repeated report of the same end changes nothing.
        assert_eq!(
            call.end_attempt(AttemptEnd::Completed, EndDetails::default(), at),
            None
        );
        dialed(&mut call, next_morning);
        assert_eq!(call.cancelable(), Err(CancelRefused::AlreadyDialed));
        let after = call.end_attempt(
            AttemptEnd::Unanswered(SipOutcome::Busy),
            EndDetails::default(),
            next_morning,
        );
        assert_eq!(after, Some(AfterAttempt::Final(CallStatus::Busy)));
        assert_eq!(call.cancelable(), Err(CancelRefused::AlreadyEnded));
    }

    #[test]
    fn completed_calls_carry_their_duration() {
        let mut call = sample(Direction::Outbound);
        let t0: DateTime<Utc> = "2026-11-20T12:00:00Z".parse().expect("time");
        dialed(&mut call, t0);
        if let Some(a) = call.current_attempt_mut() {
            a.answered_at = Some(t0 + chrono::Duration::seconds(5));
        }
        let after = call.end_attempt(
            AttemptEnd::Completed,
            EndDetails {
                disconnect_reason: Some("CLIENT_INITIATED".into()),
                ..Default::default()
            },
            t0 + chrono::Duration::milliseconds(65_500),
        );
        assert_eq!(after, Some(AfterAttempt::Final(CallStatus::Completed)));
        assert_eq!(call.duration_s, Some(60.5));
        assert_eq!(call.end_reason.as_deref(), Some("CLIENT_INITIATED"));
    }

    #[test]
    fn declined_is_final_even_with_attempts_left() {
        let mut call = sample(Direction::Outbound);
        call.retry.max_attempts = 5;
        let now = Utc::now();
        dialed(&mut call, now);
        let after = call.end_attempt(
            AttemptEnd::Unanswered(SipOutcome::Declined),
            EndDetails::default(),
            now,
        );
        assert_eq!(after, Some(AfterAttempt::Final(CallStatus::Failed)));
        assert_eq!(call.end_reason.as_deref(), Some("declined"));
    }

    #[test]
    fn not_before_defers_and_cancel_before_dial_works() {
        let mut call = sample(Direction::Outbound);
        let now = Utc::now();
        call.not_before = Some(now + chrono::Duration::seconds(30));
        assert_eq!(call.deferred_until(now), call.not_before);
        assert_eq!(
            call.deferred_until(now + chrono::Duration::seconds(31)),
            None
        );
        assert!(call.cancel(now).is_ok());
        assert_eq!(call.status, CallStatus::Canceled);
    }

    #[test]
    fn a_leave_waits_for_the_exact_outcome_of_a_waiting_dial() {
        let now = Utc::now();
        let mut call = sample(Direction::Outbound);
        call.wait_until_answered = true;
        dialed(&mut call, now);
        // The dial request is still out: the leave is evidence only.
        assert_eq!(
            call.callee_gone(SipOutcome::Busy, EndDetails::default(), now),
            None
        );
        assert!(call
            .current_attempt()
            .is_some_and(|a| a.left_at.is_some() && !a.is_over()));
        // Once the dial's participant is recorded, a leave decides.
        if let Some(a) = call.current_attempt_mut() {
            a.steps.participant_sid = Some("PA_1".into());
        }
        assert_eq!(
            call.callee_gone(SipOutcome::Busy, EndDetails::default(), now),
            Some(AfterAttempt::Final(CallStatus::Busy))
        );
        let mut answered = sample(Direction::Outbound);
        dialed(&mut answered, now);
        if let Some(a) = answered.current_attempt_mut() {
            a.answered = true;
        }
        assert_eq!(
            answered.callee_gone(SipOutcome::Failed, EndDetails::default(), now),
            Some(AfterAttempt::Final(CallStatus::Completed))
        );
    }

    #[test]
    fn an_unenqueued_call_is_abandoned_then_revived_but_never_a_started_one() {
        let at = Utc::now();
        let mut call = sample(Direction::Outbound);
        assert!(call.awaits_first_job());
        assert!(call.abandon_unenqueued(at));
        assert_eq!(call.status, CallStatus::Failed);
        assert_eq!(call.end_reason.as_deref(), Some(NOT_ENQUEUED));
        assert!(call.revive_unenqueued(at));
        assert_eq!(call.status, CallStatus::Queued);
        assert!(call.ended_at.is_none() && call.end_reason.is_none());
        // A worker took it: the late "could not enqueue" must not fail a live call.
        call.begin_attempt(at);
        assert!(!call.abandon_unenqueued(at));
        assert!(!call.revive_unenqueued(at));
        call.assign_id("call_abc");
        assert_eq!(call.room_name, room_for_call("call_abc"));
    }

    #[test]
    fn a_quiet_call_is_stuck_in_the_step_it_stopped_at() {
        let quiet = chrono::Duration::seconds(120);
        let t0 = Utc::now();
        let later = t0 + chrono::Duration::seconds(121);
        let mut call = sample(Direction::Outbound);
        call.updated_at = t0;
        assert_eq!(call.stuck(t0, quiet), None, "not quiet long enough");
        assert_eq!(call.stuck(later, quiet), Some(Stuck::QueueAttempt(1)));
        call.begin_attempt(t0);
        assert_eq!(call.stuck(later, quiet), Some(Stuck::ResumeAttempt(1)));
        if let Some(a) = call.current_attempt_mut() {
            a.steps.participant_sid = Some("PA_1".into());
        }
        assert_eq!(call.stuck(later, quiet), Some(Stuck::CheckLive(1)));
        // A retry due later is not stuck before its time.
        if let Some(a) = call.current_attempt_mut() {
            a.ended_at = Some(t0);
        }
        call.status = CallStatus::Scheduled;
        call.scheduled_for = Some(t0 + chrono::Duration::seconds(600));
        assert_eq!(call.stuck(later, quiet), None);
        let past_due = t0 + chrono::Duration::seconds(721);
        assert_eq!(call.stuck(past_due, quiet), Some(Stuck::QueueAttempt(2)));
        call.advance(CallStatus::Failed, past_due);
        assert_eq!(
            call.stuck(past_due, quiet),
            None,
            "final calls are never stuck"
        );
        assert_eq!(call.look_at(), None);
    }

    #[test]
    fn a_job_is_triaged_from_the_call_record_alone() {
        let now = Utc::now();
        let mut call = sample(Direction::Outbound);
        assert_eq!(
            call.triage_job(1, now),
            JobTriage::Run {
                resuming: false,
                dial_started: false
            }
        );
        assert!(matches!(call.triage_job(3, now), JobTriage::Corrupt(_)));
        call.not_before = Some(now + chrono::Duration::minutes(5));
        assert_eq!(
            call.triage_job(1, now),
            JobTriage::Wait(now + chrono::Duration::minutes(5))
        );
        call.not_before = None;
        call.begin_attempt(now);
        assert_eq!(
            call.triage_job(1, now),
            JobTriage::Run {
                resuming: true,
                dial_started: false
            }
        );
        assert_eq!(
            call.triage_job(2, now),
            JobTriage::Stale,
            "the next attempt's job while this one is live"
        );
        if let Some(a) = call.current_attempt_mut() {
            a.steps.dial_started_at = Some(now);
        }
        // A dial that may be out is settled even outside the call window.
        call.not_before = Some(now + chrono::Duration::minutes(5));
        assert_eq!(
            call.triage_job(1, now),
            JobTriage::Run {
                resuming: true,
                dial_started: true
            }
        );
        if let Some(a) = call.current_attempt_mut() {
            a.ended_at = Some(now);
        }
        assert_eq!(call.triage_job(1, now), JobTriage::EnsureNext);
        call.advance(CallStatus::Failed, now);
        assert_eq!(call.triage_job(1, now), JobTriage::Stale);
    }
}
