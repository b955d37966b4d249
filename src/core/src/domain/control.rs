//! Call control: hang-up and transfer commands on a live call, journaled on the call so a
//! redelivered command resumes (or does nothing) instead of acting twice.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::call::{Call, Direction};
use super::events::entries;
use super::phone::E164;

/// Where a call is transferred: a phone number or a SIP URI, as LiveKit's REFER takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TransferTarget(String);

/// Why a transfer target was refused (the API's 422 message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTarget {
    #[error("must start with tel: (a phone number in E.164, e.g. tel:+15105550199) or sip:/sips: (e.g. sip:desk@pbx.example.com)")]
    Scheme,
    #[error("tel: needs a valid phone number in E.164 (e.g. tel:+15105550199): {0}")]
    Number(String),
    #[error("a SIP URI needs user@host without spaces or angle brackets (e.g. sip:desk@pbx.example.com)")]
    SipUri,
}

impl TransferTarget {
    pub fn parse(raw: &str) -> Result<Self, BadTarget> {
        let raw = raw.trim();
        if let Some(number) = raw.strip_prefix("tel:") {
            let number = E164::parse(number, None).map_err(|e| BadTarget::Number(e.to_string()))?;
            return Ok(Self(format!("tel:{number}")));
        }
        let uri = raw
            .strip_prefix("sip:")
            .or_else(|| raw.strip_prefix("sips:"))
            .ok_or(BadTarget::Scheme)?;
        let (user, host) = uri.split_once('@').ok_or(BadTarget::SipUri)?;
        let bad =
            |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace() || "<>\"".contains(c));
        if bad(user) || bad(host) {
            return Err(BadTarget::SipUri);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TransferTarget {
    type Error = BadTarget;

    fn try_from(s: String) -> Result<Self, BadTarget> {
        Self::parse(&s)
    }
}

impl From<TransferTarget> for String {
    fn from(t: TransferTarget) -> String {
        t.0
    }
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandKind {
    /// Removes the call's SIP participant; with `delete_room`, ends the room for everyone.
    Hangup {
        #[serde(default)]
        delete_room: bool,
    },
    Transfer {
        to: TransferTarget,
        #[serde(default)]
        play_dialtone: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ringing_timeout_s: Option<u32>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
    },
}

impl CommandKind {
    /// A bounded label (metrics, timeline).
    pub fn label(&self) -> &'static str {
        match self {
            CommandKind::Hangup { .. } => "hangup",
            CommandKind::Transfer { .. } => "transfer",
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CommandOutcome {
    HungUp,
    Transferred,
    /// The target did not take the call (603 declined, 486 busy, 408 ringing timeout…);
    /// the caller stays on the call.
    TransferFailed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sip_status: Option<u16>,
        reason: String,
    },
    /// Nothing to do any more: the call ended before the command ran.
    CallEnded,
    /// Taken but never queued (the broker was down); the client was told to retry.
    NotQueued,
    /// LiveKit kept failing until the command was given up (dead-lettered).
    Failed {
        reason: String,
    },
}

impl CommandOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            CommandOutcome::HungUp => "hung_up",
            CommandOutcome::Transferred => "transferred",
            CommandOutcome::TransferFailed { .. } => "transfer_failed",
            CommandOutcome::CallEnded => "call_ended",
            CommandOutcome::NotQueued => "not_queued",
            CommandOutcome::Failed { .. } => "failed",
        }
    }
}

/// One command and its journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    #[serde(flatten)]
    pub kind: CommandKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub requested_at: DateTime<Utc>,
    /// Set before the LiveKit request is sent: from then on a repeat must reconcile first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    /// A hang-up of an outbound call: whether LiveKit said the callee had answered just
    /// before (`sip.callStatus`). Its leave then reads `hangup` either way, so this is
    /// what tells a hung-up conversation from a canceled ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callee_answered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<CommandOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

pub fn new_command_id() -> String {
    format!("cmd_{}", uuid::Uuid::now_v7().simple())
}

/// Why a command cannot be taken (the API's 409 message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlRefused {
    #[error("the call has ended")]
    Ended,
    #[error("the call is not connected yet (nothing to hang up or transfer); cancel a call that has not been dialed with POST /v1/calls/{{id}}/cancel")]
    NotConnected,
    #[error("this Idempotency-Key was used for a different command on this call; use a new key for a new command")]
    KeyReused,
    #[error("the callee has not answered yet: a ringing call cannot be transferred (hang it up instead)")]
    NotAnswered,
}

