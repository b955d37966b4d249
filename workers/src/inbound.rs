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
use std::time::{Duration, Instant};

use callfleet_core::calls::{wall_time, CallJob, Held};
pub use callfleet_core::config::UnroutedAction;
use callfleet_core::domain::inbound::{
    inbound_call_id, inbound_facts, InboundDispatch, InboundEnd, InboundStep,
};
use callfleet_core::domain::phone::Region;
use callfleet_core::domain::phone::E164;
use callfleet_core::domain::routing::{
    Decision, Excluding, Ineligible, NoAgentAction, RouteQuery, RouteReason, RoutedProfile,
    RoutingRecord, DEFAULT_AGENT_JOIN_TIMEOUT_S,
};
use callfleet_core::domain::webhook::{EventKind, ParticipantRef, RoomRef, WebhookEvent};
use callfleet_core::domain::Call;
use callfleet_core::ports::store::LockToken;
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
                self.ended(room, Some(&p.identity), p.disconnect_reason.clone())
                    .await
            }
            (EventKind::RoomFinished, _) => {
                self.ended(room, None, Some("ROOM_FINISHED".into())).await
            }
            _ => Ok("ignored"),
        }
    }

    /// LiveKit passes numbers as the INVITE had them: `+15105550100`, or without the
    /// `+` from some carriers (read in the configured region, else as international).
    fn parse_number(&self, raw: Option<&str>) -> Option<E164> {
        let raw = raw?;
        E164::parse(raw, self.settings.region)
            .or_else(|_| E164::parse(&format!("+{raw}"), None))
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
        let mut known = None;
        if deps.calls.create(&call).await?.is_some() {
            metrics::counter!(m::INBOUND_CALLS, "result" => "started").increment(1);
            tracing::info!(room = %room.name, "inbound call started");
            // A new record is at version 1.
            known = Some(Held { call, version: 1 });
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
        self.progress(&id, origin, known).await
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

    /// The caller left (`caller`: its identity), or the room finished (`None`):
    /// tombstone first (a join processed later then dispatches nothing), then end the
    /// call if it exists. Another SIP participant leaving (a transfer leg, a second
    /// caller in a shared room) ends nothing.
    async fn ended(
        &self,
        room: &RoomRef,
        caller: Option<&str>,
        reason: Option<String>,
    ) -> Result<&'static str, Halt> {
        let id = inbound_call_id(room);
        let store = self.deps.calls.store();
        store
            .claim_key(&tombstone(&id), caller.unwrap_or(ROOM_GONE), TOMBSTONE_TTL)
            .await?;
        let now = self.deps.clock.now();
        let updated = self
            .deps
            .calls
            .update(&id, |c| {
                if !ends_call(c, caller) {
                    return None;
                }
                c.inbound_ended(InboundEnd::CallerLeft, reason.clone(), now)
            })
            .await?;
        match updated {
            Some((call, Some(_))) => {
                self.finish(&call).await?;
                Ok("applied")
            }
            Some((call, None)) => {
                // Already ended (a duplicate, or the room finishing after the caller left):
                // make sure its slot is free.
                self.release_slot(&call).await?;
                Ok("stale")
            }
            None => Ok("tombstoned"),
        }
    }

    /// After a call ended: free its profile slot, count it, close the room if asked to.
    async fn finish(&self, call: &Call) -> Result<(), Halt> {
        metrics::counter!(m::CALLS_FINISHED, "direction" => "inbound", "status" => call.status.as_str())
            .increment(1);
        tracing::info!(status = call.status.as_str(), "inbound call finished");
        if self.settings.delete_room_after {
            if let Err(e) = self.deps.livekit.delete_room(&call.room_name).await {
                if !e.is_not_found() {
                    tracing::debug!(error = %e, "room not deleted");
                }
            }
        }
        self.release_slot(call).await
    }

    /// Frees the profile slot an ended call holds; an error is returned (the event or job
    /// is retried) rather than leaving the slot taken until it expires.
    async fn release_slot(&self, call: &Call) -> Result<(), Halt> {
        let Some(profile) = call.slot_to_release().map(str::to_owned) else {
            return Ok(());
        };
        self.routing
            .store()
            .release_slot(&profile, &call.id)
            .await?;
        self.deps
            .calls
            .update(&call.id, |c| c.slot_released())
            .await?;
        Ok(())
    }

    /// A call job for an inbound call (the agent check, or the sweeper's nudge).
    pub async fn run_job(&self, call_id: &str) -> HandlerOutcome {
        match self.progress(call_id, Origin::Job, None).await {
            Ok(_) => HandlerOutcome::Done,
            Err(halt) => halt.outcome(),
        }
    }

    /// Moves the call as far as it can go now, under its lock.
    async fn progress(
        &self,
        call_id: &str,
        origin: Origin,
        known: Option<Held>,
    ) -> Result<&'static str, Halt> {
        let store = self.deps.calls.store();
        let lock = CallLock {
            name: format!("call:{call_id}"),
            token: None,
            taken: Instant::now(),
        };
        let Some(token) = store.try_lock(&lock.name, self.settings.lock_ttl).await? else {
            return Err(Halt::Busy);
        };
        let mut lock = CallLock {
            token: Some(token),
            ..lock
        };
        let result = self.drive(call_id, origin, known, &mut lock).await;
        if let Some(token) = &lock.token {
            if let Err(e) = store.unlock(&lock.name, token).await {
                tracing::debug!(error = %e, "call lock not released; it expires");
            }
        }
        result
    }

    /// Renews the call's lock before a request that must not overlap another worker's
    /// (a lock held for more than half its time could lapse mid-request). False: it
    /// lapsed, someone else may hold the call; stop.
    async fn keep_lock(&self, lock: &mut CallLock) -> Result<bool, Halt> {
        if lock.taken.elapsed() < self.settings.lock_ttl / 2 {
            return Ok(true);
        }
        let Some(token) = &lock.token else {
            return Ok(false);
        };
        let kept = self
            .deps
            .calls
            .store()
            .extend_lock(&lock.name, token, self.settings.lock_ttl)
            .await?;
        if kept {
            lock.taken = Instant::now();
        } else {
            lock.token = None;
        }
        Ok(kept)
    }

    /// `known`: the call as just created (saves reading it back).
    async fn drive(
        &self,
        call_id: &str,
        origin: Origin,
        known: Option<Held>,
        lock: &mut CallLock,
    ) -> Result<&'static str, Halt> {
        let deps = &self.deps;
        let received_at = match origin {
            Origin::Webhook { received_at, .. } => received_at,
            Origin::Job => None,
        };
        let known = match known {
            Some(held) => Some(held),
            None => deps.calls.get_held(call_id).await?,
        };
        let Some(mut call) = known else {
            return Ok("unknown_call");
        };
        // Checked once the call exists and before anything is sent (the other half of the
        // ordering is in `ended`: tombstone first, then the call).
        if matches!(
            call.inbound_step(),
            InboundStep::Route | InboundStep::Dispatch(_) | InboundStep::Reconcile(_)
        ) {
            if let Some(ended) = self.ended_first(&call).await? {
                dispatched_metric("skipped_ended");
                let _ = ended;
                return Ok("skipped_ended");
            }
        }
        let mut result = "duplicate";
        // Each pass takes one step; a call needs a handful at most.
        for _ in 0..8 {
            let now = deps.clock.now();
            call = match call.inbound_step() {
                InboundStep::HangUp => self.hang_up(call).await?,
                InboundStep::Done => {
                    self.release_slot(&call).await?;
                    return Ok(result);
                }
                InboundStep::Route => {
                    result = "applied";
                    let decided = self.decide(&call, now).await?;
                    if decided.plan.is_some() {
                        self.route_and_dispatch(call, decided, lock, received_at, now)
                            .await?
                    } else {
                        self.record_route(call, decided, now).await?
                    }
                }
                InboundStep::Dispatch(n) | InboundStep::Reconcile(n) => {
                    result = "applied";
                    self.dispatch(call, n, lock, received_at).await?
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
                    result = "applied";
                    self.check_agent(call, n).await?
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
            };
        }
        Ok(result)
    }

    /// The call's end, if it was seen before its dispatch (the tombstone): the call is
    /// ended here and returned.
    async fn ended_first(&self, call: &Held) -> Result<Option<Held>, Halt> {
        let store = self.deps.calls.store();
        let Some(who) = store.get_key(&tombstone(&call.id)).await? else {
            return Ok(None);
        };
        let caller = (who != ROOM_GONE).then_some(who.as_str());
        if !ends_call(call, caller) {
            return Ok(None);
        }
        let now = self.deps.clock.now();
        let (call, ended) = self
            .write(call, |c| {
                c.inbound_ended(
                    InboundEnd::CallerLeft,
                    Some("ended before dispatch".into()),
                    now,
                )
            })
            .await?;
        if ended.is_some() {
            self.finish(&call).await?;
        }
        Ok(Some(call))
    }

    /// The call, written through `change`; gone calls are an error (records are never
    /// deleted while a call is handled).
    async fn write<T>(
        &self,
        held: &Held,
        change: impl FnMut(&mut Call) -> T,
    ) -> Result<(Held, T), Halt> {
        self.deps
            .calls
            .update_held(held.clone(), change)
            .await?
            .ok_or_else(|| {
                Halt::Infra(InfraError::Calls(
                    callfleet_core::calls::CallBookError::Corrupt {
                        id: held.id.clone(),
                        reason: "the call record vanished".into(),
                    },
                ))
            })
    }

    /// Decides the call's route: resolve from memory, then take a slot of the chosen
    /// profile (the cap is enforced here, atomically; a profile found full is excluded and
    /// the call resolved again). Nothing is written to the call yet.
    async fn decide(&self, call: &Call, now: DateTime<Utc>) -> Result<Decided, Halt> {
        let leg = call.inbound.as_ref();
        let loads = self.routing.loads();
        let mut full: Vec<String> = Vec::new();
        let (decision, slot) = loop {
            let q = RouteQuery {
                to: call.to.as_str(),
                from: call.from.as_ref().map(E164::as_str),
                trunk_id: leg.and_then(|l| l.trunk_id.as_deref()),
                rule_id: leg.and_then(|l| l.rule_id.as_deref()),
                at: now,
                call_key: &call.id,
            };
            let excluding = Excluding {
                loads: loads.as_ref(),
                full: &full,
            };
            let decision = self.routing.resolve(&q, &excluding);
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
            full.push(p.id.clone());
            if full.len() >= MAX_FULL_PROFILES {
                // Every profile tried was full by the time its slot was asked for.
                let cause = Ineligible::AtCapacity;
                break (
                    Decision {
                        profile: None,
                        reason: RouteReason::Unrouted { cause },
                        considered: decision.considered,
                    },
                    None,
                );
            }
        };
        let plan = decision
            .profile()
            .map(|p| (p.id.clone(), p.agent_name.clone(), p.metadata.clone()));
        Ok(Decided {
            record: RoutingRecord::of(&decision, now),
            slot,
            plan,
        })
    }

    /// The routing decision applied to `c` (the dispatch of the chosen profile planned);
    /// false when someone routed the call first.
    fn apply_route(&self, c: &mut Call, decided: &Decided, now: DateTime<Utc>) -> bool {
        if c.routing.is_some() {
            return false;
        }
        let hang_up = self.settings.unrouted == UnroutedAction::Hangup;
        c.routed(decided.record.clone(), decided.slot.clone(), hang_up, now);
        if let Some((profile, agent, metadata)) = &decided.plan {
            let metadata = c.inbound_metadata(metadata, 1);
            c.plan_dispatch(1, Some(profile.clone()), agent.clone(), metadata);
        }
        true
    }

    /// After the routing write: gives back a slot that another worker's route made moot,
    /// or logs and counts the decision that was recorded.
    async fn after_route(&self, call: &Held, decided: &Decided, ours: bool) -> Result<(), Halt> {
        if !ours {
            if let Some(s) = &decided.slot {
                if call.inbound.as_ref().and_then(|l| l.slot.as_deref()) != Some(s) {
                    self.routing.store().release_slot(s, &call.id).await?;
                }
            }
            return Ok(());
        }
        let record = &decided.record;
        tracing::info!(decision = %record.decision, profile = ?record.profile_id, "inbound call routed");
        match record.reason.result() {
            "unrouted" => {
                dispatched_metric("unrouted");
                metrics::counter!(m::CALLS_FINISHED, "direction" => "inbound", "status" => "unrouted")
                    .increment(1);
            }
            "fallback" | "default" => dispatched_metric("fallback"),
            _ => {}
        }
        Ok(())
    }

    /// Records the routing decision (and plans the dispatch) in one write.
    async fn record_route(
        &self,
        call: Held,
        decided: Decided,
        now: DateTime<Utc>,
    ) -> Result<Held, Halt> {
        let (call, ours) = self
            .write(&call, |c| self.apply_route(c, &decided, now))
            .await?;
        self.after_route(&call, &decided, ours).await?;
        Ok(call)
    }

    /// The first pass of a new call: after LiveKit shows nothing in the room yet, the
    /// routing decision, the dispatch's plan and its send stamp are journalled in one
    /// write, then CreateDispatch is sent. Anything unusual in the room (the rule's own
    /// agent, an agent already there) takes the general path instead.
    async fn route_and_dispatch(
        &self,
        call: Held,
        decided: Decided,
        lock: &mut CallLock,
        received_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Held, Halt> {
        let existing = steps::list_dispatches(self.deps.livekit.as_ref(), &call.room_name)
            .await
            .map_err(Halt::LiveKit)?;
        let agent_here = call
            .inbound
            .as_ref()
            .is_some_and(|l| l.agent_joined_at.is_some());
        if !existing.is_empty() || agent_here || !self.keep_lock(lock).await? {
            return self.record_route(call, decided, now).await;
        }
        let (call, sent) = self
            .write(&call, |c| {
                self.apply_route(c, &decided, now) && c.dispatch_stamp(1, None, now)
            })
            .await?;
        let ours = call.routing.as_ref() == Some(&decided.record);
        self.after_route(&call, &decided, ours).await?;
        if !sent {
            return Ok(call);
        }
        self.send(call, 1, now, received_at).await
    }

    /// Removes the caller (RemoveParticipant) the call's record says must go, and records
    /// that it was done. A caller LiveKit has rule agents for is left alone: the rule
    /// serves the number, callfleet just does not route it.
    async fn hang_up(&self, call: Held) -> Result<Held, Halt> {
        let Some(leg) = &call.inbound else {
            return Ok(call);
        };
        let deps = &self.deps;
        if leg.hangup_reason.as_deref() == Some("unrouted") {
            let dispatches = steps::list_dispatches(deps.livekit.as_ref(), &call.room_name)
                .await
                .map_err(Halt::LiveKit)?;
            if !dispatches.is_empty() {
                let now = deps.clock.now();
                let (call, _) = self
                    .write(&call, |c| {
                        if let Some(l) = c.inbound.as_mut() {
                            if l.hangup_reason.take().is_some() {
                                c.note(now, "left_to_rule_agents", None);
                            }
                        }
                    })
                    .await?;
                return Ok(call);
            }
        }
        match deps
            .livekit
            .remove_participant(&call.room_name, &leg.participant_identity)
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(Halt::LiveKit(e)),
        }
        let now = deps.clock.now();
        let (call, _) = self.write(&call, |c| c.hung_up(now)).await?;
        Ok(call)
    }

    fn profile(&self, id: Option<&str>) -> Option<Arc<RoutedProfile>> {
        self.routing.table().get(id?).cloned()
    }

    /// Dispatch `n` as planned, and how long its profile gives the agent to join.
    fn planned(&self, call: &Call, n: u32) -> Option<(InboundDispatch, chrono::Duration)> {
        let planned = call.inbound_dispatch(n)?.clone();
        let seconds = self
            .profile(planned.profile_id.as_deref())
            .map_or(DEFAULT_AGENT_JOIN_TIMEOUT_S, |p| {
                p.profile.agent_join_timeout_s
            });
        Some((planned, chrono::Duration::seconds(i64::from(seconds))))
    }

    /// Dispatch `n`, sent once: LiveKit is asked what the room already has (ours after a
    /// lost answer, the rule's own agent, an agent already joined), an earlier send that
    /// may still land is waited out, the lock is renewed, the send is stamped in the
    /// journal (only if nobody stamped since we looked), and only then sent.
    async fn dispatch(
        &self,
        call: Held,
        n: u32,
        lock: &mut CallLock,
        received_at: Option<DateTime<Utc>>,
    ) -> Result<Held, Halt> {
        let deps = &self.deps;
        let Some((planned, join_timeout)) = self.planned(&call, n) else {
            return Ok(call);
        };
        let existing = steps::list_dispatches(deps.livekit.as_ref(), &call.room_name)
            .await
            .map_err(Halt::LiveKit)?;
        if let Some(ours) = existing.iter().find(|d| {
            steps::metadata_attempt(&d.metadata) == Some(n)
                && metadata_call(&d.metadata).as_deref() == Some(call.id.as_str())
        }) {
            dispatched_metric("duplicate_prevented");
            let id = ours.id.clone();
            return self
                .record_dispatched(&call, n, Some(id), false, join_timeout)
                .await;
        }
        let agent_here = call
            .inbound
            .as_ref()
            .is_some_and(|l| l.agent_joined_at.is_some());
        if agent_here {
            // An agent is in the room: whatever became of this dispatch, another would be
            // a second agent.
            let (call, _) = self
                .write(&call, |c| c.dispatch_confirmed_by_agent(n))
                .await?;
            return Ok(call);
        }
        // Any dispatch this call did not make is the dispatch rule's (`room_config.agents`):
        // the room has its agent, a second would talk over it.
        if n == 1
            && existing
                .iter()
                .any(|d| metadata_call(&d.metadata).as_deref() != Some(call.id.as_str()))
        {
            dispatched_metric("dispatched_by_rule");
            return self
                .record_dispatched(&call, n, None, true, join_timeout)
                .await;
        }
        let now = deps.clock.now();
        if let Some(sent) = planned.started_at {
            // Sent before and not found: it may still be on its way in LiveKit.
            let waited = (now - sent).to_std().unwrap_or_default();
            if let DispatchDecision::LookAgain(after) =
                steps::decide_dispatch(Some(waited), deps.settings.livekit_settle)
            {
                return Err(Halt::LookAgain(after));
            }
        }
        if !self.keep_lock(lock).await? {
            return Err(Halt::Busy);
        }
        let (call, may_send) = self
            .write(&call, |c| c.dispatch_stamp(n, planned.started_at, now))
            .await?;
        if !may_send {
            // Ended meanwhile, or another worker stamped it: its turn.
            return Ok(call);
        }
        self.send(call, n, now, received_at).await
    }

    /// CreateDispatch `n`, stamped `stamp` in the journal, sent once.
    async fn send(
        &self,
        call: Held,
        n: u32,
        stamp: DateTime<Utc>,
        received_at: Option<DateTime<Utc>>,
    ) -> Result<Held, Halt> {
        let deps = &self.deps;
        let Some((planned, join_timeout)) = self.planned(&call, n) else {
            return Ok(call);
        };
        if let Some(at) = received_at {
            let secs = (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!(m::INBOUND_DISPATCH_SECONDS).record(secs);
        }
        let agent = planned.agent_name.clone();
        match steps::create_dispatch(
            deps.livekit.as_ref(),
            &call.room_name,
            &agent,
            &planned.metadata,
        )
        .await
        {
            Ok(d) => {
                dispatched_metric(if n == 1 { "dispatched" } else { "fallback" });
                tracing::info!(agent = %agent, dispatch = %d.id, "agent dispatched");
                self.record_dispatched(&call, n, Some(d.id), false, join_timeout)
                    .await
            }
            Err(e) => {
                if !e.failure.maybe_processed() {
                    // LiveKit did nothing: the next try need not wait for it.
                    self.write(&call, |c| c.dispatch_not_sent(n, stamp)).await?;
                }
                // Maybe carried out: the next pass looks in LiveKit before any repeat.
                Err(Halt::LiveKit(e))
            }
        }
    }

    async fn record_dispatched(
        &self,
        call: &Held,
        n: u32,
        dispatch_id: Option<String>,
        by_rule: bool,
        join_timeout: chrono::Duration,
    ) -> Result<Held, Halt> {
        let now = self.deps.clock.now();
        let (call, recorded) = self
            .write(call, |c| {
                c.dispatched(n, dispatch_id.clone(), by_rule, join_timeout, now)
            })
            .await?;
        if recorded {
            if let Some(due) = call.inbound_dispatch(n).and_then(|d| d.agent_due_at) {
                self.queue_check(&call, n, due).await?;
            }
        }
        Ok(call)
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
    /// in one write: the fallback's dispatch planned (its slot taken, the missing agent's
    /// dispatch withdrawn so a late joiner does not make two), or the call failed with
    /// its caller to be hung up.
    async fn check_agent(&self, call: Held, n: u32) -> Result<Held, Halt> {
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
            let (call, _) = self
                .write(&call, |c| c.agent_joined(&agent.identity, now))
                .await?;
            return Ok(call);
        }
        let caller_here = call.inbound.as_ref().is_some_and(|l| {
            participants
                .iter()
                .any(|p| p.identity == l.participant_identity)
        });
        if !caller_here {
            // The caller is gone and no webhook said so.
            let (call, ended) = self
                .write(&call, |c| {
                    c.inbound_ended(
                        InboundEnd::CallerLeft,
                        Some("caller gone (agent check)".into()),
                        now,
                    )
                })
                .await?;
            if ended.is_some() {
                self.finish(&call).await?;
            }
            return Ok(call);
        }
        let missing = call.inbound_dispatch(n).cloned();
        let profile_id = missing.as_ref().and_then(|d| d.profile_id.clone());
        let profile = self.profile(profile_id.as_deref());
        let wants_fallback = profile
            .as_ref()
            .is_none_or(|p| p.profile.on_no_agent == NoAgentAction::Fallback);
        let mut fallback = None;
        if n == 1 && wants_fallback {
            let table = self.routing.table();
            let mut considered = Vec::new();
            let found = profile_id.as_deref().and_then(|id| {
                table.fallback_of(id, now, self.routing.loads().as_ref(), &mut considered)
            });
            if let Some(fb) = found {
                let fb = &fb.profile;
                let cap = fb.max_concurrent_calls;
                let store = self.routing.store();
                if store
                    .claim_slot(&fb.id, &call.id, cap, self.settings.slot_ttl)
                    .await?
                {
                    let metadata = call.inbound_metadata(&fb.metadata, n + 1);
                    fallback = Some((fb.id.clone(), fb.agent_name.clone(), metadata));
                }
            }
        }
        let old_slot = call.inbound.as_ref().and_then(|l| l.slot.clone());
        let (call, changed) = self
            .write(&call, |c| c.agent_missing(n, fallback.clone(), now))
            .await?;
        if !changed {
            if let Some((fb, _, _)) = &fallback {
                if call.inbound.as_ref().and_then(|l| l.slot.as_deref()) != Some(fb) {
                    self.routing.store().release_slot(fb, &call.id).await?;
                }
            }
            return Ok(call);
        }
        dispatched_metric("no_agent");
        tracing::warn!(
            dispatch = n,
            fallback = fallback.is_some(),
            "the dispatched agent did not join in time"
        );
        if fallback.is_some() {
            // The call now holds the fallback's slot; the first profile's goes back.
            if let Some(old) = old_slot {
                self.routing.store().release_slot(&old, &call.id).await?;
            }
            // Withdrawn, so an agent that turns up late does not make two.
            if let Some(id) = missing.and_then(|d| d.dispatch_id) {
                if let Err(e) = deps.livekit.delete_dispatch(&call.room_name, &id).await {
                    tracing::debug!(error = %e, "the missing agent's dispatch was not withdrawn");
                }
            }
        } else {
            self.finish(&call).await?;
        }
        Ok(call)
    }

    /// The call is live and quiet: ask LiveKit whether the caller is still there (a lost
    /// leave webhook would otherwise hold the profile's slot).
    async fn check_caller(&self, call: &Held) -> Result<(), Halt> {
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
            // Still talking: its profile slot is renewed, so a call longer than the slot's
            // lifetime keeps it (a slot held is renewed whatever the cap).
            if let Some(profile) = &leg.slot {
                self.routing
                    .store()
                    .claim_slot(profile, &call.id, None, self.settings.slot_ttl)
                    .await?;
            }
            return Ok(());
        }
        let now = self.deps.clock.now();
        let (call, ended) = self
            .write(call, |c| {
                c.inbound_ended(
                    InboundEnd::CallerLeft,
                    Some("caller gone (sweeper)".into()),
                    now,
                )
            })
            .await?;
        if ended.is_some() {
            self.finish(&call).await?;
        }
        Ok(())
    }
}

/// A routing decision not yet written: the record, the profile slot it took, and the
/// dispatch to plan (profile, agent, the profile's metadata).
struct Decided {
    record: RoutingRecord,
    slot: Option<String>,
    plan: Option<(String, String, serde_json::Value)>,
}

/// The call's lock as one `drive` holds it.
struct CallLock {
    name: String,
    /// `None` once it lapsed.
    token: Option<LockToken>,
    taken: Instant,
}

/// Whether the departure of `caller` (`None`: the room finished) ends `call`.
fn ends_call(call: &Call, caller: Option<&str>) -> bool {
    match (caller, &call.inbound) {
        (None, _) => true,
        (Some(who), Some(leg)) => leg.participant_identity == who,
        (Some(_), None) => false,
    }
}

/// Tombstone value of a room that finished (any caller identity is stored as itself).
const ROOM_GONE: &str = "\u{0}room";
/// How many full profiles a call is offered before it is unrouted at capacity.
const MAX_FULL_PROFILES: usize = 16;

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
