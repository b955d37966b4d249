//! The inbound call: a caller LiveKit put in a room through a dispatch rule, routed to an
//! agent profile, given exactly one agent. Keyed by the room (name and sid): every webhook
//! about the room finds the same call. Pure; the worker in `workers/src/inbound.rs` does
//! the I/O each [`InboundStep`] asks for.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::call::{Call, CallStatus, Direction, RetryPolicy};
use super::phone::E164;
use super::routing::{RouteReason, RoutingRecord};
use super::webhook::{ParticipantRef, RoomRef};

/// The call id of the inbound call in `room`: derived from the room's name and sid, so
/// duplicated, concurrent and replayed webhooks all name the same call, and a room
/// reused under the same name later (a new sid) is a new call.
pub fn inbound_call_id(room: &RoomRef) -> String {
    let digest = Sha256::new()
        .chain_update(b"inbound\0")
        .chain_update(room.name.as_bytes())
        .chain_update([0u8])
        .chain_update(room.sid.as_bytes())
        .finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("call_in{hex}")
}

/// Whether `id` names an inbound call (see [`inbound_call_id`]; outbound ids are
/// `call_` + hex, and `i` is not a hex digit).
pub fn is_inbound_call_id(id: &str) -> bool {
    id.starts_with("call_in")
}

/// What LiveKit told us about the caller's SIP participant (livekit-sip-inbound.md §2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundLeg {
    pub room_sid: String,
    /// `sip.phoneNumber` as LiveKit gave it; absent when the rule hides the number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// `sip.trunkPhoneNumber` as LiveKit gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    pub participant_identity: String,
    pub participant_sid: String,
    /// The rule hides the caller's number (`hide_phone_number`).
    pub number_hidden: bool,
    pub caller_joined_at: DateTime<Utc>,
    /// Agent dispatches, in order: the routed profile's, then at most one fallback.
    #[serde(default)]
    pub dispatches: Vec<InboundDispatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_joined_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_identity: Option<String>,
    /// When the dispatched agent was found not to have joined in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_agent_at: Option<DateTime<Utc>>,
    /// The profile whose concurrent-call slot this call holds (released at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default)]
    pub slot_released: bool,
    /// The caller must be told to go (`unrouted`, `no_agent`): recorded with the decision
    /// itself, so a worker that dies before RemoveParticipant leaves it to the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hangup_reason: Option<String>,
    /// The caller was told to go; the request was carried out.
    #[serde(default)]
    pub hung_up: bool,
}

/// One agent dispatch and its journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundDispatch {
    /// 1 for the routed profile, 2 for the fallback after no agent joined.
    pub n: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    pub agent_name: String,
    /// The dispatch's metadata as sent (built once, so a repeat sends the same).
    pub metadata: String,
    /// Journal: CreateDispatch may have been sent from here on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_id: Option<String>,
    /// The dispatch rule had already dispatched this agent; callfleet sent nothing.
    #[serde(default)]
    pub by_rule: bool,
    /// Its answer was lost and LiveKit no longer lists it, but its agent joined: sent.
    #[serde(default)]
    pub confirmed_by_agent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When the agent must have joined by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_due_at: Option<DateTime<Utc>>,
}

impl InboundDispatch {
    pub fn done(&self) -> bool {
        self.dispatch_id.is_some() || self.by_rule || self.confirmed_by_agent
    }
}

/// What an inbound call needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundStep {
    /// No routing decision yet.
    Route,
    /// Dispatch `n` is not yet sent.
    Dispatch(u32),
    /// Dispatch `n` may have been sent (its answer was lost): look in LiveKit before
    /// any repeat.
    Reconcile(u32),
    /// Dispatched; the agent is due by then.
    AwaitAgent { n: u32, due: DateTime<Utc> },
    /// The agent joined: the call runs until the caller leaves.
    Live,
    /// The caller must be removed (the decision is recorded; the request is not yet done).
    HangUp,
    /// Nothing more to do (ended, unrouted).
    Done,
}

/// Why a call is not given an agent after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundEnd {
    /// The caller, or the room, went before the agent came.
    CallerLeft,
    /// The call ran with its agent and ended.
    Completed,
    /// No agent joined in time and nobody else could take it; the caller was hung up.
    NoAgent,
}

