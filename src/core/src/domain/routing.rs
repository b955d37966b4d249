//! Inbound routing: agent profiles, and the pure decision of which profile takes a call
//! (the dialed number's active profiles inside their hours and under their cap; a
//! weighted choice sticky per caller; then fallbacks, then the default; else unrouted).
//! Time and the profiles' current load are parameters, so every decision is unit-tested.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use rlibphonenumber::Region;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::phone::E164;
use super::request::{bad, check_token, FieldError};

pub mod limits {
    pub const MAX_NAME_LEN: usize = 128;
    pub const MAX_ID_LEN: usize = 64;
    pub const MAX_NUMBERS: usize = 1_000;
    pub const MAX_SCOPE_IDS: usize = 100;
    pub const MAX_METADATA_BYTES: usize = 16 * 1024;
    pub const MAX_WEIGHT: u32 = 10_000;
    pub const MAX_CONCURRENT: u32 = 1_000_000;
    pub const MAX_WEEKLY_WINDOWS: usize = 28;
    /// As many date overrides as Amazon Connect's hours of operation allow.
    pub const MAX_OVERRIDES: usize = 50;
    pub const MAX_AGENT_JOIN_TIMEOUT_S: u32 = 600;
    /// How far a fallback chain is followed (cycles are cut too).
    pub const MAX_FALLBACK_DEPTH: usize = 8;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileStatus {
    #[default]
    Active,
    Inactive,
}

impl ProfileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileStatus::Active => "active",
            ProfileStatus::Inactive => "inactive",
        }
    }
}

/// What to do when the dispatched agent has not joined within `agent_join_timeout_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoAgentAction {
    /// Dispatch the fallback chain's agent once; hang up when there is none.
    #[default]
    Fallback,
    /// Hang up the caller (never leave them ringing for the trunk's minutes).
    Hangup,
}

/// Local opening hours: weekly windows and date overrides, in one IANA time zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    pub time_zone: String,
    #[serde(default)]
    pub weekly: Vec<WeeklyWindow>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<DateOverride>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeeklyWindow {
    /// `mon`..`sun`; empty means every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// `HH:MM`, local.
    pub start: String,
    /// `HH:MM` (exclusive) or `24:00`; earlier than `start` crosses midnight.
    pub end: String,
}

/// A date with its own hours (a holiday: `closed`, or shorter windows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DateOverride {
    /// `YYYY-MM-DD`, local.
    pub date: String,
    #[serde(default)]
    pub closed: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<TimeWindow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    pub start: String,
    pub end: String,
}

/// An agent profile: which LiveKit agent answers which numbers, when, and how many at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    pub agent_name: String,
    /// JSON the agent receives (prompt, greeting, voice…), beside the call's facts.
    pub metadata: Value,
    pub status: ProfileStatus,
    pub numbers: Vec<E164>,
    /// When non-empty, only calls arriving on these trunks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk_ids: Vec<String>,
    /// When non-empty, only calls matched by these dispatch rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_ids: Vec<String>,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<Hours>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_calls: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    pub agent_join_timeout_s: u32,
    pub on_no_agent: NoAgentAction,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A profile as clients write it (create, replace, import). Server-kept fields an export
/// carries (`created_at`, `updated_at`) are accepted and ignored, so an export imports
/// unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    #[serde(default)]
    pub agent_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ProfileStatus>,
    #[serde(default)]
    pub numbers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<Hours>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_calls: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_join_timeout_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_no_agent: Option<NoAgentAction>,
    #[serde(default, skip_serializing)]
    pub created_at: Option<Value>,
    #[serde(default, skip_serializing)]
    pub updated_at: Option<Value>,
}

pub const DEFAULT_WEIGHT: u32 = 100;
pub const DEFAULT_AGENT_JOIN_TIMEOUT_S: u32 = 20;

/// A fresh profile id.
pub fn new_profile_id() -> String {
    format!("prof_{}", &uuid::Uuid::now_v7().simple().to_string()[..20])
}

fn check_id(field: &str, value: &str) -> Result<(), FieldError> {
    check_token(field, value, limits::MAX_ID_LEN)
}

