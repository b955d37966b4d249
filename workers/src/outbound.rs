//! The outbound call job: wait for the call's time, take a trunk slot, then CreateRoom →
//! CreateDispatch → CreateSIPParticipant, each step recorded in the attempt's journal
//! before the job moves on. A redelivered job resumes at the first unrecorded step, and
//! before repeating a step that is not idempotent it asks LiveKit whether the step already
//! happened (ListDispatch; GetParticipant with the attempt's deterministic identity).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use callfleet_core::calls::{wall_time, CallJob};
use callfleet_core::domain::inbound::is_inbound_call_id;
use callfleet_core::domain::metadata::snake_case_keys;
use callfleet_core::domain::phone::E164;
use callfleet_core::domain::sip_outcome::{ApiFailure, FailureKind, SipOutcome};
use callfleet_core::domain::{AttemptEnd, Call, CallStatus, EndDetails, JobTriage};
use callfleet_core::ports::livekit::DialRequest;
use callfleet_core::ports::store::RateDecision;
use callfleet_core::ports::{LiveKitError, Message, WorkQueue};
use callfleet_core::telemetry::metrics as m;
use chrono::Utc;
use serde_json::{json, Value};

use crate::calls::{trunk_pool, CallDeps, InfraError};
use crate::inbound::Inbound;
use crate::steps::{self, DispatchDecision};
use crate::{Handler, HandlerOutcome};

/// Consumes `call_jobs` (outbound calls' jobs, and inbound calls' through [`Inbound`]).
pub struct OutboundCallHandler {
    deps: CallDeps,
    inbound: Option<Arc<Inbound>>,
}

/// Why a job stopped before its end.
enum Stop {
    /// The call changed under us (canceled, ended, superseded): nothing more to do.
    Gone,
    Outcome(HandlerOutcome),
}

impl From<InfraError> for Stop {
    fn from(e: InfraError) -> Self {
        Stop::Outcome(e.retry())
    }
}

impl OutboundCallHandler {
    pub fn new(deps: CallDeps) -> Self {
        Self {
            deps,
            inbound: None,
        }
    }

    /// Also runs inbound calls' jobs.
    pub fn with_inbound(mut self, inbound: Arc<Inbound>) -> Self {
        self.inbound = Some(inbound);
        self
    }

    fn agent(&self, call: &Call) -> String {
        call.agent_name
            .clone()
            .unwrap_or_else(|| self.deps.settings.default_agent.clone())
    }

    /// What the agent receives: the scheduler's context in snake_case plus the call's own
    /// fields (which win over context keys of the same name).
    fn dispatch_metadata(call: &Call, attempt: u32) -> String {
        let mut meta = match snake_case_keys(&call.context) {
            Value::Object(map) => map,
            _ => Default::default(),
        };
        meta.insert("call_id".into(), json!(call.id));
        meta.insert("direction".into(), json!("outbound"));
        meta.insert("phone_number".into(), json!(call.to));
        if let Some(from) = &call.from {
            meta.insert("from_number".into(), json!(from));
        }
        meta.insert("attempt".into(), json!(attempt));
        if let Some(trunk) = &call.trunk_id {
            meta.insert("trunk_id".into(), json!(trunk));
        }
        Value::Object(meta).to_string()
    }

    fn room_metadata(call: &Call) -> String {
        json!({"call_id": call.id, "direction": "outbound", "tags": call.tags}).to_string()
    }

    /// Applies `change` to attempt `attempt` of the call, unless the call ended or moved on
    /// to another attempt meanwhile (then `Stop::Gone`).
    async fn record(
        &self,
        call_id: &str,
        attempt: u32,
        mut change: impl FnMut(&mut Call),
    ) -> Result<Call, Stop> {
        let updated = self
            .deps
            .calls
            .update(call_id, |call| {
                let current = call.current_attempt().map(|a| (a.number, a.is_over()));
                if call.status.is_terminal() || current != Some((attempt, false)) {
                    return false;
                }
                change(call);
                true
            })
            .await
            .map_err(InfraError::from)?;
        match updated {
            Some((call, true)) => Ok(call),
            _ => Err(Stop::Gone),
        }
    }

