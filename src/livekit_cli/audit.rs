//! What `check` and `connect-number` decide, as pure functions over LiveKit's trunks and
//! rules (reference: livekit-sip-inbound.md §1–3). Numbers are compared by their digits:
//! LiveKit's matching and its rule-conflict check normalise them the same way (protocol
//! `sip.NormalizeNumber`: spaces, dashes and parentheses dropped, a `+` added), so
//! `15105550100` and `+1 510 555 0100` are one number to it and here.

use livekit_protocol as proto;
use proto::sip_dispatch_rule::Rule;
use serde::Serialize;

use super::view::agents;

/// One thing wrong with the set-up, naming what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `two_agents`, `did_in_inbound_numbers`, `number_without_trunk`, `missing_trunk`,
    /// `trunk_without_rule`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trunk_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
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