fn check_ids(field: &str, values: &[String]) -> Result<Vec<String>, FieldError> {
    if values.len() > limits::MAX_SCOPE_IDS {
        return Err(bad(
            field,
            format!("may hold at most {} ids", limits::MAX_SCOPE_IDS),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        check_token(&format!("{field}[{i}]"), v, limits::MAX_NAME_LEN)?;
        if !out.contains(v) {
            out.push(v.clone());
        }
    }
    Ok(out)
}

impl ProfileInput {
    /// Validates into a profile with `id` (the path's, or the body's, or a new one);
    /// `existing` keeps its creation time.
    pub fn into_profile(
        self,
        id: Option<&str>,
        region: Option<Region>,
        existing: Option<&Profile>,
        now: DateTime<Utc>,
    ) -> Result<Profile, FieldError> {
        let id = match (id, &self.id) {
            (Some(path), Some(body)) if path != body => {
                return Err(bad("id", "differs from the id in the path"))
            }
            (Some(path), _) => path.to_owned(),
            (None, Some(body)) => body.clone(),
            (None, None) => new_profile_id(),
        };
        check_id("id", &id)?;
        let name = self.name.unwrap_or_default();
        if name.trim().is_empty() || name.len() > limits::MAX_NAME_LEN {
            return Err(bad(
                "name",
                format!("is required, 1 to {} characters", limits::MAX_NAME_LEN),
            ));
        }
        if let Some(org) = &self.organization {
            check_token("organization", org, limits::MAX_NAME_LEN)?;
        }
        let agent_name = self
            .agent_name
            .ok_or_else(|| bad("agent_name", "is required: the LiveKit agent to dispatch"))?;
        check_token("agent_name", &agent_name, limits::MAX_NAME_LEN)?;
        let metadata = match self.metadata {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v @ Value::Object(_)) => {
                let size = serde_json::to_vec(&v)
                    .map(|b| b.len())
                    .unwrap_or(usize::MAX);
                if size > limits::MAX_METADATA_BYTES {
                    return Err(bad(
                        "metadata",
                        format!("must be at most {} bytes", limits::MAX_METADATA_BYTES),
                    ));
                }
                v
            }
            Some(_) => return Err(bad("metadata", "must be a JSON object")),
        };
        if self.numbers.len() > limits::MAX_NUMBERS {
            return Err(bad(
                "numbers",
                format!("may hold at most {} numbers", limits::MAX_NUMBERS),
            ));
        }
        let mut numbers: Vec<E164> = Vec::with_capacity(self.numbers.len());
        for (i, n) in self.numbers.iter().enumerate() {
            let number =
                E164::parse(n, region).map_err(|e| bad(&format!("numbers[{i}]"), e.to_string()))?;
            if !numbers.contains(&number) {
                numbers.push(number);
            }
        }
        let trunk_ids = check_ids("trunk_ids", &self.trunk_ids)?;
        let rule_ids = check_ids("rule_ids", &self.rule_ids)?;
        let weight = self.weight.unwrap_or(DEFAULT_WEIGHT);
        if !(1..=limits::MAX_WEIGHT).contains(&weight) {
            return Err(bad(
                "weight",
                format!("must be 1 to {}", limits::MAX_WEIGHT),
            ));
        }
        // Stored as understood: `monday` → `mon`, `9:00` → `09:00`.
        let hours = match &self.hours {
            Some(hours) => {
                CompiledHours::compile(hours)?;
                Some(canonical_hours(hours))
            }
            None => None,
        };
        if let Some(cap) = self.max_concurrent_calls {
            if !(1..=limits::MAX_CONCURRENT).contains(&cap) {
                return Err(bad(
                    "max_concurrent_calls",
                    format!(
                        "must be 1 to {} (leave it out for no cap)",
                        limits::MAX_CONCURRENT
                    ),
                ));
            }
        }
        if let Some(fallback) = &self.fallback {
            check_id("fallback", fallback)?;
            if *fallback == id {
                return Err(bad("fallback", "must name another profile"));
            }
        }
        let agent_join_timeout_s = self
            .agent_join_timeout_s
            .unwrap_or(DEFAULT_AGENT_JOIN_TIMEOUT_S);
        if !(1..=limits::MAX_AGENT_JOIN_TIMEOUT_S).contains(&agent_join_timeout_s) {
            return Err(bad(
                "agent_join_timeout_s",
                format!("must be 1 to {}", limits::MAX_AGENT_JOIN_TIMEOUT_S),
            ));
        }
        Ok(Profile {
            id,
            name,
            organization: self.organization,
            agent_name,
            metadata,
            status: self.status.unwrap_or_default(),
            numbers,
            trunk_ids,
            rule_ids,
            weight,
            hours,
            max_concurrent_calls: self.max_concurrent_calls,
            fallback: self.fallback,
            agent_join_timeout_s,
            on_no_agent: self.on_no_agent.unwrap_or_default(),
            created_at: existing.map(|p| p.created_at).unwrap_or(now),
            updated_at: now,
        })
    }
}

impl Profile {
    /// The profile as a client would write it (the base a JSON merge patch applies to).
    pub fn to_input(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.remove("created_at");
            map.remove("updated_at");
        }
        v
    }
}

/// RFC 7396 JSON merge patch: `null` removes a field, objects merge, anything else
/// replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

// --- hours -------------------------------------------------------------------------------