    /// Ends the attempt and settles what follows.
    async fn end(
        &self,
        call_id: &str,
        attempt: u32,
        end: AttemptEnd,
        details: EndDetails,
    ) -> Result<(), Stop> {
        let now = self.deps.clock.now();
        let mut after = None;
        let call = self
            .record(call_id, attempt, |call| {
                after = call.end_attempt(end.clone(), details.clone(), now);
            })
            .await?;
        if let Some(after) = after {
            self.deps.settle(&call, after).await?;
        }
        Ok(())
    }

    async fn fail_permanently(
        &self,
        call_id: &str,
        attempt: u32,
        error: &LiveKitError,
    ) -> Result<(), Stop> {
        tracing::warn!(call_id, error = %error, "permanent LiveKit error; failing the call");
        self.end(
            call_id,
            attempt,
            AttemptEnd::Error(format!("{}: {}", error.method, describe(&error.failure))),
            EndDetails::default(),
        )
        .await
    }

    async fn run(&self, job: &CallJob) -> Result<(), Stop> {
        let deps = &self.deps;
        let Some(call) = deps
            .calls
            .get(&job.call_id)
            .await
            .map_err(InfraError::from)?
        else {
            return Err(Stop::Outcome(HandlerOutcome::DeadLetter {
                reason: format!("no call {}", job.call_id),
            }));
        };
        let dial_started = match call.triage_job(job.attempt, deps.clock.now()) {
            JobTriage::Stale => return Err(Stop::Gone),
            JobTriage::Corrupt(reason) => {
                return Err(Stop::Outcome(HandlerOutcome::DeadLetter { reason }))
            }
            JobTriage::EnsureNext => {
                // This attempt is settled; make sure its successor (if any) is queued.
                deps.ensure_next_attempt(&call).await?;
                return Err(Stop::Gone);
            }
            JobTriage::Wait(due) => return self.defer_until(&call, job, due).await,
            JobTriage::Run { dial_started, .. } => dial_started,
        };

        let Some(trunk) = call.trunk_id.clone() else {
            return Err(Stop::Outcome(HandlerOutcome::DeadLetter {
                reason: "call has no trunk".into(),
            }));
        };

        // Only one worker drives a call at a time; the journal and reconciliation below
        // keep us safe when this lock expires under a slow worker.
        let lock_name = format!("call:{}", call.id);
        let ringing = if call.wait_until_answered {
            Duration::from_secs(u64::from(call.ringing_timeout_s.unwrap_or(30)))
        } else {
            Duration::ZERO
        };
        let lock_ttl = deps.settings.call_lock_ttl + ringing;
        let Some(token) = deps
            .calls
            .store()
            .try_lock(&lock_name, lock_ttl)
            .await
            .map_err(InfraError::from)?
        else {
            return Err(Stop::Outcome(HandlerOutcome::Defer {
                after: steps::jitter(Duration::from_secs(2)),
                reason: "another worker holds the call".into(),
            }));
        };
        let result = self.drive(call, job.attempt, &trunk, dial_started).await;
        if matches!(result, Err(Stop::Gone)) {
            self.clean_up_if_canceled(&job.call_id).await;
        }
        if let Err(e) = deps.calls.store().unlock(&lock_name, &token).await {
            tracing::debug!(error = %e, "call lock not released; it expires");
        }
        result
    }

    /// A call canceled while this job was setting it up: free its trunk slot and close its
    /// room so a dispatched agent leaves.
    async fn clean_up_if_canceled(&self, call_id: &str) {
        let Ok(Some(call)) = self.deps.calls.get(call_id).await else {
            return;
        };
        if call.status == CallStatus::Canceled {
            self.deps.release_trunk(&call).await;
            if call.current_attempt().is_some_and(|a| a.steps.room_created) {
                let _ = self.deps.livekit.delete_room(&call.room_name).await;
            }
        }
    }