/// The facts of a SIP `participant_joined` (or a departure seen first).
pub fn inbound_facts(room: &RoomRef, p: &ParticipantRef, at: DateTime<Utc>) -> InboundLeg {
    let attr = |k: &str| p.attributes.get(k).filter(|v| !v.is_empty()).cloned();
    let caller = attr("sip.phoneNumber");
    InboundLeg {
        room_sid: room.sid.clone(),
        number_hidden: caller.is_none(),
        caller,
        dialed: attr("sip.trunkPhoneNumber"),
        sip_call_id: attr("sip.callID"),
        trunk_id: attr("sip.trunkID"),
        rule_id: attr("sip.ruleID"),
        participant_identity: p.identity.clone(),
        participant_sid: p.sid.clone(),
        caller_joined_at: p
            .joined_at_ms
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(at),
        dispatches: Vec::new(),
        agent_joined_at: None,
        agent_identity: None,
        no_agent_at: None,
        slot: None,
        slot_released: false,
        hangup_reason: None,
        hung_up: false,
    }
}

impl Call {
    /// A new inbound call in `room` (status `sip_participant_joined`: the caller rings
    /// until an agent subscribes). `to`/`from` are the parsed numbers when they parse.
    pub fn new_inbound(
        room: &RoomRef,
        leg: InboundLeg,
        to: E164,
        from: Option<E164>,
        at: DateTime<Utc>,
    ) -> Call {
        let mut call = Call {
            id: inbound_call_id(room),
            direction: Direction::Inbound,
            status: CallStatus::SipParticipantJoined,
            to,
            from,
            trunk_id: leg.trunk_id.clone(),
            agent_name: None,
            context: Value::Object(Map::new()),
            tags: Vec::new(),
            room_name: room.name.clone(),
            dispatch_id: None,
            idempotency_key: None,
            retry: RetryPolicy::default(),
            not_before: None,
            scheduled_for: None,
            call_window: None,
            ringing_timeout_s: None,
            max_duration_s: None,
            wait_until_answered: false,
            attempts: Vec::new(),
            created_at: at,
            updated_at: at,
            ended_at: None,
            duration_s: None,
            end_reason: None,
            timeline: Vec::new(),
            inbound: Some(leg),
            routing: None,
            callback_url: None,
            commands: Vec::new(),
        };
        call.note(at, "sip_participant_joined", None);
        call
    }

    /// What the call needs next, at `now`.
    pub fn inbound_step(&self) -> InboundStep {
        let Some(leg) = &self.inbound else {
            return InboundStep::Done;
        };
        if leg.hangup_reason.is_some() && !leg.hung_up {
            return InboundStep::HangUp;
        }
        if self.status.is_terminal() {
            return InboundStep::Done;
        }
        if leg.agent_joined_at.is_some() {
            // A dispatch whose answer was lost is still settled for the record (its id),
            // but never sent again: an agent is here.
            return match leg.dispatches.last() {
                Some(d) if d.started_at.is_some() && !d.done() => InboundStep::Reconcile(d.n),
                _ => InboundStep::Live,
            };
        }
        let Some(routing) = &self.routing else {
            return InboundStep::Route;
        };
        if routing.profile_id.is_none() {
            return InboundStep::Done;
        }
        match leg.dispatches.last() {
            None => InboundStep::Dispatch(1),
            Some(d) if d.done() => match d.agent_due_at {
                Some(due) => InboundStep::AwaitAgent { n: d.n, due },
                None => InboundStep::Live,
            },
            Some(d) if d.started_at.is_some() => InboundStep::Reconcile(d.n),
            Some(d) => InboundStep::Dispatch(d.n),
        }
    }

    /// Records the routing decision. An unrouted call ends here (`unrouted`).
    pub fn routed(
        &mut self,
        record: RoutingRecord,
        slot: Option<String>,
        hang_up_unrouted: bool,
        at: DateTime<Utc>,
    ) {
        if self.routing.is_some() || self.status.is_terminal() {
            return;
        }
        let unrouted = matches!(record.reason, RouteReason::Unrouted { .. });
        self.agent_name = record.agent_name.clone();
        self.note(at, "routed", Some(record.decision.clone()));
        self.routing = Some(record);
        if let Some(leg) = self.inbound.as_mut() {
            leg.slot = slot;
        }
        if unrouted {
            self.end_reason = Some("unrouted".into());
            if hang_up_unrouted {
                if let Some(leg) = self.inbound.as_mut() {
                    leg.hangup_reason = Some("unrouted".into());
                }
            }
            self.advance(CallStatus::Unrouted, at);
            self.finish_duration(at);
        }
    }

