//! Agent dispatches and the workers that answer them. Every dispatch (CreateDispatch or a
//! dispatch rule's `room_config.agents`) is recorded; a simulated worker joins the room as
//! an `AGENT` participant after a per-agent-name delay, or never ("no worker available").
//!
//! Facts (livekit `pkg/agent/worker.go`, protocol `agent/token.go`, `pkg/rtc/room.go`): the
//! job id is `AJ_…`; the server adds the `lk.agent_name` attribute and gives the agent
//! kind AGENT; the agents SDK joins as `agent-<job id>` and publishes its voice as the
//! `roomio_audio` microphone track; agents are "dependent" participants, so a room
//! holding only agents counts as empty and closes on its timeout, disconnecting them.

use std::collections::HashMap;
use std::time::Duration;

use livekit_protocol as proto;
use serde::Serialize;

use crate::ids::{guid, now_ms};
use crate::Emulator;

/// Where a dispatch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchSource {
    /// `AgentDispatchService.CreateDispatch`.
    Api,
    /// A dispatch rule's `room_config.agents`, when the inbound call created the room.
    Rule,
}

/// What the dispatch's job has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its worker's join delay.
    Pending,
    /// No worker for this agent name will take it (join delay "never").
    NoWorker,
    /// The agent is in the room.
    Joined,
    /// The agent left the room (or was disconnected when it closed).
    Left,
    /// The room closed before the agent joined: the job ended with it.
    RoomGone,
}

/// One dispatch, as `GET /emulator/v1/dispatches` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DispatchRecord {
    /// `AD_…`
    pub id: String,
    pub room: String,
    pub agent_name: String,
    pub metadata: String,
    pub source: DispatchSource,
    /// Epoch milliseconds.
    pub created_at_ms: i64,
    /// `AJ_…`
    pub job_id: String,
    /// `agent-<job id>`, the identity the agent joins with.
    pub agent_identity: String,
    pub job_state: JobState,
    pub joined_at_ms: Option<i64>,
    pub left_at_ms: Option<i64>,
}

/// The agent's participant, as the server builds it from the worker's answer.
fn agent_participant(identity: &str, agent_name: &str) -> proto::ParticipantInfo {
    let ms = now_ms();
    proto::ParticipantInfo {
        sid: guid("PA_"),
        identity: identity.to_owned(),
        state: proto::participant_info::State::Active as i32,
        tracks: vec![proto::TrackInfo {
            sid: guid("TR_"),
            name: "roomio_audio".into(),
            r#type: proto::TrackType::Audio as i32,
            source: proto::TrackSource::Microphone as i32,
            mime_type: "audio/opus".into(),
            ..Default::default()
        }],
        joined_at: ms / 1000,
        joined_at_ms: ms,
        version: 1,
        permission: Some(proto::ParticipantPermission {
            can_subscribe: true,
            can_publish: true,
            can_publish_data: true,
            can_update_metadata: true,
            ..Default::default()
        }),
        is_publisher: true,
        kind: proto::participant_info::Kind::Agent as i32,
        attributes: HashMap::from([("lk.agent_name".to_owned(), agent_name.to_owned())]),
        ..Default::default()
    }
}

impl Emulator {
    /// How long `agent_name`'s worker takes to join (`None`: it never does).
    pub fn agent_join_after(&self, agent_name: &str) -> Option<Duration> {
        self.inner
            .agent_delays
            .lock()
            .get(agent_name)
            .copied()
            .unwrap_or(self.inner.config.agent_join_after)
    }

    /// Sets how long `agent_name`'s worker takes to join a dispatched room (`None`: no
    /// worker ever takes its jobs). Applies to dispatches created afterwards.
    pub fn set_agent_join_after(&self, agent_name: &str, after: Option<Duration>) {
        self.inner
            .agent_delays
            .lock()
            .insert(agent_name.to_owned(), after);
    }

    /// Forgets a per-agent setting (back to `EmulatorConfig::agent_join_after`).
    pub fn clear_agent_join_after(&self, agent_name: &str) {
        self.inner.agent_delays.lock().remove(agent_name);
    }

    /// The per-agent join delays set at run time.
    pub fn agent_settings(&self) -> HashMap<String, Option<Duration>> {
        self.inner.agent_delays.lock().clone()
    }

    /// Every dispatch ever created (API or rule), oldest first.
    pub fn dispatches(&self) -> Vec<DispatchRecord> {
        self.inner.dispatch_log.lock().clone()
    }