/// `hours` (already validated) written the one way they are shown back.
fn canonical_hours(hours: &Hours) -> Hours {
    let time = |t: &str| {
        if t == "24:00" {
            return t.to_owned();
        }
        NaiveTime::parse_from_str(t, "%H:%M")
            .map(|t| t.format("%H:%M").to_string())
            .unwrap_or_else(|_| t.to_owned())
    };
    let day = |d: &String| {
        let d = d.to_ascii_lowercase();
        d.get(..3).map(str::to_owned).unwrap_or(d)
    };
    Hours {
        time_zone: hours.time_zone.clone(),
        weekly: hours
            .weekly
            .iter()
            .map(|w| WeeklyWindow {
                days: w.days.iter().map(day).collect(),
                start: time(&w.start),
                end: time(&w.end),
            })
            .collect(),
        overrides: hours
            .overrides
            .iter()
            .map(|o| DateOverride {
                date: o.date.clone(),
                closed: o.closed,
                windows: o
                    .windows
                    .iter()
                    .map(|w| TimeWindow {
                        start: time(&w.start),
                        end: time(&w.end),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[derive(Debug, Clone)]
struct Span {
    start: NaiveTime,
    /// `None`: until midnight.
    end: Option<NaiveTime>,
}

impl Span {
    /// Whether `t` falls in the span on its own day (the part before midnight).
    fn contains_same_day(&self, t: NaiveTime) -> bool {
        match self.end {
            None => t >= self.start,
            Some(end) if end > self.start => t >= self.start && t < end,
            // Overnight: the part after `start` belongs to this day.
            Some(_) => t >= self.start,
        }
    }

    /// Whether `t` is in the part of an overnight span that spills into the next day.
    fn contains_spill(&self, t: NaiveTime) -> bool {
        matches!(self.end, Some(end) if end < self.start && t < end)
    }
}

#[derive(Debug, Clone)]
struct CompiledHours {
    tz: Tz,
    weekly: Vec<(u8, Span)>,
    overrides: HashMap<NaiveDate, Vec<Span>>,
}

fn parse_hhmm(
    field: &str,
    value: &str,
    allow_midnight_end: bool,
) -> Result<Option<NaiveTime>, FieldError> {
    if allow_midnight_end && value == "24:00" {
        return Ok(None);
    }
    NaiveTime::parse_from_str(value, "%H:%M")
        .map(Some)
        .map_err(|_| bad(field, "is not a local time written HH:MM, such as 09:00"))
}

fn day_bit(day: Weekday) -> u8 {
    1 << day.num_days_from_monday()
}

fn parse_days(field: &str, days: &[String]) -> Result<u8, FieldError> {
    if days.is_empty() {
        return Ok(0x7f);
    }
    let mut mask = 0;
    for (i, d) in days.iter().enumerate() {
        let day = match d.to_ascii_lowercase().as_str() {
            "mon" | "monday" => Weekday::Mon,
            "tue" | "tuesday" => Weekday::Tue,
            "wed" | "wednesday" => Weekday::Wed,
            "thu" | "thursday" => Weekday::Thu,
            "fri" | "friday" => Weekday::Fri,
            "sat" | "saturday" => Weekday::Sat,
            "sun" | "sunday" => Weekday::Sun,
            _ => {
                return Err(bad(
                    &format!("{field}[{i}]"),
                    "must be one of mon, tue, wed, thu, fri, sat, sun",
                ))
            }
        };
        mask |= day_bit(day);
    }
    Ok(mask)
}

fn span(field: &str, start: &str, end: &str, overnight: bool) -> Result<Span, FieldError> {
    let s = parse_hhmm(&format!("{field}.start"), start, false)?
        .ok_or_else(|| bad(&format!("{field}.start"), "must be a time of day"))?;
    let e = parse_hhmm(&format!("{field}.end"), end, true)?;
    match e {
        Some(e) if e == s => Err(bad(field, "start and end are equal")),
        Some(e) if e < s && !overnight => Err(bad(
            &format!("{field}.end"),
            "must be after start (a date's windows cannot cross midnight)",
        )),
        _ => Ok(Span { start: s, end: e }),
    }
}

impl CompiledHours {
    fn compile(hours: &Hours) -> Result<Self, FieldError> {
        let tz: Tz = hours.time_zone.parse().map_err(|_| {
            bad(
                "hours.time_zone",
                "is not an IANA time zone such as America/New_York",
            )
        })?;
        if hours.weekly.len() > limits::MAX_WEEKLY_WINDOWS {
            return Err(bad(
                "hours.weekly",
                format!("may hold at most {} windows", limits::MAX_WEEKLY_WINDOWS),
            ));
        }
        if hours.overrides.len() > limits::MAX_OVERRIDES {
            return Err(bad(
                "hours.overrides",
                format!("may hold at most {} dates", limits::MAX_OVERRIDES),
            ));
        }
        let mut weekly = Vec::with_capacity(hours.weekly.len());
        for (i, w) in hours.weekly.iter().enumerate() {
            let field = format!("hours.weekly[{i}]");
            let days = parse_days(&format!("{field}.days"), &w.days)?;
            weekly.push((days, span(&field, &w.start, &w.end, true)?));
        }
        let mut overrides = HashMap::new();
        for (i, o) in hours.overrides.iter().enumerate() {
            let field = format!("hours.overrides[{i}]");
            let date = NaiveDate::parse_from_str(&o.date, "%Y-%m-%d")
                .map_err(|_| bad(&format!("{field}.date"), "is not a date written YYYY-MM-DD"))?;
            if o.closed && !o.windows.is_empty() {
                return Err(bad(&field, "is closed but has windows: choose one"));
            }
            let mut spans = Vec::with_capacity(o.windows.len());
            for (j, w) in o.windows.iter().enumerate() {
                spans.push(span(
                    &format!("{field}.windows[{j}]"),
                    &w.start,
                    &w.end,
                    false,
                )?);
            }
            if overrides.insert(date, spans).is_some() {
                return Err(bad(&format!("{field}.date"), "appears twice"));
            }
        }
        Ok(Self {
            tz,
            weekly,
            overrides,
        })
    }

    fn open(&self, at: DateTime<Utc>) -> bool {
        let local = at.with_timezone(&self.tz);
        let date = local.date_naive();
        let t = NaiveTime::from_hms_opt(local.hour(), local.minute(), local.second())
            .unwrap_or(NaiveTime::MIN);
        if let Some(spans) = self.overrides.get(&date) {
            return spans.iter().any(|s| s.contains_same_day(t));
        }
        let today = day_bit(local.weekday());
        let yesterday = day_bit(local.weekday().pred());
        let yesterday_overridden = date
            .pred_opt()
            .is_some_and(|d| self.overrides.contains_key(&d));
        self.weekly.iter().any(|(days, s)| {
            (days & today != 0 && s.contains_same_day(t))
                || (!yesterday_overridden && days & yesterday != 0 && s.contains_spill(t))
        })
    }
}

// --- the routing table -------------------------------------------------------------------

/// A profile with its hours compiled.
#[derive(Debug, Clone)]
pub struct RoutedProfile {
    pub profile: Profile,
    hours: Option<CompiledHours>,
}

impl RoutedProfile {
    pub fn new(profile: Profile) -> Self {
        // Stored profiles were validated on the way in; hours that no longer compile
        // (a time zone dropped from the database) count as always open rather than never.
        let hours = profile
            .hours
            .as_ref()
            .and_then(|h| CompiledHours::compile(h).ok());
        Self { profile, hours }
    }

    pub fn open_at(&self, at: DateTime<Utc>) -> bool {
        self.hours.as_ref().is_none_or(|h| h.open(at))
    }

    fn serves(&self, q: &RouteQuery<'_>) -> bool {
        let scoped = |ids: &[String], id: Option<&str>| {
            ids.is_empty() || id.is_some_and(|id| ids.iter().any(|x| x == id))
        };
        scoped(&self.profile.trunk_ids, q.trunk_id) && scoped(&self.profile.rule_ids, q.rule_id)
    }
}

/// The current number of calls each profile is handling.
pub trait Loads {
    fn busy(&self, profile_id: &str) -> u32;
}

impl Loads for HashMap<String, u32> {
    fn busy(&self, profile_id: &str) -> u32 {
        self.get(profile_id).copied().unwrap_or(0)
    }
}

/// Loads with some profiles treated as full (their slot was just refused).
pub struct Excluding<'a, L: Loads + ?Sized> {
    pub loads: &'a L,
    pub full: &'a [String],
}

impl<L: Loads + ?Sized> Loads for Excluding<'_, L> {
    fn busy(&self, profile_id: &str) -> u32 {
        if self.full.iter().any(|f| f == profile_id) {
            u32::MAX
        } else {
            self.loads.busy(profile_id)
        }
    }
}

/// What a call offers the router.
#[derive(Debug, Clone)]
pub struct RouteQuery<'a> {
    /// The dialed number (E.164 when it parses; matched exactly).
    pub to: &'a str,
    /// The caller, when known (the weighted choice sticks to it).
    pub from: Option<&'a str>,
    pub trunk_id: Option<&'a str>,
    pub rule_id: Option<&'a str>,
    pub at: DateTime<Utc>,
    /// Used for the weighted choice when the caller is hidden (random per call).
    pub call_key: &'a str,
}

/// Why a profile could not take the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ineligible {
    /// No profile serves the number (on this trunk and rule).
    NoProfile,
    Inactive,
    OutsideHours,
    AtCapacity,
}

impl Ineligible {
    pub fn as_str(self) -> &'static str {
        match self {
            Ineligible::NoProfile => "no_profile",
            Ineligible::Inactive => "inactive",
            Ineligible::OutsideHours => "outside_hours",
            Ineligible::AtCapacity => "at_capacity",
        }
    }
}

/// How the profile was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum RouteReason {
    /// The one eligible profile serving the number.
    Active,
    /// One of several eligible profiles, by weight, sticky per caller.
    Weighted,
    /// The number's profiles could not take it (`cause`); a profile's fallback did.
    Fallback { cause: Ineligible, via: String },
    /// Nothing serving the number could take it; the configured default did.
    Default { cause: Ineligible },
    /// Nobody can take it.
    Unrouted { cause: Ineligible },
}

