//! `callfleet livekit …`: LiveKit SIP set-up from the command line. Trunk and dispatch-rule
//! CRUD, `connect-number` (a number → an inbound trunk and a room-per-caller rule without
//! agents, because callfleet dispatches) and `check` (set-ups that give a room two agents
//! or never match). The decisions are pure functions in `audit`; printing is in `view`.

mod audit;
mod view;

use std::collections::HashMap;
use std::time::Duration;

use callfleet_core::adapters::LiveKitSip;
use callfleet_core::config::LiveKitConfig;
use callfleet_core::domain::phone::{parse_region, E164};
use callfleet_core::domain::sip_outcome::ApiFailure;
use callfleet_core::ports::livekit::LiveKitError;
use clap::{Args, Subcommand, ValueEnum};
use livekit_protocol as proto;
use proto::sip_dispatch_rule::Rule;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use audit::{PlanError, Problem, RuleStep, TrunkStep};

/// Exit codes, for scripts (also in `--help` and the README).
pub const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  `check` found problems, connect-number met a rule it must not override, or the trunk,
     rule or profile named does not exist
  2  bad usage or input (yours, or refused by LiveKit as invalid)
  3  LiveKit (or the callfleet API) unreachable, or refusing the API key and secret
  4  LiveKit answered with an error (try again later)
  5  no answer in time: the change may or may not have been made (list before retrying)";

/// Why a `livekit` command failed, and the exit code that says so.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Problems found (`check`), or a conflict connect-number will not resolve itself.
    #[error("{0}")]
    Problems(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Service(String),
    #[error("{0}")]
    Unknown(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Problems(_) | Failure::NotFound(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
            Failure::Service(_) => 4,
            Failure::Unknown(_) => 5,
        }
    }
}

type Result<T> = std::result::Result<T, Failure>;

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct LivekitArgs {
    #[command(flatten)]
    livekit: LiveKitConfig,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: LivekitCommand,
}

#[derive(Debug, Subcommand)]
enum LivekitCommand {
    /// Inbound trunks: which numbers LiveKit accepts calls to, from where.
    #[command(after_help = EXIT_CODES)]
    InboundTrunks {
        #[command(subcommand)]
        action: InboundAction,
    },
    /// Outbound trunks: where LiveKit sends the calls it places.
    #[command(after_help = EXIT_CODES)]
    OutboundTrunks {
        #[command(subcommand)]
        action: OutboundAction,
    },
    /// Dispatch rules: which room (and agents) an inbound call gets.
    #[command(after_help = EXIT_CODES)]
    Rules {
        #[command(subcommand)]
        action: RuleAction,
    },
    /// Connects a phone number to callfleet: an inbound trunk serving it and a dispatch rule
    /// giving each caller a room, without agents (callfleet dispatches them). Running it
    /// again changes nothing.
    #[command(after_help = EXIT_CODES)]
    ConnectNumber(ConnectArgs),
    /// Lists set-up problems: rules whose agents would join rooms callfleet also
    /// dispatches to, numbers in inbound_numbers (the callers) by mistake, rule numbers no
    /// trunk accepts, trunks without rules. Exit 1 when there are any. With a callfleet API
    /// key it also reads every routing profile: rules with agents on numbers an active
    /// profile routes are problems; routed numbers LiveKit never passes on are warnings.
    #[command(after_help = EXIT_CODES)]
    Check(CheckArgs),
}

/// The callfleet API (routing profiles), for connect-number and check.
#[derive(Debug, Args)]
struct ApiArgs {
    /// The callfleet API.
    #[arg(
        long,
        env = "CALLFLEET_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    api_url: String,
    /// A callfleet API key: with it, callfleet's routing profiles are read (and --profile
    /// changed); without it they are not consulted.
    #[arg(long, env = "CALLFLEET_API_KEY", hide_env_values = true)]
    api_key: Option<SecretString>,
}

impl ApiArgs {
    /// The API when a key is configured.
    fn api(&self) -> Result<Option<CallfleetApi>> {
        let Some(key) = self.api_key.clone() else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|_| Failure::Unreachable("cannot build an HTTP client".into()))?;
        Ok(Some(CallfleetApi {
            http,
            base: self.api_url.trim_end_matches('/').to_owned(),
            key,
        }))
    }
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    api: ApiArgs,
}

/// Lists of numbers or addresses: repeat the flag or separate with commas; `''` empties.
#[derive(Debug, Args)]
struct InboundFields {
    /// Trunk name.
    #[arg(long)]
    name: Option<String>,
    /// Trunk metadata.
    #[arg(long)]
    metadata: Option<String>,
    /// Numbers (DIDs) it accepts calls to, E.164 (+15105550100); none = any number. On
    /// update: replaces the list.
    #[arg(long = "number", value_delimiter = ',')]
    numbers: Option<Vec<String>>,
    /// Addresses or CIDRs calls may come from; none = anywhere.
    #[arg(long = "allowed-address", value_delimiter = ',')]
    allowed_addresses: Option<Vec<String>>,
    /// Caller numbers allowed; none = any caller.
    #[arg(long = "allowed-number", value_delimiter = ',')]
    allowed_numbers: Option<Vec<String>>,
    /// SIP digest user the carrier authenticates with.
    #[arg(long)]
    auth_user: Option<String>,
    /// SIP digest password.
    #[arg(long)]
    auth_pass: Option<String>,
    /// How long a caller may ring before someone subscribes (30s, 2m, 90).
    #[arg(long, value_parser = parse_duration)]
    ringing_timeout: Option<Duration>,
    /// Longest call (1h, 90m, 3600).
    #[arg(long, value_parser = parse_duration)]
    max_call_duration: Option<Duration>,
    /// Krisp noise cancellation (`--krisp`, `--krisp false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    krisp: Option<bool>,
}

