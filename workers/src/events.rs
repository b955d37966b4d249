//! The webhook-event worker: dedupes LiveKit events by id, then moves the call they are
//! about forward (never backward): the SIP participant joined, answered, left; the room
//! finished. The end of an answered call completes it and frees its trunk slot; an
//! unanswered dial ends its attempt (retried per the call's policy).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use callfleet_core::domain::sip_outcome::SipOutcome;
use callfleet_core::domain::webhook::{
    outcome_from_disconnect, EventKind, ParticipantRef, WebhookEvent,
};
use callfleet_core::domain::{
    call_for_room, parse_participant_identity, AfterAttempt, Call, CallStatus, EndDetails,
};
use callfleet_core::ports::broker::headers;
use callfleet_core::ports::{Message, WorkQueue};
use callfleet_core::telemetry::metrics as m;
use chrono::{DateTime, TimeZone, Utc};

use crate::calls::{CallDeps, InfraError};
use crate::inbound::{Halt, Inbound};
use crate::{Handler, HandlerOutcome};

/// How long an event id is remembered (LiveKit gives up on an event after 30 s of retries;
/// a day also covers broker redeliveries and replays).
const DEDUPE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Consumes `webhook_events`.
pub struct WebhookEventHandler {
    deps: CallDeps,
    /// Events about rooms the fleet did not create (inbound calls).
    inbound: Option<Arc<Inbound>>,
}

fn millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

impl WebhookEventHandler {
    pub fn new(deps: CallDeps) -> Self {
        Self {
            deps,
            inbound: None,
        }
    }

    /// Also handles inbound calls.
    pub fn with_inbound(mut self, inbound: Arc<Inbound>) -> Self {
        self.inbound = Some(inbound);
        self
    }

    async fn apply(&self, event: &WebhookEvent) -> Result<&'static str, InfraError> {
        match &event.event {
            EventKind::ParticipantJoined
            | EventKind::TrackPublished
            | EventKind::ParticipantLeft
            | EventKind::ParticipantConnectionAborted => {
                let Some(p) = &event.participant else {
                    return Ok("ignored");
                };
                let Some((call_id, attempt)) = parse_participant_identity(&p.identity) else {
                    return Ok("ignored");
                };
                self.participant_event(&call_id, attempt, p, event.event.is_departure())
                    .await
            }
            EventKind::RoomFinished => {
                let Some(room) = &event.room else {
                    return Ok("ignored");
                };
                let Some(call_id) = call_for_room(&room.name) else {
                    return Ok("ignored");
                };
                self.room_finished(&call_id, &room.sid).await
            }
            _ => Ok("ignored"),
        }
    }

    async fn participant_event(
        &self,
        call_id: &str,
        attempt: u32,
        p: &ParticipantRef,
        gone: bool,
    ) -> Result<&'static str, InfraError> {
        let now = self.deps.clock.now();
        let mut after = None;
        let updated = self
            .deps
            .calls
            .update(call_id, |call| {
                after = None;
                let ended = call.status.is_terminal();
                let ringing_hung_up = call.hung_up_ringing();
                let Some(a) = call.current_attempt_mut() else {
                    return false;
                };
                // Events of an earlier attempt, or of one already settled, change nothing.
                if a.number != attempt || a.is_over() || ended {
                    return false;
                }
                // The journal (steps) belongs to the job; webhooks add evidence beside it.
                if a.sip_call_id.is_none() {
                    a.sip_call_id = p.attributes.get("sip.callID").cloned();
                }
                if a.joined_at.is_none() {
                    a.joined_at = p.joined_at_ms.and_then(millis);
                }
                let answered_now = p.was_answered() && !a.answered && !ringing_hung_up;
                if answered_now {
                    a.answered = true;
                    if p.sip_call_status() == Some("active") && !gone {
                        a.answered_at = Some(now);
                    }
                }
                if !gone {
                    call.advance(CallStatus::SipParticipantJoined, now);
                    if answered_now {
                        call.advance(CallStatus::InProgress, now);
                    }
                    return true;
                }
                if answered_now {
                    // Without wait_until_answered the answer is first known here: LiveKit
                    // sends no webhook when `sip.callStatus` turns `active`, only the leave
                    // with `hangup`. The call was in progress; its timeline says so.
                    call.advance(CallStatus::InProgress, now);
                }
                let details = EndDetails {
                    disconnect_reason: p.disconnect_reason.clone(),
                    ..Default::default()
                };
                let outcome = outcome_from_disconnect(p.disconnect_reason.as_deref());
                after = call.callee_gone(outcome, details, now);
                if after.is_none() {
                    // Evidence for the waiting dial's job, should that job have died.
                    call.note(now, "participant_left", p.disconnect_reason.clone());
                }
                true
            })
            .await?;
        let Some((call, current)) = updated else {
            return Ok("unknown_call");
        };
        self.follow_up(&call, current, after).await
    }

    async fn room_finished(
        &self,
        call_id: &str,
        room_sid: &str,
    ) -> Result<&'static str, InfraError> {
        let now = self.deps.clock.now();
        let mut after = None;
        let updated = self
            .deps
            .calls
            .update(call_id, |call| {
                after = None;
                let ended = call.status.is_terminal();
                let Some(a) = call.current_attempt_mut() else {
                    return false;
                };
                let same_room = match (&a.steps.room_sid, room_sid) {
                    (Some(ours), theirs) if !theirs.is_empty() => ours == theirs,
                    _ => true,
                };
                // Only a dialed, unsettled attempt in this very room instance can end here.
                if a.is_over() || !a.dial_started() || !same_room || ended {
                    return false;
                }
                let details = EndDetails {
                    reason: Some("room_finished".into()),
                    ..Default::default()
                };
                after = call.callee_gone(SipOutcome::Failed, details, now);
                true
            })
            .await?;
        let Some((call, current)) = updated else {
            return Ok("unknown_call");
        };
        self.follow_up(&call, current, after).await
    }

    /// `current`: the event was about the call's live attempt (else it is stale: late,
    /// repeated or about an earlier attempt, and changed nothing).
    async fn follow_up(
        &self,
        call: &Call,
        current: bool,
        after: Option<AfterAttempt>,
    ) -> Result<&'static str, InfraError> {
        if let Some(after) = after {
            self.deps.settle(call, after).await?;
            return Ok("applied");
        }
        // A retry whose publishing died with its worker is queued by the redelivered job
        // or the sweeper; queueing it again on every late event would only pile up
        // delayed duplicates.
        Ok(if current { "applied" } else { "stale" })
    }
}