    async fn defer_until(
        &self,
        call: &Call,
        job: &CallJob,
        due: chrono::DateTime<Utc>,
    ) -> Result<(), Stop> {
        let deps = &self.deps;
        let now = deps.clock.now();
        deps.calls
            .update(&call.id, |c| c.schedule(due, now))
            .await
            .map_err(InfraError::from)?;
        deps.broker
            .publish(job.message(Some(wall_time(deps.clock.as_ref(), due))))
            .await
            .map_err(InfraError::from)?;
        tracing::debug!(call_id = %call.id, due = %due, "deferred");
        Err(Stop::Gone)
    }

    /// Takes the trunk slot and a calls-per-second token, or says when to come back.
    async fn admit(&self, call: &Call, trunk: &str) -> Result<(), Stop> {
        let deps = &self.deps;
        let store = deps.calls.store();
        let pool = trunk_pool(trunk);
        let settings = &deps.settings;
        if !store
            .acquire_lease(
                &pool,
                &call.id,
                settings.trunk_max_concurrent,
                settings.lease_ttl,
            )
            .await
            .map_err(InfraError::from)?
        {
            return Err(Stop::Outcome(HandlerOutcome::Defer {
                after: steps::jitter(Duration::from_millis(300)),
                reason: format!("trunk {trunk} is at its concurrent-call limit"),
            }));
        }
        let burst = settings.trunk_cps.ceil().max(1.0) as u32;
        match store
            .rate_limit(&format!("cps:{trunk}"), settings.trunk_cps, burst)
            .await
            .map_err(InfraError::from)?
        {
            RateDecision::Allowed => {
                deps.publish_active(trunk).await;
                Ok(())
            }
            RateDecision::RetryAfter(wait) => {
                let _ = store.release_lease(&pool, &call.id).await;
                Err(Stop::Outcome(HandlerOutcome::Defer {
                    after: wait + steps::jitter(Duration::from_millis(100)),
                    reason: format!("trunk {trunk} is at its calls-per-second limit"),
                }))
            }
        }
    }

    async fn drive(
        &self,
        call: Call,
        attempt: u32,
        trunk: &str,
        dial_started: bool,
    ) -> Result<(), Stop> {
        let deps = &self.deps;
        let call_id = call.id.clone();
        if !dial_started {
            self.admit(&call, trunk).await?;
        }
        let mut call = if call.attempts.len() as u32 == attempt {
            call
        } else {
            let now = deps.clock.now();
            let begun = deps
                .calls
                .update(&call_id, |c| {
                    if c.status.is_terminal() || c.attempts.len() as u32 != attempt - 1 {
                        return false;
                    }
                    c.begin_attempt(now);
                    true
                })
                .await
                .map_err(InfraError::from)?;
            match begun {
                Some((c, true)) => c,
                _ => {
                    deps.release_trunk(&call).await;
                    return Err(Stop::Gone);
                }
            }
        };
        let Some(current) = call.current_attempt().cloned() else {
            return Err(Stop::Gone);
        };
        let steps = current.steps.clone();

        // 1. The room (CreateRoom is an upsert, so repeating it is safe).
        if !steps.room_created {
            let metadata = Self::room_metadata(&call);
            let empty_timeout = deps.settings.room_empty_timeout_s;
            let created = steps::ensure_room(
                deps.livekit.as_ref(),
                &call.room_name,
                &metadata,
                empty_timeout,
            )
            .await;
            match created {
                Ok(room) => {
                    call = self
                        .record(&call_id, attempt, |c| {
                            if let Some(a) = c.current_attempt_mut() {
                                a.steps.room_created = true;
                                a.steps.room_sid = Some(room.sid.clone());
                            }
                        })
                        .await?;
                }
                Err(e) => return self.api_failed(&call, attempt, &e).await,
            }
        }

        // 2. The agent (CreateDispatch is not idempotent: look before creating).
        if steps.dispatch_id.is_none() {
            call = self.ensure_dispatch(call, attempt).await?;
        }

        // 3. The dial.
        if steps.participant_sid.is_some() {
            return Ok(());
        }
        if steps.dial_started_at.is_some() {
            return self.reconcile_dial(&call, attempt).await;
        }
        let now = deps.clock.now();
        call = self
            .record(&call_id, attempt, |c| {
                if let Some(a) = c.current_attempt_mut() {
                    a.steps.dial_started_at = Some(now);
                }
                c.advance(CallStatus::Dialing, now);
            })
            .await?;
        self.dial(&call, attempt).await
    }

