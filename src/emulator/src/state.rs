//! The emulator's state: rooms, participants, dispatches, scripts, faults and records.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use livekit_protocol as proto;
use parking_lot::Mutex;
use serde::Serialize;

use crate::agents::DispatchRecord;
use crate::faults::Faults;
use crate::ids::{guid, now_ms, now_s};
use crate::sip::{CallScript, InboundCallResult, PendingTransfer, TransferScript};
use crate::sip_admin::SipStore;
use crate::webhooks::WebhookSender;
use crate::{Emulator, EmulatorConfig};

/// What became of an API request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOutcome {
    /// Arrived, not finished yet (waiting out latency, or a dial waiting for the answer).
    InFlight,
    /// Carried out and answered: past auth and request validation, so its effect took
    /// place (the answer may still be an error such as `not_found` or a failed dial).
    Executed,
    /// Refused before anything was carried out and answered with an error: auth (401),
    /// grant, bad content type, malformed or invalid request, or an injected error
    /// (`X-Lk-Mock` status failure or `sipStatus`, fault `error_rate`, `pinnedRegions`).
    Rejected,
    /// The connection was dropped without an answer and nothing was carried out
    /// (fault `drop_rate`, `X-Lk-Mock` `failMode: "drop"`, or a `drop_after` fault on a
    /// request that was rejected anyway).
    DroppedBefore,
    /// Carried out, then the connection was dropped without an answer: the effect took
    /// place but the client never learns it (fault `drop_after_rate`, `X-Lk-Mock`
    /// `failMode: "drop_after"`).
    ExecutedThenDropped,
}

impl RequestOutcome {
    /// The snake_case name it is serialized with.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InFlight => "in_flight",
            Self::Executed => "executed",
            Self::Rejected => "rejected",
            Self::DroppedBefore => "dropped_before",
            Self::ExecutedThenDropped => "executed_then_dropped",
        }
    }

    /// Whether the request's effect took place.
    pub fn executed(self) -> bool {
        matches!(self, Self::Executed | Self::ExecutedThenDropped)
    }
}

/// One API request served.
#[derive(Debug, Clone, Serialize)]
pub struct ApiRecord {
    pub seq: u64,
    /// Epoch milliseconds when it arrived.
    pub at_ms: i64,
    pub service: String,
    pub method: String,
    /// The room the request names (filled whenever the request could be decoded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// The participant identity the request names; for CreateSIPParticipant the identity
    /// the participant gets (`sip_<number>` when the request leaves it empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Other key fields (`sip_call_to`, `agent_name`, `sip_trunk_id`; for
    /// TransferSIPParticipant `transfer_to`, `play_dialtone`, `ringing_timeout` in seconds
    /// (`0`: unset), `headers_count`, `transfer_outcome`, and `transfer_repeat` when it
    /// joined a transfer of the same call already ringing).
    pub fields: HashMap<String, String>,
    /// HTTP status of the answer; `0` when none was sent (in flight, or dropped).
    pub status: u16,
    /// Twirp error code when it failed, `ok` when it succeeded, `dropped` when the
    /// connection was dropped without an answer, `in_flight` until it finishes.
    pub result: String,
    /// What became of the request.
    pub outcome: RequestOutcome,
    /// For a dropped answer: what it would have said (`ok` or a Twirp code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_result: Option<String>,
    /// The client hung up before the answer (timeout, crash); the request still ran.
    pub client_gone: bool,
    pub duration_ms: u64,
}

/// One webhook event's delivery to one URL.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookRecord {
    pub id: String,
    pub event: String,
    pub room: String,
    pub url: String,
    pub attempts: u32,
    /// HTTP status of the last attempt (none if the connection failed).
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// `delivered`, `failed`, `dropped` (aged out) or `pending`.
    pub outcome: String,
    /// Whether this delivery was an injected duplicate.
    pub duplicate: bool,
    /// Epoch milliseconds when the event was queued for this URL (when it happened).
    pub queued_ms: i64,
}

#[derive(Default)]
pub struct Records {
    pub requests: Vec<ApiRecord>,
    pub webhooks: Vec<WebhookRecord>,
}