/// What a command needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStep {
    /// Send the request to LiveKit (stamp it first).
    Send,
    /// Sent before without a recorded answer: find out what happened before any repeat.
    Reconcile(DateTime<Utc>),
    Done,
}

impl Call {
    /// The SIP participant a command acts on: the caller of an inbound call, the callee
    /// of the current outbound attempt once it was dialed.
    /// A transfer also needs an answered callee: LiveKit cannot transfer a call that is
    /// still ringing (hang it up instead).
    pub fn control_target(&self, kind: &CommandKind) -> Result<String, ControlRefused> {
        if self.status.is_terminal() {
            return Err(ControlRefused::Ended);
        }
        match self.direction {
            Direction::Inbound => self
                .inbound
                .as_ref()
                .map(|leg| leg.participant_identity.clone())
                .ok_or(ControlRefused::NotConnected),
            Direction::Outbound => match self.current_attempt() {
                Some(a) if !a.answered && matches!(kind, CommandKind::Transfer { .. }) => {
                    Err(ControlRefused::NotAnswered)
                }
                Some(a) if a.dial_started() && !a.is_over() => Ok(a.participant_identity.clone()),
                _ => Err(ControlRefused::NotConnected),
            },
        }
    }

    /// Takes a command, or hands back the one already taken with the same idempotency key
    /// (`false`: nothing to queue; `true` also for a repeat of one that was never queued).
    /// Refused once the call ended or before it is connected.
    pub fn request_command(
        &mut self,
        kind: CommandKind,
        idempotency_key: Option<String>,
        id: String,
        at: DateTime<Utc>,
    ) -> Result<(Command, bool), ControlRefused> {
        if let Some(key) = &idempotency_key {
            if let Some(existing) = self
                .commands
                .iter_mut()
                .find(|c| c.idempotency_key.as_ref() == Some(key))
            {
                if existing.kind != kind {
                    return Err(ControlRefused::KeyReused);
                }
                if existing.outcome != Some(CommandOutcome::NotQueued) {
                    return Ok((existing.clone(), false));
                }
                // Its first request could not be queued: this repeat queues it after all.
                existing.outcome = None;
                existing.finished_at = None;
                let revived = existing.clone();
                self.note(at, "command_requeued", Some(revived.id.clone()));
                return Ok((revived, true));
            }
        }
        self.control_target(&kind)?;
        let command = Command {
            id,
            kind,
            idempotency_key,
            requested_at: at,
            sent_at: None,
            callee_answered: None,
            outcome: None,
            finished_at: None,
        };
        let detail = match &command.kind {
            CommandKind::Hangup { delete_room: true } => "delete_room".to_owned(),
            CommandKind::Hangup { .. } => "remove_participant".to_owned(),
            CommandKind::Transfer { to, .. } => to.as_str().to_owned(),
        };
        self.note(
            at,
            format!("{}_requested", command.kind.label()),
            Some(format!("{} {detail}", command.id)),
        );
        self.commands.push(command.clone());
        Ok((command, true))
    }

    /// Whether an operator asked to hang this call up: a dial it cuts short is not a
    /// failure to retry, and the call ends `canceled`.
    pub fn hangup_requested(&self) -> bool {
        self.commands.iter().any(|c| {
            matches!(c.kind, CommandKind::Hangup { .. })
                && c.outcome != Some(CommandOutcome::NotQueued)
        })
    }

    pub fn command(&self, id: &str) -> Option<&Command> {
        self.commands.iter().find(|c| c.id == id)
    }

    fn command_mut(&mut self, id: &str) -> Option<&mut Command> {
        self.commands.iter_mut().find(|c| c.id == id)
    }

    pub fn command_step(&self, id: &str) -> CommandStep {
        match self.command(id) {
            None => CommandStep::Done,
            Some(c) if c.outcome.is_some() => CommandStep::Done,
            Some(c) => match c.sent_at {
                Some(at) => CommandStep::Reconcile(at),
                None => CommandStep::Send,
            },
        }
    }

