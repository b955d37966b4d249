//! Inbound calls: a SIP caller joined a room callfleet did not create. The call is keyed
//! by its room, routed to an agent profile from the in-memory routing table, and given
//! that profile's agent exactly once per room:
//! - one worker drives a call at a time (a lock); the others defer and find it done;
//! - CreateDispatch is journalled before it is sent, and a dispatch whose answer was lost
//!   is looked for in LiveKit (ListDispatch) before anything is sent again;
//! - an end seen first (the caller left, the room finished) leaves a tombstone that the
//!   dispatch step checks after the call exists, so a late join dispatches nothing;
//! - an agent that does not join in time gets the fallback profile's agent once, or the
//!   caller is hung up, per profile.

use std::sync::Arc;
use std::time::Duration;

use callfleet_core::calls::{wall_time, CallJob};
pub use callfleet_core::config::UnroutedAction;
use callfleet_core::domain::inbound::{inbound_call_id, inbound_facts, InboundEnd, InboundStep};
use callfleet_core::domain::phone::Region;
use callfleet_core::domain::phone::E164;
use callfleet_core::domain::routing::{
    Excluding, NoAgentAction, RouteQuery, RoutedProfile, RoutingRecord,
};
use callfleet_core::domain::webhook::{EventKind, ParticipantRef, RoomRef, WebhookEvent};
use callfleet_core::domain::{Call, CallStatus};
use callfleet_core::ports::LiveKitError;
use callfleet_core::routing::RoutingCache;
use callfleet_core::telemetry::metrics as m;
use chrono::{DateTime, Utc};
use livekit_protocol as proto;

use crate::calls::{CallDeps, InfraError};
use crate::steps::{self, DispatchDecision};
use crate::HandlerOutcome;

#[derive(Debug, Clone)]
pub struct InboundSettings {
    pub unrouted: UnroutedAction,
    /// Delete the room once the call ended (agents and anyone else are removed).
    pub delete_room_after: bool,
    /// How long a profile slot survives without its call's end being seen.
    pub slot_ttl: Duration,
    /// How long one worker keeps a call to itself.
    pub lock_ttl: Duration,
    /// The region numbers without a `+` are read in.
    pub region: Option<Region>,
}

impl Default for InboundSettings {
    fn default() -> Self {
        Self {
            unrouted: UnroutedAction::Hangup,
            delete_room_after: false,
            slot_ttl: Duration::from_secs(4 * 3600),
            lock_ttl: Duration::from_secs(10),
            region: None,
        }
    }
}

/// What asked for the call to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A webhook event, received by the ingress then.
    Webhook {
        received_at: Option<DateTime<Utc>>,
        redelivered: bool,
    },
    /// A call job: an agent check, or the sweeper's nudge.
    Job,
}

impl Origin {
    fn may_have_lost_work(self) -> bool {
        match self {
            Origin::Webhook { redelivered, .. } => redelivered,
            Origin::Job => true,
        }
    }
}

/// Why a step stopped short.
#[derive(Debug)]
pub enum Halt {
    Infra(InfraError),
    LiveKit(LiveKitError),
    /// Another worker holds the call.
    Busy,
    /// Come back later (a lost dispatch may still land; the agent is not due yet).
    LookAgain(Duration),
}

impl From<InfraError> for Halt {
    fn from(e: InfraError) -> Self {
        Halt::Infra(e)
    }
}

impl From<callfleet_core::calls::CallBookError> for Halt {
    fn from(e: callfleet_core::calls::CallBookError) -> Self {
        Halt::Infra(e.into())
    }
}

impl From<callfleet_core::ports::StoreError> for Halt {
    fn from(e: callfleet_core::ports::StoreError) -> Self {
        Halt::Infra(e.into())
    }
}

impl From<callfleet_core::ports::BrokerError> for Halt {
    fn from(e: callfleet_core::ports::BrokerError) -> Self {
        Halt::Infra(e.into())
    }
}