impl RouteReason {
    /// The metric label.
    pub fn result(&self) -> &'static str {
        match self {
            RouteReason::Active => "active",
            RouteReason::Weighted => "weighted",
            RouteReason::Fallback { .. } => "fallback",
            RouteReason::Default { .. } => "default",
            RouteReason::Unrouted { .. } => "unrouted",
        }
    }

    pub fn cause(&self) -> Option<Ineligible> {
        match self {
            RouteReason::Active | RouteReason::Weighted => None,
            RouteReason::Fallback { cause, .. }
            | RouteReason::Default { cause }
            | RouteReason::Unrouted { cause } => Some(*cause),
        }
    }
}

impl fmt::Display for RouteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteReason::Active => f.write_str("active"),
            RouteReason::Weighted => f.write_str("weighted"),
            RouteReason::Fallback { cause, via } => {
                write!(f, "{}→fallback:{via}", cause.as_str())
            }
            RouteReason::Default { cause } => write!(f, "{}→default", cause.as_str()),
            RouteReason::Unrouted { cause } => write!(f, "{}→unrouted", cause.as_str()),
        }
    }
}

/// A profile looked at, and what it was found to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Considered {
    pub profile_id: String,
    /// `eligible`, or why not.
    pub verdict: String,
}

/// The router's answer.
#[derive(Debug, Clone)]
pub struct Decision {
    pub profile: Option<Arc<RoutedProfile>>,
    pub reason: RouteReason,
    pub considered: Vec<Considered>,
}

