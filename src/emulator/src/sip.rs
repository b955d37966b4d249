//! SIP: scripted outbound dial outcomes, scripted transfer targets and simulated inbound
//! calls.

use std::collections::HashMap;
use std::time::Duration;

use livekit_protocol as proto;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

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
    trunk_exists: impl FnOnce(&str) -> bool,
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
    // livekit `CreateSIPParticipantRequest` loads the outbound trunk before anything is
    // dialled: `not_found` "requested sip trunk does not exist".
    if !req.sip_trunk_id.is_empty() && !trunk_exists(&req.sip_trunk_id) {
        return Err(crate::sip_admin::trunk_not_found());
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

/// Whether `target` is a transfer destination LiveKit accepts: a `tel:`, `sip:` or `sips:`
/// URI (protocol `livekit/sip.go`).
pub fn transfer_target_ok(target: &str) -> bool {
    ["tel:", "sip:", "sips:"]
        .iter()
        .any(|p| target.starts_with(p))
}

/// TransferSIPParticipant's validation, as the real server does it: everything that
/// refuses a transfer before anything happens (an `X-Lk-Mock` `sipStatus` comes after).
pub fn check_transfer(req: &proto::TransferSipParticipantRequest) -> Result<(), TwirpError> {
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
    if !transfer_target_ok(&req.transfer_to) {
        return Err(TwirpError::new(
            "invalid_argument",
            "transfer_to must start with tel:, sip: or sips:",
        ));
    }
    Ok(())
}

/// What a transfer target does when the caller is referred to it (a cold transfer: SIP
/// REFER, and the provider calls the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferOutcome {
    /// Answers after `after_ms`: the REFER succeeds and the caller leaves the room.
    Answer,
    /// 603 Decline.
    Decline,
    /// 486 Busy Here.
    Busy,
    /// Never answers: 408 once the request's ringing timeout (or `after_ms`) passes.
    NoAnswer,
    /// 480 Temporarily Unavailable.
    Unavailable,
    /// Fails with the script's `sip_status`.
    SipStatus,
}

impl TransferOutcome {
    /// The snake_case name it is serialized with.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answer => "answer",
            Self::Decline => "decline",
            Self::Busy => "busy",
            Self::NoAnswer => "no_answer",
            Self::Unavailable => "unavailable",
            Self::SipStatus => "sip_status",
        }
    }
}

/// The script for a transfer target, keyed by the exact `transfer_to` string
/// (`PUT /emulator/v1/transfers/{target}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferScript {
    pub outcome: TransferOutcome,
    /// Time from the REFER to the outcome ([`DEFAULT_TRANSFER_AFTER_MS`] when not given).
    /// For `no_answer`, a cap on the request's ringing timeout (so tests can be fast).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// The final SIP status of outcome `sip_status` (and only of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_status: Option<u16>,
}

/// How long a scripted transfer target takes when its script does not say.
pub const DEFAULT_TRANSFER_AFTER_MS: u64 = 200;

/// LiveKit's server gives a transfer 30 s when the request names no ringing timeout
/// (livekit `pkg/service/sip.go` `TransferSIPParticipant`).
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);

impl TransferScript {
    /// The checks serde cannot make: `Err((field, message))`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        match (self.outcome, self.sip_status) {
            (TransferOutcome::SipStatus, None) => Err((
                "sip_status",
                "sip_status is required with outcome sip_status".into(),
            )),
            (TransferOutcome::SipStatus, Some(code)) if !(400..=699).contains(&code) => Err((
                "sip_status",
                format!("sip_status {code} is not a final failure status (400 to 699)"),
            )),
            (TransferOutcome::SipStatus, Some(_)) | (_, None) => Ok(()),
            (other, Some(_)) => Err((
                "sip_status",
                format!(
                    "sip_status is only for outcome sip_status, not {}",
                    other.as_str()
                ),
            )),
        }
    }

    /// The final SIP status the REFER fails with (`None`: the target answers).
    fn failure_status(&self) -> Option<u16> {
        match self.outcome {
            TransferOutcome::Answer => None,
            TransferOutcome::Decline => Some(603),
            TransferOutcome::Busy => Some(486),
            TransferOutcome::Unavailable => Some(480),
            TransferOutcome::NoAnswer => Some(408),
            TransferOutcome::SipStatus => self.sip_status,
        }
    }
}

