//! What `check` and `connect-number` decide, as pure functions over LiveKit's trunks and
//! rules and callfleet's routing profiles (reference: livekit-sip-inbound.md §1–3). Numbers
//! are compared by their digits among LiveKit's own records: LiveKit's matching and its
//! rule-conflict check normalise them the same way (protocol `sip.NormalizeNumber`: spaces,
//! dashes and parentheses dropped, a `+` added), so `15105550100` and `+1 510 555 0100` are
//! one number to it and here. Against profiles they are compared in E.164 normal form
//! (`e164`), the form callfleet stores.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use callfleet_core::domain::phone::E164;
use livekit_protocol as proto;
use proto::sip_dispatch_rule::Rule;
use serde::{Deserialize, Serialize};

use super::view::agents;

/// One thing wrong with the set-up, naming what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Problems: `two_agents`, `did_in_inbound_numbers`, `number_without_trunk`,
    /// `missing_trunk`, `trunk_without_rule`. Warnings (callfleet's profiles):
    /// `routed_number_without_trunk`, `routed_number_without_rule`, `profile_scope_excludes`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trunk_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    /// The callfleet routing profile involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    pub message: String,
}

/// Two spellings of one number (`+1 510…`, `1510…`): the same digits.
pub fn same_number(a: &str, b: &str) -> bool {
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    let (a, b) = (digits(a), digits(b));
    !a.is_empty() && a == b
}

pub fn lists(numbers: &[String], number: &str) -> bool {
    numbers.iter().any(|n| same_number(n, number))
}

/// A rule as callfleet wants one: a room per caller, no agents of its own (callfleet
/// dispatches), every caller accepted.
pub fn is_callfleet_rule(rule: &proto::SipDispatchRuleInfo) -> bool {
    matches!(
        rule.rule.as_ref().and_then(|r| r.rule.as_ref()),
        Some(Rule::DispatchRuleIndividual(i)) if i.pin.is_empty()
    ) && agents(rule).is_empty()
        && rule.inbound_numbers.is_empty()
}