    /// Makes sure attempt `attempt` has its agent dispatched exactly once. An earlier try
    /// may have dispatched already (ListDispatch finds it); a try whose answer was lost
    /// may still be in LiveKit's hands, so another is created only once that one had
    /// time to show up.
    async fn ensure_dispatch(&self, call: Call, attempt: u32) -> Result<Call, Stop> {
        let deps = &self.deps;
        let agent = self.agent(&call);
        let metadata = Self::dispatch_metadata(&call, attempt);
        let started = call
            .current_attempt()
            .and_then(|a| a.steps.dispatch_started_at);
        match steps::find_dispatch(deps.livekit.as_ref(), &call.room_name, &agent, attempt).await {
            Ok(Some(found)) => {
                metrics::counter!(m::DISPATCHES, "result" => "duplicate_prevented").increment(1);
                return self.record_dispatch(&call.id, attempt, &found.id).await;
            }
            Ok(None) => {}
            Err(e) => {
                return self
                    .api_failed(&call, attempt, &e)
                    .await
                    .and(Err(Stop::Gone))
            }
        }
        let now = deps.clock.now();
        let sent_ago = started.map(|at| (now - at).to_std().unwrap_or_default());
        if let DispatchDecision::LookAgain(after) =
            steps::decide_dispatch(sent_ago, deps.settings.livekit_settle)
        {
            return Err(Stop::Outcome(HandlerOutcome::Defer {
                after,
                reason: "waiting to see whether an interrupted CreateDispatch went through".into(),
            }));
        }
        let call = self
            .record(&call.id, attempt, |c| {
                if let Some(a) = c.current_attempt_mut() {
                    a.steps.dispatch_started_at = Some(now);
                }
            })
            .await?;
        let created =
            steps::create_dispatch(deps.livekit.as_ref(), &call.room_name, &agent, &metadata).await;
        match created {
            Ok(dispatch) => {
                metrics::counter!(m::DISPATCHES, "result" => "done").increment(1);
                self.record_dispatch(&call.id, attempt, &dispatch.id).await
            }
            Err(e) if e.failure.maybe_processed() => Err(Stop::Outcome(HandlerOutcome::Defer {
                after: steps::settle_backoff(Duration::ZERO),
                reason: format!(
                    "CreateDispatch: {}; settling it from LiveKit's state",
                    describe(&e.failure)
                ),
            })),
            Err(e) => {
                // LiveKit answered with an error, or was never reached: nothing was created.
                self.record(&call.id, attempt, |c| {
                    if let Some(a) = c.current_attempt_mut() {
                        a.steps.dispatch_started_at = None;
                    }
                })
                .await?;
                self.api_failed(&call, attempt, &e)
                    .await
                    .and(Err(Stop::Gone))
            }
        }
    }

    async fn record_dispatch(
        &self,
        call_id: &str,
        attempt: u32,
        dispatch_id: &str,
    ) -> Result<Call, Stop> {
        let now = self.deps.clock.now();
        self.record(call_id, attempt, |c| {
            if let Some(a) = c.current_attempt_mut() {
                a.steps.dispatch_id = Some(dispatch_id.to_owned());
            }
            c.dispatch_id = Some(dispatch_id.to_owned());
            c.advance(CallStatus::AgentDispatched, now);
        })
        .await
    }

    /// What a failed dial means: as LiveKit's answer says, except that a dial an operator
    /// hung up (its request then fails `canceled`) is an unanswered end, never a retry.
    async fn dial_failure_kind(&self, call: &Call, e: &LiveKitError) -> Result<FailureKind, Stop> {
        let kind = e.kind();
        if !matches!(kind, FailureKind::Retryable) {
            return Ok(kind);
        }
        let hung_up = self
            .deps
            .calls
            .get(&call.id)
            .await
            .map_err(InfraError::from)?
            .is_some_and(|c| c.hangup_requested());
        Ok(if hung_up {
            FailureKind::CallOutcome(SipOutcome::NoAnswer)
        } else {
            kind
        })
    }