/// A transfer whose target is still ringing, per `sip.callID` (livekit/sip
/// `pendingTransfers`): a repeated request for the same target waits for its result.
pub struct PendingTransfer {
    pub target: String,
    pub done: watch::Receiver<Option<TransferResult>>,
}

/// What became of a TransferSIPParticipant past validation.
#[derive(Debug, Clone)]
pub struct TransferResult {
    /// For the request record: the script's outcome (`answer`, `busy`, ...), `unscripted`,
    /// `ringing_timeout` (a scripted target slower than the ringing timeout), `caller_left`
    /// (the call ended while the target rang), `already_transferring` (another target is
    /// ringing for this call), `no_participant` or `not_sip`.
    pub outcome: &'static str,
    /// The request joined a transfer of the same call to the same target already ringing.
    pub repeat: bool,
    pub result: Result<(), TwirpError>,
}

impl TransferResult {
    fn new(outcome: &'static str, result: Result<(), TwirpError>) -> Self {
        Self {
            outcome,
            repeat: false,
            result,
        }
    }
}

/// The 408 of a transfer target that did not answer within the ringing timeout.
fn transfer_timeout() -> TwirpError {
    sip_error(408, None)
}

/// The transferred call ends: LiveKit's SIP service hangs up after the REFER succeeded
/// (`CallHangup`, so `sip.callStatus` becomes `hangup`), and its participant leaves the room
/// with CLIENT_INITIATED (livekit/sip `outboundCall.transferCall` closes with
/// `Reason: CLIENT_INITIATED`; an inbound call closes as a hangup, whose
/// `CallStatus.DisconnectReason()` is CLIENT_INITIATED too).
fn transferred(emu: &Emulator, room: &str, identity: &str, sid: &str) {
    emu.set_attribute(room, sid, "sip.callStatus", "hangup");
    emu.leave(
        room,
        identity,
        proto::DisconnectReason::ClientInitiated,
        Some(sid),
    );
}

/// Waits up to `wait` while the participant `sid` stays in `room`; false if it left.
async fn stays_for(emu: &Emulator, room: &str, sid: &str, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let changed = emu.inner.participants_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let here = emu
            .inner
            .rooms
            .lock()
            .get(room)
            .is_some_and(|r| r.participants.iter().any(|p| p.sid == sid));
        if !here {
            return false;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(deadline) => return true,
        }
    }
}