#[derive(Debug, Subcommand)]
enum InboundAction {
    /// List inbound trunks.
    List {
        /// Only trunks accepting calls to this number (trunks for any number included).
        #[arg(long)]
        number: Option<String>,
    },
    /// Show one trunk.
    Get { id: String },
    /// Create a trunk.
    Create {
        #[command(flatten)]
        fields: InboundFields,
    },
    /// Change a trunk. Ringing timeout, max call duration and krisp can only change with
    /// --replace (LiveKit's update cannot change them).
    Update {
        id: String,
        #[command(flatten)]
        fields: InboundFields,
        /// Add numbers to the trunk's list.
        #[arg(long, value_delimiter = ',')]
        add_number: Vec<String>,
        /// Remove numbers from the trunk's list.
        #[arg(long, value_delimiter = ',')]
        remove_number: Vec<String>,
        /// Read the trunk, change it here and write it back whole.
        #[arg(long)]
        replace: bool,
    },
    /// Delete a trunk.
    Delete { id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Transport {
    Auto,
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    fn proto(self) -> i32 {
        match self {
            Transport::Auto => proto::SipTransport::Auto as i32,
            Transport::Udp => proto::SipTransport::Udp as i32,
            Transport::Tcp => proto::SipTransport::Tcp as i32,
            Transport::Tls => proto::SipTransport::Tls as i32,
        }
    }
}

#[derive(Debug, Args)]
struct OutboundFields {
    /// Trunk name.
    #[arg(long)]
    name: Option<String>,
    /// Trunk metadata.
    #[arg(long)]
    metadata: Option<String>,
    /// The carrier's SIP host (no `sip:`), e.g. my-trunk.pstn.twilio.com.
    #[arg(long)]
    address: Option<String>,
    /// SIP transport.
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Country calls terminate in (ISO 3166-1 alpha-2), for LiveKit's region choice.
    #[arg(long)]
    destination_country: Option<String>,
    /// Caller ids to call from. On update: replaces the list.
    #[arg(long = "number", value_delimiter = ',')]
    numbers: Option<Vec<String>>,
    /// SIP digest user.
    #[arg(long)]
    auth_user: Option<String>,
    /// SIP digest password.
    #[arg(long)]
    auth_pass: Option<String>,
}

#[derive(Debug, Subcommand)]
enum OutboundAction {
    /// List outbound trunks.
    List,
    /// Show one trunk.
    Get { id: String },
    /// Create a trunk.
    Create {
        #[command(flatten)]
        fields: OutboundFields,
    },
    /// Change a trunk.
    Update {
        id: String,
        #[command(flatten)]
        fields: OutboundFields,
        #[arg(long, value_delimiter = ',')]
        add_number: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        remove_number: Vec<String>,
    },
    /// Delete a trunk.
    Delete { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// A new room per caller (what callfleet uses).
    Individual,
    /// Every caller into one room (--room).
    Direct,
    /// A room per number called.
    Callee,
}

#[derive(Debug, Args)]
struct RuleFields {
    /// Rule name.
    #[arg(long)]
    name: Option<String>,
    /// Metadata the SIP participant gets.
    #[arg(long)]
    metadata: Option<String>,
    /// Inbound trunks the rule applies to; none = every trunk. On update: replaces the list.
    #[arg(long = "trunk", value_delimiter = ',')]
    trunk_ids: Option<Vec<String>>,
    /// Numbers called (the DIDs) the rule takes; none = any.
    #[arg(long = "number", value_delimiter = ',')]
    numbers: Option<Vec<String>>,
    /// Caller numbers the rule takes; none = any caller. Not the DID: see --number.
    #[arg(long = "inbound-number", value_delimiter = ',')]
    inbound_numbers: Option<Vec<String>>,
    /// The room a call gets.
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// Room name prefix (individual, callee).
    #[arg(long)]
    room_prefix: Option<String>,
    /// The room (direct).
    #[arg(long)]
    room: Option<String>,
    /// PIN callers must enter.
    #[arg(long)]
    pin: Option<String>,
    /// Random suffix on room names (individual: on unless `--randomize false`; callee: off
    /// unless `--randomize`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    randomize: Option<bool>,
    /// Hide the caller's number from the room (`--hide-phone-number [true|false]`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    hide_phone_number: Option<bool>,
    /// Participant attribute `key=value` (repeat). Replaces all attributes.
    #[arg(long = "attribute", value_parser = parse_attribute)]
    attributes: Vec<(String, String)>,
    /// Agent the rule dispatches itself, `name[:metadata]` (repeat). Not with callfleet
    /// routing the number: the room would get two agents.
    #[arg(long = "agent", value_parser = parse_agent)]
    agents: Vec<(String, String)>,
    /// Remove the rule's agents.
    #[arg(long, conflicts_with = "agents")]
    no_agents: bool,
    /// Krisp noise cancellation.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    krisp: Option<bool>,
}

#[derive(Debug, Subcommand)]
enum RuleAction {
    /// List dispatch rules.
    List {
        /// Only rules for this inbound trunk (rules for every trunk included).
        #[arg(long)]
        trunk: Option<String>,
        /// Only rules taking calls to this number (rules for any number included).
        #[arg(long)]
        number: Option<String>,
    },
    /// Show one rule.
    Get { id: String },
    /// Create a rule (an individual rule unless --kind says otherwise).
    Create {
        #[command(flatten)]
        fields: RuleFields,
    },
    /// Change a rule. Numbers, inbound numbers, hide-phone-number, agents and krisp can
    /// only change with --replace (LiveKit's update cannot change them).
    Update {
        id: String,
        #[command(flatten)]
        fields: RuleFields,
        #[arg(long, value_delimiter = ',')]
        add_trunk: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        remove_trunk: Vec<String>,
        /// Read the rule, change it here and write it back whole.
        #[arg(long)]
        replace: bool,
    },
    /// Delete a rule.
    Delete { id: String },
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// The number callers dial, E.164 (+15105550100) or national in --region.
    number: String,
    /// Use this inbound trunk (the number is added to it if missing) instead of the one
    /// listing the number or a new one.
    #[arg(long)]
    trunk: Option<String>,
    /// Room name prefix for a new rule (default `call`: rooms `call_<caller>_<random>`); an
    /// existing rule keeps its own.
    #[arg(long)]
    room_prefix: Option<String>,
    /// Also add the number to this callfleet routing profile (through the callfleet API).
    #[arg(long)]
    profile: Option<String>,
    /// The LiveKit SIP host carriers send calls to (LiveKit Cloud:
    /// <project-id>.sip.livekit.cloud). Derived from LIVEKIT_URL when unset.
    #[arg(long, env = "LIVEKIT_SIP_HOST")]
    sip_host: Option<String>,
    /// Region of a number written without a country code.
    #[arg(long, env = "CALLFLEET_DEFAULT_REGION", default_value = "US")]
    region: String,
    #[command(flatten)]
    api: ApiArgs,
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: write 30s, 5m, 1h or seconds"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => {
            return Err(format!(
                "`{s}` is not a duration: write 30s, 5m, 1h or seconds"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

fn parse_attribute(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not key=value")),
    }
}

/// `name[:metadata]`: the metadata is everything after the first `:` (JSON included).
fn parse_agent(s: &str) -> std::result::Result<(String, String), String> {
    let (name, metadata) = s.split_once(':').unwrap_or((s, ""));
    if name.trim().is_empty() {
        return Err(format!("`{s}` names no agent: write name or name:metadata"));
    }
    Ok((name.trim().to_owned(), metadata.to_owned()))
}

/// A list flag's value: `''` (or only empty items) means the empty list.
fn cleaned(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn list_update(
    set: &Option<Vec<String>>,
    add: &[String],
    remove: &[String],
) -> Option<proto::ListUpdate> {
    let add = cleaned(add);
    let remove = cleaned(remove);
    match set {
        None if add.is_empty() && remove.is_empty() => None,
        Some(list) if cleaned(list).is_empty() => Some(proto::ListUpdate {
            clear: true,
            add,
            remove,
            ..Default::default()
        }),
        set => Some(proto::ListUpdate {
            set: set.as_deref().map(cleaned).unwrap_or_default(),
            add,
            remove,
            ..Default::default()
        }),
    }
}

/// Applies set, then add (no duplicates), then remove, to a list held locally.
fn edit_list(list: &mut Vec<String>, set: &Option<Vec<String>>, add: &[String], remove: &[String]) {
    if let Some(set) = set {
        *list = cleaned(set);
    }
    for a in cleaned(add) {
        if !list.contains(&a) {
            list.push(a);
        }
    }
    let remove = cleaned(remove);
    list.retain(|n| !remove.contains(n));
}

fn duration(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

fn apply_inbound(
    t: &mut proto::SipInboundTrunkInfo,
    f: &InboundFields,
    add: &[String],
    remove: &[String],
) {
    if let Some(v) = &f.name {
        t.name = v.clone();
    }
    if let Some(v) = &f.metadata {
        t.metadata = v.clone();
    }
    edit_list(&mut t.numbers, &f.numbers, add, remove);
    edit_list(&mut t.allowed_addresses, &f.allowed_addresses, &[], &[]);
    edit_list(&mut t.allowed_numbers, &f.allowed_numbers, &[], &[]);
    if let Some(v) = &f.auth_user {
        t.auth_username = v.clone();
    }
    if let Some(v) = &f.auth_pass {
        t.auth_password = v.clone();
    }
    if let Some(d) = f.ringing_timeout {
        t.ringing_timeout = Some(duration(d));
    }
    if let Some(d) = f.max_call_duration {
        t.max_call_duration = Some(duration(d));
    }
    if let Some(k) = f.krisp {
        t.krisp_enabled = k;
    }
}

/// The update form: only what LiveKit's `SIPInboundTrunkUpdate` carries.
fn inbound_update(
    f: &InboundFields,
    add: &[String],
    remove: &[String],
) -> Result<proto::SipInboundTrunkUpdate> {
    let mut replace_only = Vec::new();
    if f.ringing_timeout.is_some() {
        replace_only.push("--ringing-timeout");
    }
    if f.max_call_duration.is_some() {
        replace_only.push("--max-call-duration");
    }
    if f.krisp.is_some() {
        replace_only.push("--krisp");
    }
    needs_replace(&replace_only)?;
    Ok(proto::SipInboundTrunkUpdate {
        numbers: list_update(&f.numbers, add, remove),
        allowed_addresses: list_update(&f.allowed_addresses, &[], &[]),
        allowed_numbers: list_update(&f.allowed_numbers, &[], &[]),
        auth_username: f.auth_user.clone(),
        auth_password: f.auth_pass.clone(),
        name: f.name.clone(),
        metadata: f.metadata.clone(),
        ..Default::default()
    })
}

fn needs_replace(flags: &[&str]) -> Result<()> {
    if flags.is_empty() {
        return Ok(());
    }
    Err(Failure::Usage(format!(
        "{} can only change with --replace: LiveKit's update leaves {} as they are (add \
         --replace to read the whole record, change it and write it back)",
        flags.join(", "),
        if flags.len() == 1 { "it" } else { "them" }
    )))
}

fn apply_outbound(
    t: &mut proto::SipOutboundTrunkInfo,
    f: &OutboundFields,
    add: &[String],
    remove: &[String],
) {
    if let Some(v) = &f.name {
        t.name = v.clone();
    }
    if let Some(v) = &f.metadata {
        t.metadata = v.clone();
    }
    if let Some(v) = &f.address {
        t.address = v.trim().trim_start_matches("sip:").to_owned();
    }
    if let Some(v) = f.transport {
        t.transport = v.proto();
    }
    if let Some(v) = &f.destination_country {
        t.destination_country = v.clone();
    }
    edit_list(&mut t.numbers, &f.numbers, add, remove);
    if let Some(v) = &f.auth_user {
        t.auth_username = v.clone();
    }
    if let Some(v) = &f.auth_pass {
        t.auth_password = v.clone();
    }
}

/// The rule's kind after the flags: the current one changed, or a new one.
fn rule_kind(
    current: Option<&proto::SipDispatchRule>,
    f: &RuleFields,
) -> Result<Option<proto::SipDispatchRule>> {
    let touched = f.kind.is_some()
        || f.room_prefix.is_some()
        || f.room.is_some()
        || f.pin.is_some()
        || f.randomize.is_some();
    let current = current.and_then(|r| r.rule.clone());
    if !touched {
        return Ok(current.map(|r| proto::SipDispatchRule { rule: Some(r) }));
    }
    let current_kind = match &current {
        Some(Rule::DispatchRuleDirect(_)) => Kind::Direct,
        Some(Rule::DispatchRuleCallee(_)) => Kind::Callee,
        _ => Kind::Individual,
    };
    let kind = f.kind.unwrap_or(current_kind);
    // Settings carry over from the current rule when its kind stays.
    let (prefix, room, pin) = match &current {
        Some(Rule::DispatchRuleIndividual(i)) => {
            (i.room_prefix.clone(), String::new(), i.pin.clone())
        }
        Some(Rule::DispatchRuleCallee(c)) => (c.room_prefix.clone(), String::new(), c.pin.clone()),
        Some(Rule::DispatchRuleDirect(d)) => (String::new(), d.room_name.clone(), d.pin.clone()),
        None => Default::default(),
    };
    let same = kind == current_kind && current.is_some();
    let pin = f
        .pin
        .clone()
        .unwrap_or(if same { pin } else { String::new() });
    let rule = match kind {
        Kind::Individual => {
            if f.room.is_some() {
                return Err(Failure::Usage(
                    "--room is for --kind direct; an individual rule takes --room-prefix".into(),
                ));
            }
            let keep_random = match &current {
                Some(Rule::DispatchRuleIndividual(i)) => !i.no_randomness,
                _ => true,
            };
            Rule::DispatchRuleIndividual(proto::SipDispatchRuleIndividual {
                room_prefix: f.room_prefix.clone().unwrap_or(if same {
                    prefix
                } else {
                    String::new()
                }),
                pin,
                no_randomness: !f.randomize.unwrap_or(keep_random),
            })
        }
        Kind::Callee => {
            if f.room.is_some() {
                return Err(Failure::Usage(
                    "--room is for --kind direct; a callee rule takes --room-prefix".into(),
                ));
            }
            let keep_random = match &current {
                Some(Rule::DispatchRuleCallee(c)) => c.randomize,
                _ => false,
            };
            Rule::DispatchRuleCallee(proto::SipDispatchRuleCallee {
                room_prefix: f.room_prefix.clone().unwrap_or(if same {
                    prefix
                } else {
                    String::new()
                }),
                pin,
                randomize: f.randomize.unwrap_or(keep_random),
            })
        }
        Kind::Direct => {
            if f.room_prefix.is_some() || f.randomize.is_some() {
                return Err(Failure::Usage("a direct rule puts every caller in one --room: --room-prefix and --randomize do not apply".into()));
            }
            let room = f
                .room
                .clone()
                .unwrap_or(if same { room } else { String::new() });
            if room.trim().is_empty() {
                return Err(Failure::Usage(
                    "--kind direct needs --room (the room every caller joins)".into(),
                ));
            }
            Rule::DispatchRuleDirect(proto::SipDispatchRuleDirect {
                room_name: room,
                pin,
            })
        }
    };
    Ok(Some(proto::SipDispatchRule { rule: Some(rule) }))
}

fn apply_rule(
    r: &mut proto::SipDispatchRuleInfo,
    f: &RuleFields,
    add_trunk: &[String],
    remove_trunk: &[String],
) -> Result<()> {
    r.rule = rule_kind(r.rule.as_ref(), f)?;
    if let Some(v) = &f.name {
        r.name = v.clone();
    }
    if let Some(v) = &f.metadata {
        r.metadata = v.clone();
    }
    edit_list(&mut r.trunk_ids, &f.trunk_ids, add_trunk, remove_trunk);
    edit_list(&mut r.numbers, &f.numbers, &[], &[]);
    edit_list(&mut r.inbound_numbers, &f.inbound_numbers, &[], &[]);
    if let Some(v) = f.hide_phone_number {
        r.hide_phone_number = v;
    }
    if !f.attributes.is_empty() {
        r.attributes = f.attributes.iter().cloned().collect();
    }
    if f.no_agents || !f.agents.is_empty() {
        let config = r.room_config.get_or_insert_with(Default::default);
        config.agents = f
            .agents
            .iter()
            .map(|(name, metadata)| proto::RoomAgentDispatch {
                agent_name: name.clone(),
                metadata: metadata.clone(),
                ..Default::default()
            })
            .collect();
    }
    if let Some(k) = f.krisp {
        r.krisp_enabled = k;
    }
    Ok(())
}

fn rule_replace_only(f: &RuleFields) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if f.numbers.is_some() {
        flags.push("--number");
    }
    if f.inbound_numbers.is_some() {
        flags.push("--inbound-number");
    }
    if f.hide_phone_number.is_some() {
        flags.push("--hide-phone-number");
    }
    if !f.agents.is_empty() {
        flags.push("--agent");
    }
    if f.no_agents {
        flags.push("--no-agents");
    }
    if f.krisp.is_some() {
        flags.push("--krisp");
    }
    flags
}

/// A LiveKit failure in words, with the exit code that classifies it.
fn livekit_failure(err: LiveKitError, url: &str) -> Failure {
    let method = err.method;
    match err.failure {
        ApiFailure::Transport => Failure::Unreachable(format!(
            "cannot reach LiveKit at {url} ({method} was not sent): check LIVEKIT_URL and that \
             the server is running"
        )),
        ApiFailure::Timeout | ApiFailure::Interrupted => Failure::Unknown(format!(
            "LiveKit at {url} gave no answer to {method} in time: it may or may not have been \
             carried out; list before trying again (CALLFLEET_LIVEKIT_TIMEOUT_MS sets the wait)"
        )),
        ApiFailure::Protocol => Failure::Service(format!(
            "LiveKit at {url} answered {method} with something that is not LiveKit's protocol: \
             is LIVEKIT_URL a LiveKit server?"
        )),
        ApiFailure::Twirp { code, msg, .. } => {
            let msg = msg.trim_start_matches("twirp error unknown: ").to_owned();
            match code.as_str() {
                "unauthenticated" | "permission_denied" => Failure::Unreachable(format!(
                    "LiveKit at {url} refused the credentials for {method} ({msg}): check \
                     LIVEKIT_API_KEY and LIVEKIT_API_SECRET (a key with SIP admin rights)"
                )),
                "bad_route" => Failure::Unreachable(format!(
                    "{url} does not serve LiveKit's API ({method}: {msg}): check LIVEKIT_URL"
                )),
                "not_found" => Failure::NotFound(format!("LiveKit: {msg}")),
                "invalid_argument"
                | "malformed"
                | "already_exists"
                | "failed_precondition"
                | "out_of_range" => Failure::Usage(format!("LiveKit refused {method}: {msg}")),
                _ => Failure::Service(format!("LiveKit failed {method} ({code}): {msg}")),
            }
        }
    }
}

struct Ctx {
    sip: LiveKitSip,
    url: String,
    json: bool,
}

impl Ctx {
    fn lk(&self) -> impl Fn(LiveKitError) -> Failure + '_ {
        move |e| livekit_failure(e, &self.url)
    }

    fn print(&self, json: Value, text: String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_else(|_| json.to_string())
            );
        } else {
            print!("{text}");
        }
    }

    fn print_table(&self, json: Value, table: view::Table, empty: &str) {
        if !self.json && table.is_empty() {
            println!("{empty}");
            return;
        }
        self.print(json, table.render());
    }

    async fn inbound_trunk(&self, id: &str) -> Result<proto::SipInboundTrunkInfo> {
        self.sip
            .get_inbound_trunk(id)
            .await
            .map_err(|e| match livekit_failure(e, &self.url) {
                Failure::NotFound(_) => Failure::NotFound(format!("no inbound trunk {id}")),
                other => other,
            })
    }

    async fn outbound_trunk(&self, id: &str) -> Result<proto::SipOutboundTrunkInfo> {
        self.sip
            .get_outbound_trunk(id)
            .await
            .map_err(|e| match livekit_failure(e, &self.url) {
                Failure::NotFound(_) => Failure::NotFound(format!("no outbound trunk {id}")),
                other => other,
            })
    }

    async fn rule(&self, id: &str) -> Result<proto::SipDispatchRuleInfo> {
        self.sip
            .get_dispatch_rule(id)
            .await
            .map_err(self.lk())?
            .ok_or_else(|| Failure::NotFound(format!("no dispatch rule {id}")))
    }

    async fn all_inbound(&self) -> Result<Vec<proto::SipInboundTrunkInfo>> {
        self.sip
            .list_inbound_trunks(Default::default())
            .await
            .map_err(self.lk())
    }

    async fn all_rules(&self) -> Result<Vec<proto::SipDispatchRuleInfo>> {
        self.sip
            .list_dispatch_rules(Default::default())
            .await
            .map_err(self.lk())
    }
}

/// Runs `callfleet livekit …`.
pub async fn run(args: LivekitArgs) -> Result<()> {
    args.livekit
        .validate()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let url = args.livekit.livekit_url.clone().ok_or_else(|| {
        Failure::Usage(
            "LIVEKIT_URL: required (for dev mode's emulator: LIVEKIT_URL=http://127.0.0.1:7880)"
                .into(),
        )
    })?;
    let sip = LiveKitSip::new(
        &url,
        &args.livekit.livekit_api_key,
        args.livekit.livekit_api_secret.expose_secret(),
        args.livekit.timeout(),
    )
    .map_err(|e| livekit_failure(e, &url))?;
    let ctx = Ctx {
        sip,
        url,
        json: args.json,
    };
    match args.command {
        LivekitCommand::InboundTrunks { action } => inbound(&ctx, action).await,
        LivekitCommand::OutboundTrunks { action } => outbound(&ctx, action).await,
        LivekitCommand::Rules { action } => rules(&ctx, action).await,
        LivekitCommand::ConnectNumber(connect) => connect_number(&ctx, connect).await,
        LivekitCommand::Check(check_args) => check(&ctx, check_args).await,
    }
}

async fn inbound(ctx: &Ctx, action: InboundAction) -> Result<()> {
    let show = |t: &proto::SipInboundTrunkInfo| {
        ctx.print(view::inbound_trunk_json(t), view::inbound_trunk_details(t))
    };
    match action {
        InboundAction::List { number } => {
            let request = proto::ListSipInboundTrunkRequest {
                numbers: number.iter().cloned().collect(),
                ..Default::default()
            };
            let mut trunks = ctx
                .sip
                .list_inbound_trunks(request)
                .await
                .map_err(ctx.lk())?;
            // Servers that ignore the filter return more: apply it here as LiveKit does.
            if let Some(n) = &number {
                trunks.retain(|t| t.numbers.is_empty() || audit::lists(&t.numbers, n));
            }
            let json = Value::Array(trunks.iter().map(view::inbound_trunk_json).collect());
            ctx.print_table(
                json,
                view::inbound_trunk_table(&trunks),
                "no inbound trunks",
            );
        }
        InboundAction::Get { id } => show(&ctx.inbound_trunk(&id).await?),
        InboundAction::Create { fields } => {
            let mut trunk = proto::SipInboundTrunkInfo::default();
            apply_inbound(&mut trunk, &fields, &[], &[]);
            show(
                &ctx.sip
                    .create_inbound_trunk(trunk)
                    .await
                    .map_err(ctx.lk())?,
            );
        }
        InboundAction::Update {
            id,
            fields,
            add_number,
            remove_number,
            replace,
        } => {
            let trunk = if replace {
                let mut trunk = ctx.inbound_trunk(&id).await?;
                apply_inbound(&mut trunk, &fields, &add_number, &remove_number);
                ctx.sip.replace_inbound_trunk(&id, trunk).await
            } else {
                let update = inbound_update(&fields, &add_number, &remove_number)?;
                ctx.sip.update_inbound_trunk(&id, update).await
            };
            show(&trunk.map_err(|e| not_found_as(e, ctx, "inbound trunk", &id))?);
        }
        InboundAction::Delete { id } => {
            ctx.inbound_trunk(&id).await?;
            ctx.sip.delete_trunk(&id).await.map_err(ctx.lk())?;
            ctx.print(
                json!({"deleted": id}),
                format!("deleted inbound trunk {id}\n"),
            );
        }
    }
    Ok(())
}

fn not_found_as(e: LiveKitError, ctx: &Ctx, what: &str, id: &str) -> Failure {
    match livekit_failure(e, &ctx.url) {
        Failure::NotFound(_) => Failure::NotFound(format!("no {what} {id}")),
        other => other,
    }
}

async fn outbound(ctx: &Ctx, action: OutboundAction) -> Result<()> {
    let show = |t: &proto::SipOutboundTrunkInfo| {
        ctx.print(
            view::outbound_trunk_json(t),
            view::outbound_trunk_details(t),
        )
    };
    match action {
        OutboundAction::List => {
            let trunks = ctx
                .sip
                .list_outbound_trunks(Default::default())
                .await
                .map_err(ctx.lk())?;
            let json = Value::Array(trunks.iter().map(view::outbound_trunk_json).collect());
            ctx.print_table(
                json,
                view::outbound_trunk_table(&trunks),
                "no outbound trunks",
            );
        }
        OutboundAction::Get { id } => show(&ctx.outbound_trunk(&id).await?),
        OutboundAction::Create { fields } => {
            if fields
                .address
                .as_deref()
                .is_none_or(|a| a.trim().is_empty())
            {
                return Err(Failure::Usage(
                    "--address is required: the carrier's SIP host calls are sent to".into(),
                ));
            }
            let mut trunk = proto::SipOutboundTrunkInfo::default();
            apply_outbound(&mut trunk, &fields, &[], &[]);
            show(
                &ctx.sip
                    .create_outbound_trunk(trunk)
                    .await
                    .map_err(ctx.lk())?,
            );
        }
        OutboundAction::Update {
            id,
            fields,
            add_number,
            remove_number,
        } => {
            let update = proto::SipOutboundTrunkUpdate {
                address: fields
                    .address
                    .as_ref()
                    .map(|a| a.trim().trim_start_matches("sip:").to_owned()),
                transport: fields.transport.map(Transport::proto),
                destination_country: fields.destination_country.clone(),
                numbers: list_update(&fields.numbers, &add_number, &remove_number),
                auth_username: fields.auth_user.clone(),
                auth_password: fields.auth_pass.clone(),
                name: fields.name.clone(),
                metadata: fields.metadata.clone(),
                ..Default::default()
            };
            let trunk = ctx
                .sip
                .update_outbound_trunk(&id, update)
                .await
                .map_err(|e| not_found_as(e, ctx, "outbound trunk", &id))?;
            show(&trunk);
        }
        OutboundAction::Delete { id } => {
            ctx.outbound_trunk(&id).await?;
            ctx.sip.delete_trunk(&id).await.map_err(ctx.lk())?;
            ctx.print(
                json!({"deleted": id}),
                format!("deleted outbound trunk {id}\n"),
            );
        }
    }
    Ok(())
}

async fn rules(ctx: &Ctx, action: RuleAction) -> Result<()> {
    let show =
        |r: &proto::SipDispatchRuleInfo| ctx.print(view::rule_json(r), view::rule_details(r));
    match action {
        RuleAction::List { trunk, number } => {
            let request = proto::ListSipDispatchRuleRequest {
                trunk_ids: trunk.iter().cloned().collect(),
                ..Default::default()
            };
            let mut rules = ctx
                .sip
                .list_dispatch_rules(request)
                .await
                .map_err(ctx.lk())?;
            if let Some(t) = &trunk {
                rules.retain(|r| r.trunk_ids.is_empty() || r.trunk_ids.contains(t));
            }
            if let Some(n) = &number {
                rules.retain(|r| r.numbers.is_empty() || audit::lists(&r.numbers, n));
            }
            let json = Value::Array(rules.iter().map(view::rule_json).collect());
            ctx.print_table(json, view::rule_table(&rules), "no dispatch rules");
        }
        RuleAction::Get { id } => show(&ctx.rule(&id).await?),
        RuleAction::Create { fields } => {
            let mut rule = proto::SipDispatchRuleInfo::default();
            apply_rule(&mut rule, &fields, &[], &[])?;
            if rule.rule.is_none() {
                // No kind flags: LiveKit needs one; a room per caller is the default.
                rule.rule = rule_kind(
                    None,
                    &RuleFields {
                        kind: Some(Kind::Individual),
                        ..empty_rule_fields()
                    },
                )?;
            }
            if !rule.numbers.is_empty()
                && rule
                    .inbound_numbers
                    .iter()
                    .any(|n| rule.numbers.contains(n))
            {
                eprintln!(
                    "warning: a number is in both --number (called) and --inbound-number (callers)"
                );
            }
            show(&ctx.sip.create_dispatch_rule(rule).await.map_err(ctx.lk())?);
        }
        RuleAction::Update {
            id,
            fields,
            add_trunk,
            remove_trunk,
            replace,
        } => {
            let rule = if replace {
                let mut rule = ctx.rule(&id).await?;
                apply_rule(&mut rule, &fields, &add_trunk, &remove_trunk)?;
                ctx.sip.replace_dispatch_rule(&id, rule).await
            } else {
                needs_replace(&rule_replace_only(&fields))?;
                let kind_flags = fields.kind.is_some()
                    || fields.room_prefix.is_some()
                    || fields.room.is_some()
                    || fields.pin.is_some()
                    || fields.randomize.is_some();
                // Changing one setting of the kind keeps the others: read them first.
                let rule = if kind_flags {
                    let current = ctx.rule(&id).await?;
                    rule_kind(current.rule.as_ref(), &fields)?
                } else {
                    None
                };
                let update = proto::SipDispatchRuleUpdate {
                    trunk_ids: list_update(&fields.trunk_ids, &add_trunk, &remove_trunk),
                    rule,
                    name: fields.name.clone(),
                    metadata: fields.metadata.clone(),
                    attributes: fields.attributes.iter().cloned().collect::<HashMap<_, _>>(),
                    ..Default::default()
                };
                ctx.sip.update_dispatch_rule(&id, update).await
            };
            show(&rule.map_err(|e| not_found_as(e, ctx, "dispatch rule", &id))?);
        }
        RuleAction::Delete { id } => {
            ctx.rule(&id).await?;
            ctx.sip.delete_dispatch_rule(&id).await.map_err(ctx.lk())?;
            ctx.print(
                json!({"deleted": id}),
                format!("deleted dispatch rule {id}\n"),
            );
        }
    }
    Ok(())
}

fn empty_rule_fields() -> RuleFields {
    RuleFields {
        name: None,
        metadata: None,
        trunk_ids: None,
        numbers: None,
        inbound_numbers: None,
        kind: None,
        room_prefix: None,
        room: None,
        pin: None,
        randomize: None,
        hide_phone_number: None,
        attributes: Vec::new(),
        agents: Vec::new(),
        no_agents: false,
        krisp: None,
    }
}

fn print_problems(problems: &[Problem]) {
    for p in problems {
        eprintln!("warning: {}", p.message);
    }
}

/// Text lines for findings: every problem; warnings up to 20 of a kind (all in --json).
fn findings_text(findings: &audit::Findings) -> String {
    let mut text = String::new();
    for p in &findings.problems {
        text.push_str(&format!("- [{}] {}\n", p.kind, p.message));
    }
    let mut shown: HashMap<&str, usize> = HashMap::new();
    for w in &findings.warnings {
        let n = shown.entry(w.kind).or_default();
        *n += 1;
        if *n <= 20 {
            text.push_str(&format!("- [{}] warning: {}\n", w.kind, w.message));
        }
    }
    let mut more: Vec<_> = shown.into_iter().filter(|(_, n)| *n > 20).collect();
    more.sort();
    for (kind, n) in more {
        text.push_str(&format!(
            "- [{kind}] warning: … and {} more (--json lists them all)\n",
            n - 20
        ));
    }
    text
}

async fn check(ctx: &Ctx, args: CheckArgs) -> Result<()> {
    // With a key configured, profiles that cannot be read fail the check (exit 3) rather
    // than leave it to LiveKit's side alone.
    let api = args.api.api()?;
    let profiles = match &api {
        Some(api) => Some(api.list_profiles(None).await?),
        None => None,
    };
    let trunks = ctx.all_inbound().await?;
    let rules = ctx.all_rules().await?;
    let findings = audit::check_all(&trunks, &rules, profiles.as_deref());
    let mut notes = Vec::new();
    if profiles.is_none() {
        notes.push(
            "callfleet's routing profiles were not consulted (no CALLFLEET_API_KEY / \
             --api-key): rules with agents were checked only against other rules, and routed \
             numbers LiveKit does not pass on were not looked for"
                .to_owned(),
        );
    }
    // Nothing to fail on: the summary first, then any warnings.
    let mut text = String::new();
    if findings.problems.is_empty() {
        text.push_str(&format!(
            "no problems in {} inbound trunk(s), {} dispatch rule(s){}{}\n",
            trunks.len(),
            rules.len(),
            profiles.as_ref().map_or(String::new(), |p| format!(
                " and {} routing profile(s) ({} active)",
                p.len(),
                p.iter().filter(|p| p.is_active()).count()
            )),
            match findings.warnings.len() {
                0 => String::new(),
                n => format!("; {n} warning(s)"),
            }
        ));
    }
    text.push_str(&findings_text(&findings));
    for n in &notes {
        text.push_str(&format!("note: {n}\n"));
    }
    ctx.print(
        json!({
            "problems": findings.problems,
            "warnings": findings.warnings,
            "inbound_trunks": trunks.len(),
            "dispatch_rules": rules.len(),
            "routing_profiles": profiles.as_ref().map(Vec::len),
            "notes": notes,
        }),
        text,
    );
    if findings.problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Problems(format!(
            "{} problem(s) found",
            findings.problems.len()
        )))
    }
}

/// The callfleet routing API: `--profile`, and the profiles connect-number and check read.
struct CallfleetApi {
    http: reqwest::Client,
    base: String,
    key: SecretString,
}

impl CallfleetApi {
    fn unreachable(&self, e: &reqwest::Error) -> Failure {
        if e.is_connect() || e.is_builder() {
            Failure::Unreachable(format!(
                "cannot reach the callfleet API at {}: check --api-url / CALLFLEET_API_URL",
                self.base
            ))
        } else {
            Failure::Unknown(format!(
                "the callfleet API at {} gave no answer in time",
                self.base
            ))
        }
    }

