//! The LiveKit port: the server API methods the fleet uses, with failures classified.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use livekit_protocol as proto;

use crate::domain::sip_outcome::{ApiFailure, FailureKind};
use crate::ErrorClass;

/// A failed LiveKit call: which method, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("LiveKit {method} failed: {failure:?}")]
pub struct LiveKitError {
    pub method: &'static str,
    pub failure: ApiFailure,
}

impl LiveKitError {
    pub fn kind(&self) -> FailureKind {
        self.failure.classify()
    }

    pub fn class(&self) -> ErrorClass {
        match self.kind() {
            FailureKind::Retryable | FailureKind::BackPressure => ErrorClass::Retryable,
            FailureKind::CallOutcome(_) | FailureKind::Permanent => ErrorClass::Permanent,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(&self.failure, ApiFailure::Twirp { code, sip_status_code: None, .. } if code == "not_found")
    }
}

/// What CreateSIPParticipant needs.
#[derive(Debug, Clone, Default)]
pub struct DialRequest {
    pub trunk_id: String,
    pub call_to: String,
    pub from_number: Option<String>,
    pub room_name: String,
    pub participant_identity: String,
    pub participant_name: Option<String>,
    pub participant_metadata: Option<String>,
    pub participant_attributes: HashMap<String, String>,
    pub ringing_timeout: Option<Duration>,
    pub max_call_duration: Option<Duration>,
    pub wait_until_answered: bool,
}

/// What TransferSIPParticipant needs: a cold transfer (SIP REFER) of the caller to `to`.
#[derive(Debug, Clone, Default)]
pub struct TransferRequest {
    pub room_name: String,
    pub participant_identity: String,
    /// `tel:+E164`, `sip:…` or `sips:…`.
    pub to: String,
    pub play_dialtone: bool,
    /// How long the target may ring (LiveKit's default 30 s when `None`).
    pub ringing_timeout: Option<Duration>,
    /// SIP headers added to the REFER.
    pub headers: HashMap<String, String>,
}

#[async_trait]
pub trait LiveKit: Send + Sync + 'static {
    /// Upsert: creating an existing room returns it unchanged.
    async fn create_room(
        &self,
        name: &str,
        metadata: &str,
        empty_timeout_s: u32,
    ) -> Result<proto::Room, LiveKitError>;
    async fn delete_room(&self, name: &str) -> Result<(), LiveKitError>;
    async fn list_participants(
        &self,
        room: &str,
    ) -> Result<Vec<proto::ParticipantInfo>, LiveKitError>;
    /// `Ok(None)` when the participant (or room) does not exist.
    async fn get_participant(
        &self,
        room: &str,
        identity: &str,
    ) -> Result<Option<proto::ParticipantInfo>, LiveKitError>;
    async fn remove_participant(&self, room: &str, identity: &str) -> Result<(), LiveKitError>;
    /// Not idempotent: every call launches another agent.
    async fn create_dispatch(
        &self,
        room: &str,
        agent_name: &str,
        metadata: &str,
    ) -> Result<proto::AgentDispatch, LiveKitError>;
    async fn list_dispatch(&self, room: &str) -> Result<Vec<proto::AgentDispatch>, LiveKitError>;
    async fn delete_dispatch(&self, room: &str, dispatch_id: &str) -> Result<(), LiveKitError>;
    /// Not idempotent: every call dials.
    async fn create_sip_participant(
        &self,
        request: DialRequest,
    ) -> Result<proto::SipParticipantInfo, LiveKitError>;
    /// Blocks until the target answered (Ok) or the transfer failed (a Twirp error with
    /// the SIP status: 603 declined, 486 busy, 408 ringing timeout…). Not idempotent.
    async fn transfer_sip_participant(&self, request: TransferRequest) -> Result<(), LiveKitError>;
}
