//! SIP trunks and dispatch rules: stored, validated and served as LiveKit's server does
//! (livekit `pkg/service/sip.go`, `redisstore_sip.go`; protocol `livekit/sip.go`,
//! `sip/sip.go`), and the trunk and rule choice livekit/sip makes for an inbound call.

use std::collections::{BTreeMap, HashMap, HashSet};

use livekit_protocol as proto;
use proto::sip_dispatch_rule::Rule;

use crate::ids::guid;
use crate::twirp::TwirpError;

/// Trunks and rules, keyed by id (sorted: LiveKit lists them sorted by id).
#[derive(Default)]
pub struct SipStore {
    pub inbound: BTreeMap<String, proto::SipInboundTrunkInfo>,
    pub outbound: BTreeMap<String, proto::SipOutboundTrunkInfo>,
    pub rules: BTreeMap<String, proto::SipDispatchRuleInfo>,
}

fn invalid(msg: impl Into<String>) -> TwirpError {
    TwirpError::new("invalid_argument", &msg.into())
}

pub fn trunk_not_found() -> TwirpError {
    TwirpError::new("not_found", "requested sip trunk does not exist")
}

fn rule_not_found() -> TwirpError {
    TwirpError::new("not_found", "requested sip dispatch rule does not exist")
}

/// protocol `NormalizeNumber`: a number-looking string (`^\+?[\d\- ()]+$`) loses its
/// spaces, dashes and parentheses and gains a leading `+`; anything else is unchanged.
pub fn normalize_number(num: &str) -> String {
    if num.is_empty() {
        return String::new();
    }
    let body = num.strip_prefix('+').unwrap_or(num);
    let looks_like_number = !body.is_empty()
        && body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | ' ' | '(' | ')'));
    if !looks_like_number {
        return num.to_owned();
    }
    let digits: String = num
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '(' | ')'))
        .collect();
    if digits.starts_with('+') {
        digits
    } else {
        format!("+{digits}")
    }
}

