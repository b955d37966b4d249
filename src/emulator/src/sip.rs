//! SIP: scripted outbound dial outcomes and simulated inbound calls.

use std::collections::HashMap;
use std::time::Duration;

use livekit_protocol as proto;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::ids::{guid, now_ms};
use crate::twirp::TwirpError;
use crate::Emulator;

/// What the far end does when dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answers after `ring_ms`; hangs up after `talk_ms` if set.
    Answer,
    /// 486 Busy Here.
    Busy,
    /// 480 Temporarily Unavailable.
    Unavailable,
    /// Rings until the ringing timeout (LiveKit's own: `canceled`, no SIP status).
    NoAnswer,
    /// 603 Decline.
    Decline,
    /// 404 Not Found.
    NotFound,
    /// 503 from the carrier.
    Failed,
}

/// The script for a dialled number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallScript {
    pub outcome: Outcome,
    /// Time from dial to the outcome (answer or final failure).
    pub ring_ms: u64,
    /// After answer, the callee hangs up after this long (`None`: stays until removed).
    pub talk_ms: Option<u64>,
    /// Overrides the SIP status of a failure outcome.
    pub sip_status: Option<u16>,
}

impl Default for CallScript {
    fn default() -> Self {
        Self {
            outcome: Outcome::Answer,
            ring_ms: 200,
            talk_ms: Some(2_000),
            sip_status: None,
        }
    }
}

/// How LiveKit reports a final SIP status (livekit-facts §5 table): Twirp code and the
/// `disconnectReason` the participant leaves with.
pub fn sip_failure(code: u16) -> (&'static str, proto::DisconnectReason) {
    use proto::DisconnectReason as R;
    match code {
        486 | 600 => ("resource_exhausted", R::UserRejected),
        480 => ("resource_exhausted", R::UserUnavailable),
        408 => ("deadline_exceeded", R::UserUnavailable),
        404 => ("not_found", R::UserUnavailable),
        604 => ("not_found", R::UserRejected),
        402 | 403 | 603 => ("permission_denied", R::UserRejected),
        401 | 407 => ("failed_precondition", R::UserRejected),
        487 => ("aborted", R::UserRejected),
        504 => ("deadline_exceeded", R::ClientInitiated),
        400..=499 => ("invalid_argument", R::UserRejected),
        600..=699 => ("permission_denied", R::UserRejected),
        _ => ("failed_precondition", R::ClientInitiated),
    }
}

/// The reason phrase of a final SIP status ("" for one without a common phrase).
fn reason_phrase(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        480 => "Temporarily Unavailable",
        486 => "Busy Here",
        487 => "Request Terminated",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        _ => "",
    }
}

/// The Twirp error LiveKit returns for a final SIP status.
pub fn sip_error(code: u16, status_text: Option<&str>) -> TwirpError {
    let (twirp, _) = sip_failure(code);
    let phrase = reason_phrase(code);
    // LiveKit's own name for the status, from its protocol enum.
    let enum_name = proto::SipStatusCode::try_from(i32::from(code))
        .map(|c| c.as_str_name())
        .unwrap_or("SIP_STATUS_UNKNOWN");
    let shown = if phrase.is_empty() { enum_name } else { phrase };
    let status = status_text.unwrap_or(shown).to_owned();
    let mut meta = HashMap::new();
    meta.insert("sip_status_code".to_owned(), code.to_string());
    meta.insert("sip_status".to_owned(), status);
    TwirpError {
        code: twirp.to_owned(),
        msg: format!("twirp error unknown: sip status: {code}: {shown}"),
        meta,
    }
}

fn ringing_timeout_error() -> TwirpError {
    TwirpError {
        code: "canceled".into(),
        msg: "twirp error unknown: sip request timed out".into(),
        meta: HashMap::new(),
    }
}

fn status_of(outcome: Outcome, script: &CallScript) -> Option<u16> {
    script.sip_status.or(match outcome {
        Outcome::Answer | Outcome::NoAnswer => None,
        Outcome::Busy => Some(486),
        Outcome::Unavailable => Some(480),
        Outcome::Decline => Some(603),
        Outcome::NotFound => Some(404),
        Outcome::Failed => Some(503),
    })
}

fn duration_of(d: &Option<pbjson_types::Duration>) -> Option<Duration> {
    d.as_ref().and_then(|d| {
        let ms = d
            .seconds
            .checked_mul(1000)?
            .checked_add(i64::from(d.nanos) / 1_000_000)?;
        (ms > 0).then(|| Duration::from_millis(ms as u64))
    })
}