pub struct Room {
    pub info: proto::Room,
    pub participants: Vec<proto::ParticipantInfo>,
    pub dispatches: Vec<proto::AgentDispatch>,
    /// Bumped whenever the room becomes empty; an empty-timeout task only closes the room
    /// if the epoch it saw is still current.
    pub empty_epoch: u64,
    /// Someone joined at some point: once it empties, the room lives `departure_timeout`
    /// (LiveKit: 20 s), not `empty_timeout` (the wait for a first participant).
    pub had_participants: bool,
}

pub struct Inner {
    pub config: EmulatorConfig,
    /// `http://<addr>` of each region's listener, primary first.
    pub region_urls: Mutex<Vec<String>>,
    pub rooms: Mutex<HashMap<String, Room>>,
    /// SIP trunks and dispatch rules.
    pub sip: Mutex<SipStore>,
    /// Every agent dispatch ever created (API or rule), oldest first.
    pub dispatch_log: Mutex<Vec<DispatchRecord>>,
    /// Per agent name: how long its worker takes to join (`None`: it never does).
    pub agent_delays: Mutex<HashMap<String, Option<Duration>>>,
    /// Every simulated inbound call, oldest first.
    pub inbound_calls: Mutex<Vec<InboundCallResult>>,
    /// Signalled whenever a participant joins or leaves a room (ringing callers wait on it).
    pub participants_changed: tokio::sync::Notify,
    pub records: Mutex<Records>,
    pub scripts: Mutex<HashMap<String, CallScript>>,
    /// What each transfer target does, by the exact `transfer_to` string.
    pub transfer_scripts: Mutex<HashMap<String, TransferScript>>,
    /// Transfers whose target is still ringing, by `sip.callID`.
    pub pending_transfers: Mutex<HashMap<String, PendingTransfer>>,
    pub faults: Mutex<Faults>,
    /// Signalled whenever the faults are replaced (paused deliveries wait on it).
    pub faults_changed: tokio::sync::Notify,
    pub webhook_urls: Mutex<Vec<String>>,
    pub webhooks: WebhookSender,
    pub seq: AtomicU64,
}

/// The SIP store at start: the configured outbound trunks, so tests and dev mode can dial
/// through the trunk ids they use.
fn seeded_sip(config: &EmulatorConfig) -> SipStore {
    let mut store = SipStore::default();
    for id in &config.outbound_trunks {
        store.outbound.insert(
            id.clone(),
            proto::SipOutboundTrunkInfo {
                sip_trunk_id: id.clone(),
                name: "seeded by EmulatorConfig".into(),
                address: "sip.emulator.invalid".into(),
                numbers: vec!["+15105550100".into()],
                ..Default::default()
            },
        );
    }
    store
}

/// The configured webhook URLs, each once.
fn configured_urls(config: &EmulatorConfig) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for url in &config.webhook_urls {
        if !urls.contains(url) {
            urls.push(url.clone());
        }
    }
    urls
}

impl Inner {
    pub fn new(config: EmulatorConfig) -> Arc<Self> {
        let urls = configured_urls(&config);
        let sip = seeded_sip(&config);
        Arc::new(Self {
            webhooks: WebhookSender::new(),
            config,
            region_urls: Mutex::new(Vec::new()),
            rooms: Mutex::new(HashMap::new()),
            sip: Mutex::new(sip),
            dispatch_log: Mutex::new(Vec::new()),
            agent_delays: Mutex::new(HashMap::new()),
            inbound_calls: Mutex::new(Vec::new()),
            participants_changed: tokio::sync::Notify::new(),
            records: Mutex::new(Records::default()),
            scripts: Mutex::new(HashMap::new()),
            transfer_scripts: Mutex::new(HashMap::new()),
            pending_transfers: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            faults_changed: tokio::sync::Notify::new(),
            webhook_urls: Mutex::new(urls),
            seq: AtomicU64::new(0),
        })
    }