/// TransferSIPParticipant once [`check_transfer`] passed: the (simulated) REFER is sent
/// and the request blocks while the target rings, as LiveKit's does. An unscripted target
/// answers at once; a scripted one plays its [`TransferScript`]. On success the caller
/// leaves the room; a failed transfer keeps the call.
pub async fn transfer(emu: &Emulator, req: proto::TransferSipParticipantRequest) -> TransferResult {
    let Some(p) = emu.participant(&req.room_name, &req.participant_identity) else {
        return TransferResult::new(
            "no_participant",
            Err(TwirpError::new(
                "not_found",
                "twirp error unknown: participant does not exist",
            )),
        );
    };
    let Some(call_id) = p.attributes.get("sip.callID").cloned() else {
        return TransferResult::new(
            "not_sip",
            Err(TwirpError::new(
                "invalid_argument",
                "no SIP session associated with participant",
            )),
        );
    };
    let script = emu
        .inner
        .transfer_scripts
        .lock()
        .get(&req.transfer_to)
        .cloned();
    let ringing_timeout = duration_of(&req.ringing_timeout).unwrap_or(DEFAULT_TRANSFER_TIMEOUT);

    // One REFER per call at a time (livekit/sip `transferSIPParticipant`): a repeated
    // request to the same target waits for the ringing one's result, another target is
    // refused. An unscripted target answers at once, so it is never pending.
    let (tx, rx) = watch::channel(None);
    let joined = {
        let mut pending = emu.inner.pending_transfers.lock();
        match pending.get(&call_id) {
            Some(t) if t.target != req.transfer_to => {
                return TransferResult::new(
                    "already_transferring",
                    Err(TwirpError::new(
                        "invalid_argument",
                        "twirp error unknown: call already being transferred elsewhere",
                    )),
                );
            }
            Some(t) => Some(t.done.clone()),
            None if script.is_none() => None,
            None => {
                pending.insert(
                    call_id.clone(),
                    PendingTransfer {
                        target: req.transfer_to.clone(),
                        done: rx.clone(),
                    },
                );
                None
            }
        }
    };
    if let Some(mut done) = joined {
        // This request's own deadline still applies.
        let waited = tokio::time::timeout(ringing_timeout, done.wait_for(Option::is_some)).await;
        let mut result = match waited {
            Ok(Ok(r)) => r
                .clone()
                .unwrap_or_else(|| TransferResult::new("ringing_timeout", Err(transfer_timeout()))),
            Ok(Err(_)) | Err(_) => TransferResult::new("ringing_timeout", Err(transfer_timeout())),
        };
        result.repeat = true;
        return result;
    }
    let Some(script) = script else {
        transferred(emu, &req.room_name, &req.participant_identity, &p.sid);
        return TransferResult::new("unscripted", Ok(()));
    };

    let after = Duration::from_millis(script.after_ms.unwrap_or(DEFAULT_TRANSFER_AFTER_MS));
    let (wait, times_out) = match (script.outcome, script.after_ms) {
        (TransferOutcome::NoAnswer, Some(ms)) => {
            (ringing_timeout.min(Duration::from_millis(ms)), true)
        }
        (TransferOutcome::NoAnswer, None) => (ringing_timeout, true),
        // A target slower than the ringing timeout never gets to answer.
        _ if after > ringing_timeout => (ringing_timeout, true),
        _ => (after, false),
    };
    let result = if !stays_for(emu, &req.room_name, &p.sid, wait).await {
        // The REFER was accepted but the call ended before the target answered: LiveKit's
        // SIP service answers success ("refer canceled: call ended before transfer
        // completed").
        TransferResult::new("caller_left", Ok(()))
    } else if times_out {
        let outcome = if script.outcome == TransferOutcome::NoAnswer {
            "no_answer"
        } else {
            "ringing_timeout"
        };
        TransferResult::new(outcome, Err(transfer_timeout()))
    } else {
        match script.failure_status() {
            None => {
                transferred(emu, &req.room_name, &req.participant_identity, &p.sid);
                TransferResult::new(script.outcome.as_str(), Ok(()))
            }
            Some(code) => TransferResult::new(script.outcome.as_str(), Err(sip_error(code, None))),
        }
    };
    {
        let mut pending = emu.inner.pending_transfers.lock();
        if pending
            .get(&call_id)
            .is_some_and(|t| t.done.same_channel(&rx))
        {
            pending.remove(&call_id);
        }
    }
    let _ = tx.send(Some(result.clone()));
    result
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

/// Where an inbound call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundStatus {
    /// In the room, not answered yet (nobody subscribed to the caller).
    Ringing,
    /// Answered: someone else joined the room.
    Active,
    /// Refused before any room (no dispatch rule, trunk conflict, PIN required).
    Rejected,
    /// The caller left the room.
    Ended,
}

/// An inbound call: the answer to `POST /emulator/v1/inbound` and an entry of
/// `GET /emulator/v1/inbound`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboundCallResult {
    /// `SCL_…` (`sip.callID`).
    pub sip_call_id: String,
    pub from: String,
    pub to: String,
    /// The inbound trunk the call arrived on (none when no trunk matched).
    pub trunk_id: Option<String>,
    /// The dispatch rule that took it.
    pub rule_id: Option<String>,
    /// Whether a rule accepted it (the caller joined a room).
    pub accepted: bool,
    pub status: InboundStatus,
    /// The final SIP answer to the caller: 200 once answered, 486 when no rule matched
    /// or ringing timed out, 503 when the trunks conflict; none while ringing.
    pub sip_status: Option<u16>,
    /// Why it was rejected or ended: `no_dispatch_rule`, `trunk_conflict`, `pin_required`,
    /// `ringing_timeout`, `caller_hangup`, or the caller's disconnect reason.
    pub reason: Option<String>,
    /// Empty when rejected.
    pub room_name: String,
    pub participant_identity: String,
    pub participant_sid: String,
    pub created_at_ms: i64,
    pub answered_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
}