/// Go's `%q` of a string list: `["a" "b"]`, or `<any>` when empty (`printNumbers`).
fn print_numbers(numbers: &[String]) -> String {
    if numbers.is_empty() {
        return "<any>".into();
    }
    let quoted: Vec<String> = numbers.iter().map(|n| format!("{n:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

fn print_id(id: &str) -> &str {
    if id.is_empty() {
        "<new>"
    } else {
        id
    }
}

fn print_name(name: &str) -> &str {
    if name.is_empty() {
        "<blank name>"
    } else {
        name
    }
}

/// `ListUpdate.Validate`.
fn validate_list_update(u: &Option<proto::ListUpdate>) -> Result<(), TwirpError> {
    let Some(u) = u else { return Ok(()) };
    let change = !(u.set.is_empty() && u.add.is_empty() && u.remove.is_empty());
    if !u.clear && !change {
        return Err(invalid("unsupported list update operation"));
    }
    if u.clear && change {
        return Err(invalid("cannot clear and change the list at the same time"));
    }
    let changes = !u.add.is_empty() || !u.remove.is_empty();
    if !u.set.is_empty() && changes {
        return Err(invalid("cannot set and change the list at the same time"));
    }
    if u.set
        .iter()
        .chain(&u.add)
        .chain(&u.remove)
        .any(String::is_empty)
    {
        return Err(invalid("empty element in the list"));
    }
    Ok(())
}

/// `applyListUpdate`: clear, set, or remove then add (without duplicates).
fn apply_list_update(dst: &mut Vec<String>, u: &Option<proto::ListUpdate>) {
    let Some(u) = u else { return };
    if u.clear {
        dst.clear();
        return;
    }
    if !u.set.is_empty() {
        *dst = u.set.clone();
        return;
    }
    for v in &u.remove {
        if let Some(i) = dst.iter().position(|x| x == v) {
            dst.remove(i);
        }
    }
    for v in &u.add {
        if !dst.contains(v) {
            dst.push(v.clone());
        }
    }
}

fn apply<T: Clone>(dst: &mut T, v: &Option<T>) {
    if let Some(v) = v {
        *dst = v.clone();
    }
}

/// `SIPInboundTrunkInfo.Validate`: some way to tell the trunk's callers apart.
fn validate_inbound(t: &proto::SipInboundTrunkInfo) -> Result<(), TwirpError> {
    let has_auth = !t.auth_username.is_empty() || !t.auth_password.is_empty();
    if !has_auth && t.allowed_addresses.is_empty() && t.numbers.is_empty() {
        return Err(invalid("for security, one of the fields must be set: AuthUsername+AuthPassword, AllowedAddresses or Numbers"));
    }
    Ok(())
}

/// `SIPOutboundTrunkInfo.Validate` (the parts that matter here).
fn validate_outbound(t: &proto::SipOutboundTrunkInfo) -> Result<(), TwirpError> {
    if t.numbers.is_empty() {
        return Err(invalid("no trunk numbers specified"));
    }
    if t.address.is_empty() {
        return Err(invalid("no outbound address specified"));
    }
    for (value, field) in [(&t.address, "trunk address"), (&t.from_host, "from_host")] {
        if value.contains("transport=") {
            return Err(invalid(format!(
                "{field} should not contain transport parameter"
            )));
        }
        if value.contains(['@', ';']) || value.starts_with("sip:") || value.starts_with("sips:") {
            return Err(invalid(format!(
                "{field} should be a hostname or IP, not SIP URI"
            )));
        }
    }
    Ok(())
}

/// `ValidateTrunksIter`: two inbound trunks may not share a called number (or both have
/// none) unless their allowed caller numbers tell them apart. `trunks` are checked in
/// order, so the one named second in the error is the earlier one.
fn validate_trunks<'a>(
    trunks: impl Iterator<Item = &'a proto::SipInboundTrunkInfo>,
) -> Result<(), TwirpError> {
    // called number → caller number ("" = any) → trunk
    let mut seen: HashMap<String, HashMap<String, &proto::SipInboundTrunkInfo>> = HashMap::new();
    for t in trunks {
        let keys: Vec<String> = if t.numbers.is_empty() {
            vec![String::new()]
        } else {
            let mut uniq = Vec::new();
            for n in &t.numbers {
                let k = normalize_number(n);
                if !uniq.contains(&k) {
                    uniq.push(k);
                }
            }
            uniq
        };
        for key in keys {
            let by_caller = seen.entry(key).or_default();
            if t.allowed_numbers.is_empty() {
                if let Some(t2) = by_caller.get("") {
                    if t2.sip_trunk_id != t.sip_trunk_id {
                        return Err(invalid(format!(
                            "Conflicting inbound SIP Trunks: {:?} and {:?}, using the same number(s) {} without AllowedNumbers set",
                            print_id(&t.sip_trunk_id),
                            print_id(&t2.sip_trunk_id),
                            print_numbers(&t.numbers)
                        )));
                    }
                }
                by_caller.insert(String::new(), t);
            } else {
                let mut done = HashSet::new();
                for num in &t.allowed_numbers {
                    let k = normalize_number(num);
                    if !done.insert(k.clone()) {
                        continue;
                    }
                    if let Some(t2) = by_caller.get(&k) {
                        if t2.sip_trunk_id != t.sip_trunk_id {
                            return Err(invalid(format!(
                                "Conflicting inbound SIP Trunks: {:?} and {:?}, using the same number(s) {} and AllowedNumber {:?}",
                                print_id(&t.sip_trunk_id),
                                print_id(&t2.sip_trunk_id),
                                print_numbers(&t.numbers),
                                num
                            )));
                        }
                    }
                    by_caller.insert(k, t);
                }
            }
        }
    }
    Ok(())
}

/// The room name or prefix and the PIN of a rule (`GetPinAndRoom`).
pub fn pin_and_room(rule: &proto::SipDispatchRuleInfo) -> Option<(&str, &str)> {
    match rule.rule.as_ref()?.rule.as_ref()? {
        Rule::DispatchRuleDirect(r) => Some((&r.room_name, &r.pin)),
        Rule::DispatchRuleIndividual(r) => Some((&r.room_prefix, &r.pin)),
        Rule::DispatchRuleCallee(r) => Some((&r.room_prefix, &r.pin)),
    }
}

/// `DispatchRulePriority`: lower wins. PIN-protected first (direct 0, individual 1,
/// callee 2), then open ones (100, 101, 102); +1000 each for no caller and no called
/// numbers.
pub fn rule_priority(rule: &proto::SipDispatchRuleInfo) -> i32 {
    let Some(kind) = rule.rule.as_ref().and_then(|r| r.rule.as_ref()) else {
        return i32::MAX;
    };
    let mut p = match kind {
        Rule::DispatchRuleDirect(r) if !r.pin.is_empty() => 0,
        Rule::DispatchRuleDirect(_) => 100,
        Rule::DispatchRuleIndividual(r) if !r.pin.is_empty() => 1,
        Rule::DispatchRuleIndividual(_) => 101,
        Rule::DispatchRuleCallee(r) if !r.pin.is_empty() => 2,
        Rule::DispatchRuleCallee(_) => 102,
    };
    if rule.inbound_numbers.is_empty() {
        p += 1000;
    }
    if rule.numbers.is_empty() {
        p += 1000;
    }
    p
}

/// `hasHigherPriority`: by priority, then by room name for a stable order.
fn higher_priority(a: &proto::SipDispatchRuleInfo, b: &proto::SipDispatchRuleInfo) -> bool {
    let (pa, pb) = (rule_priority(a), rule_priority(b));
    if pa != pb {
        return pa < pb;
    }
    let room = |r| pin_and_room(r).map(|(room, _)| room).unwrap_or("");
    room(a) < room(b)
}

/// `DispatchRuleValidator`: no two rules for the same (trunk, caller, called number, PIN).
fn validate_rules<'a>(
    rules: impl Iterator<Item = &'a proto::SipDispatchRuleInfo>,
) -> Result<(), TwirpError> {
    let mut seen: HashMap<(String, String, String, String), &proto::SipDispatchRuleInfo> =
        HashMap::new();
    for r in rules {
        let Some((_, pin)) = pin_and_room(r) else {
            return Err(invalid("unsupported SIP Dispatch Rule: <nil>"));
        };
        let any = vec![String::new()];
        let trunks = if r.trunk_ids.is_empty() {
            &any
        } else {
            &r.trunk_ids
        };
        let callers = if r.inbound_numbers.is_empty() {
            &any
        } else {
            &r.inbound_numbers
        };
        let called = if r.numbers.is_empty() {
            &any
        } else {
            &r.numbers
        };
        for trunk in trunks {
            for caller in callers {
                for number in called {
                    let key = (
                        pin.to_owned(),
                        trunk.clone(),
                        normalize_number(caller),
                        normalize_number(number),
                    );
                    if let Some(r2) = seen.get(&key) {
                        return Err(invalid(format!(
                            "Dispatch rule for the same trunk, inbound number, number, and PIN combination already exists in dispatch rule {:?} {:?}",
                            print_id(&r2.sip_dispatch_rule_id),
                            print_name(&r2.name)
                        )));
                    }
                    seen.insert(key, r);
                }
            }
        }
    }
    Ok(())
}

/// `ListSIPInboundTrunkRequest.Filter` and `ListSIPOutboundTrunkRequest.Filter`: by id, and
/// by number (a trunk without numbers always passes; inbound compares normalised numbers).
fn numbers_pass(wanted: &[String], have: &[String], normalise: bool) -> bool {
    if wanted.is_empty() || have.is_empty() {
        return true;
    }
    have.iter().any(|n| {
        wanted.contains(n)
            || (normalise && {
                let norm = normalize_number(n);
                wanted.iter().any(|w| normalize_number(w) == norm)
            })
    })
}

/// `Pagination.Filter`: ids after `after_id`. The server pages through everything, so
/// `limit` only sizes its internal pages and the answer holds every item after `after_id`.
fn after(page: &Option<proto::Pagination>, id: &str) -> bool {
    page.as_ref()
        .is_none_or(|p| p.after_id.is_empty() || id > p.after_id.as_str())
}

impl SipStore {
    pub fn create_inbound(
        &mut self,
        req: proto::CreateSipInboundTrunkRequest,
    ) -> Result<proto::SipInboundTrunkInfo, TwirpError> {
        let Some(mut trunk) = req.trunk else {
            return Err(invalid("missing trunk"));
        };
        if !trunk.sip_trunk_id.is_empty() {
            return Err(invalid("trunk id must not be set"));
        }
        validate_inbound(&trunk)?;
        validate_trunks(self.inbound.values().chain(std::iter::once(&trunk)))?;
        trunk.sip_trunk_id = guid("ST_");
        self.inbound
            .insert(trunk.sip_trunk_id.clone(), trunk.clone());
        Ok(trunk)
    }

    pub fn create_outbound(
        &mut self,
        req: proto::CreateSipOutboundTrunkRequest,
    ) -> Result<proto::SipOutboundTrunkInfo, TwirpError> {
        let Some(mut trunk) = req.trunk else {
            return Err(invalid("missing trunk"));
        };
        if !trunk.sip_trunk_id.is_empty() {
            return Err(invalid("trunk id must not be set"));
        }
        validate_outbound(&trunk)?;
        trunk.sip_trunk_id = guid("ST_");
        self.outbound
            .insert(trunk.sip_trunk_id.clone(), trunk.clone());
        Ok(trunk)
    }

    pub fn update_inbound(
        &mut self,
        req: proto::UpdateSipInboundTrunkRequest,
    ) -> Result<proto::SipInboundTrunkInfo, TwirpError> {
        use proto::update_sip_inbound_trunk_request::Action;
        if req.sip_trunk_id.is_empty() {
            return Err(invalid("trunk id must be set"));
        }
        match &req.action {
            None => return Err(invalid("missing or unsupported update action")),
            Some(Action::Replace(info)) => {
                if !info.sip_trunk_id.is_empty() && info.sip_trunk_id != req.sip_trunk_id {
                    return Err(invalid(
                        "trunk id in the info must be empty or match the id in the update",
                    ));
                }
                validate_inbound(info)?;
            }
            Some(Action::Update(u)) => {
                validate_list_update(&u.numbers)?;
                validate_list_update(&u.allowed_addresses)?;
                validate_list_update(&u.allowed_numbers)?;
            }
        }
        let current = self
            .inbound
            .get(&req.sip_trunk_id)
            .ok_or_else(trunk_not_found)?;
        let updated = match req.action {
            Some(Action::Replace(mut info)) => {
                info.sip_trunk_id = req.sip_trunk_id.clone();
                info
            }
            Some(Action::Update(u)) => {
                let mut info = current.clone();
                apply_list_update(&mut info.numbers, &u.numbers);
                apply_list_update(&mut info.allowed_addresses, &u.allowed_addresses);
                apply_list_update(&mut info.allowed_numbers, &u.allowed_numbers);
                apply(&mut info.auth_username, &u.auth_username);
                apply(&mut info.auth_password, &u.auth_password);
                apply(&mut info.auth_realm, &u.auth_realm);
                apply(&mut info.name, &u.name);
                apply(&mut info.metadata, &u.metadata);
                if u.media.is_some() {
                    info.media = u.media.clone();
                }
                validate_inbound(&info)?;
                info
            }
            None => return Err(invalid("missing or unsupported update action")),
        };
        validate_trunks(self.inbound.values().map(|t| {
            if t.sip_trunk_id == req.sip_trunk_id {
                &updated
            } else {
                t
            }
        }))?;
        self.inbound.insert(req.sip_trunk_id, updated.clone());
        Ok(updated)
    }

    pub fn update_outbound(
        &mut self,
        req: proto::UpdateSipOutboundTrunkRequest,
    ) -> Result<proto::SipOutboundTrunkInfo, TwirpError> {
        use proto::update_sip_outbound_trunk_request::Action;
        if req.sip_trunk_id.is_empty() {
            return Err(invalid("trunk id must be set"));
        }
        match &req.action {
            None => return Err(invalid("missing or unsupported update action")),
            Some(Action::Replace(info)) => {
                if !info.sip_trunk_id.is_empty() && info.sip_trunk_id != req.sip_trunk_id {
                    return Err(invalid(
                        "trunk id in the info must be empty or match the id in the update",
                    ));
                }
                validate_outbound(info)?;
            }
            Some(Action::Update(u)) => validate_list_update(&u.numbers)?,
        }
        let current = self
            .outbound
            .get(&req.sip_trunk_id)
            .ok_or_else(trunk_not_found)?;
        let updated = match req.action {
            Some(Action::Replace(mut info)) => {
                info.sip_trunk_id = req.sip_trunk_id.clone();
                info
            }
            Some(Action::Update(u)) => {
                let mut info = current.clone();
                apply(&mut info.address, &u.address);
                apply(&mut info.transport, &u.transport);
                apply(&mut info.destination_country, &u.destination_country);
                apply_list_update(&mut info.numbers, &u.numbers);
                apply(&mut info.auth_username, &u.auth_username);
                apply(&mut info.auth_password, &u.auth_password);
                apply(&mut info.name, &u.name);
                apply(&mut info.metadata, &u.metadata);
                apply(&mut info.from_host, &u.from_host);
                if u.media.is_some() {
                    info.media = u.media.clone();
                }
                validate_outbound(&info)?;
                info
            }
            None => return Err(invalid("missing or unsupported update action")),
        };
        self.outbound.insert(req.sip_trunk_id, updated.clone());
        Ok(updated)
    }

    pub fn get_inbound(&self, id: &str) -> Result<proto::SipInboundTrunkInfo, TwirpError> {
        if id.is_empty() {
            return Err(invalid("trunk ID is required"));
        }
        self.inbound.get(id).cloned().ok_or_else(trunk_not_found)
    }

    pub fn get_outbound(&self, id: &str) -> Result<proto::SipOutboundTrunkInfo, TwirpError> {
        if id.is_empty() {
            return Err(invalid("trunk ID is required"));
        }
        self.outbound.get(id).cloned().ok_or_else(trunk_not_found)
    }

    pub fn list_inbound(
        &self,
        req: &proto::ListSipInboundTrunkRequest,
    ) -> Vec<proto::SipInboundTrunkInfo> {
        self.inbound
            .values()
            .filter(|t| req.trunk_ids.is_empty() || req.trunk_ids.contains(&t.sip_trunk_id))
            .filter(|t| numbers_pass(&req.numbers, &t.numbers, true))
            .filter(|t| after(&req.page, &t.sip_trunk_id))
            .cloned()
            .collect()
    }

    pub fn list_outbound(
        &self,
        req: &proto::ListSipOutboundTrunkRequest,
    ) -> Vec<proto::SipOutboundTrunkInfo> {
        self.outbound
            .values()
            .filter(|t| req.trunk_ids.is_empty() || req.trunk_ids.contains(&t.sip_trunk_id))
            .filter(|t| numbers_pass(&req.numbers, &t.numbers, false))
            .filter(|t| after(&req.page, &t.sip_trunk_id))
            .cloned()
            .collect()
    }

    /// DeleteSIPTrunk: removes an inbound or outbound trunk. LiveKit's store deletes by
    /// hash field and reports nothing for an unknown id, so that answers like a success.
    pub fn delete_trunk(&mut self, id: &str) -> Result<proto::SipTrunkInfo, TwirpError> {
        if id.is_empty() {
            return Err(invalid("trunk ID is required"));
        }
        self.inbound.remove(id);
        self.outbound.remove(id);
        Ok(proto::SipTrunkInfo {
            sip_trunk_id: id.to_owned(),
            ..Default::default()
        })
    }

    #[allow(deprecated)] // the legacy request fields are part of what LiveKit accepts
    pub fn create_rule(
        &mut self,
        req: proto::CreateSipDispatchRuleRequest,
    ) -> Result<proto::SipDispatchRuleInfo, TwirpError> {
        let mut info = match req.dispatch_rule {
            Some(info) => {
                if !info.sip_dispatch_rule_id.is_empty() {
                    return Err(invalid("rule id must not be set"));
                }
                info
            }
            None => proto::SipDispatchRuleInfo {
                rule: req.rule,
                trunk_ids: req.trunk_ids,
                inbound_numbers: req.inbound_numbers,
                hide_phone_number: req.hide_phone_number,
                name: req.name,
                metadata: req.metadata,
                attributes: req.attributes,
                room_preset: req.room_preset,
                room_config: req.room_config,
                ..Default::default()
            },
        };
        if info.rule.as_ref().and_then(|r| r.rule.as_ref()).is_none() {
            return Err(invalid("missing rule"));
        }
        validate_rules(self.rules.values().chain(std::iter::once(&info)))?;
        info.sip_dispatch_rule_id = guid("SDR_");
        self.rules
            .insert(info.sip_dispatch_rule_id.clone(), info.clone());
        Ok(info)
    }

    pub fn update_rule(
        &mut self,
        req: proto::UpdateSipDispatchRuleRequest,
    ) -> Result<proto::SipDispatchRuleInfo, TwirpError> {
        use proto::update_sip_dispatch_rule_request::Action;
        if req.sip_dispatch_rule_id.is_empty() {
            return Err(invalid("rule id must be set"));
        }
        match &req.action {
            None => return Err(invalid("missing or unsupported update action")),
            Some(Action::Replace(info)) => {
                if !info.sip_dispatch_rule_id.is_empty()
                    && info.sip_dispatch_rule_id != req.sip_dispatch_rule_id
                {
                    return Err(invalid(
                        "rule id in the info must be empty or match the id in the update",
                    ));
                }
                if info.rule.as_ref().and_then(|r| r.rule.as_ref()).is_none() {
                    return Err(invalid("missing rule"));
                }
            }
            Some(Action::Update(u)) => validate_list_update(&u.trunk_ids)?,
        }
        let current = self
            .rules
            .get(&req.sip_dispatch_rule_id)
            .ok_or_else(rule_not_found)?;
        let updated = match req.action {
            Some(Action::Replace(mut info)) => {
                info.sip_dispatch_rule_id = req.sip_dispatch_rule_id.clone();
                info
            }
            // `update` touches only trunk_ids, rule, name, metadata, attributes and media.
            Some(Action::Update(u)) => {
                let mut info = current.clone();
                apply_list_update(&mut info.trunk_ids, &u.trunk_ids);
                if u.rule.is_some() {
                    info.rule = u.rule.clone();
                }
                apply(&mut info.name, &u.name);
                apply(&mut info.metadata, &u.metadata);
                // An empty value deletes the key (`applyMapDiff`).
                for (k, v) in &u.attributes {
                    if v.is_empty() {
                        info.attributes.remove(k);
                    } else {
                        info.attributes.insert(k.clone(), v.clone());
                    }
                }
                if u.media.is_some() {
                    info.media = u.media.clone();
                }
                info
            }
            None => return Err(invalid("missing or unsupported update action")),
        };
        validate_rules(self.rules.values().map(|r| {
            if r.sip_dispatch_rule_id == req.sip_dispatch_rule_id {
                &updated
            } else {
                r
            }
        }))?;
        self.rules.insert(req.sip_dispatch_rule_id, updated.clone());
        Ok(updated)
    }

    pub fn list_rules(
        &self,
        req: &proto::ListSipDispatchRuleRequest,
    ) -> Vec<proto::SipDispatchRuleInfo> {
        self.rules
            .values()
            .filter(|r| {
                req.dispatch_rule_ids.is_empty()
                    || req.dispatch_rule_ids.contains(&r.sip_dispatch_rule_id)
            })
            .filter(|r| {
                req.trunk_ids.is_empty()
                    || r.trunk_ids.is_empty()
                    || r.trunk_ids.iter().any(|t| req.trunk_ids.contains(t))
            })
            .filter(|r| after(&req.page, &r.sip_dispatch_rule_id))
            .cloned()
            .collect()
    }

    pub fn delete_rule(&mut self, id: &str) -> Result<proto::SipDispatchRuleInfo, TwirpError> {
        if id.is_empty() {
            return Err(invalid("dispatch rule ID is required"));
        }
        self.rules.remove(id).ok_or_else(rule_not_found)
    }

    /// The inbound trunk a call from `from` to `to` arrives on (`MatchTrunkDetailed`): the
    /// trunk listing `to` among its numbers whose allowed numbers admit `from`, else the one
    /// trunk without numbers; several of either kind is a conflict.
    pub fn match_trunk(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Option<proto::SipInboundTrunkInfo>, TwirpError> {
        let called = normalize_number(to);
        let caller = normalize_number(from);
        let mut specific: Option<&proto::SipInboundTrunkInfo> = None;
        let mut defaults = Vec::new();
        for t in self.inbound.values() {
            let allowed = t.allowed_numbers.is_empty()
                || t.allowed_numbers
                    .iter()
                    .any(|a| a == from || normalize_number(a) == caller);
            if !allowed {
                continue;
            }
            if t.numbers.is_empty() {
                defaults.push(t);
            } else if t
                .numbers
                .iter()
                .any(|n| n == to || normalize_number(n) == called)
            {
                if specific.is_some() {
                    return Err(TwirpError::new(
                        "failed_precondition",
                        &format!("Multiple SIP Trunks matched for {to:?}"),
                    ));
                }
                specific = Some(t);
            }
        }
        if let Some(t) = specific {
            return Ok(Some(t.clone()));
        }
        if defaults.len() > 1 {
            return Err(TwirpError::new(
                "failed_precondition",
                &format!("Multiple default SIP Trunks matched for {to:?}"),
            ));
        }
        Ok(defaults.first().map(|t| (*t).clone()))
    }

    /// The dispatch rule for a call (`MatchDispatchRuleIter` with no PIN sent): rules whose
    /// `inbound_numbers` hold the caller and `numbers` the called number (exact strings),
    /// those naming the trunk beating wildcard ones, the best priority within each.
    pub fn match_rule(
        &self,
        trunk: Option<&proto::SipInboundTrunkInfo>,
        from: &str,
        to: &str,
    ) -> Option<proto::SipDispatchRuleInfo> {
        let mut specific: Option<&proto::SipDispatchRuleInfo> = None;
        let mut default: Option<&proto::SipDispatchRuleInfo> = None;
        for r in self.rules.values() {
            if !r.inbound_numbers.is_empty() && !r.inbound_numbers.iter().any(|n| n == from) {
                continue;
            }
            if !r.numbers.is_empty() && !r.numbers.iter().any(|n| n == to) {
                continue;
            }
            if pin_and_room(r).is_none() {
                continue;
            }
            let slot = if r.trunk_ids.is_empty() {
                &mut default
            } else {
                match trunk {
                    Some(t) if r.trunk_ids.contains(&t.sip_trunk_id) => &mut specific,
                    _ => continue,
                }
            };
            if slot.is_none_or(|best| higher_priority(r, best)) {
                *slot = Some(r);
            }
        }
        specific.or(default).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_normalise_as_livekit_does() {
        assert_eq!(normalize_number("+1 (510) 555-0100"), "+15105550100");
        assert_eq!(normalize_number("15105550100"), "+15105550100");
        assert_eq!(normalize_number("alice"), "alice");
        assert_eq!(normalize_number(""), "");
    }

    #[test]
    fn priorities_follow_livekit() {
        let rule = |kind: Rule, callers: &[&str], called: &[&str]| proto::SipDispatchRuleInfo {
            rule: Some(proto::SipDispatchRule { rule: Some(kind) }),
            inbound_numbers: callers.iter().map(|s| (*s).to_owned()).collect(),
            numbers: called.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        let direct = Rule::DispatchRuleDirect(proto::SipDispatchRuleDirect {
            room_name: "r".into(),
            pin: String::new(),
        });
        let pinned = Rule::DispatchRuleIndividual(proto::SipDispatchRuleIndividual {
            pin: "12".into(),
            ..Default::default()
        });
        assert_eq!(rule_priority(&rule(direct.clone(), &["a"], &["b"])), 100);
        assert_eq!(rule_priority(&rule(direct, &[], &[])), 2100);
        assert_eq!(rule_priority(&rule(pinned, &[], &["b"])), 1001);
        assert_eq!(print_numbers(&["+1".into(), "+2".into()]), r#"["+1" "+2"]"#);
    }
}