    /// Stamps the command as being sent (with what LiveKit said of the callee, for a
    /// hang-up); false if someone already did (or it is done).
    pub fn command_sending(
        &mut self,
        id: &str,
        callee_answered: Option<bool>,
        at: DateTime<Utc>,
    ) -> bool {
        match self.command_mut(id) {
            Some(c) if c.outcome.is_none() && c.sent_at.is_none() => {
                c.sent_at = Some(at);
                if callee_answered.is_some() {
                    c.callee_answered = callee_answered;
                }
                true
            }
            _ => false,
        }
    }

    /// An operator hung the callee up while the phone was still ringing: its leave's
    /// `hangup` is a canceled ring, not the end of an answered call.
    pub fn hung_up_ringing(&self) -> bool {
        self.commands.iter().any(|c| {
            matches!(c.kind, CommandKind::Hangup { .. }) && c.callee_answered == Some(false)
        })
    }

    /// The request surely never reached LiveKit: it may be sent again.
    pub fn command_not_sent(&mut self, id: &str) {
        if let Some(c) = self.command_mut(id) {
            if c.outcome.is_none() {
                c.sent_at = None;
            }
        }
    }

    /// Records how the command ended (once) on the command and the timeline.
    pub fn command_done(&mut self, id: &str, outcome: CommandOutcome, at: DateTime<Utc>) -> bool {
        let Some(c) = self.command_mut(id) else {
            return false;
        };
        if c.outcome.is_some() {
            return false;
        }
        c.outcome = Some(outcome.clone());
        c.finished_at = Some(at);
        let to = match &c.kind {
            CommandKind::Transfer { to, .. } => Some(to.as_str().to_owned()),
            CommandKind::Hangup { .. } => None,
        };
        match outcome {
            CommandOutcome::HungUp => self.note(at, entries::HUNG_UP, Some(id.to_owned())),
            CommandOutcome::Transferred => {
                self.note(at, entries::TRANSFERRED, to);
            }
            CommandOutcome::TransferFailed { sip_status, reason } => {
                let detail = match sip_status {
                    Some(code) => format!("{code} {reason}"),
                    None => reason,
                };
                self.note(at, entries::TRANSFER_FAILED, Some(detail));
            }
            CommandOutcome::CallEnded => {
                self.note(at, "command_skipped", Some(format!("{id} call ended")));
            }
            CommandOutcome::NotQueued => {
                self.note(at, "command_not_queued", Some(id.to_owned()));
            }
            CommandOutcome::Failed { reason } => {
                self.note(at, "command_failed", Some(format!("{id} {reason}")));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::call::tests::sample;
    use crate::domain::events::{event_type, EventType};
    use crate::domain::CallStatus;

    /// An outbound call whose first attempt was dialed.
    fn connected() -> Call {
        let mut call = sample(Direction::Outbound);
        let now = Utc::now();
        let attempt = call.begin_attempt(now);
        attempt.steps.dial_started_at = Some(now);
        attempt.answered = true;
        call.status = CallStatus::InProgress;
        call
    }

    fn hangup() -> CommandKind {
        CommandKind::Hangup { delete_room: false }
    }

    #[test]
    fn a_key_takes_one_command_and_a_never_queued_one_is_queued_by_its_repeat() {
        let mut call = connected();
        let now = Utc::now();
        let (first, new) = call
            .request_command(hangup(), Some("k".into()), "cmd_1".into(), now)
            .expect("taken");
        assert!(new);
        let (again, new) = call
            .request_command(hangup(), Some("k".into()), "cmd_2".into(), now)
            .expect("same");
        assert_eq!(
            call.request_command(
                CommandKind::Hangup { delete_room: true },
                Some("k".into()),
                "cmd_4".into(),
                now
            ),
            Err(ControlRefused::KeyReused),
            "a key names one command"
        );
        assert!(!new);
        assert_eq!(again.id, first.id);
        assert_eq!(call.commands.len(), 1);
        // Its publish failed: the repeat queues it after all, under the same id.
        assert!(call.command_done("cmd_1", CommandOutcome::NotQueued, now));
        let (revived, new) = call
            .request_command(hangup(), Some("k".into()), "cmd_3".into(), now)
            .expect("revived");
        assert!(new);
        assert_eq!(revived.id, "cmd_1");
        assert_eq!(call.command_step("cmd_1"), CommandStep::Send);
    }

    #[test]
    fn a_ringing_call_can_be_hung_up_not_transferred() {
        let mut ringing = connected();
        if let Some(a) = ringing.current_attempt_mut() {
            a.answered = false;
        }
        let now = Utc::now();
        let to = TransferTarget::parse("sip:desk@pbx.example.com").expect("target");
        let transfer = CommandKind::Transfer {
            to,
            play_dialtone: false,
            ringing_timeout_s: None,
            headers: BTreeMap::new(),
        };
        assert_eq!(
            ringing.request_command(transfer, None, "t".into(), now),
            Err(ControlRefused::NotAnswered)
        );
        assert!(!ringing.hangup_requested());
        assert!(ringing
            .request_command(hangup(), None, "h".into(), now)
            .is_ok());
        assert!(ringing.hangup_requested());
        // The dial it cuts short ends the call canceled, with no retry.
        ringing.retry.max_attempts = 3;
        let after = ringing.end_attempt(
            crate::domain::AttemptEnd::Unanswered(crate::domain::sip_outcome::SipOutcome::NoAnswer),
            Default::default(),
            now,
        );
        assert_eq!(
            after,
            Some(crate::domain::AfterAttempt::Final(CallStatus::Canceled))
        );
        assert_eq!(ringing.end_reason.as_deref(), Some("hung_up"));
    }

    #[test]
    fn commands_need_a_connected_call_that_has_not_ended() {
        let mut queued = sample(Direction::Outbound);
        let now = Utc::now();
        assert_eq!(
            queued.request_command(hangup(), None, "c".into(), now),
            Err(ControlRefused::NotConnected)
        );
        let mut ended = connected();
        ended.advance(CallStatus::Completed, now);
        assert_eq!(
            ended.request_command(hangup(), None, "c".into(), now),
            Err(ControlRefused::Ended)
        );
    }

    #[test]
    fn the_journal_sends_once_and_records_one_outcome_as_an_event() {
        let mut call = connected();
        let now = Utc::now();
        let to = TransferTarget::parse("tel:+15105550199").expect("target");
        let kind = CommandKind::Transfer {
            to,
            play_dialtone: false,
            ringing_timeout_s: None,
            headers: BTreeMap::new(),
        };
        call.request_command(kind, None, "t".into(), now)
            .expect("taken");
        assert!(call.command_sending("t", None, now));
        assert!(!call.command_sending("t", None, now), "stamped once");
        assert_eq!(call.command_step("t"), CommandStep::Reconcile(now));
        call.command_not_sent("t");
        assert_eq!(call.command_step("t"), CommandStep::Send);
        assert!(call.command_done(
            "t",
            CommandOutcome::TransferFailed {
                sip_status: Some(603),
                reason: "Decline".into()
            },
            now
        ));
        assert!(!call.command_done("t", CommandOutcome::Transferred, now));
        let last = call.timeline.last().expect("entry").clone();
        assert_eq!(last.detail.as_deref(), Some("603 Decline"));
        assert_eq!(event_type(&call, &last), EventType::TransferFailed);
        assert_eq!(call.command_step("t"), CommandStep::Done);
    }

    #[test]
    fn transfer_targets_are_tel_or_sip() {
        assert_eq!(
            TransferTarget::parse("tel:+15105550199").map(|t| t.0),
            Ok("tel:+15105550199".to_owned())
        );
        assert!(matches!(
            TransferTarget::parse("tel:12"),
            Err(BadTarget::Number(_))
        ));
        assert_eq!(
            TransferTarget::parse("sip:desk@pbx.example.com").map(|t| t.0),
            Ok("sip:desk@pbx.example.com".to_owned())
        );
        assert!(TransferTarget::parse("sips:a@b").is_ok());
        assert_eq!(
            TransferTarget::parse("sip:pbx.example.com"),
            Err(BadTarget::SipUri)
        );
        assert_eq!(TransferTarget::parse("sip:<a>@b"), Err(BadTarget::SipUri));
        assert_eq!(
            TransferTarget::parse("+15105550199"),
            Err(BadTarget::Scheme)
        );
        assert_eq!(TransferTarget::parse("http://x"), Err(BadTarget::Scheme));
    }
}