/// What `hangup_inbound` could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HangupError {
    #[error("no inbound call {0}")]
    NotFound(String),
    #[error("inbound call {0} has already ended")]
    AlreadyEnded(String),
}

/// LiveKit's SIP service rings this long when the trunk does not say (livekit/sip
/// `defaultRingingTimeout`).
const DEFAULT_RINGING_TIMEOUT: Duration = Duration::from_secs(180);

/// The call as a dispatch rule places it (protocol `sip/sip.go` `EvaluateDispatchRule`).
struct Placement {
    room_name: String,
    identity: String,
    name: String,
    metadata: String,
    attributes: HashMap<String, String>,
}

fn evaluate(
    trunk: Option<&proto::SipInboundTrunkInfo>,
    rule: &proto::SipDispatchRuleInfo,
    call_id: &str,
    from: &str,
    to: &str,
) -> Placement {
    use proto::sip_dispatch_rule::Rule;
    let mut attributes = rule.attributes.clone();
    attributes.insert("sip.callID".into(), call_id.to_owned());
    attributes.insert(
        "sip.trunkID".into(),
        trunk.map(|t| t.sip_trunk_id.clone()).unwrap_or_default(),
    );
    let (identity, shown) = if rule.hide_phone_number {
        let digest = Sha256::digest(from.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let keep = if from.chars().count() <= 4 { 1 } else { 4 };
        let tail: String = from
            .chars()
            .rev()
            .take(keep)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        (format!("sip_{hex}"), tail)
    } else {
        attributes.insert("sip.phoneNumber".into(), from.to_owned());
        attributes.insert("sip.hostname".into(), "pstn.emulator.invalid".into());
        attributes.insert("sip.trunkPhoneNumber".into(), to.to_owned());
        (format!("sip_{from}"), from.to_owned())
    };
    let with_prefix = |prefix: &str, base: &str| {
        if prefix.is_empty() {
            base.to_owned()
        } else {
            format!("{prefix}_{base}")
        }
    };
    let room_name = match rule.rule.as_ref().and_then(|r| r.rule.as_ref()) {
        Some(Rule::DispatchRuleDirect(r)) => r.room_name.clone(),
        Some(Rule::DispatchRuleIndividual(r)) => {
            let room = with_prefix(&r.room_prefix, &shown);
            if r.no_randomness {
                room
            } else {
                format!("{room}_{}", guid(""))
            }
        }
        Some(Rule::DispatchRuleCallee(r)) => {
            let room = with_prefix(&r.room_prefix, to);
            if r.randomize {
                format!("{room}_{}", guid(""))
            } else {
                room
            }
        }
        None => String::new(),
    };
    attributes.insert("sip.ruleID".into(), rule.sip_dispatch_rule_id.clone());
    Placement {
        room_name,
        identity,
        name: format!("Phone {shown}"),
        metadata: rule.metadata.clone(),
        attributes,
    }
}

fn record_call(emu: &Emulator, call: &InboundCallResult) {
    emu.inner.inbound_calls.lock().push(call.clone());
}

fn update_call(emu: &Emulator, call_id: &str, f: impl FnOnce(&mut InboundCallResult)) {
    if let Some(c) = emu
        .inner
        .inbound_calls
        .lock()
        .iter_mut()
        .rev()
        .find(|c| c.sip_call_id == call_id)
    {
        f(c);
    }
}

/// Places an inbound call. With no inbound trunk and no dispatch rule at all, the
/// request's own trunk, rule and room are used and the call is active at once (quick
/// tests); otherwise the trunk and rule are chosen as livekit/sip chooses them.
pub async fn inbound_call(emu: &Emulator, call: InboundCall) -> InboundCallResult {
    let routed = {
        let sip = emu.inner.sip.lock();
        !(sip.inbound.is_empty() && sip.rules.is_empty())
    };
    let result = if routed {
        routed_call(emu, &call)
    } else {
        direct_call(emu, &call)
    };
    let hangup_after = call
        .hangup_after_ms
        .map(Duration::from_millis)
        .or(emu.inner.config.inbound_hangup_after);
    if let (Some(after), true) = (hangup_after, result.accepted) {
        let emu = emu.clone();
        let call_id = result.sip_call_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = emu.hangup_inbound(&call_id);
        });
    }
    result
}