    fn dial_request(&self, call: &Call, attempt: u32) -> DialRequest {
        let identity = callfleet_core::domain::participant_identity(&call.id, attempt);
        DialRequest {
            trunk_id: call.trunk_id.clone().unwrap_or_default(),
            call_to: call.to.to_string(),
            from_number: call.from.as_ref().map(E164::to_string),
            room_name: call.room_name.clone(),
            participant_identity: identity,
            participant_name: None,
            participant_metadata: Some(json!({"call_id": call.id, "attempt": attempt}).to_string()),
            participant_attributes: HashMap::from([
                ("callfleet.callID".to_owned(), call.id.clone()),
                ("callfleet.attempt".to_owned(), attempt.to_string()),
            ]),
            ringing_timeout: call
                .ringing_timeout_s
                .map(|s| Duration::from_secs(u64::from(s))),
            max_call_duration: call
                .max_duration_s
                .map(|s| Duration::from_secs(u64::from(s))),
            wait_until_answered: call.wait_until_answered,
        }
    }

    /// Sends CreateSIPParticipant once. Failures that say nothing happened are retried on
    /// the spot; after one that may have reached LiveKit (a timeout, a broken connection)
    /// the dial is settled from LiveKit's state by `reconcile_dial`, never sent again.
    async fn dial(&self, call: &Call, attempt: u32) -> Result<(), Stop> {
        let deps = &self.deps;
        let request = self.dial_request(call, attempt);
        let result = steps::dial(deps.livekit.as_ref(), &request, || {
            metrics::counter!(m::DIALS, "result" => "sent").increment(1);
        })
        .await;
        let kind = match &result {
            Err(e) => Some(self.dial_failure_kind(call, e).await?),
            Ok(_) => None,
        };
        match result {
            Ok(info) => self.dialed(call, attempt, Dialed::Created(info)).await,
            Err(e) => match kind.unwrap_or_else(|| e.kind()) {
                FailureKind::CallOutcome(outcome) => {
                    let sip_status_code = match &e.failure {
                        ApiFailure::Twirp {
                            sip_status_code, ..
                        } => *sip_status_code,
                        _ => None,
                    };
                    self.end(
                        &call.id,
                        attempt,
                        AttemptEnd::Unanswered(outcome),
                        EndDetails {
                            sip_status_code,
                            reason: Some(describe(&e.failure)),
                            ..Default::default()
                        },
                    )
                    .await
                }
                FailureKind::Retryable | FailureKind::BackPressure
                    if e.failure.maybe_processed() =>
                {
                    // The journal keeps dial_started_at: the next delivery reconciles.
                    metrics::counter!(m::DIALS, "result" => "answer_lost").increment(1);
                    Err(Stop::Outcome(HandlerOutcome::Defer {
                        after: steps::settle_backoff(Duration::ZERO),
                        reason: format!(
                            "CreateSIPParticipant: {}; settling it from LiveKit's state",
                            describe(&e.failure)
                        ),
                    }))
                }
                FailureKind::Retryable | FailureKind::BackPressure => {
                    // LiveKit answered with an error, or was never reached: no participant
                    // was created, so the next try may dial without waiting for evidence.
                    self.record(&call.id, attempt, |c| {
                        if let Some(a) = c.current_attempt_mut() {
                            a.steps.dial_started_at = None;
                        }
                    })
                    .await?;
                    Err(Stop::Outcome(HandlerOutcome::RetryAfter {
                        after: Duration::from_secs(1),
                        reason: format!("CreateSIPParticipant: {}", describe(&e.failure)),
                    }))
                }
                FailureKind::Permanent => self.fail_permanently(&call.id, attempt, &e).await,
            },
        }
    }