fn agent_names(rule: &proto::SipDispatchRuleInfo) -> String {
    agents(rule)
        .iter()
        .map(|a| a.agent_name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether two rules can see calls from the same trunk (an empty list is every trunk).
fn trunks_overlap(a: &[String], b: &[String]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|t| b.contains(t))
}

/// Rules with agents on a number another rule also routes; `own` (connect-number's own
/// rule) is reported from the other rule's side only.
fn two_agent_problems(rules: &[proto::SipDispatchRuleInfo], only: Option<&str>) -> Vec<Problem> {
    let mut problems = Vec::new();
    for r in rules.iter().filter(|r| !agents(r).is_empty()) {
        for number in &r.numbers {
            if only.is_some_and(|n| !same_number(n, number)) {
                continue;
            }
            let others: Vec<&proto::SipDispatchRuleInfo> = rules
                .iter()
                .filter(|s| s.sip_dispatch_rule_id != r.sip_dispatch_rule_id)
                .filter(|s| lists(&s.numbers, number) && trunks_overlap(&r.trunk_ids, &s.trunk_ids))
                .collect();
            let Some(other) = others.first() else {
                continue;
            };
            let why = if is_callfleet_rule(other) {
                format!(
                    "callfleet routes {number} through rule {} and dispatches its own agent",
                    other.sip_dispatch_rule_id
                )
            } else {
                format!("rule {} also routes {number}", other.sip_dispatch_rule_id)
            };
            problems.push(Problem {
                kind: "two_agents",
                rule_id: Some(r.sip_dispatch_rule_id.clone()),
                trunk_id: None,
                number: Some(number.clone()),
                profile_id: None,
                message: format!(
                    "rule {} dispatches agents ({}) for {number} and {why}: a room could get two \
                     agents. Remove the rule's agents (callfleet livekit rules update {} --replace \
                     --no-agents) or delete the rule",
                    r.sip_dispatch_rule_id,
                    agent_names(r),
                    r.sip_dispatch_rule_id
                ),
            });
        }
    }
    problems
}

/// Rules whose `inbound_numbers` (the callers) hold one of `dids`.
fn did_as_caller_problems(rules: &[proto::SipDispatchRuleInfo], dids: &[String]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for r in rules {
        for n in &r.inbound_numbers {
            if lists(dids, n) {
                problems.push(Problem {
                    kind: "did_in_inbound_numbers",
                    rule_id: Some(r.sip_dispatch_rule_id.clone()),
                    trunk_id: None,
                    number: Some(n.clone()),
                    profile_id: None,
                    message: format!(
                        "rule {} lists {n} in inbound_numbers, which filters callers, not the \
                         number dialled: only calls *from* {n} match it. Put the number in \
                         `numbers` instead (callfleet livekit rules update {} --replace \
                         --number {n} --inbound-number '')",
                        r.sip_dispatch_rule_id, r.sip_dispatch_rule_id
                    ),
                });
            }
        }
    }
    problems
}

/// Everything `callfleet livekit check` reports.
pub fn check(
    trunks: &[proto::SipInboundTrunkInfo],
    rules: &[proto::SipDispatchRuleInfo],
) -> Vec<Problem> {
    let mut problems = two_agent_problems(rules, None);

    // A number is a DID when a trunk or a rule serves it as the called number.
    let dids: Vec<String> = trunks
        .iter()
        .flat_map(|t| t.numbers.iter())
        .chain(rules.iter().flat_map(|r| r.numbers.iter()))
        .cloned()
        .collect();
    problems.extend(did_as_caller_problems(rules, &dids));

    for r in rules {
        let named: Vec<&proto::SipInboundTrunkInfo> = if r.trunk_ids.is_empty() {
            trunks.iter().collect()
        } else {
            trunks
                .iter()
                .filter(|t| r.trunk_ids.contains(&t.sip_trunk_id))
                .collect()
        };
        for id in &r.trunk_ids {
            if !trunks.iter().any(|t| &t.sip_trunk_id == id) {
                problems.push(Problem {
                    kind: "missing_trunk",
                    rule_id: Some(r.sip_dispatch_rule_id.clone()),
                    trunk_id: Some(id.clone()),
                    number: None,
                    profile_id: None,
                    message: format!(
                        "rule {} names inbound trunk {id}, which does not exist",
                        r.sip_dispatch_rule_id
                    ),
                });
            }
        }
        for number in &r.numbers {
            // LiveKit picks the trunk by exact number; an empty list takes any number.
            let served = named
                .iter()
                .any(|t| t.numbers.is_empty() || lists(&t.numbers, number));
            if !served {
                problems.push(Problem {
                    kind: "number_without_trunk",
                    rule_id: Some(r.sip_dispatch_rule_id.clone()),
                    trunk_id: None,
                    number: Some(number.clone()),
                    profile_id: None,
                    message: format!(
                        "rule {} routes {number} but no inbound trunk{} accepts calls to it: \
                         LiveKit rejects them before any rule. Add the number to a trunk \
                         (callfleet livekit connect-number {number})",
                        r.sip_dispatch_rule_id,
                        if r.trunk_ids.is_empty() {
                            ""
                        } else {
                            " it names"
                        }
                    ),
                });
            }
        }
    }

    for t in trunks {
        let ruled = rules
            .iter()
            .any(|r| r.trunk_ids.is_empty() || r.trunk_ids.contains(&t.sip_trunk_id));
        if !ruled {
            problems.push(Problem {
                kind: "trunk_without_rule",
                rule_id: None,
                trunk_id: Some(t.sip_trunk_id.clone()),
                number: None,
                profile_id: None,
                message: format!(
                    "inbound trunk {} ({}) has no dispatch rule: LiveKit drops its calls \
                     (SIP 486). Create one (callfleet livekit connect-number <number> --trunk {})",
                    t.sip_trunk_id,
                    if t.numbers.is_empty() {
                        "any number".to_owned()
                    } else {
                        t.numbers.join(", ")
                    },
                    t.sip_trunk_id
                ),
            });
        }
    }
    problems
}

/// What connect-number warns about for one number: rules with agents on it and the number
/// put among a rule's callers.
pub fn number_warnings(did: &str, rules: &[proto::SipDispatchRuleInfo]) -> Vec<Problem> {
    let mut problems: Vec<Problem> = rules
        .iter()
        .filter(|r| !agents(r).is_empty() && lists(&r.numbers, did))
        .map(|r| Problem {
            kind: "two_agents",
            rule_id: Some(r.sip_dispatch_rule_id.clone()),
            trunk_id: None,
            number: Some(did.to_owned()),
            profile_id: None,
            message: format!(
                "rule {} already dispatches agents ({}) for {did}: with callfleet dispatching \
                 too, a room could get two agents. Remove its agents (callfleet livekit rules \
                 update {} --replace --no-agents) or delete it",
                r.sip_dispatch_rule_id,
                agent_names(r),
                r.sip_dispatch_rule_id
            ),
        })
        .collect();
    problems.extend(did_as_caller_problems(rules, &[did.to_owned()]));
    problems
}

/// A callfleet routing profile as `GET /v1/routing/profiles` serves it: only what the audit
/// needs (other fields are ignored, missing ones empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RoutedProfile {
    pub id: String,
    pub status: String,
    pub agent_name: String,
    pub numbers: Vec<String>,
    pub trunk_ids: Vec<String>,
    pub rule_ids: Vec<String>,
}

impl RoutedProfile {
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }

    /// Whether it serves `number` (any spelling).
    pub fn serves(&self, number: &str) -> bool {
        let n = e164(number);
        self.numbers.iter().any(|m| e164(m) == n)
    }

    /// Whether it takes calls that came through this trunk and rule (an empty list takes
    /// any), as callfleet's routing decides.
    pub fn takes(&self, trunk_id: &str, rule_id: &str) -> bool {
        (self.trunk_ids.is_empty() || self.trunk_ids.iter().any(|t| t == trunk_id))
            && (self.rule_ids.is_empty() || self.rule_ids.iter().any(|r| r == rule_id))
    }

    fn label(&self) -> String {
        if self.is_active() {
            format!("profile {}", self.id)
        } else {
            format!("profile {} ({})", self.id, self.status)
        }
    }

    fn scope(&self) -> String {
        let mut parts = Vec::new();
        if !self.trunk_ids.is_empty() {
            parts.push(format!("trunk_ids {}", self.trunk_ids.join(", ")));
        }
        if !self.rule_ids.is_empty() {
            parts.push(format!("rule_ids {}", self.rule_ids.join(", ")));
        }
        parts.join(" and ")
    }
}

/// A number in E.164 normal form, as callfleet stores profile numbers: LiveKit's own
/// normalisation first (spaces, dashes, dots and parentheses dropped, `+` before bare
/// digits), then `E164`. What is no phone number (a SIP user name) stays as LiveKit has it.
pub fn e164(number: &str) -> String {
    let cleaned: String = number
        .trim()
        .chars()
        .filter(|c| !" -().".contains(*c))
        .collect();
    let plus = if !cleaned.is_empty() && cleaned.chars().all(|c| c.is_ascii_digit()) {
        format!("+{cleaned}")
    } else {
        cleaned
    };
    E164::parse(&plus, None).map_or(plus, |n| n.as_str().to_owned())
}