fn new_result(call: &InboundCall, call_id: &str) -> InboundCallResult {
    InboundCallResult {
        sip_call_id: call_id.to_owned(),
        from: call.from.clone(),
        to: call.to.clone(),
        trunk_id: None,
        rule_id: None,
        accepted: false,
        status: InboundStatus::Rejected,
        sip_status: None,
        reason: None,
        room_name: String::new(),
        participant_identity: String::new(),
        participant_sid: String::new(),
        created_at_ms: now_ms(),
        answered_at_ms: None,
        ended_at_ms: None,
    }
}

/// No SIP set-up at all: the request says which trunk, rule and room (as before).
fn direct_call(emu: &Emulator, call: &InboundCall) -> InboundCallResult {
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
    let mut result = new_result(call, &call_id);
    result.trunk_id = Some(call.trunk_id.clone());
    result.rule_id = Some(call.rule_id.clone());
    result.accepted = true;
    result.status = InboundStatus::Active;
    result.sip_status = Some(200);
    result.room_name = room_name.clone();
    result.participant_identity = identity;
    result.participant_sid = participant.sid.clone();
    result.answered_at_ms = Some(result.created_at_ms);
    record_call(emu, &result);
    emu.join(&room_name, participant);
    result
}

fn routed_call(emu: &Emulator, call: &InboundCall) -> InboundCallResult {
    let call_id = guid("SCL_");
    let mut result = new_result(call, &call_id);
    let chosen = {
        let sip = emu.inner.sip.lock();
        sip.match_trunk(&call.from, &call.to).map(|trunk| {
            let rule = sip.match_rule(trunk.as_ref(), &call.from, &call.to);
            (trunk, rule)
        })
    };
    let (trunk, rule) = match chosen {
        Ok(found) => found,
        Err(_) => {
            // Dispatch evaluation failed: livekit/sip answers 503 "Try again later".
            result.sip_status = Some(503);
            result.reason = Some("trunk_conflict".into());
            result.ended_at_ms = Some(result.created_at_ms);
            record_call(emu, &result);
            return result;
        }
    };
    result.trunk_id = trunk.as_ref().map(|t| t.sip_trunk_id.clone());
    let Some(rule) = rule else {
        // No rule matched: the server answers DROP and livekit/sip rejects the call as an
        // inbound flood (486); nothing joins any room.
        result.sip_status = Some(486);
        result.reason = Some("no_dispatch_rule".into());
        result.ended_at_ms = Some(result.created_at_ms);
        record_call(emu, &result);
        return result;
    };
    result.rule_id = Some(rule.sip_dispatch_rule_id.clone());
    if crate::sip_admin::pin_and_room(&rule).is_some_and(|(_, pin)| !pin.is_empty()) {
        // A PIN prompt needs DTMF from the caller, which the emulator does not play.
        result.sip_status = Some(486);
        result.reason = Some("pin_required".into());
        result.ended_at_ms = Some(result.created_at_ms);
        record_call(emu, &result);
        return result;
    }
    let placement = evaluate(trunk.as_ref(), &rule, &call_id, &call.from, &call.to);
    let mut attributes = placement.attributes;
    attributes.insert(
        "sip.callIDFull".into(),
        format!("{}@emulator.invalid", guid("")),
    );
    attributes.insert("sip.callStatus".into(), "ringing".into());

    // The caller's join token carries the rule's room_config, applied only if this join
    // creates the room (then its agents are dispatched).
    let config = rule.room_config.clone().unwrap_or_default();
    let created = !emu.inner.rooms.lock().contains_key(&placement.room_name);
    emu.upsert_room(&proto::CreateRoomRequest {
        name: placement.room_name.clone(),
        empty_timeout: config.empty_timeout,
        departure_timeout: config.departure_timeout,
        max_participants: config.max_participants,
        metadata: config.metadata.clone(),
        ..Default::default()
    });
    if created {
        for agent in config.agents {
            emu.add_dispatch(
                &placement.room_name,
                agent,
                crate::agents::DispatchSource::Rule,
            );
        }
    }
    let participant = sip_participant(
        placement.identity.clone(),
        placement.name,
        placement.metadata,
        attributes,
    );
    result.accepted = true;
    result.status = InboundStatus::Ringing;
    result.room_name = placement.room_name.clone();
    result.participant_identity = placement.identity.clone();
    result.participant_sid = participant.sid.clone();
    record_call(emu, &result);
    emu.join(&placement.room_name, participant);

    let ringing_timeout = trunk
        .as_ref()
        .and_then(|t| duration_of(&t.ringing_timeout))
        .unwrap_or(DEFAULT_RINGING_TIMEOUT);
    tokio::spawn(ring(
        emu.clone(),
        placement.room_name,
        placement.identity,
        result.participant_sid.clone(),
        call_id,
        ringing_timeout,
    ));
    result
}