    /// Records a dial that reached LiveKit.
    async fn dialed(&self, call: &Call, attempt: u32, dialed: Dialed) -> Result<(), Stop> {
        let deps = &self.deps;
        let now = deps.clock.now();
        let (sid, sip_call_id, answered) = match &dialed {
            Dialed::Created(info) => (
                info.participant_id.clone(),
                info.sip_call_id.clone(),
                call.wait_until_answered,
            ),
            Dialed::Found(p) => (
                p.sid.clone(),
                p.attributes.get("sip.callID").cloned().unwrap_or_default(),
                matches!(
                    p.attributes.get("sip.callStatus").map(String::as_str),
                    Some("active") | Some("automation")
                ),
            ),
        };
        if matches!(dialed, Dialed::Found(_)) {
            metrics::counter!(m::DIALS, "result" => "duplicate_prevented").increment(1);
        }
        let updated = self
            .record(&call.id, attempt, |c| {
                if let Some(a) = c.current_attempt_mut() {
                    a.steps.participant_sid = Some(sid.clone());
                    if !sip_call_id.is_empty() {
                        a.sip_call_id = Some(sip_call_id.clone());
                    }
                    if answered && !a.answered {
                        a.answered = true;
                        a.answered_at = Some(now);
                    }
                }
                c.advance(CallStatus::SipParticipantJoined, now);
                if answered {
                    c.advance(CallStatus::InProgress, now);
                }
            })
            .await;
        let call = match updated {
            Ok(call) => call,
            // The call ended while we dialed (a fast hang-up reported by webhook).
            Err(Stop::Gone) => return Ok(()),
            Err(other) => return Err(other),
        };
        if let Some(a) = call.current_attempt() {
            let from = if a.number == 1 && call.not_before.is_none() && call.call_window.is_none() {
                call.created_at
            } else {
                a.started_at
            };
            metrics::histogram!(m::CALL_SETUP_SECONDS)
                .record((now - from).num_milliseconds().max(0) as f64 / 1e3);
        }
        tracing::info!(call_id = %call.id, attempt, "SIP participant created");
        Ok(())
    }

    /// A dial was sent but its result never recorded (the worker died, or the request
    /// timed out). Ask LiveKit, then the webhook evidence; never dial twice.
    async fn reconcile_dial(&self, call: &Call, attempt: u32) -> Result<(), Stop> {
        let deps = &self.deps;
        let identity = callfleet_core::domain::participant_identity(&call.id, attempt);
        let found =
            steps::find_participant(deps.livekit.as_ref(), &call.room_name, &identity).await;
        match found {
            Ok(Some(p)) => self.dialed(call, attempt, Dialed::Found(Box::new(p))).await,
            Ok(None) => {
                let Some(current) = call.current_attempt() else {
                    return Err(Stop::Gone);
                };
                if current.left_at.is_some() {
                    // It was dialed and has already gone; the webhook evidence says how.
                    let answered = current.answered;
                    let reason = current.disconnect_reason.clone();
                    let end = if answered {
                        AttemptEnd::Completed
                    } else {
                        AttemptEnd::Unanswered(
                            callfleet_core::domain::webhook::outcome_from_disconnect(
                                reason.as_deref(),
                            ),
                        )
                    };
                    return self
                        .end(
                            &call.id,
                            attempt,
                            end,
                            EndDetails {
                                disconnect_reason: reason,
                                ..Default::default()
                            },
                        )
                        .await;
                }
                let started = current.steps.dial_started_at.unwrap_or(current.started_at);
                let waited = (deps.clock.now() - started).to_std().unwrap_or_default();
                // A dial that waits for the answer may be in LiveKit's hands for its whole
                // ringing time before the participant shows.
                let ringing = if call.wait_until_answered {
                    Duration::from_secs(u64::from(call.ringing_timeout_s.unwrap_or(30)))
                } else {
                    Duration::ZERO
                };
                let grace = deps
                    .settings
                    .dial_evidence_grace
                    .max(deps.settings.livekit_settle + ringing);
                if waited < grace {
                    return Err(Stop::Outcome(HandlerOutcome::Defer {
                        after: steps::settle_backoff(waited),
                        reason: "waiting for evidence of an interrupted dial".into(),
                    }));
                }
                // No participant and no webhook: we cannot know whether the phone rang.
                // Redialing could call the person twice, so the attempt ends as unknown.
                self.end(
                    &call.id,
                    attempt,
                    AttemptEnd::Error(
                        "dial outcome unknown after an interrupted dial; not redialed".into(),
                    ),
                    EndDetails::default(),
                )
                .await
            }
            Err(e) => self.api_failed(call, attempt, &e).await,
        }
    }