    pub fn set_region_urls(&self, urls: Vec<String>) {
        *self.region_urls.lock() = urls;
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Back to the state at start: no rooms, records, dial or transfer scripts or faults,
    /// and only the configured webhook URLs (those added at run time are forgotten).
    pub fn reset(&self) {
        self.rooms.lock().clear();
        *self.sip.lock() = seeded_sip(&self.config);
        self.dispatch_log.lock().clear();
        self.agent_delays.lock().clear();
        self.inbound_calls.lock().clear();
        *self.records.lock() = Records::default();
        self.scripts.lock().clear();
        self.transfer_scripts.lock().clear();
        self.pending_transfers.lock().clear();
        *self.webhook_urls.lock() = configured_urls(&self.config);
        *self.faults.lock() = Faults::default();
        self.faults_changed.notify_waiters();
        self.webhooks.reset();
    }

    /// Updates the record with sequence number `seq` (recent records are searched first).
    pub fn update_record(&self, seq: u64, f: impl FnOnce(&mut ApiRecord)) {
        let mut records = self.records.lock();
        if let Some(r) = records.requests.iter_mut().rev().find(|r| r.seq == seq) {
            f(r);
        }
    }

    pub fn record(&self, record: ApiRecord) {
        if self.config.record {
            self.records.lock().requests.push(record);
        }
    }
}

/// A webhook to emit once the state lock is released.
pub struct PendingEvent {
    pub event: &'static str,
    pub room: proto::Room,
    pub participant: Option<proto::ParticipantInfo>,
    pub track: Option<proto::TrackInfo>,
}

fn new_room(
    name: &str,
    empty_timeout: u32,
    departure_timeout: u32,
    max_participants: u32,
    metadata: &str,
) -> proto::Room {
    let ms = now_ms();
    proto::Room {
        sid: guid("RM_"),
        name: name.to_owned(),
        empty_timeout,
        departure_timeout,
        max_participants,
        creation_time: ms / 1000,
        creation_time_ms: ms,
        turn_password: guid(""),
        enabled_codecs: ["audio/opus", "audio/red", "video/VP8", "video/H264"]
            .iter()
            .map(|m| proto::Codec {
                mime: (*m).into(),
                ..Default::default()
            })
            .collect(),
        metadata: metadata.to_owned(),
        ..Default::default()
    }
}

/// Agents are "dependent" participants (livekit `pkg/rtc/room.go` `IsDependent`): they
/// neither keep a room open nor count as someone in it.
pub fn is_agent(p: &proto::ParticipantInfo) -> bool {
    p.kind == proto::participant_info::Kind::Agent as i32
}

/// Whether a room holds anyone but agents.
fn has_independent(participants: &[proto::ParticipantInfo]) -> bool {
    participants.iter().any(|p| !is_agent(p))
}

/// Track events carry a room with only sid and name (livekit-facts §2).
fn slim_room(room: &proto::Room) -> proto::Room {
    proto::Room {
        sid: room.sid.clone(),
        name: room.name.clone(),
        ..Default::default()
    }
}

impl Emulator {
    /// Sends events to every webhook URL, in order per room.
    pub(crate) fn emit(&self, events: Vec<PendingEvent>) {
        for e in events {
            let event = proto::WebhookEvent {
                event: e.event.to_owned(),
                room: Some(e.room.clone()),
                participant: e.participant,
                track: e.track,
                id: guid("EV_"),
                created_at: now_s(),
                ..Default::default()
            };
            self.inner.webhooks.enqueue(self, &e.room.name, event);
        }
    }