    /// Dispatches into `room`, oldest first.
    pub fn dispatches_in(&self, room: &str) -> Vec<DispatchRecord> {
        self.inner
            .dispatch_log
            .lock()
            .iter()
            .filter(|d| d.room == room)
            .cloned()
            .collect()
    }

    /// Adds a dispatch to an existing room, records it and starts its job. `None` if the
    /// room does not exist.
    pub(crate) fn add_dispatch(
        &self,
        room_name: &str,
        dispatch: proto::RoomAgentDispatch,
        source: DispatchSource,
    ) -> Option<proto::AgentDispatch> {
        let job_id = guid("AJ_");
        let identity = format!("agent-{job_id}");
        let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let delay = self.agent_join_after(&dispatch.agent_name);
        let record = DispatchRecord {
            id: guid("AD_"),
            room: room_name.to_owned(),
            agent_name: dispatch.agent_name.clone(),
            metadata: dispatch.metadata.clone(),
            source,
            created_at_ms: now_ms(),
            job_id: job_id.clone(),
            agent_identity: identity.clone(),
            job_state: if delay.is_some() {
                JobState::Pending
            } else {
                JobState::NoWorker
            },
            joined_at_ms: None,
            left_at_ms: None,
        };
        let info = proto::AgentDispatch {
            id: record.id.clone(),
            agent_name: dispatch.agent_name.clone(),
            room: room_name.to_owned(),
            metadata: dispatch.metadata.clone(),
            state: Some(proto::AgentDispatchState {
                jobs: vec![],
                created_at: now_ns,
                deleted_at: 0,
            }),
            restart_policy: dispatch.restart_policy,
            deployment: dispatch.deployment.clone(),
            attributes: dispatch.attributes.clone(),
        };
        {
            let mut rooms = self.inner.rooms.lock();
            let room = rooms.get_mut(room_name)?;
            room.dispatches.push(info.clone());
            // Recorded under the rooms lock, so the log and the rooms agree.
            self.inner.dispatch_log.lock().push(record.clone());
        }
        if let Some(delay) = delay {
            let emu = self.clone();
            let room = room_name.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                emu.agent_joins(&room, &record, &identity, &job_id);
            });
        }
        Some(info)
    }

    fn set_job_state(&self, dispatch_id: &str, f: impl FnOnce(&mut DispatchRecord)) {
        if let Some(d) = self
            .inner
            .dispatch_log
            .lock()
            .iter_mut()
            .find(|d| d.id == dispatch_id)
        {
            f(d);
        }
    }

    /// The worker's agent joins, unless the room closed meanwhile (its jobs end with it).
    fn agent_joins(&self, room_name: &str, record: &DispatchRecord, identity: &str, job_id: &str) {
        let participant = agent_participant(identity, &record.agent_name);
        let joined = {
            let mut rooms = self.inner.rooms.lock();
            match rooms.get_mut(room_name) {
                None => false,
                Some(room) => {
                    // The dispatch's job, as ListDispatch shows it.
                    if let Some(d) = room.dispatches.iter_mut().find(|d| d.id == record.id) {
                        if let Some(state) = d.state.as_mut() {
                            state.jobs.push(proto::Job {
                                id: job_id.to_owned(),
                                dispatch_id: record.id.clone(),
                                r#type: proto::JobType::JtRoom as i32,
                                room: Some(room.info.clone()),
                                metadata: record.metadata.clone(),
                                agent_name: record.agent_name.clone(),
                                state: Some(proto::JobState {
                                    status: proto::JobStatus::JsRunning as i32,
                                    started_at: chrono::Utc::now()
                                        .timestamp_nanos_opt()
                                        .unwrap_or_default(),
                                    participant_identity: identity.to_owned(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            });
                        }
                    }
                    true
                }
            }
        };
        if !joined {
            self.set_job_state(&record.id, |d| d.job_state = JobState::RoomGone);
            return;
        }
        self.set_job_state(&record.id, |d| {
            d.job_state = JobState::Joined;
            d.joined_at_ms = Some(now_ms());
        });
        self.join(room_name, participant);
    }

    /// Notes that an agent participant left (for the dispatch record).
    pub(crate) fn agent_left(&self, identity: &str) {
        let mut log = self.inner.dispatch_log.lock();
        if let Some(d) = log.iter_mut().find(|d| d.agent_identity == identity) {
            d.job_state = JobState::Left;
            d.left_at_ms = Some(now_ms());
        }
    }
}