    /// A room or dispatch step failed: transient → broker retry; permanent → fail the call.
    async fn api_failed(&self, call: &Call, attempt: u32, e: &LiveKitError) -> Result<(), Stop> {
        if steps::transient(e) {
            Err(Stop::Outcome(HandlerOutcome::RetryAfter {
                after: Duration::from_secs(1),
                reason: format!("{}: {}", e.method, describe(&e.failure)),
            }))
        } else {
            self.fail_permanently(&call.id, attempt, e).await
        }
    }
}

enum Dialed {
    Created(livekit_protocol::SipParticipantInfo),
    Found(Box<livekit_protocol::ParticipantInfo>),
}

fn describe(failure: &ApiFailure) -> String {
    match failure {
        ApiFailure::Transport => "LiveKit unreachable".into(),
        ApiFailure::Interrupted => "connection to LiveKit broke before its answer".into(),
        ApiFailure::Timeout => "LiveKit request timed out".into(),
        ApiFailure::Protocol => "unreadable LiveKit response".into(),
        ApiFailure::Twirp {
            code,
            msg,
            sip_status_code,
            sip_status,
        } => match sip_status_code {
            Some(status) => format!(
                "{code}: SIP {status} {}",
                sip_status.clone().unwrap_or_default()
            ),
            None => format!("{code}: {msg}"),
        },
    }
}

#[async_trait]
impl Handler for OutboundCallHandler {
    fn queue(&self) -> WorkQueue {
        WorkQueue::CallJobs
    }

    async fn handle(&self, message: &Message, _redeliveries: u32) -> HandlerOutcome {
        let job = match CallJob::parse(&message.body) {
            Ok(job) => job,
            Err(reason) => return HandlerOutcome::DeadLetter { reason },
        };
        // Inbound calls' jobs (agent checks, the sweeper's nudges) share the queue.
        if is_inbound_call_id(&job.call_id) {
            return match &self.inbound {
                Some(inbound) => inbound.run_job(&job.call_id).await,
                None => HandlerOutcome::DeadLetter {
                    reason: "an inbound call's job on a worker without inbound routing".into(),
                },
            };
        }
        match self.run(&job).await {
            Ok(()) | Err(Stop::Gone) => HandlerOutcome::Done,
            Err(Stop::Outcome(outcome)) => outcome,
        }
    }

    async fn dead_lettered(&self, message: &Message, reason: &str) {
        let Ok(job) = CallJob::parse(&message.body) else {
            return;
        };
        let now = self.deps.clock.now();
        let reason = reason.to_owned();
        let updated = self
            .deps
            .calls
            .update(&job.call_id, |c| {
                c.note(now, "dead_lettered", Some(reason.clone()));
                c.current_attempt().is_none_or(|a| !a.dial_started())
            })
            .await;
        if let Ok(Some((call, true))) = updated {
            // Nothing is ringing: the trunk slot is not in use until the job is replayed.
            self.deps.release_trunk(&call).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_metadata_is_snake_case_with_call_fields() {
        let mut call: Call = serde_json::from_value(json!({
            "id": "call_1", "direction": "outbound", "status": "queued", "to": "+15105550123",
            "room_name": "cf-1", "retry": {"max_attempts": 1, "retry_on": [], "retry_delay_s": 1},
            "created_at": "2026-11-20T12:00:00Z", "updated_at": "2026-11-20T12:00:00Z",
            "trunk_id": "ST_1"
        }))
        .expect("call");
        call.context =
            json!({"customerName": "Ada", "invoiceInfo": {"amountDue": 12}, "callId": "spoof"});
        let meta: Value =
            serde_json::from_str(&OutboundCallHandler::dispatch_metadata(&call, 2)).expect("json");
        assert_eq!(meta["customer_name"], "Ada");
        assert_eq!(meta["invoice_info"]["amount_due"], 12);
        assert_eq!(meta["call_id"], "call_1", "call fields win over context");
        assert_eq!(meta["attempt"], 2);
        assert_eq!(steps::metadata_attempt(&meta.to_string()), Some(2));
    }
}