fn sip_track() -> proto::TrackInfo {
    proto::TrackInfo {
        sid: guid("TR_"),
        name: "phone".into(),
        r#type: proto::TrackType::Audio as i32,
        source: proto::TrackSource::Microphone as i32,
        mime_type: "audio/opus".into(),
        ..Default::default()
    }
}

fn sip_participant(
    identity: String,
    name: String,
    metadata: String,
    attributes: HashMap<String, String>,
) -> proto::ParticipantInfo {
    let ms = now_ms();
    proto::ParticipantInfo {
        sid: guid("PA_"),
        identity,
        state: proto::participant_info::State::Active as i32,
        tracks: vec![sip_track()],
        metadata,
        joined_at: ms / 1000,
        joined_at_ms: ms,
        name,
        version: 2,
        permission: Some(proto::ParticipantPermission {
            can_subscribe: true,
            can_publish: true,
            can_publish_data: true,
            can_update_metadata: true,
            ..Default::default()
        }),
        is_publisher: true,
        kind: proto::participant_info::Kind::Sip as i32,
        attributes,
        ..Default::default()
    }
}

/// The identity a dial's participant gets: the requested one, or `sip_<number>`.
pub fn dial_identity(req: &proto::CreateSipParticipantRequest) -> String {
    if req.participant_identity.is_empty() {
        format!("sip_{}", req.sip_call_to)
    } else {
        req.participant_identity.clone()
    }
}

/// CreateSIPParticipant's validation, as the real server does it, then an `X-Lk-Mock`
/// `sipStatus`: everything that refuses a dial before anything happens.
pub fn check_dial(
    req: &proto::CreateSipParticipantRequest,
    forced_status: Option<(u16, Option<String>)>,
) -> Result<(), TwirpError> {
    if req.sip_trunk_id.is_empty() && req.trunk.is_none() && req.sip_number.is_empty() {
        return Err(TwirpError::new("invalid_argument", "missing sip trunk id"));
    }
    if req.sip_call_to.is_empty() {
        return Err(TwirpError::new(
            "invalid_argument",
            "missing sip callee number",
        ));
    }
    if req.sip_call_to.contains('@') {
        return Err(TwirpError::new(
            "invalid_argument",
            "SipCallTo should be a phone number or SIP user, not a full SIP URI",
        ));
    }
    if req.room_name.is_empty() {
        return Err(TwirpError::new("invalid_argument", "missing room name"));
    }
    if req.trunk.is_some() && req.sip_number.is_empty() {
        return Err(TwirpError::new(
            "invalid_argument",
            "sip_number is required with an inline trunk",
        ));
    }
    if let Some((code, text)) = forced_status {
        return Err(sip_error(code, text.as_deref()));
    }
    Ok(())
}

/// CreateSIPParticipant once [`check_dial`] passed: a SIP participant joins at dial time,
/// then the scripted outcome plays. With `wait_until_answered` the call blocks until
/// answer or failure.
pub async fn dial(
    emu: &Emulator,
    req: proto::CreateSipParticipantRequest,
) -> Result<proto::SipParticipantInfo, TwirpError> {
    let identity = dial_identity(&req);
    let call_id = guid("SCL_");
    let mut attributes = req.participant_attributes.clone();
    attributes.insert("sip.callID".into(), call_id.clone());
    attributes.insert("sip.callStatus".into(), "dialing".into());
    attributes.insert("sip.trunkID".into(), req.sip_trunk_id.clone());
    if !req.hide_phone_number {
        attributes.insert("sip.phoneNumber".into(), req.sip_call_to.clone());
        attributes.insert("sip.hostname".into(), "sip.emulator.invalid".into());
        if !req.sip_number.is_empty() {
            attributes.insert("sip.trunkPhoneNumber".into(), req.sip_number.clone());
        }
    }
    emu.ensure_room(&req.room_name);
    let participant = sip_participant(
        identity.clone(),
        req.participant_name.clone(),
        req.participant_metadata.clone(),
        attributes,
    );
    let sid = participant.sid.clone();
    emu.join(&req.room_name, participant);

    let script = emu
        .inner
        .scripts
        .lock()
        .get(&req.sip_call_to)
        .cloned()
        .unwrap_or_else(|| emu.inner.config.default_script.clone());
    let ringing_timeout = duration_of(&req.ringing_timeout).unwrap_or(Duration::from_secs(30));
    let max_duration = duration_of(&req.max_call_duration);
    let (tx, rx) = oneshot::channel();
    let play = Dial {
        emu: emu.clone(),
        room: req.room_name.clone(),
        identity: identity.clone(),
        sid: sid.clone(),
        script,
        ringing_timeout,
        max_duration,
    };
    tokio::spawn(play.run(tx));

    let info = proto::SipParticipantInfo {
        participant_id: sid,
        participant_identity: identity,
        room_name: req.room_name,
        sip_call_id: call_id,
    };
    if req.wait_until_answered {
        match rx.await {
            Ok(Ok(())) => Ok(info),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TwirpError::new(
                "internal",
                "twirp error unknown: call ended",
            )),
        }
    } else {
        Ok(info)
    }
}

