//! The control worker: runs hang-up and transfer commands against LiveKit with the same
//! journal rules as every other LiveKit step. A command is stamped on the call before its
//! request is sent; a redelivered command that finds the stamp without an outcome finds out
//! what happened before it repeats anything. A hang-up is idempotent (the participant or
//! room is gone, or goes now), so it is simply sent again. A transfer is not (a second REFER
//! could ring the target twice): after LiveKit could have finished the first one, a caller
//! no longer in the room proves it transferred; a caller still there proves it did not.

use std::time::Duration;

use async_trait::async_trait;
use callfleet_core::calls::{ControlJob, Held};
use callfleet_core::domain::control::{Command, CommandKind, CommandOutcome, CommandStep};
use callfleet_core::domain::sip_outcome::{ApiFailure, FailureKind};
use callfleet_core::domain::Direction;
use callfleet_core::ports::{LiveKitError, Message, TransferRequest, WorkQueue};
use callfleet_core::telemetry::metrics as m;
use tracing::Instrument;

use crate::calls::{CallDeps, InfraError};
use crate::{Handler, HandlerOutcome};

/// LiveKit's ringing time for a transfer that names none.
const DEFAULT_TRANSFER_RINGING: Duration = Duration::from_secs(30);
/// Pause before retrying a LiveKit request that failed transiently.
const RETRY_PAUSE: Duration = Duration::from_secs(5);
/// How many times one delivery re-reads a call another writer changed under it.
const RELOADS: usize = 8;

/// Consumes `control`.
pub struct ControlHandler {
    deps: CallDeps,
}

impl ControlHandler {
    pub fn new(deps: CallDeps) -> Self {
        Self { deps }
    }
}

enum Stop {
    Outcome(HandlerOutcome),
}

impl From<InfraError> for Stop {
    fn from(e: InfraError) -> Self {
        Stop::Outcome(e.retry())
    }
}

fn retry(e: &LiveKitError) -> Stop {
    Stop::Outcome(HandlerOutcome::RetryAfter {
        after: RETRY_PAUSE,
        reason: e.to_string(),
    })
}

impl ControlHandler {
    async fn run(&self, job: &ControlJob) -> Result<(), Stop> {
        for _ in 0..RELOADS {
            let Some(held) = self
                .deps
                .calls
                .get_held(&job.call_id)
                .await
                .map_err(InfraError::from)?
            else {
                return Err(Stop::Outcome(HandlerOutcome::DeadLetter {
                    reason: format!("no call {}", job.call_id),
                }));
            };
            let Some(command) = held.command(&job.command_id).cloned() else {
                tracing::warn!(command_id = %job.command_id, "no such command on the call");
                return Ok(());
            };
            match held.command_step(&command.id) {
                CommandStep::Done => return Ok(()),
                CommandStep::Send => {
                    if self.send(held, &command).await? {
                        return Ok(());
                    }
                }
                CommandStep::Reconcile(sent_at) => {
                    if self.reconcile(held, &command, sent_at).await? {
                        return Ok(());
                    }
                }
            }
        }
        Err(Stop::Outcome(HandlerOutcome::RetryAfter {
            after: Duration::from_millis(200),
            reason: "the call kept changing under the command".into(),
        }))
    }

    /// Records `outcome` (once) and counts it.
    async fn finish(
        &self,
        held: Held,
        command: &Command,
        outcome: CommandOutcome,
    ) -> Result<(), Stop> {
        let now = self.deps.clock.now();
        let label = outcome.label();
        let recorded = self
            .deps
            .calls
            .update_held(held, |c| c.command_done(&command.id, outcome.clone(), now))
            .await
            .map_err(InfraError::from)?;
        if matches!(recorded, Some((_, true))) {
            metrics::counter!(m::CONTROL_COMMANDS, "kind" => command.kind.label(), "result" => label)
                .increment(1);
            tracing::info!(command_id = %command.id, result = label, "call command done");
        }
        Ok(())
    }