    /// Plans dispatch `n` of `agent_name` (the journal entry; not yet sent).
    pub fn plan_dispatch(
        &mut self,
        n: u32,
        profile_id: Option<String>,
        agent_name: String,
        metadata: String,
    ) -> bool {
        let Some(leg) = self.inbound.as_mut() else {
            return false;
        };
        if leg.dispatches.iter().any(|d| d.n == n) {
            return false;
        }
        leg.dispatches.push(InboundDispatch {
            n,
            profile_id,
            agent_name,
            metadata,
            started_at: None,
            dispatch_id: None,
            by_rule: false,
            dispatched_at: None,
            agent_due_at: None,
            confirmed_by_agent: false,
        });
        true
    }

    /// Dispatch `n`'s answer was lost and LiveKit does not list it (any more), but an
    /// agent joined: it was sent; nothing is sent again.
    pub fn dispatch_confirmed_by_agent(&mut self, n: u32) -> bool {
        match self.dispatch_mut(n) {
            Some(d) if !d.done() => {
                d.confirmed_by_agent = true;
                true
            }
            _ => false,
        }
    }

    /// Dispatch `n` of an inbound call.
    pub fn inbound_dispatch(&self, n: u32) -> Option<&InboundDispatch> {
        self.inbound.as_ref()?.dispatches.iter().find(|d| d.n == n)
    }

    fn dispatch_mut(&mut self, n: u32) -> Option<&mut InboundDispatch> {
        self.inbound
            .as_mut()?
            .dispatches
            .iter_mut()
            .find(|d| d.n == n)
    }