    /// The answer's body, or the failure it says; `profile` is the one asked about (none:
    /// the list).
    async fn answer(&self, response: reqwest::Response, profile: Option<&str>) -> Result<Value> {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let said = body
            .get("error")
            .and_then(|e| e.get("message").or(Some(e)))
            .map(|m| match m {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        match status.as_u16() {
            200..=299 => Ok(body),
            404 => Err(match profile {
                Some(profile) => {
                    Failure::NotFound(format!("no routing profile {profile} at {}", self.base))
                }
                None => Failure::Unreachable(format!(
                    "{} serves no /v1/routing/profiles: check --api-url / CALLFLEET_API_URL",
                    self.base
                )),
            }),
            401 | 403 => Err(Failure::Unreachable(format!(
                "the callfleet API refused the key ({}): check CALLFLEET_API_KEY",
                said.unwrap_or_else(|| status.to_string())
            ))),
            400 | 409 | 422 => Err(Failure::Usage(format!(
                "the callfleet API refused {}: {}",
                profile.map_or("the profile list".to_owned(), |p| format!(
                    "the change to profile {p}"
                )),
                said.unwrap_or_else(|| status.to_string())
            ))),
            _ => Err(Failure::Service(format!(
                "the callfleet API failed ({status}): {}",
                said.unwrap_or_default()
            ))),
        }
    }

    async fn get_profile(&self, id: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!(
                "{}/v1/routing/profiles/{}",
                self.base,
                encode_segment(id)
            ))
            .bearer_auth(self.key.expose_secret())
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        self.answer(response, Some(id)).await
    }

    async fn set_numbers(&self, id: &str, numbers: &[String]) -> Result<Value> {
        let response = self
            .http
            .patch(format!(
                "{}/v1/routing/profiles/{}",
                self.base,
                encode_segment(id)
            ))
            .bearer_auth(self.key.expose_secret())
            .json(&json!({ "numbers": numbers }))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        self.answer(response, Some(id)).await
    }

    /// Every routing profile (those serving `number` only, when given), page by page.
    async fn list_profiles(&self, number: Option<&str>) -> Result<Vec<audit::RoutedProfile>> {
        let mut profiles = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/routing/profiles?limit=500", self.base);
            if let Some(n) = number {
                url.push_str(&format!("&number={}", encode_segment(n)));
            }
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={}", encode_segment(c)));
            }
            let response = self
                .http
                .get(url)
                .bearer_auth(self.key.expose_secret())
                .send()
                .await
                .map_err(|e| self.unreachable(&e))?;
            let mut page = self.answer(response, None).await?;
            let listed: Vec<audit::RoutedProfile> = serde_json::from_value(page["profiles"].take())
                .map_err(|_| {
                    Failure::Service(format!(
                        "the callfleet API at {} answered the profile list without profiles",
                        self.base
                    ))
                })?;
            profiles.extend(listed);
            match page["next_cursor"].as_str() {
                // A cursor that does not move would loop forever.
                Some(next) if !next.is_empty() && cursor.as_deref() != Some(next) => {
                    cursor = Some(next.to_owned());
                }
                _ => return Ok(profiles),
            }
        }
    }
}