    /// CreateRoom semantics: returns the existing room (updating non-zero fields) or a new
    /// one, with `room_started` for a new one.
    pub(crate) fn upsert_room(&self, req: &proto::CreateRoomRequest) -> proto::Room {
        let (room, events) = {
            let mut rooms = self.inner.rooms.lock();
            if let Some(existing) = rooms.get_mut(&req.name) {
                if req.empty_timeout > 0 {
                    existing.info.empty_timeout = req.empty_timeout;
                }
                if req.departure_timeout > 0 {
                    existing.info.departure_timeout = req.departure_timeout;
                }
                if req.max_participants > 0 {
                    existing.info.max_participants = req.max_participants;
                }
                if !req.metadata.is_empty() {
                    existing.info.metadata = req.metadata.clone();
                }
                (existing.info.clone(), vec![])
            } else {
                let empty_timeout = if req.empty_timeout > 0 {
                    req.empty_timeout
                } else {
                    self.inner.config.default_empty_timeout
                };
                let departure = if req.departure_timeout > 0 {
                    req.departure_timeout
                } else {
                    20
                };
                let info = new_room(
                    &req.name,
                    empty_timeout,
                    departure,
                    req.max_participants,
                    &req.metadata,
                );
                rooms.insert(
                    req.name.clone(),
                    Room {
                        info: info.clone(),
                        participants: vec![],
                        dispatches: vec![],
                        empty_epoch: 0,
                        had_participants: false,
                    },
                );
                let event = PendingEvent {
                    event: "room_started",
                    room: info.clone(),
                    participant: None,
                    track: None,
                };
                (info, vec![event])
            }
        };
        let created = !events.is_empty();
        self.emit(events);
        if created {
            self.schedule_empty_close(&room.name);
        }
        room
    }

    pub(crate) fn ensure_room(&self, name: &str) -> proto::Room {
        self.upsert_room(&proto::CreateRoomRequest {
            name: name.to_owned(),
            ..Default::default()
        })
    }