#[async_trait]
impl Handler for WebhookEventHandler {
    fn queue(&self) -> WorkQueue {
        WorkQueue::WebhookEvents
    }

    async fn handle(&self, message: &Message, redeliveries: u32) -> HandlerOutcome {
        let event = match WebhookEvent::parse(&message.body) {
            Ok(e) => e,
            Err(reason) => return HandlerOutcome::DeadLetter { reason },
        };
        // Applying is idempotent (states only move forward; each event names its attempt
        // or room instance), so the event is applied first and marked seen after: a worker
        // that dies in between leaves no mark, and the redelivery is applied, not dropped
        // as a duplicate. The mark only tells the metrics what was a repeat.
        let applied = match &self.inbound {
            Some(inbound) if Inbound::concerns(&event) => {
                let received_at = message
                    .headers
                    .get(headers::RECEIVED_MS)
                    .and_then(|ms| ms.parse().ok())
                    .and_then(DateTime::from_timestamp_millis);
                match inbound
                    .on_event(&event, received_at, redeliveries > 0)
                    .await
                {
                    Ok(result) => Ok(result),
                    Err(Halt::Infra(e)) => Err(e),
                    Err(halt) => return halt.outcome(),
                }
            }
            _ => self.apply(&event).await,
        };
        match applied {
            Ok(result) => {
                let seen_key = format!("wh:{}", event.dedupe_id(&message.body));
                let first = match self
                    .deps
                    .calls
                    .store()
                    .first_seen(&seen_key, DEDUPE_TTL)
                    .await
                {
                    Ok(first) => first,
                    Err(e) => {
                        tracing::debug!(error = %e, "webhook event applied but not marked seen");
                        true
                    }
                };
                let (result, reason) = if first {
                    (result, "none")
                } else {
                    ("duplicate", "event_id")
                };
                // Event names LiveKit may add later count as `other` (bounded labels).
                let kind = match &event.event {
                    EventKind::Other(_) => "other",
                    known => known.as_str(),
                };
                let kind = kind.to_owned();
                metrics::counter!(m::WEBHOOKS, "event" => kind, "result" => result, "reason" => reason)
                    .increment(1);
                HandlerOutcome::Done
            }
            Err(e) => {
                tracing::warn!(event = %event.event, error = %e, "webhook event not applied; retrying");
                e.retry()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_map_back_to_their_call() {
        let id = callfleet_core::domain::new_call_id();
        let room = callfleet_core::domain::room_for_call(&id);
        assert_eq!(call_for_room(&room), Some(id));
        assert_eq!(call_for_room("someone-elses-room"), None);
    }
}