/// A profile id as one URL path segment.
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn connect_number(ctx: &Ctx, args: ConnectArgs) -> Result<()> {
    let region =
        parse_region(&args.region).map_err(|e| Failure::Usage(format!("--region: {e}")))?;
    let did = E164::parse(&args.number, Some(region))
        .map_err(|e| {
            let hint = e.to_string();
            let hint = if hint.contains("E.164") {
                String::new()
            } else {
                " (write it in E.164, e.g. +15105550100)".to_owned()
            };
            Failure::Usage(format!("the number `{}` {e}{hint}", args.number.trim()))
        })?
        .as_str()
        .to_owned();

    // callfleet's side is read first, so a wrong profile id or an unreachable API changes
    // nothing in LiveKit.
    let api = args.api.api()?;
    let profile = match &args.profile {
        None => None,
        Some(id) => {
            let api = api.as_ref().ok_or_else(|| {
                Failure::Usage(
                    "--profile needs a callfleet API key: set CALLFLEET_API_KEY (or --api-key)"
                        .into(),
                )
            })?;
            let found = api.get_profile(id).await?;
            Some((api, id.clone(), found))
        }
    };
    // The profiles serving the number already, for the warnings about their trunk_ids and
    // rule_ids.
    let mut serving = match &api {
        Some(api) => Some(api.list_profiles(Some(&did)).await?),
        None => None,
    };

    let trunks = ctx.all_inbound().await?;
    let mut notes: Vec<String> = Vec::new();
    let step = audit::plan_trunk(&did, &trunks, args.trunk.as_deref()).map_err(|e| match e {
        PlanError::NoSuchTrunk(_) => Failure::NotFound(e.to_string()),
        PlanError::SeveralTrunks(..) => Failure::Usage(e.to_string()),
    })?;
    let (trunk_id, trunk_action) = match step {
        TrunkStep::Reuse { id, any_number } => {
            if any_number {
                notes.push(format!(
                    "inbound trunk {id} accepts calls to any number, so {did} was not added to it"
                ));
            }
            (id, "unchanged")
        }
        TrunkStep::AddNumber { id } => {
            let update = proto::SipInboundTrunkUpdate {
                numbers: Some(proto::ListUpdate {
                    add: vec![did.clone()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            ctx.sip
                .update_inbound_trunk(&id, update)
                .await
                .map_err(ctx.lk())?;
            (id, "number_added")
        }
        TrunkStep::Create => {
            let trunk = proto::SipInboundTrunkInfo {
                name: format!("callfleet {did}"),
                numbers: vec![did.clone()],
                ..Default::default()
            };
            let created = ctx
                .sip
                .create_inbound_trunk(trunk)
                .await
                .map_err(ctx.lk())?;
            (created.sip_trunk_id, "created")
        }
    };

    let rules = ctx.all_rules().await?;
    let mut warnings = audit::number_warnings(&did, &rules);
    let (rule_id, rule_action) = match audit::plan_rule(&did, &trunk_id, &rules) {
        RuleStep::Reuse { id } => {
            if let (Some(wanted), Some(rule)) = (
                &args.room_prefix,
                rules.iter().find(|r| r.sip_dispatch_rule_id == id),
            ) {
                let (_, prefix, _, _) = view::rule_kind(rule);
                if &prefix != wanted {
                    notes.push(format!("rule {id} keeps its room prefix `{prefix}`; --room-prefix applies to a new rule"));
                }
            }
            (id, "unchanged")
        }
        RuleStep::Create => {
            let rule = proto::SipDispatchRuleInfo {
                name: format!("callfleet {did}"),
                trunk_ids: vec![trunk_id.clone()],
                numbers: vec![did.clone()],
                rule: Some(proto::SipDispatchRule {
                    rule: Some(Rule::DispatchRuleIndividual(
                        proto::SipDispatchRuleIndividual {
                            room_prefix: args.room_prefix.clone().unwrap_or_else(|| "call".into()),
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            };
            let created = ctx.sip.create_dispatch_rule(rule).await.map_err(ctx.lk())?;
            (created.sip_dispatch_rule_id, "created")
        }
        RuleStep::Blocked { id, why } => {
            print_problems(&warnings);
            return Err(Failure::Problems(format!(
                "rule {id} already routes {did} on inbound trunk {trunk_id} and {why}; callfleet \
                 needs a room per caller without agents, and LiveKit refuses a second rule for \
                 the same trunk and number. Change it (callfleet livekit rules update {id} \
                 --replace --kind individual --no-agents) or delete it, then run this again{}",
                if trunk_action == "unchanged" {
                    String::new()
                } else {
                    format!(" (inbound trunk {trunk_id} is set up: {trunk_action})")
                }
            )));
        }
    };

    let mut profile_json = Value::Null;
    let mut profile_line = None;
    if let Some((api, id, found)) = profile {
        let mut numbers = strings(&found, "numbers");
        let listed = numbers.iter().any(|n| n == &did);
        let now = if listed {
            found
        } else {
            numbers.push(did.clone());
            api.set_numbers(&id, &numbers).await?
        };
        let action = if listed { "unchanged" } else { "number_added" };
        if let (Some(serving), Ok(now)) = (&mut serving, serde_json::from_value(now)) {
            serving.insert(0, now);
        }
        profile_line = Some(format!("  profile        {id}  ({})\n", words(action)));
        profile_json = json!({"id": id, "number": action});
    }

    if let Some(serving) = &serving {
        warnings.extend(audit::connect_profile_warnings(
            &did, &trunk_id, &rule_id, serving,
        ));
        if !serving.iter().any(|p| p.is_active() && p.serves(&did)) {
            notes.push(format!(
                "no active callfleet routing profile serves {did}: its calls go to \
                 CALLFLEET_DEFAULT_PROFILE if one is set, otherwise they end unrouted (add the \
                 number to a profile with --profile ID)"
            ));
        }
    }

    let changed = trunk_action != "unchanged"
        || rule_action != "unchanged"
        || profile_json.get("number").is_some_and(|a| a != "unchanged");
    let (host, host_note) = audit::sip_host(&ctx.url, args.sip_host.as_deref());
    if let Some(n) = &host_note {
        notes.push(n.clone());
    }
    let uri = format!("sip:{did}@{host}");

    let mut text = String::new();
    text.push_str(&format!("{did} → callfleet\n"));
    text.push_str(&format!(
        "  inbound trunk  {trunk_id}  ({})\n",
        words(trunk_action)
    ));
    text.push_str(&format!(
        "  dispatch rule  {rule_id}  ({}; a room per caller, no agents: callfleet dispatches)\n",
        words(rule_action)
    ));
    if let Some(line) = profile_line {
        text.push_str(&line);
    }
    text.push_str(&format!(
        "Point the carrier's trunk for {did} at:\n  {uri}   (SIP host {host})\n"
    ));
    for n in &notes {
        text.push_str(&format!("note: {n}\n"));
    }
    text.push_str(if changed {
        "Done.\n"
    } else {
        "Nothing changed: the number was already connected.\n"
    });
    ctx.print(
        json!({
            "number": did,
            "trunk_id": trunk_id,
            "trunk": trunk_action,
            "rule_id": rule_id,
            "rule": rule_action,
            "profile": profile_json,
            "sip_host": host,
            "sip_uri": uri,
            "notes": notes,
            "changed": changed,
            "warnings": warnings,
        }),
        text,
    );
    print_problems(&warnings);
    Ok(())
}

fn words(action: &str) -> &str {
    match action {
        "number_added" => "number added",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: LivekitArgs,
    }

    fn parse(args: &[&str]) -> LivekitArgs {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("parses")
            .args
    }

    #[test]
    fn durations_agents_and_attributes_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(
            parse_agent("support:{\"lang\":\"en\"}"),
            Ok(("support".into(), "{\"lang\":\"en\"}".into()))
        );
        assert_eq!(
            parse_agent("support"),
            Ok(("support".into(), String::new()))
        );
        assert!(parse_agent(":x").is_err());
        assert_eq!(parse_attribute("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_attribute("nope").is_err());
    }

    #[test]
    fn list_flags_set_add_remove_and_clear() {
        assert_eq!(list_update(&None, &[], &[]), None);
        let clear = list_update(&Some(vec![String::new()]), &[], &[]).expect("update");
        assert!(clear.clear && clear.set.is_empty());
        let set = list_update(&Some(vec!["+1".into(), " +2 ".into()]), &["+3".into()], &[])
            .expect("update");
        assert_eq!(
            (set.set, set.add),
            (vec!["+1".into(), "+2".into()], vec!["+3".into()])
        );
        let mut list = vec!["+1".to_owned(), "+2".to_owned()];
        edit_list(
            &mut list,
            &None,
            &["+2".into(), "+3".into()],
            &["+1".into()],
        );
        assert_eq!(list, ["+2", "+3"]);
    }

    #[test]
    fn fields_only_replace_can_change_are_refused_without_it() {
        let args = parse(&[
            "inbound-trunks",
            "update",
            "ST_a",
            "--ringing-timeout",
            "30s",
            "--name",
            "x",
        ]);
        let LivekitCommand::InboundTrunks {
            action:
                InboundAction::Update {
                    fields,
                    add_number,
                    remove_number,
                    ..
                },
        } = args.command
        else {
            panic!("not an update");
        };
        let err = inbound_update(&fields, &add_number, &remove_number).expect_err("replace only");
        assert_eq!(err.exit_code(), 2);
        assert!(err
            .to_string()
            .contains("--ringing-timeout can only change with --replace"));

        let args = parse(&[
            "rules",
            "update",
            "SDR_a",
            "--number",
            "+15105550100",
            "--no-agents",
        ]);
        let LivekitCommand::Rules {
            action: RuleAction::Update { fields, .. },
        } = args.command
        else {
            panic!("not an update");
        };
        assert_eq!(rule_replace_only(&fields), ["--number", "--no-agents"]);
    }

    #[test]
    fn rule_flags_build_the_rule_livekit_stores() {
        let args = parse(&[
            "rules",
            "create",
            "--name",
            "support",
            "--trunk",
            "ST_a",
            "--number",
            "+15105550100",
            "--inbound-number",
            "+14155550199,+14155550198",
            "--kind",
            "callee",
            "--room-prefix",
            "sup-",
            "--randomize",
            "--hide-phone-number",
            "--attribute",
            "team=blue",
            "--agent",
            "support-agent:{\"lang\":\"en\"}",
            "--krisp",
        ]);
        let LivekitCommand::Rules {
            action: RuleAction::Create { fields },
        } = args.command
        else {
            panic!("not a create");
        };
        let mut rule = proto::SipDispatchRuleInfo::default();
        apply_rule(&mut rule, &fields, &[], &[]).expect("valid");
        assert_eq!(rule.numbers, ["+15105550100"]);
        assert_eq!(rule.inbound_numbers, ["+14155550199", "+14155550198"]);
        assert_eq!(rule.trunk_ids, ["ST_a"]);
        assert!(rule.hide_phone_number && rule.krisp_enabled);
        assert_eq!(
            rule.attributes.get("team").map(String::as_str),
            Some("blue")
        );
        assert_eq!(view::agents(&rule)[0].agent_name, "support-agent");
        assert_eq!(view::agents(&rule)[0].metadata, "{\"lang\":\"en\"}");
        assert_eq!(
            view::rule_kind(&rule),
            ("callee", "sup-".into(), String::new(), true)
        );

        // Changing the pin keeps the kind's other settings; a direct rule needs its room.
        let current = rule.rule.clone();
        let pin_only = RuleFields {
            pin: Some("1234".into()),
            ..empty_rule_fields()
        };
        let changed = rule_kind(current.as_ref(), &pin_only)
            .expect("valid")
            .expect("rule");
        assert!(
            matches!(changed.rule, Some(Rule::DispatchRuleCallee(c)) if c.room_prefix == "sup-" && c.randomize && c.pin == "1234")
        );
        let direct = RuleFields {
            kind: Some(Kind::Direct),
            ..empty_rule_fields()
        };
        assert_eq!(
            rule_kind(current.as_ref(), &direct)
                .expect_err("no room")
                .exit_code(),
            2
        );
    }

    #[test]
    fn livekit_failures_map_to_exit_codes_that_say_what_to_fix() {
        let url = "http://lk";
        let twirp = |code: &str| LiveKitError {
            method: "ListSIPInboundTrunk",
            failure: ApiFailure::Twirp {
                code: code.into(),
                msg: "twirp error unknown: why".into(),
                sip_status_code: None,
                sip_status: None,
            },
        };
        let of = |failure| LiveKitError {
            method: "CreateSIPDispatchRule",
            failure,
        };
        assert_eq!(
            livekit_failure(of(ApiFailure::Transport), url).exit_code(),
            3
        );
        assert_eq!(
            livekit_failure(twirp("unauthenticated"), url).exit_code(),
            3
        );
        assert_eq!(livekit_failure(twirp("not_found"), url).exit_code(), 1);
        assert_eq!(
            livekit_failure(twirp("invalid_argument"), url).exit_code(),
            2
        );
        assert_eq!(livekit_failure(twirp("unavailable"), url).exit_code(), 4);
        let unknown = livekit_failure(of(ApiFailure::Timeout), url);
        assert_eq!(unknown.exit_code(), 5);
        assert!(unknown.to_string().contains("may or may not"));
        let refused = livekit_failure(twirp("invalid_argument"), url).to_string();
        assert_eq!(refused, "LiveKit refused ListSIPInboundTrunk: why");
    }
}