    /// Journals that CreateDispatch `n` is about to be sent (again), at `at`: only if the
    /// call is live, the dispatch not yet settled, and its last stamp is still `expected`
    /// (what the worker looked at before deciding to send; another worker's stamp in
    /// between means it is that worker's turn). False: do not send.
    pub fn dispatch_stamp(
        &mut self,
        n: u32,
        expected: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> bool {
        if self.status.is_terminal() {
            return false;
        }
        match self.dispatch_mut(n) {
            Some(d) if !d.done() && d.started_at == expected => {
                d.started_at = Some(at);
                true
            }
            _ => false,
        }
    }

    /// CreateDispatch `n` stamped `stamp` was refused outright (LiveKit did nothing): the
    /// stamp goes, so the next try need not wait for it to settle.
    pub fn dispatch_not_sent(&mut self, n: u32, stamp: DateTime<Utc>) -> bool {
        match self.dispatch_mut(n) {
            Some(d) if !d.done() && d.started_at == Some(stamp) => {
                d.started_at = None;
                true
            }
            _ => false,
        }
    }

    /// Dispatch `n` is in LiveKit (`dispatch_id`), or the rule's own agent is
    /// (`by_rule`); the agent is due within `join_timeout`.
    pub fn dispatched(
        &mut self,
        n: u32,
        dispatch_id: Option<String>,
        by_rule: bool,
        join_timeout: chrono::Duration,
        at: DateTime<Utc>,
    ) -> bool {
        let Some(d) = self.dispatch_mut(n) else {
            return false;
        };
        if d.done() {
            return false;
        }
        d.dispatch_id = dispatch_id.clone();
        d.by_rule = by_rule;
        d.dispatched_at = Some(at);
        let agent = d.agent_name.clone();
        let agent_here = self
            .inbound
            .as_ref()
            .is_some_and(|l| l.agent_joined_at.is_some());
        if let Some(d) = self.dispatch_mut(n) {
            // No check is due for an agent already in the room.
            d.agent_due_at = (!agent_here).then_some(at + join_timeout);
        }
        if n == 1 {
            self.dispatch_id = dispatch_id;
        }
        let what = if by_rule {
            "dispatched_by_rule"
        } else {
            "dispatch_created"
        };
        self.note(at, what, Some(agent));
        if !self.status.is_terminal() {
            self.advance(CallStatus::AgentDispatched, at);
        }
        true
    }

    /// An agent participant joined the call's room.
    pub fn agent_joined(&mut self, identity: &str, at: DateTime<Utc>) -> bool {
        let Some(leg) = self.inbound.as_mut() else {
            return false;
        };
        if leg.agent_joined_at.is_some() {
            return false;
        }
        leg.agent_joined_at = Some(at);
        leg.agent_identity = Some(identity.to_owned());
        for d in &mut leg.dispatches {
            d.agent_due_at = None;
        }
        self.note(at, "agent_joined", Some(identity.to_owned()));
        self.advance(CallStatus::InProgress, at);
        true
    }

    /// Dispatch `n`'s agent did not join by its due time: in the same step, either the
    /// fallback's dispatch is planned (`fallback`: its profile, agent and metadata; the
    /// call now holds that profile's slot) or the call fails and its caller is to be hung
    /// up.
    pub fn agent_missing(
        &mut self,
        n: u32,
        fallback: Option<(String, String, String)>,
        at: DateTime<Utc>,
    ) -> bool {
        let Some(leg) = self.inbound.as_mut() else {
            return false;
        };
        if leg.agent_joined_at.is_some() || self.status.is_terminal() {
            return false;
        }
        let Some(d) = leg.dispatches.iter_mut().find(|d| d.n == n) else {
            return false;
        };
        if d.agent_due_at.take().is_none() {
            return false;
        }
        let agent = d.agent_name.clone();
        leg.no_agent_at = Some(at);
        self.note(at, "agent_did_not_join", Some(agent));
        match fallback {
            Some((profile, agent, metadata)) => {
                if let Some(leg) = self.inbound.as_mut() {
                    leg.slot = Some(profile.clone());
                }
                self.plan_dispatch(n + 1, Some(profile.clone()), agent, metadata);
                self.note(at, "fallback_after_no_agent", Some(profile));
            }
            None => {
                if let Some(leg) = self.inbound.as_mut() {
                    leg.hangup_reason = Some("no_agent".into());
                }
                self.inbound_ended(InboundEnd::NoAgent, None, at);
            }
        }
        true
    }

    /// The caller was removed (or was already gone).
    pub fn hung_up(&mut self, at: DateTime<Utc>) {
        if let Some(leg) = self.inbound.as_mut() {
            if !leg.hung_up {
                leg.hung_up = true;
                let why = leg.hangup_reason.clone();
                self.note(at, "caller_hung_up_by_fleet", why);
            }
        }
    }

    fn finish_duration(&mut self, at: DateTime<Utc>) {
        if let Some(leg) = &self.inbound {
            let secs = (at - leg.caller_joined_at).num_milliseconds() as f64 / 1000.0;
            self.duration_s.get_or_insert(secs.max(0.0));
        }
        self.ended_at.get_or_insert(at);
    }

    /// The caller left or the room finished (or the fleet gave up: `NoAgent`). Ends the
    /// call unless already ended; returns the end it recorded.
    pub fn inbound_ended(
        &mut self,
        end: InboundEnd,
        disconnect_reason: Option<String>,
        at: DateTime<Utc>,
    ) -> Option<InboundEnd> {
        if self.status.is_terminal() {
            return None;
        }
        let end = match end {
            InboundEnd::CallerLeft if self.status == CallStatus::InProgress => {
                InboundEnd::Completed
            }
            other => other,
        };
        let (status, reason) = match end {
            InboundEnd::Completed => (CallStatus::Completed, "caller_left"),
            InboundEnd::CallerLeft => (CallStatus::Canceled, "caller_left_before_agent"),
            InboundEnd::NoAgent => (CallStatus::Failed, "no_agent_joined"),
        };
        if let Some(leg) = self.inbound.as_mut() {
            for d in &mut leg.dispatches {
                d.agent_due_at = None;
            }
        }
        self.end_reason = Some(reason.into());
        if let Some(a) = &disconnect_reason {
            self.note(at, "disconnect_reason", Some(a.clone()));
        }
        self.advance(status, at);
        self.finish_duration(at);
        Some(end)
    }

    /// The slot to release (the call ended and still holds one).
    pub fn slot_to_release(&self) -> Option<&str> {
        let leg = self.inbound.as_ref()?;
        if self.status.is_terminal() && !leg.slot_released {
            leg.slot.as_deref()
        } else {
            None
        }
    }

    pub fn slot_released(&mut self) {
        if let Some(leg) = self.inbound.as_mut() {
            leg.slot_released = true;
        }
    }

    /// The metadata an inbound agent receives: the profile's metadata, plus the call's
    /// facts in snake_case (a key the profile also sets is the call's).
    pub fn inbound_metadata(&self, profile_metadata: &Value, n: u32) -> String {
        let mut map = profile_metadata.as_object().cloned().unwrap_or_default();
        let leg = self.inbound.as_ref();
        let facts = json!({
            "call_id": self.id,
            "direction": "inbound",
            "caller_number": self.from.as_ref().map(|f| f.as_str().to_owned())
                .or_else(|| leg.and_then(|l| l.caller.clone())),
            "dialed_number": self.to.as_str(),
            "sip_call_id": leg.and_then(|l| l.sip_call_id.clone()),
            "trunk_id": leg.and_then(|l| l.trunk_id.clone()),
            "rule_id": leg.and_then(|l| l.rule_id.clone()),
            "room_name": self.room_name,
            "profile_id": self.routing.as_ref().and_then(|r| r.profile_id.clone()),
            "routing_decision": self.routing.as_ref().map(|r| r.decision.clone()),
            "attempt": n,
        });
        if let Value::Object(facts) = facts {
            for (k, v) in facts {
                if !v.is_null() {
                    map.insert(k, v);
                }
            }
        }
        Value::Object(map).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::routing::{Decision, Ineligible};
    use std::collections::BTreeMap;

    fn room() -> RoomRef {
        RoomRef {
            name: "call-_+15105550123_abc".into(),
            sid: "RM_1".into(),
        }
    }

    fn caller() -> ParticipantRef {
        ParticipantRef {
            identity: "sip_+15105550123".into(),
            sid: "PA_1".into(),
            kind: Some("SIP".into()),
            attributes: BTreeMap::from([
                ("sip.phoneNumber".to_owned(), "+15105550123".to_owned()),
                ("sip.trunkPhoneNumber".to_owned(), "+15105550100".to_owned()),
                ("sip.callID".to_owned(), "SCL_1".to_owned()),
            ]),
            disconnect_reason: None,
            joined_at_ms: None,
        }
    }

    fn call() -> Call {
        let now = Utc::now();
        Call::new_inbound(
            &room(),
            inbound_facts(&room(), &caller(), now),
            E164::parse("+15105550100", None).expect("valid"),
            E164::parse("+15105550123", None).ok(),
            now,
        )
    }

    fn routed(c: &mut Call, unrouted: bool) {
        let reason = if unrouted {
            RouteReason::Unrouted {
                cause: Ineligible::NoProfile,
            }
        } else {
            RouteReason::Active
        };
        let mut record = RoutingRecord::of(
            &Decision {
                profile: None,
                reason,
                considered: vec![],
            },
            Utc::now(),
        );
        if !unrouted {
            record.profile_id = Some("p".into());
            record.agent_name = Some("agent".into());
        }
        c.routed(record, Some("p".into()), true, Utc::now());
    }

    #[test]
    fn the_same_room_is_the_same_call_and_a_new_sid_a_new_one() {
        let a = inbound_call_id(&room());
        assert_eq!(a, inbound_call_id(&room()));
        let mut other = room();
        other.sid = "RM_2".into();
        assert_ne!(a, inbound_call_id(&other));
        assert_eq!(call().id, a);
    }

    #[test]
    fn steps_follow_the_journal() {
        let mut c = call();
        assert_eq!(c.inbound_step(), InboundStep::Route);
        routed(&mut c, false);
        assert_eq!(c.inbound_step(), InboundStep::Dispatch(1));
        assert!(c.plan_dispatch(1, Some("p".into()), "agent".into(), "{}".into()));
        assert_eq!(c.inbound_step(), InboundStep::Dispatch(1));
        let stamp = Utc::now();
        assert!(c.dispatch_stamp(1, None, stamp));
        assert!(
            !c.dispatch_stamp(1, None, Utc::now()),
            "another stamp came first"
        );
        // Started, no answer recorded: the next look must reconcile, never resend blindly.
        assert_eq!(c.inbound_step(), InboundStep::Reconcile(1));
        assert!(c.dispatched(
            1,
            Some("AD_1".into()),
            false,
            chrono::Duration::seconds(20),
            Utc::now()
        ));
        assert!(matches!(
            c.inbound_step(),
            InboundStep::AwaitAgent { n: 1, .. }
        ));
        assert!(
            !c.dispatch_stamp(1, Some(stamp), Utc::now()),
            "a sent dispatch is never sent again"
        );
        assert_eq!(c.status, CallStatus::AgentDispatched);
        assert!(c.agent_joined("agent-AJ_1", Utc::now()));
        assert_eq!(c.inbound_step(), InboundStep::Live);
        assert_eq!(c.status, CallStatus::InProgress);
        assert_eq!(
            c.inbound_ended(InboundEnd::CallerLeft, None, Utc::now()),
            Some(InboundEnd::Completed)
        );
        assert_eq!(c.status, CallStatus::Completed);
        assert_eq!(c.slot_to_release(), Some("p"));
        assert_eq!(c.inbound_step(), InboundStep::Done);
    }

    #[test]
    fn a_refused_dispatch_loses_its_stamp() {
        let mut c = call();
        routed(&mut c, false);
        c.plan_dispatch(1, None, "agent".into(), "{}".into());
        let stamp = Utc::now();
        assert!(c.dispatch_stamp(1, None, stamp));
        assert!(c.dispatch_not_sent(1, stamp));
        assert_eq!(c.inbound_step(), InboundStep::Dispatch(1));
    }

    #[test]
    fn an_end_seen_first_blocks_the_dispatch() {
        let mut c = call();
        routed(&mut c, false);
        c.plan_dispatch(1, None, "agent".into(), "{}".into());
        assert_eq!(
            c.inbound_ended(InboundEnd::CallerLeft, None, Utc::now()),
            Some(InboundEnd::CallerLeft)
        );
        assert_eq!(c.status, CallStatus::Canceled);
        assert!(!c.dispatch_stamp(1, None, Utc::now()));
        assert_eq!(c.inbound_step(), InboundStep::Done);
    }

    #[test]
    fn unrouted_calls_end_unrouted_and_owe_a_hang_up() {
        let mut c = call();
        routed(&mut c, true);
        assert_eq!(c.status, CallStatus::Unrouted);
        assert_eq!(c.inbound_step(), InboundStep::HangUp);
        c.hung_up(Utc::now());
        assert_eq!(c.inbound_step(), InboundStep::Done);
    }

    #[test]
    fn a_missing_agent_plans_the_fallback_or_a_hang_up_in_one_step() {
        let mut c = call();
        routed(&mut c, false);
        let second = chrono::Duration::seconds(1);
        c.plan_dispatch(1, Some("p".into()), "agent".into(), "{}".into());
        c.dispatch_stamp(1, None, Utc::now());
        c.dispatched(1, Some("AD_1".into()), false, second, Utc::now());
        let fallback = Some(("q".to_owned(), "backup".to_owned(), "{}".to_owned()));
        assert!(c.agent_missing(1, fallback, Utc::now()));
        assert_eq!(c.inbound_step(), InboundStep::Dispatch(2));
        assert_eq!(
            c.inbound.as_ref().and_then(|l| l.slot.clone()).as_deref(),
            Some("q")
        );
        c.dispatch_stamp(2, None, Utc::now());
        c.dispatched(2, Some("AD_2".into()), false, second, Utc::now());
        assert!(c.agent_missing(2, None, Utc::now()));
        assert_eq!(c.status, CallStatus::Failed);
        // The hang-up is owed until it is done, even though the call is final.
        assert_eq!(c.inbound_step(), InboundStep::HangUp);
        c.hung_up(Utc::now());
        assert_eq!(c.inbound_step(), InboundStep::Done);
    }

    #[test]
    fn metadata_carries_the_profile_and_the_call_facts() {
        let mut c = call();
        routed(&mut c, false);
        let m: Value = serde_json::from_str(
            &c.inbound_metadata(&json!({"greeting": "hi", "call_id": "x"}), 1),
        )
        .expect("json");
        assert_eq!(m["greeting"], "hi");
        assert_eq!(m["call_id"], c.id);
        assert_eq!(m["caller_number"], "+15105550123");
        assert_eq!(m["dialed_number"], "+15105550100");
        assert_eq!(m["attempt"], 1);
    }
}