/// Rings until someone else is in the room (LiveKit answers once the caller's track is
/// subscribed), the caller is gone, or the trunk's ringing timeout passes: then livekit/sip
/// ends the call (486 to the caller) and the participant leaves with no callStatus change.
async fn ring(
    emu: Emulator,
    room: String,
    identity: String,
    sid: String,
    call_id: String,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let changed = emu.inner.participants_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (caller_here, answered) = {
            let rooms = emu.inner.rooms.lock();
            match rooms.get(&room) {
                None => (false, false),
                Some(r) => (
                    r.participants.iter().any(|p| p.sid == sid),
                    r.participants.iter().any(|p| p.sid != sid),
                ),
            }
        };
        if !caller_here {
            return;
        }
        if answered {
            emu.set_attribute(&room, &sid, "sip.callStatus", "active");
            update_call(&emu, &call_id, |c| {
                if c.status == InboundStatus::Ringing {
                    c.status = InboundStatus::Active;
                    c.sip_status = Some(200);
                    c.answered_at_ms = Some(now_ms());
                }
            });
            return;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(deadline) => {
                update_call(&emu, &call_id, |c| {
                    c.status = InboundStatus::Ended;
                    c.sip_status = Some(486);
                    c.reason = Some("ringing_timeout".into());
                    c.ended_at_ms = Some(now_ms());
                });
                // A dropped call has no disconnect reason of its own; the server turns an
                // unknown leave reason into CLIENT_INITIATED.
                emu.leave(&room, &identity, proto::DisconnectReason::ClientInitiated, Some(&sid));
                return;
            }
        }
    }
}

impl Emulator {
    /// Every inbound call so far, oldest first.
    pub fn inbound_calls(&self) -> Vec<InboundCallResult> {
        self.inner.inbound_calls.lock().clone()
    }

    /// The caller hangs up (a BYE, or CANCEL while ringing): `sip.callStatus` becomes
    /// `hangup` and the participant leaves with CLIENT_INITIATED.
    pub fn hangup_inbound(&self, sip_call_id: &str) -> Result<(), HangupError> {
        let found = self
            .inner
            .inbound_calls
            .lock()
            .iter()
            .rev()
            .find(|c| c.sip_call_id == sip_call_id)
            .cloned();
        let Some(call) = found else {
            return Err(HangupError::NotFound(sip_call_id.to_owned()));
        };
        if !matches!(call.status, InboundStatus::Ringing | InboundStatus::Active) {
            return Err(HangupError::AlreadyEnded(sip_call_id.to_owned()));
        }
        update_call(self, sip_call_id, |c| {
            c.status = InboundStatus::Ended;
            c.reason = Some("caller_hangup".into());
            c.ended_at_ms = Some(now_ms());
        });
        self.set_attribute(
            &call.room_name,
            &call.participant_sid,
            "sip.callStatus",
            "hangup",
        );
        self.leave(
            &call.room_name,
            &call.participant_identity,
            proto::DisconnectReason::ClientInitiated,
            Some(&call.participant_sid),
        );
        Ok(())
    }

    /// A caller left for another reason (removed, room deleted or closed): its call ends.
    pub(crate) fn inbound_caller_left(&self, sip_call_id: &str, reason: proto::DisconnectReason) {
        update_call(self, sip_call_id, |c| {
            if matches!(c.status, InboundStatus::Ringing | InboundStatus::Active) {
                c.status = InboundStatus::Ended;
                c.reason = Some(reason.as_str_name().to_ascii_lowercase());
                c.ended_at_ms = Some(now_ms());
            }
        });
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
