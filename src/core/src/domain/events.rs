//! Call events: what the fleet tells the outside world about its calls (the live stream
//! and signed callbacks). Every timeline entry a change adds is one event; the entries that
//! matter to systems (a call queued, answered, ended, transferred…) also carry a callback
//! type. Pure: the call book turns a change's new entries into events in the same write.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::call::{Call, CallStatus, Direction, TimelineEntry};

/// The event types a subscription can ask for (`call.completed`…).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "call.queued")]
    Queued,
    #[serde(rename = "call.in_progress")]
    InProgress,
    #[serde(rename = "call.completed")]
    Completed,
    #[serde(rename = "call.failed")]
    Failed,
    #[serde(rename = "call.busy")]
    Busy,
    #[serde(rename = "call.no_answer")]
    NoAnswer,
    #[serde(rename = "call.canceled")]
    Canceled,
    #[serde(rename = "call.hung_up")]
    HungUp,
    #[serde(rename = "call.transferred")]
    Transferred,
    #[serde(rename = "call.transfer_failed")]
    TransferFailed,
    /// Inbound: a caller reached the fleet and was routed to a profile.
    #[serde(rename = "call.started")]
    Started,
    /// Inbound: the call ended (any final status; the data says which).
    #[serde(rename = "call.ended")]
    Ended,
    /// Inbound: no profile could take the call.
    #[serde(rename = "call.unrouted")]
    Unrouted,
    /// Any other change (the stream's default; never a callback of its own).
    #[serde(rename = "call.updated")]
    Updated,
    /// A test-send to a subscription (never subscribed to; sent when asked).
    #[serde(rename = "subscription.test")]
    Test,
}

