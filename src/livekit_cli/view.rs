//! How trunks and rules print: aligned tables for people, snake_case JSON for scripts (the
//! field names of LiveKit's own JSON, every listed field present even when empty, secrets
//! reduced to whether they are set).

use std::collections::BTreeMap;

use livekit_protocol as proto;
use proto::sip_dispatch_rule::Rule;
use serde_json::{json, Value};

/// A table of text cells, printed with columns aligned.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cell = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(|c| cell(c)).collect())
            .collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (i, c) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                let last = i + 1 == cells.len();
                out.push_str(c);
                if !last {
                    let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                    out.push_str(&" ".repeat(pad));
                }
            }
            out.push('\n');
            out
        };
        let mut out = line(self.headers.clone());
        for row in &rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// Key/value lines for one resource (`get`, `create`, `update`).
pub fn details(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| {
            let v = if v.is_empty() { "-" } else { v.as_str() };
            format!("{k:width$}  {v}\n")
        })
        .collect()
}

fn list(items: &[String]) -> String {
    items.join(",")
}

fn map(m: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = m.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn seconds(d: &Option<pbjson_types::Duration>) -> Option<i64> {
    d.as_ref().map(|d| d.seconds).filter(|s| *s > 0)
}

fn secs_text(d: &Option<pbjson_types::Duration>) -> String {
    seconds(d).map(|s| format!("{s}s")).unwrap_or_default()
}

fn set(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "set"
    }
}

pub fn transport_name(t: i32) -> &'static str {
    match proto::SipTransport::try_from(t) {
        Ok(proto::SipTransport::Udp) => "udp",
        Ok(proto::SipTransport::Tcp) => "tcp",
        Ok(proto::SipTransport::Tls) => "tls",
        _ => "auto",
    }
}

pub fn inbound_trunk_json(t: &proto::SipInboundTrunkInfo) -> Value {
    json!({
        "sip_trunk_id": t.sip_trunk_id,
        "name": t.name,
        "metadata": t.metadata,
        "numbers": t.numbers,
        "allowed_addresses": t.allowed_addresses,
        "allowed_numbers": t.allowed_numbers,
        "auth_username": t.auth_username,
        "auth_password_set": !t.auth_password.is_empty(),
        "headers_to_attributes": t.headers_to_attributes,
        "ringing_timeout_s": seconds(&t.ringing_timeout),
        "max_call_duration_s": seconds(&t.max_call_duration),
        "krisp_enabled": t.krisp_enabled,
    })
}

pub fn inbound_trunk_table(trunks: &[proto::SipInboundTrunkInfo]) -> Table {
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "NUMBERS",
        "ALLOWED ADDRESSES",
        "ALLOWED CALLERS",
        "AUTH",
    ]);
    for t in trunks {
        table.row(vec![
            t.sip_trunk_id.clone(),
            t.name.clone(),
            if t.numbers.is_empty() {
                "(any)".into()
            } else {
                list(&t.numbers)
            },
            list(&t.allowed_addresses),
            list(&t.allowed_numbers),
            t.auth_username.clone(),
        ]);
    }
    table
}

pub fn inbound_trunk_details(t: &proto::SipInboundTrunkInfo) -> String {
    details(&[
        ("id", t.sip_trunk_id.clone()),
        ("name", t.name.clone()),
        (
            "numbers",
            if t.numbers.is_empty() {
                "(any)".into()
            } else {
                list(&t.numbers)
            },
        ),
        ("allowed addresses", list(&t.allowed_addresses)),
        ("allowed callers", list(&t.allowed_numbers)),
        ("auth user", t.auth_username.clone()),
        ("auth password", set(&t.auth_password).into()),
        ("ringing timeout", secs_text(&t.ringing_timeout)),
        ("max call duration", secs_text(&t.max_call_duration)),
        ("krisp", t.krisp_enabled.to_string()),
        ("headers → attributes", map(&t.headers_to_attributes)),
        ("metadata", t.metadata.clone()),
    ])
}

pub fn outbound_trunk_json(t: &proto::SipOutboundTrunkInfo) -> Value {
    json!({
        "sip_trunk_id": t.sip_trunk_id,
        "name": t.name,
        "metadata": t.metadata,
        "address": t.address,
        "transport": transport_name(t.transport),
        "destination_country": t.destination_country,
        "numbers": t.numbers,
        "auth_username": t.auth_username,
        "auth_password_set": !t.auth_password.is_empty(),
    })
}

pub fn outbound_trunk_table(trunks: &[proto::SipOutboundTrunkInfo]) -> Table {
    let mut table = Table::new(&["ID", "NAME", "ADDRESS", "TRANSPORT", "NUMBERS", "AUTH"]);
    for t in trunks {
        table.row(vec![
            t.sip_trunk_id.clone(),
            t.name.clone(),
            t.address.clone(),
            transport_name(t.transport).into(),
            list(&t.numbers),
            t.auth_username.clone(),
        ]);
    }
    table
}

pub fn outbound_trunk_details(t: &proto::SipOutboundTrunkInfo) -> String {
    details(&[
        ("id", t.sip_trunk_id.clone()),
        ("name", t.name.clone()),
        ("address", t.address.clone()),
        ("transport", transport_name(t.transport).into()),
        ("destination country", t.destination_country.clone()),
        ("numbers", list(&t.numbers)),
        ("auth user", t.auth_username.clone()),
        ("auth password", set(&t.auth_password).into()),
        ("metadata", t.metadata.clone()),
    ])
}