/// LiveKit's `DispatchRulePriority`, lower wins; `None` for a rule without a kind (LiveKit
/// skips it).
fn priority(r: &proto::SipDispatchRuleInfo) -> Option<i32> {
    let (kind, _, pin, _) = super::view::rule_kind(r);
    let base = match kind {
        "direct" => 0,
        "individual" => 1,
        "callee" => 2,
        _ => return None,
    };
    let mut p = if pin.is_empty() { base + 100 } else { base };
    if r.inbound_numbers.is_empty() {
        p += 1000;
    }
    if r.numbers.is_empty() {
        p += 1000;
    }
    Some(p)
}

/// Trunks and rules indexed by number in normal form, to follow a call to a number the
/// way LiveKit does: trunk by number, then the best rule.
struct Routes<'a> {
    trunks: Vec<(&'a proto::SipInboundTrunkInfo, HashSet<String>)>,
    rules: &'a [proto::SipDispatchRuleInfo],
    /// Rules listing a number, by number; rules without numbers take any.
    rules_by_number: BTreeMap<String, Vec<usize>>,
    rules_any_number: Vec<usize>,
}

impl<'a> Routes<'a> {
    fn new(
        trunks: &'a [proto::SipInboundTrunkInfo],
        rules: &'a [proto::SipDispatchRuleInfo],
    ) -> Self {
        let mut rules_by_number: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut rules_any_number = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            if r.numbers.is_empty() {
                rules_any_number.push(i);
            }
            let numbers: BTreeSet<String> = r.numbers.iter().map(|n| e164(n)).collect();
            for n in numbers {
                rules_by_number.entry(n).or_default().push(i);
            }
        }
        Self {
            trunks: trunks
                .iter()
                .map(|t| (t, t.numbers.iter().map(|n| e164(n)).collect()))
                .collect(),
            rules,
            rules_by_number,
            rules_any_number,
        }
    }

    /// The inbound trunks a call to `n` can arrive on: those listing it (LiveKit picks the
    /// trunk by number first), and the any-number trunks when none of those takes every
    /// caller (`allowed_numbers`).
    fn trunks_for(&self, n: &str) -> Vec<&'a proto::SipInboundTrunkInfo> {
        let listing: Vec<_> = self
            .trunks
            .iter()
            .filter(|(_, numbers)| numbers.contains(n))
            .map(|(t, _)| *t)
            .collect();
        if listing.iter().any(|t| t.allowed_numbers.is_empty()) {
            return listing;
        }
        let any = self
            .trunks
            .iter()
            .filter(|(t, _)| t.numbers.is_empty())
            .map(|(t, _)| *t);
        listing.into_iter().chain(any).collect()
    }

    /// The rules that can match a call to `n` (by number; trunk not yet considered).
    fn candidates(&self, n: &str) -> impl Iterator<Item = usize> + '_ {
        self.rules_by_number
            .get(n)
            .into_iter()
            .flatten()
            .chain(&self.rules_any_number)
            .copied()
    }

    /// Whether rule `i` takes some calls to `n` arriving on `trunk` (from some caller, no
    /// PIN sent): it applies to the trunk and the number, and no rule taking every caller's
    /// calls to `n` there beats it (naming the trunk beats not naming it; then LiveKit's
    /// priority; a tie is counted as taking).
    fn takes(&self, i: usize, trunk: &str, n: &str) -> bool {
        let r = &self.rules[i];
        let applies = |r: &proto::SipDispatchRuleInfo| {
            priority(r).is_some()
                && (r.trunk_ids.is_empty() || r.trunk_ids.iter().any(|t| t == trunk))
        };
        let named = |r: &proto::SipDispatchRuleInfo| r.trunk_ids.iter().any(|t| t == trunk);
        if !applies(r) {
            return false;
        }
        let p = priority(r);
        !self.candidates(n).any(|j| {
            let s = &self.rules[j];
            j != i
                && s.inbound_numbers.is_empty()
                && applies(s)
                && if named(s) != named(r) {
                    named(s)
                } else {
                    priority(s) < p
                }
        })
    }

    /// The (trunk, rule) pairs through which calls to `n` reach a room.
    fn paths(
        &self,
        n: &str,
    ) -> Vec<(
        &'a proto::SipInboundTrunkInfo,
        &'a proto::SipDispatchRuleInfo,
    )> {
        let mut paths = Vec::new();
        for t in self.trunks_for(n) {
            let mut seen = BTreeSet::new();
            for i in self.candidates(n) {
                if seen.insert(i) && self.takes(i, &t.sip_trunk_id, n) {
                    paths.push((t, &self.rules[i]));
                }
            }
        }
        paths
    }
}

/// A rule with agents on a number a callfleet profile routes through it.
fn rule_and_profile_agents(
    r: &proto::SipDispatchRuleInfo,
    trunk: &str,
    n: &str,
    p: &RoutedProfile,
) -> Problem {
    let rule = &r.sip_dispatch_rule_id;
    let same = agents(r).iter().any(|a| a.agent_name == p.agent_name);
    let what = if same {
        format!(
            "dispatches {} too: callfleet then finds the rule's dispatch and sends none \
             (dispatched_by_rule), so callers get the rule's metadata, not the profile's, and \
             the profile's toggle, hours, cap and fallback do not apply",
            p.agent_name
        )
    } else {
        format!("dispatches {}: a room gets two agents", p.agent_name)
    };
    Problem {
        kind: "two_agents",
        rule_id: Some(rule.clone()),
        trunk_id: Some(trunk.to_owned()),
        number: Some(n.to_owned()),
        profile_id: Some(p.id.clone()),
        message: format!(
            "rule {rule} dispatches agents ({}) for calls to {n} on inbound trunk {trunk}, and \
             callfleet routes {n} to {}, which {what}. Remove the rule's agents (callfleet \
             livekit rules update {rule} --replace --no-agents), delete the rule, or take {n} \
             out of the profile",
            agent_names(r),
            p.label()
        ),
    }
}