impl Halt {
    pub fn outcome(self) -> HandlerOutcome {
        match self {
            Halt::Infra(e) => e.retry(),
            Halt::LiveKit(e) => HandlerOutcome::RetryAfter {
                after: steps::jitter(Duration::from_secs(1)),
                reason: e.to_string(),
            },
            Halt::Busy => HandlerOutcome::Defer {
                after: steps::jitter(Duration::from_millis(300)),
                reason: "another worker holds the call".into(),
            },
            Halt::LookAgain(after) => HandlerOutcome::Defer {
                after,
                reason: "waiting on LiveKit".into(),
            },
        }
    }
}

fn dispatched_metric(result: &'static str) {
    metrics::counter!(m::DISPATCHES, "direction" => "inbound", "result" => result).increment(1);
}

fn tombstone(call_id: &str) -> String {
    format!("inbound-ended:{call_id}")
}

const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The inbound side of the fleet's workers.
pub struct Inbound {
    deps: CallDeps,
    routing: Arc<RoutingCache>,
    settings: InboundSettings,
}

impl Inbound {
    pub fn new(deps: CallDeps, routing: Arc<RoutingCache>, settings: InboundSettings) -> Self {
        Self {
            deps,
            routing,
            settings,
        }
    }

    /// Whether `event` is about an inbound room (any room the fleet did not name).
    pub fn concerns(event: &WebhookEvent) -> bool {
        event.room.as_ref().is_some_and(|r| {
            callfleet_core::domain::call_for_room(&r.name).is_none() && !r.name.is_empty()
        })
    }