impl EventType {
    pub const ALL: [EventType; 15] = [
        EventType::Queued,
        EventType::InProgress,
        EventType::Completed,
        EventType::Failed,
        EventType::Busy,
        EventType::NoAnswer,
        EventType::Canceled,
        EventType::HungUp,
        EventType::Transferred,
        EventType::TransferFailed,
        EventType::Started,
        EventType::Ended,
        EventType::Unrouted,
        EventType::Updated,
        EventType::Test,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Queued => "call.queued",
            EventType::InProgress => "call.in_progress",
            EventType::Completed => "call.completed",
            EventType::Failed => "call.failed",
            EventType::Busy => "call.busy",
            EventType::NoAnswer => "call.no_answer",
            EventType::Canceled => "call.canceled",
            EventType::HungUp => "call.hung_up",
            EventType::Transferred => "call.transferred",
            EventType::TransferFailed => "call.transfer_failed",
            EventType::Started => "call.started",
            EventType::Ended => "call.ended",
            EventType::Unrouted => "call.unrouted",
            EventType::Updated => "call.updated",
            EventType::Test => "subscription.test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether a subscription may ask for it (everything but the stream's `call.updated`
    /// and the test-send's own type).
    pub fn is_callback(self) -> bool {
        !matches!(self, EventType::Updated | EventType::Test)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Timeline entry names the control commands record (the outcome of a hang-up or a
/// transfer), shared by the domain methods that write them and the event mapping.
pub mod entries {
    pub const HUNG_UP: &str = "hung_up";
    pub const TRANSFERRED: &str = "transferred";
    pub const TRANSFER_FAILED: &str = "transfer_failed";
    pub const CALLER_HUNG_UP_BY_FLEET: &str = "caller_hung_up_by_fleet";
}

/// The type of the event a timeline entry of `call` announces.
pub fn event_type(call: &Call, entry: &TimelineEntry) -> EventType {
    if let Some(status) = CallStatus::parse(&entry.event) {
        return match (call.direction, status) {
            (Direction::Outbound, CallStatus::Queued) => EventType::Queued,
            (_, CallStatus::InProgress) => EventType::InProgress,
            (Direction::Inbound, CallStatus::Unrouted) => EventType::Unrouted,
            (Direction::Inbound, s) if s.is_terminal() => EventType::Ended,
            (_, CallStatus::Completed) => EventType::Completed,
            (_, CallStatus::Failed) => EventType::Failed,
            (_, CallStatus::Busy) => EventType::Busy,
            (_, CallStatus::NoAnswer) => EventType::NoAnswer,
            (_, CallStatus::Canceled) => EventType::Canceled,
            _ => EventType::Updated,
        };
    }
    match entry.event.as_str() {
        // An outbound call is queued the moment it is accepted.
        "accepted" if call.direction == Direction::Outbound => EventType::Queued,
        // An inbound call starts for the outside world once routed: from then on it has
        // the profile and organization its subscribers filter on.
        "routed" if call.direction == Direction::Inbound && call.status != CallStatus::Unrouted => {
            EventType::Started
        }
        entries::HUNG_UP | entries::CALLER_HUNG_UP_BY_FLEET => EventType::HungUp,
        entries::TRANSFERRED => EventType::Transferred,
        entries::TRANSFER_FAILED => EventType::TransferFailed,
        _ => EventType::Updated,
    }
}

/// The entries a change appended to a timeline that only grows at its end (and loses its
/// oldest entries past its bound): `after` minus the part of `before` it still holds.
pub fn appended<'a>(before: &[TimelineEntry], after: &'a [TimelineEntry]) -> &'a [TimelineEntry] {
    for dropped in 0..=before.len() {
        let kept = &before[dropped..];
        if after.len() >= kept.len() && after[..kept.len()] == *kept {
            return &after[kept.len()..];
        }
    }
    after
}

/// One call event: the call as it stands after the change, and the timeline entry that
/// says what changed. What the stream sends (with its log id) and what callbacks carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallEvent {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub call_id: String,
    pub direction: Direction,
    pub status: CallStatus,
    pub at: DateTime<Utc>,
    pub entry: TimelineEntry,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_name: Option<String>,
    /// The call's own callback URL (for the dispatcher; never shown on the stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

impl CallEvent {
    pub fn of(call: &Call, entry: &TimelineEntry) -> Self {
        let routing = call.routing.as_ref();
        Self {
            kind: event_type(call, entry),
            call_id: call.id.clone(),
            direction: call.direction,
            status: call.status,
            at: entry.at,
            entry: entry.clone(),
            to: call.to.to_string(),
            from: call.from.as_ref().map(ToString::to_string),
            profile_id: routing.and_then(|r| r.profile_id.clone()),
            organization: routing.and_then(|r| r.organization.clone()),
            agent_name: routing
                .and_then(|r| r.agent_name.clone())
                .or_else(|| call.agent_name.clone()),
            tags: call.tags.clone(),
            end_reason: call.end_reason.clone(),
            duration_s: call.duration_s,
            room_name: Some(call.room_name.clone()),
            callback_url: call.callback_url.clone(),
        }
    }

    /// The events of a change to `after` from a call whose timeline was `before`
    /// (`None`: the call was just created).
    pub fn of_change(before: Option<&[TimelineEntry]>, after: &Call) -> Vec<CallEvent> {
        let new = match before {
            Some(before) => appended(before, &after.timeline),
            None => &after.timeline[..],
        };
        new.iter()
            .map(|entry| CallEvent::of(after, entry))
            .collect()
    }

    /// A phone number as a viewer without the right to see numbers gets it: country code
    /// and the last two digits (`+1••••••••67`).
    pub fn mask(number: &str) -> String {
        let digits: Vec<char> = number.chars().collect();
        if digits.len() <= 5 {
            return "•".repeat(digits.len());
        }
        let head: String = digits[..2].iter().collect();
        let tail: String = digits[digits.len() - 2..].iter().collect();
        format!("{head}{}{tail}", "•".repeat(digits.len() - 4))
    }

    /// This event with its numbers masked, wherever they appear: the numbers themselves,
    /// and inside the room name (an inbound room is named after its caller) and the
    /// timeline detail (a transfer target).
    pub fn masked(mut self) -> Self {
        self.to = Self::mask(&self.to);
        self.from = self.from.as_deref().map(Self::mask);
        self.room_name = self.room_name.as_deref().map(mask_digit_runs);
        self.entry.detail = self.entry.detail.as_deref().map(mask_digit_runs);
        self
    }
}

/// Masks every run of 7 or more digits (a phone number, with or without `+`) in `text`,
/// keeping its last two digits.
fn mask_digit_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 7 {
            let keep = &run[run.len() - 2..];
            out.push_str(&"•".repeat(run.len() - 2));
            out.push_str(keep);
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn entry(n: i64, event: &str) -> TimelineEntry {
        TimelineEntry {
            at: Utc
                .timestamp_opt(1_700_000_000 + n, 0)
                .single()
                .expect("time"),
            event: event.into(),
            detail: None,
        }
    }

    #[test]
    fn appended_entries_survive_the_timeline_bound() {
        let before = vec![entry(1, "a"), entry(2, "b"), entry(3, "c")];
        let mut after = before.clone();
        after.push(entry(4, "d"));
        assert_eq!(appended(&before, &after), &after[3..]);
        // The oldest entry dropped to make room.
        let bounded = after[1..].to_vec();
        assert_eq!(appended(&before, &bounded), &bounded[2..]);
        // Nothing appended.
        assert!(appended(&before, &before).is_empty());
        // Repeated identical entries are counted, not merged.
        let same = vec![entry(1, "a"), entry(1, "a")];
        let mut more = same.clone();
        more.push(entry(1, "a"));
        assert_eq!(appended(&same, &more).len(), 1);
    }

    #[test]
    fn types_parse_and_print() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_value(t).expect("json"),
                serde_json::json!(t.as_str())
            );
        }
        assert!(!EventType::Updated.is_callback());
        assert!(!EventType::Test.is_callback());
        assert_eq!(EventType::parse("call.nope"), None);
    }

    #[test]
    fn entries_map_to_the_types_systems_subscribe_to() {
        use crate::domain::call::tests::sample;
        let out = sample(Direction::Outbound);
        let inb = sample(Direction::Inbound);
        let typed = |call: &Call, event: &str| event_type(call, &entry(0, event));
        assert_eq!(typed(&out, "accepted"), EventType::Queued);
        assert_eq!(typed(&out, "in_progress"), EventType::InProgress);
        assert_eq!(typed(&out, "no_answer"), EventType::NoAnswer);
        assert_eq!(typed(&out, "busy"), EventType::Busy);
        assert_eq!(typed(&out, "dialing"), EventType::Updated);
        assert_eq!(typed(&inb, "sip_participant_joined"), EventType::Updated);
        assert_eq!(typed(&inb, "routed"), EventType::Started);
        let mut unrouted = sample(Direction::Inbound);
        unrouted.status = CallStatus::Unrouted;
        assert_eq!(typed(&unrouted, "routed"), EventType::Updated);
        assert_eq!(typed(&inb, "in_progress"), EventType::InProgress);
        assert_eq!(typed(&inb, "completed"), EventType::Ended);
        assert_eq!(typed(&inb, "canceled"), EventType::Ended);
        assert_eq!(typed(&inb, "unrouted"), EventType::Unrouted);
        assert_eq!(
            typed(&inb, entries::CALLER_HUNG_UP_BY_FLEET),
            EventType::HungUp
        );
        assert_eq!(typed(&out, entries::TRANSFERRED), EventType::Transferred);
        assert_eq!(typed(&out, "dispatch_created"), EventType::Updated);
    }

    #[test]
    fn numbers_inside_names_and_details_are_masked() {
        assert_eq!(
            mask_digit_runs("call_+15105550123_abCD12"),
            "call_+•••••••••23_abCD12"
        );
        assert_eq!(mask_digit_runs("tel:+15105550199"), "tel:+•••••••••99");
        assert_eq!(mask_digit_runs("603 Decline"), "603 Decline");
        assert_eq!(mask_digit_runs("cf-01a2b3"), "cf-01a2b3");
    }

    #[test]
    fn numbers_are_masked_to_country_and_last_digits() {
        assert_eq!(CallEvent::mask("+14155550167"), "+1••••••••67");
        assert_eq!(CallEvent::mask("+123"), "••••");
    }
}