struct Dial {
    emu: Emulator,
    room: String,
    identity: String,
    sid: String,
    script: CallScript,
    ringing_timeout: Duration,
    max_duration: Option<Duration>,
}

impl Dial {
    fn still_here(&self) -> bool {
        self.emu
            .participant(&self.room, &self.identity)
            .is_some_and(|p| p.sid == self.sid)
    }

    async fn run(self, answered: oneshot::Sender<Result<(), TwirpError>>) {
        let ring = Duration::from_millis(self.script.ring_ms);
        tokio::time::sleep(ring / 2).await;
        if !self.still_here() {
            let _ = answered.send(Err(TwirpError::new(
                "canceled",
                "twirp error unknown: call canceled",
            )));
            return;
        }
        self.emu
            .set_attribute(&self.room, &self.sid, "sip.callStatus", "ringing");
        let outcome = self.script.outcome;
        let wait = if outcome == Outcome::NoAnswer {
            self.ringing_timeout
        } else {
            ring.min(self.ringing_timeout)
        };
        tokio::time::sleep(wait.saturating_sub(ring / 2)).await;
        if !self.still_here() {
            let _ = answered.send(Err(TwirpError::new(
                "canceled",
                "twirp error unknown: call canceled",
            )));
            return;
        }
        if outcome != Outcome::NoAnswer && ring > self.ringing_timeout {
            // Ringing outlasted the timeout: LiveKit gives up first.
            let _ = answered.send(Err(ringing_timeout_error()));
            self.emu.leave(
                &self.room,
                &self.identity,
                proto::DisconnectReason::UserUnavailable,
                Some(&self.sid),
            );
            return;
        }
        match (outcome, status_of(outcome, &self.script)) {
            (Outcome::Answer, _) => {
                self.emu
                    .set_attribute(&self.room, &self.sid, "sip.callStatus", "active");
                let _ = answered.send(Ok(()));
                let talk = match (
                    self.script.talk_ms.map(Duration::from_millis),
                    self.max_duration,
                ) {
                    (Some(t), Some(m)) => Some(t.min(m)),
                    (t, m) => t.or(m),
                };
                if let Some(talk) = talk {
                    tokio::time::sleep(talk).await;
                    if self.still_here() {
                        self.emu
                            .set_attribute(&self.room, &self.sid, "sip.callStatus", "hangup");
                        self.emu.leave(
                            &self.room,
                            &self.identity,
                            proto::DisconnectReason::ClientInitiated,
                            Some(&self.sid),
                        );
                    }
                }
            }
            (Outcome::NoAnswer, None) => {
                let _ = answered.send(Err(ringing_timeout_error()));
                self.emu.leave(
                    &self.room,
                    &self.identity,
                    proto::DisconnectReason::UserUnavailable,
                    Some(&self.sid),
                );
            }
            (_, status) => {
                let code = status.unwrap_or(503);
                let _ = answered.send(Err(sip_error(code, None)));
                let (_, reason) = sip_failure(code);
                // Failed dials set no final callStatus (it keeps `ringing`).
                self.emu
                    .leave(&self.room, &self.identity, reason, Some(&self.sid));
            }
        }
    }
}

/// TransferSIPParticipant's validation, then an `X-Lk-Mock` `sipStatus`: everything that
/// refuses a transfer before anything happens.
pub fn check_transfer(
    req: &proto::TransferSipParticipantRequest,
    forced_status: Option<(u16, Option<String>)>,
) -> Result<(), TwirpError> {
    if req.room_name.is_empty() {
        return Err(TwirpError::new("invalid_argument", "missing room name"));
    }
    if req.participant_identity.is_empty() {
        return Err(TwirpError::new(
            "invalid_argument",
            "missing participant identity",
        ));
    }
    if req.transfer_to.is_empty() {
        return Err(TwirpError::new(
            "invalid_argument",
            "missing transfer target",
        ));
    }
    if !["tel:", "sip:", "sips:"]
        .iter()
        .any(|p| req.transfer_to.starts_with(p))
    {
        return Err(TwirpError::new(
            "invalid_argument",
            "transfer_to must start with tel:, sip: or sips:",
        ));
    }
    if let Some((code, text)) = forced_status {
        return Err(sip_error(code, text.as_deref()));
    }
    Ok(())
}