    /// Applies a webhook event about an inbound room. `received_at`: when the ingress
    /// took it (for the webhook → dispatch latency).
    /// `redelivered`: the broker handed this event out before (its worker may have died
    /// after dispatching and before queueing the agent check).
    pub async fn on_event(
        &self,
        event: &WebhookEvent,
        received_at: Option<DateTime<Utc>>,
        redelivered: bool,
    ) -> Result<&'static str, Halt> {
        let Some(room) = &event.room else {
            return Ok("ignored");
        };
        match (&event.event, &event.participant) {
            (EventKind::ParticipantJoined, Some(p)) if p.is_sip() => {
                let origin = Origin::Webhook {
                    received_at,
                    redelivered,
                };
                self.caller_joined(room, p, origin).await
            }
            (EventKind::ParticipantJoined, Some(p)) if p.is_agent() => {
                self.agent_joined(room, p).await
            }
            (EventKind::ParticipantLeft | EventKind::ParticipantConnectionAborted, Some(p))
                if p.is_sip() =>
            {
                self.ended(room, p.disconnect_reason.clone()).await
            }
            (EventKind::RoomFinished, _) => self.ended(room, Some("ROOM_FINISHED".into())).await,
            _ => Ok("ignored"),
        }
    }

    /// LiveKit passes numbers as the INVITE had them: `+15105550100`, or without the
    /// `+` from some carriers (then read as international, or in the configured region).
    fn parse_number(&self, raw: Option<&str>) -> Option<E164> {
        let raw = raw?;
        E164::parse(raw, None)
            .or_else(|_| E164::parse(&format!("+{raw}"), None))
            .or_else(|_| E164::parse(raw, self.settings.region))
            .ok()
    }

    async fn caller_joined(
        &self,
        room: &RoomRef,
        p: &ParticipantRef,
        origin: Origin,
    ) -> Result<&'static str, Halt> {
        let deps = &self.deps;
        let now = deps.clock.now();
        let leg = inbound_facts(room, p, now);
        let Some(to) = self.parse_number(leg.dialed.as_deref()) else {
            // Routing is by dialed number; a DID that is not a phone number cannot be
            // routed (LiveKit's trunks carry E.164 numbers; see `callfleet livekit check`).
            tracing::warn!(room = %room.name, "inbound SIP participant without a dialed phone number; not routed");
            metrics::counter!(m::INBOUND_CALLS, "result" => "no_dialed_number").increment(1);
            return Ok("unroutable");
        };
        let from = self.parse_number(leg.caller.as_deref());
        let call = Call::new_inbound(room, leg, to, from, now);
        let id = call.id.clone();
        if deps.calls.create(&call).await?.is_some() {
            metrics::counter!(m::INBOUND_CALLS, "result" => "started").increment(1);
            tracing::info!(room = %room.name, "inbound call started");
        } else {
            // The same room again: a duplicate, a replay, or the caller reconnecting.
            let sid = p.sid.clone();
            deps.calls
                .update(&id, |c| {
                    let reconnect = c
                        .inbound
                        .as_ref()
                        .is_some_and(|l| !sid.is_empty() && l.participant_sid != sid);
                    if reconnect && !c.status.is_terminal() {
                        if let Some(l) = c.inbound.as_mut() {
                            l.participant_sid = sid.clone();
                        }
                        c.note(now, "caller_reconnected", None);
                    }
                })
                .await?;
        }
        self.progress(&id, origin).await
    }

    async fn agent_joined(&self, room: &RoomRef, p: &ParticipantRef) -> Result<&'static str, Halt> {
        let id = inbound_call_id(room);
        let now = self.deps.clock.now();
        let identity = p.identity.clone();
        let joined_at = p
            .joined_at_ms
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(now);
        let Some((call, changed)) = self
            .deps
            .calls
            .update(&id, |c| c.agent_joined(&identity, joined_at))
            .await?
        else {
            return Ok("ignored");
        };
        if changed {
            if let Some(at) = call
                .inbound
                .as_ref()
                .and_then(|l| l.dispatches.iter().rev().find_map(|d| d.dispatched_at))
            {
                let secs = (joined_at - at).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::histogram!(m::AGENT_JOIN_SECONDS).record(secs);
            }
            return Ok("applied");
        }
        Ok("stale")
    }

    /// The caller left, or the room finished: tombstone first (a join processed later
    /// then dispatches nothing), then end the call if it exists.
    async fn ended(&self, room: &RoomRef, reason: Option<String>) -> Result<&'static str, Halt> {
        let id = inbound_call_id(room);
        let store = self.deps.calls.store();
        store
            .claim_key(&tombstone(&id), "ended", TOMBSTONE_TTL)
            .await?;
        let now = self.deps.clock.now();
        let updated = self
            .deps
            .calls
            .update(&id, |c| {
                c.inbound_ended(InboundEnd::CallerLeft, reason.clone(), now)
            })
            .await?;
        match updated {
            Some((call, Some(_))) => {
                self.finish(&call).await;
                Ok("applied")
            }
            Some((call, None)) => {
                // Already ended (a duplicate, or the room finishing after the caller left):
                // make sure its slot is free.
                self.release_slot(&call).await;
                Ok("stale")
            }
            None => Ok("tombstoned"),
        }
    }

    /// After a call ended: free its profile slot, count it, close the room if asked to.
    async fn finish(&self, call: &Call) {
        self.release_slot(call).await;
        metrics::counter!(m::CALLS_FINISHED, "direction" => "inbound", "status" => call.status.as_str())
            .increment(1);
        tracing::info!(status = call.status.as_str(), "inbound call finished");
        if self.settings.delete_room_after {
            if let Err(e) = self.deps.livekit.delete_room(&call.room_name).await {
                if !e.is_not_found() {
                    tracing::debug!(call_id = %call.id, error = %e, "room not deleted");
                }
            }
        }
    }

    async fn release_slot(&self, call: &Call) {
        let Some(profile) = call.slot_to_release().map(str::to_owned) else {
            return;
        };
        match self.routing.store().release_slot(&profile, &call.id).await {
            Ok(_) => {
                let _ = self
                    .deps
                    .calls
                    .update(&call.id, |c| c.slot_released())
                    .await;
            }
            // The slot expires on its own; capacity is short until then.
            Err(e) => tracing::warn!(call_id = %call.id, error = %e, "profile slot not released"),
        }
    }

    /// A call job for an inbound call (the agent check, or the sweeper's nudge).
    pub async fn run_job(&self, call_id: &str) -> HandlerOutcome {
        match self.progress(call_id, Origin::Job).await {
            Ok(_) => HandlerOutcome::Done,
            Err(halt) => halt.outcome(),
        }
    }

    /// Moves the call as far as it can go now, under its lock.
    async fn progress(&self, call_id: &str, origin: Origin) -> Result<&'static str, Halt> {
        let store = self.deps.calls.store();
        let lock = format!("call:{call_id}");
        let Some(token) = store.try_lock(&lock, self.settings.lock_ttl).await? else {
            return Err(Halt::Busy);
        };
        let result = self.drive(call_id, origin).await;
        if let Err(e) = store.unlock(&lock, &token).await {
            tracing::debug!(error = %e, "call lock not released; it expires");
        }
        result
    }

    async fn drive(&self, call_id: &str, origin: Origin) -> Result<&'static str, Halt> {
        let deps = &self.deps;
        let received_at = match origin {
            Origin::Webhook { received_at, .. } => received_at,
            Origin::Job => None,
        };
        let mut result = "duplicate";
        // Each pass takes one step; a call needs at most a handful.
        for _ in 0..8 {
            let Some(call) = deps.calls.get(call_id).await? else {
                return Ok("unknown_call");
            };
            let now = deps.clock.now();
            match call.inbound_step() {
                InboundStep::Done => {
                    if result == "duplicate" {
                        dispatched_metric(if call.status == CallStatus::Unrouted {
                            "unrouted"
                        } else {
                            "skipped_ended"
                        });
                    }
                    self.release_slot(&call).await;
                    return Ok(result);
                }
                InboundStep::Route => {
                    self.route(&call, now).await?;
                    result = "applied";
                }
                InboundStep::Dispatch(n) => {
                    if self.ended_first(&call).await? {
                        dispatched_metric("skipped_ended");
                        return Ok("skipped_ended");
                    }
                    self.dispatch(&call, n, None, received_at).await?;
                    result = "applied";
                }
                InboundStep::Reconcile(n) => {
                    if self.ended_first(&call).await? {
                        dispatched_metric("skipped_ended");
                        return Ok("skipped_ended");
                    }
                    let started = call
                        .inbound
                        .as_ref()
                        .and_then(|l| l.dispatches.iter().find(|d| d.n == n))
                        .and_then(|d| d.started_at);
                    self.dispatch(&call, n, started, received_at).await?;
                    result = "applied";
                }
                InboundStep::AwaitAgent { n, due } => {
                    if now < due {
                        // The check at `due` is queued. A job (the sweeper's nudge) or a
                        // redelivered event may be all that is left of a worker that died
                        // before queueing it: queue it again (a duplicate is harmless).
                        if origin.may_have_lost_work() {
                            self.queue_check(&call, n, due).await?;
                        }
                        if result == "duplicate" {
                            dispatched_metric("duplicate_prevented");
                        }
                        return Ok(result);
                    }
                    self.check_agent(&call, n).await?;
                    result = "applied";
                }
                InboundStep::Live => {
                    if origin == Origin::Job {
                        // The sweeper's nudge: is the caller still there?
                        self.check_caller(&call).await?;
                    } else if result == "duplicate" {
                        dispatched_metric("duplicate_prevented");
                    }
                    return Ok(result);
                }
            }
        }
        Ok(result)
    }

    /// Whether the call's end was seen before its dispatch (the tombstone); if so, ends
    /// the call here.
    async fn ended_first(&self, call: &Call) -> Result<bool, Halt> {
        let store = self.deps.calls.store();
        if store.get_key(&tombstone(&call.id)).await?.is_none() {
            return Ok(false);
        }
        let now = self.deps.clock.now();
        if let Some((call, Some(_))) = self
            .deps
            .calls
            .update(&call.id, |c| {
                c.inbound_ended(
                    InboundEnd::CallerLeft,
                    Some("ended before dispatch".into()),
                    now,
                )
            })
            .await?
        {
            self.finish(&call).await;
        }
        Ok(true)
    }

    /// Routes the call: resolve from memory, then take a slot of the chosen profile (the
    /// cap is enforced here, atomically; a profile found full is excluded and the call
    /// resolved again).
    async fn route(&self, call: &Call, now: DateTime<Utc>) -> Result<(), Halt> {
        let Some(leg) = &call.inbound else {
            return Ok(());
        };
        let loads = self.routing.loads();
        let mut full: Vec<String> = Vec::new();
        let (decision, slot) = loop {
            let q = RouteQuery {
                to: call.to.as_str(),
                from: call.from.as_ref().map(E164::as_str),
                trunk_id: leg.trunk_id.as_deref(),
                rule_id: leg.rule_id.as_deref(),
                at: now,
                call_key: &call.id,
            };
            let decision = self.routing.resolve(
                &q,
                &Excluding {
                    loads: loads.as_ref(),
                    full: &full,
                },
            );
            let Some(p) = decision.profile() else {
                break (decision, None);
            };
            let taken = self
                .routing
                .store()
                .claim_slot(
                    &p.id,
                    &call.id,
                    p.max_concurrent_calls,
                    self.settings.slot_ttl,
                )
                .await?;
            if taken {
                let id = p.id.clone();
                break (decision, Some(id));
            }
            if full.len() >= 16 {
                break (decision, None);
            }
            full.push(p.id.clone());
        };
        let record = RoutingRecord::of(&decision, now);
        let unrouted = decision.profile.is_none();
        let (call, _) = self
            .deps
            .calls
            .update(&call.id, |c| c.routed(record.clone(), slot.clone(), now))
            .await?
            .ok_or(Halt::Infra(InfraError::Calls(
                callfleet_core::calls::CallBookError::Corrupt {
                    id: call.id.clone(),
                    reason: "vanished while routing".into(),
                },
            )))?;
        if call.routing.as_ref() != Some(&record) {
            // Someone routed it first; our slot (if it differs) goes back.
            if let Some(s) = &slot {
                if call.inbound.as_ref().and_then(|l| l.slot.as_deref()) != Some(s) {
                    let _ = self.routing.store().release_slot(s, &call.id).await;
                }
            }
            return Ok(());
        }
        tracing::info!(decision = %record.decision, profile = ?record.profile_id, "inbound call routed");
        if unrouted {
            dispatched_metric("unrouted");
            metrics::counter!(m::CALLS_FINISHED, "direction" => "inbound", "status" => "unrouted")
                .increment(1);
            if self.settings.unrouted == UnroutedAction::Hangup {
                self.hang_up(&call, "unrouted").await?;
            }
        } else if record.reason.result() == "fallback" || record.reason.result() == "default" {
            dispatched_metric("fallback");
        }
        Ok(())
    }

    /// Removes the caller (RemoveParticipant), and records that it was done.
    async fn hang_up(&self, call: &Call, why: &str) -> Result<(), Halt> {
        let Some(leg) = &call.inbound else {
            return Ok(());
        };
        match self
            .deps
            .livekit
            .remove_participant(&call.room_name, &leg.participant_identity)
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(Halt::LiveKit(e)),
        }
        let now = self.deps.clock.now();
        self.deps
            .calls
            .update(&call.id, |c| c.hung_up(now, why))
            .await?;
        Ok(())
    }

    fn profile(&self, id: Option<&str>) -> Option<Arc<RoutedProfile>> {
        self.routing.table().get(id?).cloned()
    }

    /// Dispatch `n`: planned, journalled, checked against what LiveKit already has, then
    /// sent once. `started`: an earlier send's journal time (its answer may be lost).
    async fn dispatch(
        &self,
        call: &Call,
        n: u32,
        started: Option<DateTime<Utc>>,
        received_at: Option<DateTime<Utc>>,
    ) -> Result<(), Halt> {
        let deps = &self.deps;
        let now = deps.clock.now();
        let routing = call.routing.as_ref();
        // The dispatch planned for `n`, or (first pass) the routed profile's.
        let planned = call
            .inbound
            .as_ref()
            .and_then(|l| l.dispatches.iter().find(|d| d.n == n))
            .cloned();
        let (profile_id, agent, metadata) = match planned {
            Some(d) => (d.profile_id, d.agent_name, d.metadata),
            None => {
                let profile_id = routing.and_then(|r| r.profile_id.clone());
                let profile = self.profile(profile_id.as_deref());
                let agent = routing
                    .and_then(|r| r.agent_name.clone())
                    .unwrap_or_else(|| deps.settings.default_agent.clone());
                let profile_metadata = profile
                    .map(|p| p.profile.metadata.clone())
                    .unwrap_or_default();
                (
                    profile_id,
                    agent,
                    call.inbound_metadata(&profile_metadata, n),
                )
            }
        };
        // Journal before sending: from here on a dispatch may exist.
        let (call, may_send) = deps
            .calls
            .update(&call.id, |c| {
                c.plan_dispatch(n, profile_id.clone(), agent.clone(), metadata.clone());
                c.dispatch_starting(n, now)
            })
            .await?
            .ok_or(Halt::LookAgain(Duration::from_secs(1)))?;
        if !may_send {
            return Ok(());
        }
        // What LiveKit already has in the room: ours (an answer lost), or the dispatch
        // rule's own agent (`room_config.agents`): then nothing is sent.
        let existing = steps::list_dispatches(deps.livekit.as_ref(), &call.room_name)
            .await
            .map_err(Halt::LiveKit)?;
        let join_timeout = self
            .profile(profile_id.as_deref())
            .map_or(20, |p| p.profile.agent_join_timeout_s);
        let join_timeout = chrono::Duration::seconds(i64::from(join_timeout));
        if let Some(ours) = existing.iter().find(|d| {
            d.agent_name == agent
                && steps::metadata_attempt(&d.metadata) == Some(n)
                && metadata_call(&d.metadata).as_deref() == Some(call.id.as_str())
        }) {
            dispatched_metric("duplicate_prevented");
            return self
                .record_dispatched(&call, n, Some(ours.id.clone()), false, join_timeout)
                .await;
        }
        if call
            .inbound
            .as_ref()
            .is_some_and(|l| l.agent_joined_at.is_some())
        {
            // An agent is already in the room: whatever became of this dispatch, another
            // would be a second agent.
            deps.calls
                .update(&call.id, |c| c.dispatch_confirmed_by_agent(n))
                .await?;
            return Ok(());
        }
        if n == 1 && existing.iter().any(|d| d.agent_name == agent) {
            dispatched_metric("dispatched_by_rule");
            return self
                .record_dispatched(&call, n, None, true, join_timeout)
                .await;
        }
        if let Some(sent) = started {
            let waited = (now - sent).to_std().unwrap_or_default();
            if let DispatchDecision::LookAgain(after) =
                steps::decide_dispatch(Some(waited), deps.settings.livekit_settle)
            {
                return Err(Halt::LookAgain(after));
            }
        }
        if let Some(at) = received_at {
            let secs = (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!(m::INBOUND_DISPATCH_SECONDS).record(secs);
        }
        match steps::create_dispatch(deps.livekit.as_ref(), &call.room_name, &agent, &metadata)
            .await
        {
            Ok(d) => {
                dispatched_metric(if n == 1 { "dispatched" } else { "fallback" });
                tracing::info!(agent = %agent, dispatch = %d.id, "agent dispatched");
                self.record_dispatched(&call, n, Some(d.id), false, join_timeout)
                    .await
            }
            // Maybe carried out: the next pass reconciles (ListDispatch) before any repeat.
            Err(e) => Err(Halt::LiveKit(e)),
        }
    }

    async fn record_dispatched(
        &self,
        call: &Call,
        n: u32,
        dispatch_id: Option<String>,
        by_rule: bool,
        join_timeout: chrono::Duration,
    ) -> Result<(), Halt> {
        let now = self.deps.clock.now();
        let updated = self
            .deps
            .calls
            .update(&call.id, |c| {
                c.dispatched(n, dispatch_id.clone(), by_rule, join_timeout, now)
            })
            .await?;
        if let Some((call, true)) = updated {
            self.queue_check(&call, n, now + join_timeout).await?;
        }
        Ok(())
    }

    /// The agent check of dispatch `n`, due at `due`.
    async fn queue_check(&self, call: &Call, n: u32, due: DateTime<Utc>) -> Result<(), Halt> {
        let job = CallJob {
            call_id: call.id.clone(),
            attempt: n,
        };
        let clock = self.deps.clock.as_ref();
        self.deps
            .broker
            .publish(job.message(Some(wall_time(clock, due))))
            .await?;
        Ok(())
    }

    /// The agent of dispatch `n` is due: has it joined (its webhook may be late)? If not,
    /// the profile's fallback agent once, or hang up.
    async fn check_agent(&self, call: &Call, n: u32) -> Result<(), Halt> {
        let deps = &self.deps;
        let participants = match deps.livekit.list_participants(&call.room_name).await {
            Ok(ps) => ps,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(Halt::LiveKit(e)),
        };
        let now = deps.clock.now();
        let agent = participants
            .iter()
            .find(|p| p.kind == proto::participant_info::Kind::Agent as i32);
        if let Some(agent) = agent {
            deps.calls
                .update(&call.id, |c| c.agent_joined(&agent.identity, now))
                .await?;
            return Ok(());
        }
        let caller_here = call.inbound.as_ref().is_some_and(|l| {
            participants
                .iter()
                .any(|p| p.identity == l.participant_identity)
        });
        if !caller_here {
            // The caller is gone and no webhook said so.
            if let Some((call, Some(_))) = deps
                .calls
                .update(&call.id, |c| {
                    c.inbound_ended(
                        InboundEnd::CallerLeft,
                        Some("caller gone (agent check)".into()),
                        now,
                    )
                })
                .await?
            {
                self.finish(&call).await;
            }
            return Ok(());
        }
        let (call, changed) = deps
            .calls
            .update(&call.id, |c| c.no_agent(n, now))
            .await?
            .ok_or(Halt::LookAgain(Duration::from_secs(1)))?;
        if !changed {
            return Ok(());
        }
        dispatched_metric("no_agent");
        tracing::warn!(dispatch = n, "the dispatched agent did not join in time");
        let profile_id = call
            .inbound
            .as_ref()
            .and_then(|l| l.dispatches.iter().find(|d| d.n == n))
            .and_then(|d| d.profile_id.clone());
        let profile = self.profile(profile_id.as_deref());
        let wants_fallback = profile
            .as_ref()
            .is_none_or(|p| p.profile.on_no_agent == NoAgentAction::Fallback);
        if n == 1 && wants_fallback {
            let table = self.routing.table();
            let mut considered = Vec::new();
            let fallback = profile_id.as_deref().and_then(|id| {
                table.fallback_of(id, now, self.routing.loads().as_ref(), &mut considered)
            });
            if let Some(fb) = fallback {
                let fb = &fb.profile;
                let metadata = call.inbound_metadata(&fb.metadata, 2);
                let (fb_id, fb_agent) = (fb.id.clone(), fb.agent_name.clone());
                deps.calls
                    .update(&call.id, |c| {
                        if c.plan_dispatch(
                            2,
                            Some(fb_id.clone()),
                            fb_agent.clone(),
                            metadata.clone(),
                        ) {
                            c.note(now, "fallback_after_no_agent", Some(fb_id.clone()));
                        }
                    })
                    .await?;
                return Ok(());
            }
        }
        self.hang_up(&call, "no_agent").await?;
        if let Some((call, Some(_))) = deps
            .calls
            .update(&call.id, |c| {
                c.inbound_ended(InboundEnd::NoAgent, None, now)
            })
            .await?
        {
            self.finish(&call).await;
        }
        Ok(())
    }

    /// The call is live and quiet: ask LiveKit whether the caller is still there (a lost
    /// leave webhook would otherwise hold the profile's slot).
    async fn check_caller(&self, call: &Call) -> Result<(), Halt> {
        let Some(leg) = &call.inbound else {
            return Ok(());
        };
        let here = steps::find_participant(
            self.deps.livekit.as_ref(),
            &call.room_name,
            &leg.participant_identity,
        )
        .await
        .map_err(Halt::LiveKit)?;
        if here.is_some() {
            return Ok(());
        }
        let now = self.deps.clock.now();
        if let Some((call, Some(_))) = self
            .deps
            .calls
            .update(&call.id, |c| {
                c.inbound_ended(
                    InboundEnd::CallerLeft,
                    Some("caller gone (sweeper)".into()),
                    now,
                )
            })
            .await?
        {
            self.finish(&call).await;
        }
        Ok(())
    }
}

/// The `call_id` a dispatch's metadata names (dispatches callfleet created carry it).
fn metadata_call(metadata: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(metadata)
        .ok()?
        .get("call_id")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_metadata_names_its_call() {
        assert_eq!(
            metadata_call(r#"{"attempt":1,"call_id":"call_in1","x":"y"}"#).as_deref(),
            Some("call_in1")
        );
        assert_eq!(metadata_call(r#"{"attempt":1}"#), None);
    }
}