impl Decision {
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_deref().map(|p| &p.profile)
    }
}

/// Filters for listing profiles.
#[derive(Debug, Clone, Default)]
pub struct ProfileFilter {
    pub number: Option<String>,
    pub status: Option<ProfileStatus>,
    pub organization: Option<String>,
}

/// Every profile, indexed by id (sorted, for paging) and by number. Cloned and changed
/// as a whole by the cache that holds it, so readers never wait on a writer.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    profiles: BTreeMap<String, Arc<RoutedProfile>>,
    by_number: HashMap<String, Vec<String>>,
    default_profile: Option<String>,
}

/// `-ln(u) / weight` for a hash-derived `u` in (0, 1]: the smallest wins (weighted
/// rendezvous hashing). The same caller gets the same profile while the eligible set
/// stays the same, and removing a profile moves only its own callers.
fn rendezvous_score(key: &str, profile_id: &str, weight: u32) -> f64 {
    let digest = Sha256::new()
        .chain_update(key.as_bytes())
        .chain_update([0u8])
        .chain_update(profile_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    let u = ((u64::from_be_bytes(bytes) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    -u.ln() / f64::from(weight.max(1))
}

impl RoutingTable {
    pub fn new(default_profile: Option<String>) -> Self {
        Self {
            default_profile,
            ..Default::default()
        }
    }

    pub fn from_profiles(profiles: Vec<Profile>, default_profile: Option<String>) -> Self {
        let mut table = Self::new(default_profile);
        for p in profiles {
            table.upsert(p);
        }
        table
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    pub fn default_profile(&self) -> Option<&str> {
        self.default_profile.as_deref()
    }

    pub fn get(&self, id: &str) -> Option<&Arc<RoutedProfile>> {
        self.profiles.get(id)
    }

    pub fn upsert(&mut self, profile: Profile) {
        self.remove(&profile.id);
        for n in &profile.numbers {
            let ids = self.by_number.entry(n.as_str().to_owned()).or_default();
            if let Err(at) = ids.binary_search(&profile.id) {
                ids.insert(at, profile.id.clone());
            }
        }
        self.profiles
            .insert(profile.id.clone(), Arc::new(RoutedProfile::new(profile)));
    }

    pub fn remove(&mut self, id: &str) -> bool {
        let Some(old) = self.profiles.remove(id) else {
            return false;
        };
        for n in &old.profile.numbers {
            if let Some(ids) = self.by_number.get_mut(n.as_str()) {
                ids.retain(|x| x != id);
                if ids.is_empty() {
                    self.by_number.remove(n.as_str());
                }
            }
        }
        true
    }

    /// Profiles in id order after `after`, matching `filter`, `limit` at most.
    pub fn list(&self, filter: &ProfileFilter, after: Option<&str>, limit: usize) -> Vec<&Profile> {
        let matches = |p: &&Arc<RoutedProfile>| {
            let p = &p.profile;
            filter.status.is_none_or(|s| p.status == s)
                && filter
                    .organization
                    .as_deref()
                    .is_none_or(|o| p.organization.as_deref() == Some(o))
        };
        if let Some(number) = &filter.number {
            let ids = self
                .by_number
                .get(number.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            return ids
                .iter()
                .filter(|id| after.is_none_or(|a| id.as_str() > a))
                .filter_map(|id| self.profiles.get(id))
                .filter(matches)
                .take(limit)
                .map(|p| &p.profile)
                .collect();
        }
        let range = match after {
            Some(a) => self
                .profiles
                .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.profiles.range::<str, _>(..),
        };
        range
            .map(|(_, p)| p)
            .filter(matches)
            .take(limit)
            .map(|p| &p.profile)
            .collect()
    }

    pub fn all(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values().map(|p| &p.profile)
    }

    fn verdict(
        &self,
        p: &RoutedProfile,
        at: DateTime<Utc>,
        loads: &dyn Loads,
    ) -> Option<Ineligible> {
        if p.profile.status != ProfileStatus::Active {
            return Some(Ineligible::Inactive);
        }
        if !p.open_at(at) {
            return Some(Ineligible::OutsideHours);
        }
        if let Some(cap) = p.profile.max_concurrent_calls {
            if loads.busy(&p.profile.id) >= cap {
                return Some(Ineligible::AtCapacity);
            }
        }
        None
    }

    /// The first eligible profile along `start`'s fallback chain (`start` excluded),
    /// skipping `exclude`d profiles and cycles.
    pub fn fallback_of(
        &self,
        start: &str,
        at: DateTime<Utc>,
        loads: &dyn Loads,
        considered: &mut Vec<Considered>,
    ) -> Option<Arc<RoutedProfile>> {
        let mut seen: HashSet<&str> = HashSet::from([start]);
        let mut next = self.profiles.get(start)?.profile.fallback.as_deref();
        for _ in 0..limits::MAX_FALLBACK_DEPTH {
            let id = next?;
            if !seen.insert(id) {
                return None;
            }
            let Some(p) = self.profiles.get(id) else {
                considered.push(Considered {
                    profile_id: id.to_owned(),
                    verdict: "missing".into(),
                });
                return None;
            };
            let verdict = self.verdict(p, at, loads);
            considered.push(Considered {
                profile_id: id.to_owned(),
                verdict: verdict.map_or("eligible", Ineligible::as_str).to_owned(),
            });
            if verdict.is_none() {
                return Some(p.clone());
            }
            next = p.profile.fallback.as_deref();
        }
        None
    }

    /// Which profile takes the call, and why.
    pub fn resolve(&self, q: &RouteQuery<'_>, loads: &dyn Loads) -> Decision {
        let mut considered = Vec::new();
        let mut candidates: Vec<&Arc<RoutedProfile>> = self
            .by_number
            .get(q.to)
            .into_iter()
            .flatten()
            .filter_map(|id| self.profiles.get(id))
            .filter(|p| p.serves(q))
            .collect();
        // Fallback chains are tried heaviest first.
        candidates.sort_by(|a, b| {
            b.profile
                .weight
                .cmp(&a.profile.weight)
                .then_with(|| a.profile.id.cmp(&b.profile.id))
        });
        let mut eligible = Vec::new();
        let mut causes = Vec::new();
        for p in &candidates {
            let verdict = self.verdict(p, q.at, loads);
            considered.push(Considered {
                profile_id: p.profile.id.clone(),
                verdict: verdict.map_or("eligible", Ineligible::as_str).to_owned(),
            });
            match verdict {
                None => eligible.push(*p),
                Some(v) => causes.push(v),
            }
        }
        if eligible.len() == 1 {
            return Decision {
                profile: Some(eligible[0].clone()),
                reason: RouteReason::Active,
                considered,
            };
        }
        if !eligible.is_empty() {
            let key = q.from.filter(|f| !f.is_empty()).unwrap_or(q.call_key);
            let chosen = eligible
                .iter()
                .min_by(|a, b| {
                    rendezvous_score(key, &a.profile.id, a.profile.weight)
                        .total_cmp(&rendezvous_score(key, &b.profile.id, b.profile.weight))
                })
                .map(|p| (*p).clone());
            return Decision {
                profile: chosen,
                reason: RouteReason::Weighted,
                considered,
            };
        }
        // The most telling reason: a profile that was open but full says more than one
        // that was closed, and that more than one switched off.
        let cause = [
            Ineligible::AtCapacity,
            Ineligible::OutsideHours,
            Ineligible::Inactive,
        ]
        .into_iter()
        .find(|c| causes.contains(c))
        .unwrap_or(Ineligible::NoProfile);
        for p in &candidates {
            if let Some(f) = self.fallback_of(&p.profile.id, q.at, loads, &mut considered) {
                let via = f.profile.id.clone();
                return Decision {
                    profile: Some(f),
                    reason: RouteReason::Fallback { cause, via },
                    considered,
                };
            }
        }
        if let Some(default) = self.default_profile.as_deref() {
            let already = candidates.iter().any(|p| p.profile.id == default);
            match self.profiles.get(default) {
                Some(p) if !already => {
                    let verdict = self.verdict(p, q.at, loads);
                    considered.push(Considered {
                        profile_id: default.to_owned(),
                        verdict: verdict.map_or("eligible", Ineligible::as_str).to_owned(),
                    });
                    if verdict.is_none() {
                        return Decision {
                            profile: Some(p.clone()),
                            reason: RouteReason::Default { cause },
                            considered,
                        };
                    }
                }
                Some(_) => {}
                None => considered.push(Considered {
                    profile_id: default.to_owned(),
                    verdict: "missing".into(),
                }),
            }
        }
        Decision {
            profile: None,
            reason: RouteReason::Unrouted { cause },
            considered,
        }
    }
}

/// The routing decision as the call keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    /// `active`, `weighted`, `outside_hours→fallback:<id>`, `at_capacity→default`, …
    pub decision: String,
    #[serde(flatten)]
    pub reason: RouteReason,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub considered: Vec<Considered>,
    pub decided_at: DateTime<Utc>,
}

impl RoutingRecord {
    pub fn of(decision: &Decision, at: DateTime<Utc>) -> Self {
        let p = decision.profile();
        Self {
            profile_id: p.map(|p| p.id.clone()),
            profile_name: p.map(|p| p.name.clone()),
            organization: p.and_then(|p| p.organization.clone()),
            agent_name: p.map(|p| p.agent_name.clone()),
            decision: decision.reason.to_string(),
            reason: decision.reason.clone(),
            considered: decision.considered.iter().take(16).cloned().collect(),
            decided_at: at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().expect("rfc3339")
    }

    fn profile(v: Value) -> Profile {
        let input: ProfileInput = serde_json::from_value(v).expect("input");
        input
            .into_profile(None, None, None, utc("2026-11-20T00:00:00Z"))
            .expect("valid profile")
    }

    fn base(id: &str) -> Value {
        json!({"id": id, "name": id, "agent_name": format!("agent-{id}"), "numbers": ["+15105550100"]})
    }

    fn with(mut v: Value, patch: Value) -> Value {
        merge_patch(&mut v, &patch);
        v
    }

    fn query(at: &str) -> RouteQuery<'static> {
        RouteQuery {
            to: "+15105550100",
            from: Some("+15105550123"),
            trunk_id: Some("ST_a"),
            rule_id: Some("SDR_a"),
            at: utc(at),
            call_key: "room-1",
        }
    }

    const FRIDAY_NOON_NY: &str = "2026-11-20T17:00:00Z";
    const FRIDAY_NIGHT_NY: &str = "2026-11-21T03:00:00Z";

    fn office_hours() -> Value {
        json!({"hours": {"time_zone": "America/New_York",
            "weekly": [{"days": ["mon","tue","wed","thu","fri"], "start": "09:00", "end": "18:00"}]}})
    }

    #[test]
    fn one_active_profile_takes_the_call() {
        let t = RoutingTable::from_profiles(vec![profile(base("a"))], None);
        let d = t.resolve(&query(FRIDAY_NOON_NY), &HashMap::new());
        assert_eq!(d.profile().map(|p| p.id.as_str()), Some("a"));
        assert_eq!(d.reason.to_string(), "active");
    }

    #[test]
    fn inactive_outside_hours_and_full_profiles_fall_back() {
        let t = RoutingTable::from_profiles(
            vec![
                profile(with(
                    base("a"),
                    json!({"fallback": "b", "status": "inactive"}),
                )),
                profile(with(base("b"), json!({"numbers": []}))),
            ],
            None,
        );
        let d = t.resolve(&query(FRIDAY_NOON_NY), &HashMap::new());
        assert_eq!(d.reason.to_string(), "inactive→fallback:b");
        assert_eq!(d.profile().map(|p| p.id.as_str()), Some("b"));

        let t = RoutingTable::from_profiles(
            vec![
                profile(with(
                    with(base("a"), office_hours()),
                    json!({"fallback": "night"}),
                )),
                profile(with(base("night"), json!({"numbers": []}))),
            ],
            None,
        );
        assert_eq!(
            t.resolve(&query(FRIDAY_NIGHT_NY), &HashMap::new())
                .reason
                .to_string(),
            "outside_hours→fallback:night"
        );
        assert_eq!(
            t.resolve(&query(FRIDAY_NOON_NY), &HashMap::new())
                .reason
                .to_string(),
            "active"
        );

        let t = RoutingTable::from_profiles(
            vec![
                profile(with(base("a"), json!({"max_concurrent_calls": 2}))),
                profile(with(base("d"), json!({"numbers": []}))),
            ],
            Some("d".into()),
        );
        let loads = HashMap::from([("a".to_owned(), 2)]);
        let d = t.resolve(&query(FRIDAY_NOON_NY), &loads);
        assert_eq!(d.reason.to_string(), "at_capacity→default");
        assert_eq!(d.profile().map(|p| p.id.as_str()), Some("d"));
        let loads = HashMap::from([("a".to_owned(), 1)]);
        assert_eq!(
            t.resolve(&query(FRIDAY_NOON_NY), &loads).reason,
            RouteReason::Active
        );
    }

    #[test]
    fn nothing_left_is_unrouted_and_cycles_end() {
        let t = RoutingTable::from_profiles(
            vec![
                profile(with(
                    base("a"),
                    json!({"status": "inactive", "fallback": "b"}),
                )),
                profile(with(
                    base("b"),
                    json!({"status": "inactive", "fallback": "a", "numbers": []}),
                )),
            ],
            Some("missing".into()),
        );
        let d = t.resolve(&query(FRIDAY_NOON_NY), &HashMap::new());
        assert!(d.profile.is_none());
        assert_eq!(d.reason.to_string(), "inactive→unrouted");
        let empty = RoutingTable::new(None);
        assert_eq!(
            empty
                .resolve(&query(FRIDAY_NOON_NY), &HashMap::new())
                .reason
                .to_string(),
            "no_profile→unrouted"
        );
    }

    #[test]
    fn trunk_and_rule_scopes_narrow_the_match() {
        let t = RoutingTable::from_profiles(
            vec![profile(with(base("a"), json!({"trunk_ids": ["ST_other"]})))],
            None,
        );
        assert_eq!(
            t.resolve(&query(FRIDAY_NOON_NY), &HashMap::new())
                .reason
                .to_string(),
            "no_profile→unrouted"
        );
        let t = RoutingTable::from_profiles(
            vec![profile(with(
                base("a"),
                json!({"trunk_ids": ["ST_a"], "rule_ids": ["SDR_a"]}),
            ))],
            None,
        );
        assert_eq!(
            t.resolve(&query(FRIDAY_NOON_NY), &HashMap::new()).reason,
            RouteReason::Active
        );
    }

    #[test]
    fn weights_split_callers_in_proportion_and_stick_to_each_caller() {
        let t = RoutingTable::from_profiles(
            vec![
                profile(with(base("a"), json!({"weight": 75}))),
                profile(with(base("b"), json!({"weight": 25}))),
            ],
            None,
        );
        let mut a = 0;
        for i in 0..10_000 {
            let caller = format!("+1510555{i:04}");
            let mut q = query(FRIDAY_NOON_NY);
            q.from = Some(&caller);
            let d = t.resolve(&q, &HashMap::new());
            assert_eq!(d.reason, RouteReason::Weighted);
            let first = d.profile().map(|p| p.id.clone());
            // Sticky: the same caller again gets the same profile.
            assert_eq!(
                t.resolve(&q, &HashMap::new())
                    .profile()
                    .map(|p| p.id.clone()),
                first
            );
            if first.as_deref() == Some("a") {
                a += 1;
            }
        }
        assert!((7_200..=7_800).contains(&a), "a took {a} of 10000");
    }

    #[test]
    fn hours_overrides_and_overnight_windows() {
        let p = profile(with(
            base("a"),
            json!({"hours": {"time_zone": "Europe/Paris",
                "weekly": [{"days": ["fri"], "start": "22:00", "end": "02:00"},
                           {"start": "09:00", "end": "24:00"}],
                "overrides": [{"date": "2026-12-25", "closed": true},
                              {"date": "2026-12-24", "windows": [{"start": "09:00", "end": "12:00"}]}]}}),
        ));
        let r = RoutedProfile::new(p);
        // Saturday 01:30 Paris: the spill of Friday's overnight window.
        assert!(r.open_at(utc("2026-11-21T00:30:00Z")));
        // Saturday 03:00 Paris: closed.
        assert!(!r.open_at(utc("2026-11-21T02:00:00Z")));
        // Saturday 23:30: open until midnight.
        assert!(r.open_at(utc("2026-11-21T22:30:00Z")));
        // Christmas: closed all day.
        assert!(!r.open_at(utc("2026-12-25T10:00:00Z")));
        // Christmas Eve: morning only.
        assert!(r.open_at(utc("2026-12-24T10:00:00Z")));
        assert!(!r.open_at(utc("2026-12-24T14:00:00Z")));
    }

    #[test]
    fn hours_are_stored_as_understood() {
        let p = profile(with(
            base("a"),
            json!({"hours": {"time_zone": "UTC",
                "weekly": [{"days": ["Monday", "TUE"], "start": "9:00", "end": "24:00"}]}}),
        ));
        let w = &p.hours.expect("hours").weekly[0];
        assert_eq!(w.days, vec!["mon", "tue"]);
        assert_eq!((w.start.as_str(), w.end.as_str()), ("09:00", "24:00"));
    }

    #[test]
    fn invalid_input_names_the_field() {
        let err = |patch: Value| {
            let input: ProfileInput =
                serde_json::from_value(with(base("a"), patch)).expect("shape");
            input
                .into_profile(None, None, None, Utc::now())
                .expect_err("must be refused")
                .field
        };
        assert_eq!(
            err(json!({"numbers": ["+15105550100", "nope"]})),
            "numbers[1]"
        );
        assert_eq!(err(json!({"weight": 0})), "weight");
        assert_eq!(err(json!({"fallback": "a"})), "fallback");
        assert_eq!(err(json!({"agent_name": "has space"})), "agent_name");
        assert_eq!(
            err(json!({"hours": {"time_zone": "UTC", "weekly": [{"start": "9", "end": "18:00"}]}})),
            "hours.weekly[0].start"
        );
        assert_eq!(
            err(json!({"hours": {"time_zone": "Mars/Base", "weekly": []}})),
            "hours.time_zone"
        );
        assert_eq!(err(json!({"metadata": [1]})), "metadata");
        assert!(serde_json::from_value::<ProfileInput>(json!({"nmae": "x"})).is_err());
    }

    #[test]
    fn numbers_are_normalised_and_exports_import_unchanged() {
        let p = profile(with(
            base("a"),
            json!({"numbers": ["+1 (510) 555-0100", "+15105550100"]}),
        ));
        assert_eq!(p.numbers.len(), 1);
        assert_eq!(p.numbers[0].as_str(), "+15105550100");
        let exported = serde_json::to_value(&p).expect("json");
        let again: ProfileInput = serde_json::from_value(exported).expect("export imports");
        let back = again
            .into_profile(None, None, Some(&p), p.updated_at)
            .expect("valid");
        assert_eq!(back, p);
    }

    #[test]
    fn listing_pages_in_id_order_with_filters() {
        let t = RoutingTable::from_profiles(
            (0..25)
                .map(|i| {
                    profile(with(
                        base(&format!("p{i:02}")),
                        json!({"organization": if i % 2 == 0 { "even" } else { "odd" }}),
                    ))
                })
                .collect(),
            None,
        );
        let page = t.list(&ProfileFilter::default(), None, 10);
        assert_eq!(page.len(), 10);
        let next = t.list(&ProfileFilter::default(), Some(&page[9].id), 100);
        assert_eq!(next.len(), 15);
        assert_eq!(next[0].id, "p10");
        let evens = ProfileFilter {
            organization: Some("even".into()),
            number: Some("+15105550100".into()),
            ..Default::default()
        };
        assert_eq!(t.list(&evens, None, 100).len(), 13);
    }
}