    /// Closes `name` after its empty timeout unless someone joined meanwhile.
    pub(crate) fn schedule_empty_close(&self, name: &str) {
        let (epoch, timeout) = {
            let mut rooms = self.inner.rooms.lock();
            let Some(room) = rooms.get_mut(name) else {
                return;
            };
            if has_independent(&room.participants) {
                return;
            }
            room.empty_epoch += 1;
            let timeout = if room.had_participants {
                room.info.departure_timeout
            } else {
                room.info.empty_timeout
            };
            (room.empty_epoch, timeout)
        };
        let emu = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(timeout))).await;
            let still_empty = emu
                .inner
                .rooms
                .lock()
                .get(&name)
                .is_some_and(|r| !has_independent(&r.participants) && r.empty_epoch == epoch);
            if still_empty {
                emu.close_room(&name, proto::DisconnectReason::RoomClosed);
            }
        });
    }

    /// Removes a room, disconnecting everyone with `reason`, then `room_finished`.
    pub(crate) fn close_room(&self, name: &str, reason: proto::DisconnectReason) -> bool {
        let Some(room) = self.inner.rooms.lock().remove(name) else {
            return false;
        };
        let mut events = Vec::new();
        for mut p in room.participants {
            self.participant_gone(&p, reason);
            p.state = proto::participant_info::State::Disconnected as i32;
            p.disconnect_reason = reason as i32;
            events.push(PendingEvent {
                event: "participant_left",
                room: room.info.clone(),
                participant: Some(p),
                track: None,
            });
        }
        let mut info = room.info;
        info.num_participants = 0;
        events.push(PendingEvent {
            event: "room_finished",
            room: info,
            participant: None,
            track: None,
        });
        self.emit(events);
        self.inner.participants_changed.notify_waiters();
        true
    }

    /// Bookkeeping when a participant leaves: its dispatch record (agents) or its inbound
    /// call record (SIP callers).
    fn participant_gone(&self, p: &proto::ParticipantInfo, reason: proto::DisconnectReason) {
        if is_agent(p) {
            self.agent_left(&p.identity);
        } else if let Some(call_id) = p.attributes.get("sip.callID") {
            self.inbound_caller_left(call_id, reason);
        }
    }

    /// Adds a participant; an existing one with the same identity is replaced
    /// (DUPLICATE_IDENTITY), as LiveKit does.
    pub(crate) fn join(&self, room_name: &str, participant: proto::ParticipantInfo) {
        let mut events = Vec::new();
        {
            let mut rooms = self.inner.rooms.lock();
            let Some(room) = rooms.get_mut(room_name) else {
                return;
            };
            if let Some(pos) = room
                .participants
                .iter()
                .position(|p| p.identity == participant.identity)
            {
                let mut old = room.participants.remove(pos);
                old.state = proto::participant_info::State::Disconnected as i32;
                old.disconnect_reason = proto::DisconnectReason::DuplicateIdentity as i32;
                events.push(PendingEvent {
                    event: "participant_left",
                    room: room.info.clone(),
                    participant: Some(old),
                    track: None,
                });
            }
            room.participants.push(participant.clone());
            room.had_participants = true;
            room.info.num_participants = room.participants.len() as u32;
            room.info.num_publishers =
                room.participants.iter().filter(|p| p.is_publisher).count() as u32;
            let info = room.info.clone();
            events.push(PendingEvent {
                event: "participant_joined",
                room: info.clone(),
                participant: Some(participant.clone()),
                track: None,
            });
            if let Some(track) = participant.tracks.first() {
                let slim = proto::ParticipantInfo {
                    sid: participant.sid.clone(),
                    identity: participant.identity.clone(),
                    ..Default::default()
                };
                events.push(PendingEvent {
                    event: "track_published",
                    room: slim_room(&info),
                    participant: Some(slim),
                    track: Some(track.clone()),
                });
            }
        }
        self.emit(events);
        self.inner.participants_changed.notify_waiters();
    }

    /// Removes a participant with `reason`: `participant_left` if it had connected,
    /// `participant_connection_aborted` if it never did. Returns it if it was there.
    pub(crate) fn leave(
        &self,
        room_name: &str,
        identity: &str,
        reason: proto::DisconnectReason,
        sid: Option<&str>,
    ) -> Option<proto::ParticipantInfo> {
        let left = {
            let mut rooms = self.inner.rooms.lock();
            let room = rooms.get_mut(room_name)?;
            let pos = room
                .participants
                .iter()
                .position(|p| p.identity == identity && sid.is_none_or(|s| s == p.sid))?;
            let mut p = room.participants.remove(pos);
            room.info.num_participants = room.participants.len() as u32;
            room.info.num_publishers =
                room.participants.iter().filter(|p| p.is_publisher).count() as u32;
            let connected = p.state == proto::participant_info::State::Active as i32;
            p.state = proto::participant_info::State::Disconnected as i32;
            p.disconnect_reason = reason as i32;
            let event = if connected {
                "participant_left"
            } else {
                "participant_connection_aborted"
            };
            (
                PendingEvent {
                    event,
                    room: room.info.clone(),
                    participant: Some(p.clone()),
                    track: None,
                },
                p,
            )
        };
        let (event, p) = left;
        self.emit(vec![event]);
        self.participant_gone(&p, reason);
        self.inner.participants_changed.notify_waiters();
        if !is_agent(&p) {
            // The agents' sessions end with the last participant they serve (the agents SDK
            // closes on the linked participant's disconnect): they leave right after.
            let agents: Vec<String> = self
                .inner
                .rooms
                .lock()
                .get(room_name)
                .filter(|r| !has_independent(&r.participants))
                .map(|r| r.participants.iter().map(|a| a.identity.clone()).collect())
                .unwrap_or_default();
            for agent in agents {
                self.leave(
                    room_name,
                    &agent,
                    proto::DisconnectReason::ClientInitiated,
                    None,
                );
            }
            self.schedule_empty_close(room_name);
        }
        Some(p)
    }

    /// Updates one attribute of a participant (attribute changes produce no webhook).
    pub(crate) fn set_attribute(&self, room_name: &str, sid: &str, key: &str, value: &str) -> bool {
        let mut rooms = self.inner.rooms.lock();
        let Some(p) = rooms
            .get_mut(room_name)
            .and_then(|r| r.participants.iter_mut().find(|p| p.sid == sid))
        else {
            return false;
        };
        p.attributes.insert(key.to_owned(), value.to_owned());
        p.version += 1;
        true
    }

    pub(crate) fn participant(
        &self,
        room_name: &str,
        identity: &str,
    ) -> Option<proto::ParticipantInfo> {
        self.inner
            .rooms
            .lock()
            .get(room_name)?
            .participants
            .iter()
            .find(|p| p.identity == identity)
            .cloned()
    }
}