/// The rule's kind and its settings: (`individual`, room prefix or room, pin, random
/// suffix).
pub fn rule_kind(r: &proto::SipDispatchRuleInfo) -> (&'static str, String, String, bool) {
    match r.rule.as_ref().and_then(|r| r.rule.as_ref()) {
        Some(Rule::DispatchRuleIndividual(i)) => (
            "individual",
            i.room_prefix.clone(),
            i.pin.clone(),
            !i.no_randomness,
        ),
        Some(Rule::DispatchRuleDirect(d)) => ("direct", d.room_name.clone(), d.pin.clone(), false),
        Some(Rule::DispatchRuleCallee(c)) => {
            ("callee", c.room_prefix.clone(), c.pin.clone(), c.randomize)
        }
        None => ("none", String::new(), String::new(), false),
    }
}

/// What room a call gets, in words.
pub fn room_text(r: &proto::SipDispatchRuleInfo) -> String {
    let (kind, room, _, random) = rule_kind(r);
    let suffix = if random { "_<random>" } else { "" };
    match kind {
        "individual" => format!("{room}<caller>{suffix} (a room per caller)"),
        "direct" => format!("{room} (every caller)"),
        "callee" => format!("{room}<called>{suffix}"),
        _ => String::new(),
    }
}

pub fn agents(r: &proto::SipDispatchRuleInfo) -> Vec<&proto::RoomAgentDispatch> {
    r.room_config
        .as_ref()
        .map(|c| c.agents.iter().collect())
        .unwrap_or_default()
}

fn agents_text(r: &proto::SipDispatchRuleInfo) -> String {
    agents(r)
        .iter()
        .map(|a| a.agent_name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn rule_json(r: &proto::SipDispatchRuleInfo) -> Value {
    let (kind, room, pin, random) = rule_kind(r);
    let room_key = if kind == "direct" {
        "room_name"
    } else {
        "room_prefix"
    };
    json!({
        "sip_dispatch_rule_id": r.sip_dispatch_rule_id,
        "name": r.name,
        "metadata": r.metadata,
        "trunk_ids": r.trunk_ids,
        "numbers": r.numbers,
        "inbound_numbers": r.inbound_numbers,
        "kind": kind,
        room_key: room,
        "pin_set": !pin.is_empty(),
        "random_suffix": random,
        "hide_phone_number": r.hide_phone_number,
        "attributes": r.attributes,
        "agents": agents(r).iter().map(|a| json!({"agent_name": a.agent_name, "metadata": a.metadata})).collect::<Vec<_>>(),
        "krisp_enabled": r.krisp_enabled,
    })
}

pub fn rule_table(rules: &[proto::SipDispatchRuleInfo]) -> Table {
    let mut table = Table::new(&[
        "ID", "NAME", "KIND", "TRUNKS", "NUMBERS", "CALLERS", "AGENTS",
    ]);
    for r in rules {
        table.row(vec![
            r.sip_dispatch_rule_id.clone(),
            r.name.clone(),
            rule_kind(r).0.into(),
            if r.trunk_ids.is_empty() {
                "(any)".into()
            } else {
                list(&r.trunk_ids)
            },
            if r.numbers.is_empty() {
                "(any)".into()
            } else {
                list(&r.numbers)
            },
            if r.inbound_numbers.is_empty() {
                "(any)".into()
            } else {
                list(&r.inbound_numbers)
            },
            agents_text(r),
        ]);
    }
    table
}

pub fn rule_details(r: &proto::SipDispatchRuleInfo) -> String {
    let (kind, _, pin, _) = rule_kind(r);
    details(&[
        ("id", r.sip_dispatch_rule_id.clone()),
        ("name", r.name.clone()),
        ("kind", kind.into()),
        ("room", room_text(r)),
        ("pin", set(&pin).into()),
        (
            "trunks",
            if r.trunk_ids.is_empty() {
                "(any)".into()
            } else {
                list(&r.trunk_ids)
            },
        ),
        (
            "numbers (called)",
            if r.numbers.is_empty() {
                "(any)".into()
            } else {
                list(&r.numbers)
            },
        ),
        (
            "callers",
            if r.inbound_numbers.is_empty() {
                "(any)".into()
            } else {
                list(&r.inbound_numbers)
            },
        ),
        ("hide phone number", r.hide_phone_number.to_string()),
        ("agents", agents_text(r)),
        ("attributes", map(&r.attributes)),
        ("krisp", r.krisp_enabled.to_string()),
        ("metadata", r.metadata.clone()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_mark_empty_cells() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["ST_a".into(), "".into()]);
        t.row(vec!["ST_longer".into(), "main".into()]);
        assert_eq!(
            t.render(),
            "ID         NAME\nST_a       -\nST_longer  main\n"
        );
    }

    #[test]
    fn secrets_print_as_set_never_their_value() {
        let trunk = proto::SipInboundTrunkInfo {
            auth_username: "u".into(),
            auth_password: "hunter2".into(),
            ..Default::default()
        };
        assert!(!inbound_trunk_details(&trunk).contains("hunter2"));
        assert!(!inbound_trunk_json(&trunk).to_string().contains("hunter2"));
        assert_eq!(inbound_trunk_json(&trunk)["auth_password_set"], true);
    }
}