fn paths_text(paths: &[(&proto::SipInboundTrunkInfo, &proto::SipDispatchRuleInfo)]) -> String {
    paths
        .iter()
        .map(|(t, r)| {
            format!(
                "inbound trunk {} and dispatch rule {}",
                t.sip_trunk_id, r.sip_dispatch_rule_id
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn scope_problem(p: &RoutedProfile, n: &str, through: &str) -> Problem {
    Problem {
        kind: "profile_scope_excludes",
        rule_id: None,
        trunk_id: None,
        number: Some(n.to_owned()),
        profile_id: Some(p.id.clone()),
        message: format!(
            "{} serves {n} only for calls through {}, but calls to {n} come through {through}: \
             they will not route to it. Add those ids to the profile's trunk_ids / rule_ids \
             (PATCH /v1/routing/profiles/{}) or empty the lists",
            p.label(),
            p.scope(),
            p.id
        ),
    }
}

/// What `check` finds: problems (exit 1) and warnings (printed, exit unchanged).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// What callfleet's active profiles add to `check`. Problems: a rule with agents that takes
/// calls to a number an active profile routes (and whose trunk_ids / rule_ids take calls
/// through it). Warnings: a routed number no inbound trunk accepts (calls never reach
/// LiveKit), or that no rule takes (LiveKit drops them), and a profile narrowed to trunks or
/// rules its number's calls never come through.
pub fn profile_findings(
    trunks: &[proto::SipInboundTrunkInfo],
    rules: &[proto::SipDispatchRuleInfo],
    profiles: &[RoutedProfile],
) -> Findings {
    let mut routed: BTreeMap<String, Vec<&RoutedProfile>> = BTreeMap::new();
    for p in profiles.iter().filter(|p| p.is_active()) {
        let numbers: BTreeSet<String> = p.numbers.iter().map(|n| e164(n)).collect();
        for n in numbers {
            routed.entry(n).or_default().push(p);
        }
    }
    let routes = Routes::new(trunks, rules);
    let mut found = Findings::default();
    for (n, by) in &routed {
        let names = || {
            by.iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let warning = |kind, message| Problem {
            kind,
            rule_id: None,
            trunk_id: None,
            number: Some(n.clone()),
            profile_id: by.first().map(|p| p.id.clone()),
            message,
        };
        if routes.trunks_for(n).is_empty() {
            found.warnings.push(warning(
                "routed_number_without_trunk",
                format!(
                    "{n} is routed by active profile(s) {} but no inbound trunk accepts calls to \
                     it: they never reach LiveKit. Connect it (callfleet livekit connect-number \
                     {n}), unless its calls reach callfleet another way (POST \
                     /v1/routing/resolve, another LiveKit project)",
                    names()
                ),
            ));
            continue;
        }
        let paths = routes.paths(n);
        if paths.is_empty() {
            found.warnings.push(warning(
                "routed_number_without_rule",
                format!(
                    "{n} is routed by active profile(s) {} and accepted by inbound trunk(s) {}, \
                     but no dispatch rule takes its calls: LiveKit drops them (SIP 486). \
                     Connect it (callfleet livekit connect-number {n})",
                    names(),
                    routes
                        .trunks_for(n)
                        .iter()
                        .map(|t| t.sip_trunk_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            continue;
        }
        let mut reported = HashSet::new();
        for (t, r) in &paths {
            if agents(r).is_empty() {
                continue;
            }
            for p in by
                .iter()
                .filter(|p| p.takes(&t.sip_trunk_id, &r.sip_dispatch_rule_id))
            {
                if reported.insert((&r.sip_dispatch_rule_id, &p.id)) {
                    found
                        .problems
                        .push(rule_and_profile_agents(r, &t.sip_trunk_id, n, p));
                }
            }
        }
        for p in by {
            if !paths
                .iter()
                .any(|(t, r)| p.takes(&t.sip_trunk_id, &r.sip_dispatch_rule_id))
            {
                found
                    .warnings
                    .push(scope_problem(p, n, &paths_text(&paths)));
            }
        }
    }
    found
}

/// `check`: LiveKit's set-up alone, or also against callfleet's profiles. A rule with
/// agents reported against a profile is not reported again against the other rule.
pub fn check_all(
    trunks: &[proto::SipInboundTrunkInfo],
    rules: &[proto::SipDispatchRuleInfo],
    profiles: Option<&[RoutedProfile]>,
) -> Findings {
    let mut problems = check(trunks, rules);
    let Some(profiles) = profiles else {
        return Findings {
            problems,
            warnings: Vec::new(),
        };
    };
    let found = profile_findings(trunks, rules, profiles);
    problems.retain(|p| {
        !(p.kind == "two_agents"
            && found.problems.iter().any(|f| {
                f.rule_id == p.rule_id
                    && f.number.as_deref().map(e164) == p.number.as_deref().map(e164)
            }))
    });
    problems.extend(found.problems);
    Findings {
        problems,
        warnings: found.warnings,
    }
}

/// connect-number's warnings about the profiles serving its number (active or not): those
/// whose trunk_ids or rule_ids leave out the trunk or rule it set up.
pub fn connect_profile_warnings(
    did: &str,
    trunk_id: &str,
    rule_id: &str,
    profiles: &[RoutedProfile],
) -> Vec<Problem> {
    let mut seen = HashSet::new();
    profiles
        .iter()
        .filter(|p| seen.insert(p.id.as_str()) && p.serves(did) && !p.takes(trunk_id, rule_id))
        .map(|p| {
            let mut w = scope_problem(
                p,
                &e164(did),
                &format!("inbound trunk {trunk_id} and dispatch rule {rule_id}"),
            );
            w.trunk_id = Some(trunk_id.to_owned());
            w.rule_id = Some(rule_id.to_owned());
            w
        })
        .collect()
}

/// What to do about the inbound trunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrunkStep {
    /// The trunk already accepts calls to the number.
    Reuse { id: String, any_number: bool },
    /// The chosen trunk lacks the number.
    AddNumber { id: String },
    /// No trunk lists the number.
    Create,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no inbound trunk {0}: `callfleet livekit inbound-trunks list` shows them")]
    NoSuchTrunk(String),
    #[error(
        "inbound trunks {0} all list {1}: choose one with --trunk (LiveKit takes the first \
         that matches)"
    )]
    SeveralTrunks(String, String),
}

pub fn plan_trunk(
    did: &str,
    trunks: &[proto::SipInboundTrunkInfo],
    chosen: Option<&str>,
) -> Result<TrunkStep, PlanError> {
    if let Some(id) = chosen {
        let trunk = trunks
            .iter()
            .find(|t| t.sip_trunk_id == id)
            .ok_or_else(|| PlanError::NoSuchTrunk(id.to_owned()))?;
        // An empty list takes every number: adding one would narrow it to that number.
        return Ok(if trunk.numbers.is_empty() || lists(&trunk.numbers, did) {
            TrunkStep::Reuse {
                id: id.to_owned(),
                any_number: trunk.numbers.is_empty(),
            }
        } else {
            TrunkStep::AddNumber { id: id.to_owned() }
        });
    }
    let serving: Vec<&proto::SipInboundTrunkInfo> =
        trunks.iter().filter(|t| lists(&t.numbers, did)).collect();
    match serving.as_slice() {
        [] => Ok(TrunkStep::Create),
        [one] => Ok(TrunkStep::Reuse {
            id: one.sip_trunk_id.clone(),
            any_number: false,
        }),
        several => Err(PlanError::SeveralTrunks(
            several
                .iter()
                .map(|t| t.sip_trunk_id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            did.to_owned(),
        )),
    }
}

/// What to do about the dispatch rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleStep {
    Reuse {
        id: String,
    },
    Create,
    /// Another rule already holds the number on this trunk, so LiveKit would refuse a
    /// second one (same trunk, callers, number and PIN).
    Blocked {
        id: String,
        why: String,
    },
}

pub fn plan_rule(did: &str, trunk_id: &str, rules: &[proto::SipDispatchRuleInfo]) -> RuleStep {
    let on_number = |r: &&proto::SipDispatchRuleInfo| lists(&r.numbers, did);
    let for_trunk = |r: &&proto::SipDispatchRuleInfo| r.trunk_ids.iter().any(|t| t == trunk_id);
    // A rule naming the trunk beats a wildcard one, so reuse that first.
    let reuse = rules
        .iter()
        .filter(on_number)
        .filter(|r| is_callfleet_rule(r))
        .filter(|r| r.trunk_ids.is_empty() || for_trunk(r))
        .max_by_key(|r| for_trunk(r));
    if let Some(r) = reuse {
        // A wildcard rule is still beaten by another rule naming the trunk for this number.
        let beaten = !for_trunk(&r) && rules.iter().filter(on_number).any(|s| for_trunk(&s));
        if !beaten {
            return RuleStep::Reuse {
                id: r.sip_dispatch_rule_id.clone(),
            };
        }
    }
    let clash = rules
        .iter()
        .filter(on_number)
        .filter(for_trunk)
        .find(|r| r.inbound_numbers.is_empty() && super::view::rule_kind(r).2.is_empty());
    match clash {
        Some(r) => RuleStep::Blocked {
            id: r.sip_dispatch_rule_id.clone(),
            why: if agents(r).is_empty() {
                format!(
                    "it is a {} rule, not a room per caller",
                    super::view::rule_kind(r).0
                )
            } else {
                format!("it dispatches agents ({})", agent_names(r))
            },
        },
        None => RuleStep::Create,
    }
}

/// Where the carrier sends calls: the LiveKit SIP host, and how it was found.
pub fn sip_host(livekit_url: &str, configured: Option<&str>) -> (String, Option<String>) {
    if let Some(host) = configured.map(str::trim).filter(|h| !h.is_empty()) {
        let host = host.trim_start_matches("sip:").to_owned();
        return (host, None);
    }
    let rest = livekit_url
        .split_once("://")
        .map_or(livekit_url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, h)| h)
        .to_owned();
    let bare = if host.starts_with('[') {
        host.split_once(']')
            .map_or(host.clone(), |(h, _)| format!("{h}]"))
    } else {
        host.split(':').next().unwrap_or(&host).to_owned()
    };
    if bare.ends_with(".livekit.cloud") || bare.ends_with(".livekit.run") {
        // Cloud's SIP host is named after the project id, which the URL does not carry.
        return (
            "<project-id>.sip.livekit.cloud".into(),
            Some(
                "LiveKit Cloud: the SIP URI is on the project's settings page (or the \
                 ProjectId of `lk project list --json` without its p_ prefix, then \
                 .sip.livekit.cloud); pass it as --sip-host or LIVEKIT_SIP_HOST"
                    .into(),
            ),
        );
    }
    (
        bare,
        Some(
            "derived from LIVEKIT_URL, assuming LiveKit's SIP service listens on the same host \
             (port 5060); set --sip-host or LIVEKIT_SIP_HOST if it does not"
                .into(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn trunk(id: &str, numbers: &[&str]) -> proto::SipInboundTrunkInfo {
        proto::SipInboundTrunkInfo {
            sip_trunk_id: id.into(),
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    fn rule(id: &str, trunks: &[&str], numbers: &[&str]) -> proto::SipDispatchRuleInfo {
        proto::SipDispatchRuleInfo {
            sip_dispatch_rule_id: id.into(),
            trunk_ids: trunks.iter().map(|n| n.to_string()).collect(),
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
            rule: Some(proto::SipDispatchRule {
                rule: Some(Rule::DispatchRuleIndividual(
                    proto::SipDispatchRuleIndividual {
                        room_prefix: "call-".into(),
                        ..Default::default()
                    },
                )),
            }),
            attributes: HashMap::new(),
            ..Default::default()
        }
    }

    fn with_agent(mut r: proto::SipDispatchRuleInfo) -> proto::SipDispatchRuleInfo {
        r.room_config = Some(proto::RoomConfiguration {
            agents: vec![proto::RoomAgentDispatch {
                agent_name: "support".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        r
    }

    const DID: &str = "+15105550100";

    #[test]
    fn a_clean_set_up_has_no_problems() {
        let trunks = [trunk("ST_a", &[DID])];
        let rules = [rule("SDR_a", &["ST_a"], &[DID])];
        assert_eq!(check(&trunks, &rules), vec![]);
    }

    #[test]
    fn agents_on_a_number_callfleet_routes_are_two_agents() {
        let trunks = [trunk("ST_a", &[DID])];
        let mut agent_rule = with_agent(rule("SDR_agent", &["ST_a"], &[DID]));
        agent_rule.inbound_numbers = vec!["+14155550199".into()];
        let rules = [rule("SDR_cf", &["ST_a"], &[DID]), agent_rule];
        let problems = check(&trunks, &rules);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].kind, "two_agents");
        assert_eq!(problems[0].rule_id.as_deref(), Some("SDR_agent"));
        assert!(problems[0].message.contains("SDR_cf"));
        // Alone on its number, a rule with agents is rule-managed dispatch: fine.
        let rules = [with_agent(rule("SDR_agent", &["ST_a"], &[DID]))];
        assert_eq!(check(&trunks, &rules), vec![]);
        // Rules on different trunks never see the same call.
        let trunks = [trunk("ST_a", &[DID]), trunk("ST_b", &[DID])];
        let rules = [
            rule("SDR_cf", &["ST_a"], &[DID]),
            with_agent(rule("SDR_agent", &["ST_b"], &[DID])),
        ];
        assert_eq!(check(&trunks, &rules), vec![]);
    }

    #[test]
    fn a_did_among_callers_is_found_in_any_spelling() {
        let trunks = [trunk("ST_a", &[DID])];
        let mut r = rule("SDR_a", &["ST_a"], &[]);
        r.inbound_numbers = vec!["15105550100".into()];
        let problems = check(&trunks, &[r.clone()]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].kind, "did_in_inbound_numbers");
        assert!(problems[0].message.contains("filters callers"));
        assert_eq!(number_warnings(DID, &[r]).len(), 1);
    }

    #[test]
    fn numbers_without_trunks_trunks_without_rules_and_missing_trunks() {
        let trunks = [trunk("ST_a", &[DID]), trunk("ST_lonely", &["+15105550111"])];
        let rules = [
            rule("SDR_a", &["ST_a"], &[DID, "+15105550122"]),
            rule("SDR_b", &["ST_gone"], &[]),
        ];
        let kinds: Vec<_> = check(&trunks, &rules).iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [
                "number_without_trunk",
                "missing_trunk",
                "trunk_without_rule"
            ],
        );
        // A trunk with no numbers takes any number; a rule with no trunks sees every trunk.
        let trunks = [trunk("ST_any", &[])];
        let rules = [rule("SDR_a", &[], &[DID])];
        assert_eq!(check(&trunks, &rules), vec![]);
    }

    #[test]
    fn the_trunk_is_reused_extended_or_created() {
        let trunks = [
            trunk("ST_a", &[DID]),
            trunk("ST_b", &["+15105550111"]),
            trunk("ST_any", &[]),
        ];
        assert_eq!(
            plan_trunk(DID, &trunks, None),
            Ok(TrunkStep::Reuse {
                id: "ST_a".into(),
                any_number: false
            })
        );
        assert_eq!(
            plan_trunk(DID, &trunks, Some("ST_b")),
            Ok(TrunkStep::AddNumber { id: "ST_b".into() })
        );
        // Adding a number to an any-number trunk would narrow it: it is used as it is.
        assert_eq!(
            plan_trunk(DID, &trunks, Some("ST_any")),
            Ok(TrunkStep::Reuse {
                id: "ST_any".into(),
                any_number: true
            })
        );
        assert_eq!(
            plan_trunk("+15105550199", &trunks, None),
            Ok(TrunkStep::Create)
        );
        assert!(matches!(
            plan_trunk(DID, &trunks, Some("ST_x")),
            Err(PlanError::NoSuchTrunk(_))
        ));
        let twice = [trunk("ST_a", &[DID]), trunk("ST_c", &[DID])];
        assert!(matches!(
            plan_trunk(DID, &twice, None),
            Err(PlanError::SeveralTrunks(..))
        ));
    }

    #[test]
    fn the_rule_is_reused_created_or_blocked() {
        let cf = rule("SDR_cf", &["ST_a"], &[DID]);
        assert_eq!(
            plan_rule(DID, "ST_a", std::slice::from_ref(&cf)),
            RuleStep::Reuse {
                id: "SDR_cf".into()
            }
        );
        assert_eq!(plan_rule(DID, "ST_b", &[cf]), RuleStep::Create);
        let agent = with_agent(rule("SDR_agent", &["ST_a"], &[DID]));
        assert!(matches!(
            plan_rule(DID, "ST_a", std::slice::from_ref(&agent)),
            RuleStep::Blocked { id, .. } if id == "SDR_agent"
        ));
        // A wildcard callfleet rule loses to a rule naming the trunk: not reusable.
        let wildcard = rule("SDR_any", &[], &[DID]);
        assert!(matches!(
            plan_rule(DID, "ST_a", &[wildcard.clone(), agent]),
            RuleStep::Blocked { .. }
        ));
        assert_eq!(
            plan_rule(DID, "ST_a", &[wildcard]),
            RuleStep::Reuse {
                id: "SDR_any".into()
            }
        );
    }

    fn profile(id: &str, agent: &str, numbers: &[&str]) -> RoutedProfile {
        RoutedProfile {
            id: id.into(),
            status: "active".into(),
            agent_name: agent.into(),
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    fn kinds(found: &[Problem]) -> Vec<&'static str> {
        found.iter().map(|p| p.kind).collect()
    }

    #[test]
    fn numbers_compare_in_e164_normal_form() {
        assert_eq!(e164("15105550100"), DID);
        assert_eq!(e164("+1 (510) 555-0100"), DID);
        assert_eq!(e164(" +1.510.555.0100 "), DID);
        assert_eq!(e164("alice"), "alice");
        assert!(profile("p", "a", &["+15105550100"]).serves("1 510 555 0100"));
    }

    #[test]
    fn a_rule_with_agents_on_a_number_an_active_profile_routes_is_a_problem() {
        // The trunk and rule spell the number as LiveKit may store it; the profile in E.164.
        let trunks = [trunk("ST_a", &["15105550100"])];
        let rules = [with_agent(rule(
            "SDR_agent",
            &["ST_a"],
            &["+1 510 555 0100"],
        ))];
        let profiles = [profile("billing", "billing-agent", &[DID])];
        let found = profile_findings(&trunks, &rules, &profiles);
        assert_eq!(found.warnings, vec![]);
        assert_eq!(kinds(&found.problems), ["two_agents"]);
        let p = &found.problems[0];
        assert_eq!(
            (
                p.rule_id.as_deref(),
                p.number.as_deref(),
                p.profile_id.as_deref()
            ),
            (Some("SDR_agent"), Some(DID), Some("billing"))
        );
        for named in [
            "SDR_agent",
            DID,
            "billing",
            "support",
            "billing-agent",
            "two agents",
        ] {
            assert!(p.message.contains(named), "{named}: {}", p.message);
        }

        // The same agent: callfleet sends none, but the profile is bypassed: still a problem.
        let same = [profile("support", "support", &[DID])];
        let found = profile_findings(&trunks, &rules, &same);
        assert_eq!(kinds(&found.problems), ["two_agents"]);
        assert!(found.problems[0].message.contains("dispatched_by_rule"));

        // An inactive profile routes nothing; a profile narrowed to another rule never takes
        // these calls (a warning that it takes none at all).
        let mut off = profile("billing", "billing-agent", &[DID]);
        off.status = "inactive".into();
        assert_eq!(
            profile_findings(&trunks, &rules, &[off]),
            Findings::default()
        );
        let mut narrowed = profile("billing", "billing-agent", &[DID]);
        narrowed.rule_ids = vec!["SDR_other".into()];
        let found = profile_findings(&trunks, &rules, &[narrowed]);
        assert_eq!(found.problems, vec![]);
        assert_eq!(kinds(&found.warnings), ["profile_scope_excludes"]);
        assert!(found.warnings[0].message.contains("rule_ids SDR_other"));

        // Without a profile on the number, a rule with agents is rule-managed dispatch.
        let elsewhere = [profile("billing", "billing-agent", &["+15105550111"])];
        let found = profile_findings(&trunks, &rules, &elsewhere);
        assert_eq!(found.problems, vec![]);
        assert_eq!(kinds(&found.warnings), ["routed_number_without_trunk"]);
    }

    #[test]
    fn a_rule_without_numbers_covers_its_trunks_numbers_unless_a_better_rule_takes_them() {
        let profiles = [profile("billing", "billing-agent", &[DID])];
        // A catch-all rule with agents on the number's trunk takes its calls.
        let trunks = [trunk("ST_a", &[DID, "+15105550111"])];
        let catch_all = with_agent(rule("SDR_all", &["ST_a"], &[]));
        let found = profile_findings(&trunks, std::slice::from_ref(&catch_all), &profiles);
        assert_eq!(kinds(&found.problems), ["two_agents"]);
        assert_eq!(found.problems[0].trunk_id.as_deref(), Some("ST_a"));
        // So it does on an any-number trunk, the only one taking the number.
        let any = [trunk("ST_any", &[])];
        let everywhere = with_agent(rule("SDR_all", &[], &[]));
        let found = profile_findings(&any, std::slice::from_ref(&everywhere), &profiles);
        assert_eq!(kinds(&found.problems), ["two_agents"]);

        // callfleet's own rule for the number beats it (numbers beat none), and a rule
        // naming the trunk beats a wildcard one: no call to the number reaches the agents.
        let ours = rule("SDR_cf", &["ST_a"], &[DID]);
        let found = profile_findings(&trunks, &[catch_all, ours.clone()], &profiles);
        assert_eq!(found, Findings::default());
        let wildcard = with_agent(rule("SDR_w", &[], &[DID]));
        let found = profile_findings(&trunks, &[wildcard.clone(), ours], &profiles);
        assert_eq!(found, Findings::default());
        // ...unless it takes only some callers: the agent rule still gets the others.
        let mut some_callers = rule("SDR_cf", &["ST_a"], &[DID]);
        some_callers.inbound_numbers = vec!["+14155550199".into()];
        let found = profile_findings(&trunks, &[wildcard, some_callers], &profiles);
        assert_eq!(kinds(&found.problems), ["two_agents"]);
        assert_eq!(found.problems[0].rule_id.as_deref(), Some("SDR_w"));

        // A trunk listing the number (for every caller) beats an any-number trunk.
        let trunks = [trunk("ST_a", &[DID]), trunk("ST_any", &[])];
        let on_any = with_agent(rule("SDR_any", &["ST_any"], &[]));
        let ours = rule("SDR_cf", &["ST_a"], &[DID]);
        assert_eq!(
            profile_findings(&trunks, &[on_any, ours], &profiles),
            Findings::default()
        );
    }

    #[test]
    fn routed_numbers_livekit_never_passes_on_are_warnings() {
        let profiles = [
            profile("billing", "billing-agent", &[DID, "+15105550111"]),
            profile("sales", "sales-agent", &["+15105550122"]),
        ];
        let trunks = [trunk("ST_a", &[DID, "+15105550111"])];
        let rules = [rule("SDR_cf", &["ST_a"], &[DID])];
        let found = profile_findings(&trunks, &rules, &profiles);
        assert_eq!(found.problems, vec![]);
        assert_eq!(
            kinds(&found.warnings),
            ["routed_number_without_rule", "routed_number_without_trunk"]
        );
        let no_rule = &found.warnings[0];
        assert_eq!(no_rule.number.as_deref(), Some("+15105550111"));
        assert!(no_rule.message.contains("ST_a") && no_rule.message.contains("486"));
        let no_trunk = &found.warnings[1];
        assert_eq!(no_trunk.number.as_deref(), Some("+15105550122"));
        assert_eq!(no_trunk.profile_id.as_deref(), Some("sales"));
        assert!(no_trunk.message.contains("never reach LiveKit"));
        assert!(no_trunk
            .message
            .contains("callfleet livekit connect-number +15105550122"));
        // An any-number trunk (with a rule) takes them all.
        let any = [trunk("ST_any", &[])];
        let all = [rule("SDR_cf", &[], &[])];
        assert_eq!(profile_findings(&any, &all, &profiles), Findings::default());
    }

    #[test]
    fn check_all_reports_a_rule_with_agents_once_and_without_profiles_as_before() {
        let trunks = [trunk("ST_a", &[DID])];
        let mut agent_rule = with_agent(rule("SDR_agent", &["ST_a"], &[DID]));
        agent_rule.inbound_numbers = vec!["+14155550199".into()];
        let rules = [rule("SDR_cf", &["ST_a"], &[DID]), agent_rule];
        let before = check_all(&trunks, &rules, None);
        assert_eq!(before.problems, check(&trunks, &rules));
        assert_eq!(before.warnings, vec![]);
        let profiles = [profile("billing", "billing-agent", &[DID])];
        let found = check_all(&trunks, &rules, Some(&profiles));
        assert_eq!(kinds(&found.problems), ["two_agents"], "{found:?}");
        assert_eq!(found.problems[0].profile_id.as_deref(), Some("billing"));
        // Alone on its number a rule with agents is fine to LiveKit, not to callfleet.
        let alone = [with_agent(rule("SDR_agent", &["ST_a"], &[DID]))];
        assert_eq!(check_all(&trunks, &alone, None), Findings::default());
        assert_eq!(
            kinds(&check_all(&trunks, &alone, Some(&profiles)).problems),
            ["two_agents"]
        );
    }

    #[test]
    fn connect_warns_about_profiles_that_leave_out_its_trunk_or_rule() {
        let mut narrowed = profile("billing", "billing-agent", &["15105550100"]);
        narrowed.trunk_ids = vec!["ST_old".into()];
        let mut other_number = profile("sales", "sales-agent", &["+15105550111"]);
        other_number.trunk_ids = vec!["ST_old".into()];
        let mut fine = profile("support", "support", &[DID]);
        fine.trunk_ids = vec!["ST_a".into()];
        fine.rule_ids = vec!["SDR_a".into()];
        let found = connect_profile_warnings(
            DID,
            "ST_a",
            "SDR_a",
            &[narrowed.clone(), other_number, fine],
        );
        assert_eq!(kinds(&found), ["profile_scope_excludes"]);
        assert_eq!(found[0].profile_id.as_deref(), Some("billing"));
        assert!(found[0].message.contains("trunk_ids ST_old"));
        assert!(found[0]
            .message
            .contains("inbound trunk ST_a and dispatch rule SDR_a"));
        // Listed twice (the --profile one and the list), warned once.
        assert_eq!(
            connect_profile_warnings(DID, "ST_a", "SDR_a", &[narrowed.clone(), narrowed]).len(),
            1
        );
    }

    #[test]
    fn the_sip_host_comes_from_the_flag_or_the_url_with_a_note() {
        assert_eq!(
            sip_host("wss://x.livekit.cloud", Some("sip:abc.sip.livekit.cloud")),
            ("abc.sip.livekit.cloud".into(), None)
        );
        let (host, note) = sip_host("http://127.0.0.1:7880", None);
        assert_eq!(host, "127.0.0.1");
        assert!(note.is_some());
        let (host, note) = sip_host("wss://my-proj.livekit.cloud", None);
        assert_eq!(host, "<project-id>.sip.livekit.cloud");
        assert!(note.is_some_and(|n| n.contains("settings")));
    }
}