    /// Before hanging up an outbound callee: had they answered? LiveKit's `sip.callStatus`
    /// says so now; the leave that follows will read `hangup` either way.
    async fn callee_answered(
        &self,
        call: &Held,
        command: &Command,
        identity: &str,
    ) -> Result<Option<bool>, Stop> {
        let hangup = matches!(command.kind, CommandKind::Hangup { .. });
        if !hangup || call.direction != Direction::Outbound {
            return Ok(None);
        }
        if call.current_attempt().is_some_and(|a| a.answered) {
            return Ok(Some(true));
        }
        match self
            .deps
            .livekit
            .get_participant(&call.room_name, identity)
            .await
        {
            Ok(Some(p)) => Ok(Some(matches!(
                p.attributes.get("sip.callStatus").map(String::as_str),
                Some("active") | Some("automation")
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(retry(&e)),
        }
    }

    /// Stamps and sends the command; false when someone else stamped it first (re-read).
    async fn send(&self, held: Held, command: &Command) -> Result<bool, Stop> {
        let identity = match held.control_target(&command.kind) {
            Ok(identity) => identity,
            Err(_) => {
                self.finish(held, command, CommandOutcome::CallEnded)
                    .await?;
                return Ok(true);
            }
        };
        let callee_answered = self.callee_answered(&held, command, &identity).await?;
        let now = self.deps.clock.now();
        let (held, stamped) = match self
            .deps
            .calls
            .update_held(held, |c| {
                c.command_sending(&command.id, callee_answered, now)
            })
            .await
            .map_err(InfraError::from)?
        {
            Some(done) => done,
            None => return Ok(true),
        };
        if !stamped {
            return Ok(false);
        }
        let result = self.execute(&held, command, &identity).await;
        match result {
            Ok(outcome) => {
                self.finish(held, command, outcome).await?;
                Ok(true)
            }
            Err(e) => {
                if !e.failure.maybe_processed() {
                    // Never reached LiveKit (or refused outright): safe to send again.
                    let _ = self
                        .deps
                        .calls
                        .update_held(held, |c| c.command_not_sent(&command.id))
                        .await;
                }
                Err(retry(&e))
            }
        }
    }

    /// Runs the command; an `Err` is a transient failure (retry), every answer LiveKit gave
    /// about the call itself is an outcome.
    async fn execute(
        &self,
        call: &Held,
        command: &Command,
        identity: &str,
    ) -> Result<CommandOutcome, LiveKitError> {
        let livekit = &self.deps.livekit;
        match &command.kind {
            CommandKind::Hangup { delete_room } => {
                let result = if *delete_room {
                    livekit.delete_room(&call.room_name).await
                } else {
                    livekit.remove_participant(&call.room_name, identity).await
                };
                match result {
                    // Already gone is what a hang-up wants.
                    Ok(()) => Ok(CommandOutcome::HungUp),
                    Err(e) if e.is_not_found() => Ok(CommandOutcome::HungUp),
                    Err(e) => Err(e),
                }
            }
            CommandKind::Transfer {
                to,
                play_dialtone,
                ringing_timeout_s,
                headers,
            } => {
                let request = TransferRequest {
                    room_name: call.room_name.clone(),
                    participant_identity: identity.to_owned(),
                    to: to.as_str().to_owned(),
                    play_dialtone: *play_dialtone,
                    ringing_timeout: ringing_timeout_s.map(|s| Duration::from_secs(s.into())),
                    headers: headers.clone().into_iter().collect(),
                };
                match livekit.transfer_sip_participant(request).await {
                    Ok(()) => Ok(CommandOutcome::Transferred),
                    Err(e) => match transfer_refusal(&e) {
                        Some(outcome) => Ok(outcome),
                        None => Err(e),
                    },
                }
            }
        }
    }

    /// Clears the stamp of a command known not to have taken effect, and sends it again.
    async fn resend(&self, held: Held, command: &Command) -> Result<bool, Stop> {
        let held = match self
            .deps
            .calls
            .update_held(held, |c| c.command_not_sent(&command.id))
            .await
            .map_err(InfraError::from)?
        {
            Some((held, ())) => held,
            None => return Ok(true),
        };
        self.send(held, command).await
    }

    /// A command sent before without a recorded answer.
    async fn reconcile(
        &self,
        held: Held,
        command: &Command,
        sent_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, Stop> {
        let ringing = match &command.kind {
            // Idempotent: send it again.
            CommandKind::Hangup { .. } => {
                // Ended since: most likely by this very hang-up, whose answer was lost.
                if held.status.is_terminal() {
                    self.finish(held, command, CommandOutcome::HungUp).await?;
                    return Ok(true);
                }
                return self.resend(held, command).await;
            }
            CommandKind::Transfer {
                ringing_timeout_s, ..
            } => ringing_timeout_s
                .map(|s| Duration::from_secs(s.into()))
                .unwrap_or(DEFAULT_TRANSFER_RINGING),
        };
        // Until LiveKit could have finished the first request, its effect proves nothing.
        let settled = sent_at
            + chrono::Duration::from_std(ringing + self.deps.settings.livekit_settle)
                .unwrap_or_default();
        let now = self.deps.clock.now();
        if now < settled {
            let wait = (settled - now).to_std().unwrap_or_default();
            return Err(Stop::Outcome(HandlerOutcome::Defer {
                after: wait.max(Duration::from_millis(100)),
                reason: "waiting for an earlier transfer request to settle".into(),
            }));
        }
        let identity = match held.control_target(&command.kind) {
            Ok(identity) => identity,
            // The call ended meanwhile: the transfer took it (or the caller hung up).
            Err(_) => {
                self.finish(held, command, CommandOutcome::Transferred)
                    .await?;
                return Ok(true);
            }
        };
        match self
            .deps
            .livekit
            .get_participant(&held.room_name, &identity)
            .await
        {
            Ok(None) => {
                self.finish(held, command, CommandOutcome::Transferred)
                    .await?;
                Ok(true)
            }
            // Still in the room after the transfer could have completed: it did not.
            Ok(Some(_)) => self.resend(held, command).await,
            Err(e) => Err(retry(&e)),
        }
    }
}

/// LiveKit's answer that the transfer itself failed (the target declined, was busy, did
/// not answer; or the participant cannot be transferred): an outcome, not a retry.
fn transfer_refusal(e: &LiveKitError) -> Option<CommandOutcome> {
    let ApiFailure::Twirp {
        code,
        msg,
        sip_status_code,
        sip_status,
    } = &e.failure
    else {
        return None;
    };
    match e.kind() {
        FailureKind::CallOutcome(_) | FailureKind::Permanent => {
            Some(CommandOutcome::TransferFailed {
                sip_status: *sip_status_code,
                reason: sip_status
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| format!("{code}: {msg}")),
            })
        }
        _ if sip_status_code.is_some() => Some(CommandOutcome::TransferFailed {
            sip_status: *sip_status_code,
            reason: sip_status.clone().unwrap_or_else(|| msg.clone()),
        }),
        _ => None,
    }
}

#[async_trait]
impl Handler for ControlHandler {
    fn queue(&self) -> WorkQueue {
        WorkQueue::Control
    }

    async fn handle(&self, message: &Message, _redeliveries: u32) -> HandlerOutcome {
        let job = match ControlJob::parse(&message.body) {
            Ok(job) => job,
            Err(reason) => return HandlerOutcome::DeadLetter { reason },
        };
        let span =
            tracing::info_span!("control", call_id = %job.call_id, command_id = %job.command_id);
        match self.run(&job).instrument(span).await {
            Ok(()) => HandlerOutcome::Done,
            Err(Stop::Outcome(outcome)) => outcome,
        }
    }

    async fn dead_lettered(&self, message: &Message, reason: &str) {
        let Ok(job) = ControlJob::parse(&message.body) else {
            return;
        };
        // The command ends failed, on the call and as its event, so nobody waits for it.
        let now = self.deps.clock.now();
        let outcome = CommandOutcome::Failed {
            reason: reason.to_owned(),
        };
        let recorded = self
            .deps
            .calls
            .update(&job.call_id, |c| {
                c.command_done(&job.command_id, outcome.clone(), now)
            })
            .await;
        if let Ok(Some((call, true))) = recorded {
            if let Some(command) = call.command(&job.command_id) {
                metrics::counter!(m::CONTROL_COMMANDS, "kind" => command.kind.label(), "result" => "failed")
                    .increment(1);
            }
        }
    }
}