/// TransferSIPParticipant once [`check_transfer`] passed: the (simulated) REFER is sent
/// and the caller leaves the room.
pub fn transfer(
    emu: &Emulator,
    req: proto::TransferSipParticipantRequest,
) -> Result<(), TwirpError> {
    let Some(p) = emu.participant(&req.room_name, &req.participant_identity) else {
        return Err(TwirpError::new(
            "not_found",
            "twirp error unknown: participant does not exist",
        ));
    };
    if !p.attributes.contains_key("sip.callID") {
        return Err(TwirpError::new(
            "invalid_argument",
            "no SIP session associated with participant",
        ));
    }
    emu.set_attribute(&req.room_name, &p.sid, "sip.callStatus", "hangup");
    emu.leave(
        &req.room_name,
        &req.participant_identity,
        proto::DisconnectReason::ClientInitiated,
        Some(&p.sid),
    );
    Ok(())
}

/// A PSTN call arriving on a trunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundCall {
    /// Caller number.
    pub from: String,
    /// Dialled number (the DID), `sip.trunkPhoneNumber`.
    pub to: String,
    #[serde(default = "default_trunk")]
    pub trunk_id: String,
    #[serde(default = "default_rule")]
    pub rule_id: String,
    /// Room to join; default `<room_prefix>_<from>_<random>` (an individual dispatch rule).
    #[serde(default)]
    pub room_name: Option<String>,
    #[serde(default = "default_prefix")]
    pub room_prefix: String,
    /// The caller hangs up after this long (`None`: stays until removed).
    #[serde(default)]
    pub hangup_after_ms: Option<u64>,
}

fn default_trunk() -> String {
    "ST_emulatorInbound".into()
}
fn default_rule() -> String {
    "SDR_emulatorRule".into()
}
fn default_prefix() -> String {
    "call".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboundCallResult {
    pub room_name: String,
    pub participant_identity: String,
    pub participant_sid: String,
    pub sip_call_id: String,
}

pub async fn inbound_call(emu: &Emulator, call: InboundCall) -> InboundCallResult {
    let room_name = call
        .room_name
        .clone()
        .unwrap_or_else(|| format!("{}_{}_{}", call.room_prefix, call.from, guid("")));
    let identity = format!("sip_{}", call.from);
    let call_id = guid("SCL_");
    let attributes: HashMap<String, String> = [
        ("sip.callID", call_id.clone()),
        ("sip.callIDFull", format!("{}@emulator.invalid", guid(""))),
        ("sip.callStatus", "active".to_owned()),
        ("sip.phoneNumber", call.from.clone()),
        ("sip.trunkPhoneNumber", call.to.clone()),
        ("sip.trunkID", call.trunk_id.clone()),
        ("sip.ruleID", call.rule_id.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    emu.ensure_room(&room_name);
    let participant = sip_participant(
        identity.clone(),
        format!("Phone {}", call.from),
        String::new(),
        attributes,
    );
    let sid = participant.sid.clone();
    emu.join(&room_name, participant);
    if let Some(after) = call.hangup_after_ms {
        let emu = emu.clone();
        let (room, identity, sid) = (room_name.clone(), identity.clone(), sid.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            emu.set_attribute(&room, &sid, "sip.callStatus", "hangup");
            emu.leave(
                &room,
                &identity,
                proto::DisconnectReason::ClientInitiated,
                Some(&sid),
            );
        });
    }
    InboundCallResult {
        room_name,
        participant_identity: identity,
        participant_sid: sid,
        sip_call_id: call_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_statuses_map_as_livekit_does() {
        assert_eq!(sip_failure(486).0, "resource_exhausted");
        assert_eq!(sip_failure(480).1, proto::DisconnectReason::UserUnavailable);
        assert_eq!(sip_failure(603).0, "permission_denied");
        assert_eq!(sip_failure(404).0, "not_found");
        assert_eq!(sip_failure(503).0, "failed_precondition");
        let e = sip_error(486, None);
        assert_eq!(
            e.meta.get("sip_status_code").map(String::as_str),
            Some("486")
        );
        assert_eq!(
            e.meta.get("sip_status").map(String::as_str),
            Some("Busy Here")
        );
    }
}
