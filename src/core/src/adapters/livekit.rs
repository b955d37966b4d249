//! LiveKit adapter over the official `livekit-api` client. Region failover is disabled: the
//! SDK would replay CreateSIPParticipant and CreateDispatch after a 5xx or timeout and dial
//! twice; retries belong to the worker, which reconciles first.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use livekit_api::services::agent_dispatch::AgentDispatchClient;
use livekit_api::services::room::{CreateRoomOptions, RoomClient};
use livekit_api::services::sip::{
    CreateSIPParticipantOptions, SIPClient, TransferSIPParticipantOptions,
};
use livekit_api::services::{ServerError, ServiceError};
use livekit_protocol as proto;

use crate::domain::sip_outcome::ApiFailure;
use crate::ports::livekit::{DialRequest, LiveKit, LiveKitError, TransferRequest};
use crate::telemetry::metrics as m;

pub struct LiveKitApi {
    room: RoomClient,
    dispatch: AgentDispatchClient,
    sip: SIPClient,
    timeout: Duration,
}

impl std::fmt::Debug for LiveKitApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKitApi")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl LiveKitApi {
    pub fn new(url: &str, api_key: &str, api_secret: &str, timeout: Duration) -> Self {
        Self {
            room: RoomClient::with_api_key(url, api_key, api_secret)
                .with_failover(false)
                .with_request_timeout(timeout),
            dispatch: AgentDispatchClient::with_api_key(url, api_key, api_secret)
                .with_failover(false)
                .with_request_timeout(timeout),
            sip: SIPClient::with_api_key(url, api_key, api_secret)
                .with_failover(false)
                .with_request_timeout(timeout),
            timeout,
        }
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Reduces an SDK error to what classification needs.
pub fn api_failure(err: &ServiceError) -> ApiFailure {
    match err {
        ServiceError::Twirp(ServerError::Twirp(code)) => ApiFailure::Twirp {
            code: code.code.clone(),
            msg: code.msg.clone(),
            sip_status_code: code
                .meta
                .get("sip_status_code")
                .and_then(|v| v.parse().ok()),
            sip_status: code.meta.get("sip_status").cloned(),
        },
        // No connection, so nothing was sent (a connect timeout included).
        ServiceError::Twirp(ServerError::Request(e)) if e.is_connect() => ApiFailure::Transport,
        ServiceError::Twirp(ServerError::Request(e)) if e.is_timeout() => ApiFailure::Timeout,
        ServiceError::Twirp(ServerError::Request(e)) if e.is_decode() => ApiFailure::Protocol,
        // Sent, then the connection broke (reset, EOF, a cut-off body).
        ServiceError::Twirp(ServerError::Request(_)) => ApiFailure::Interrupted,
        ServiceError::Twirp(ServerError::Prost(_) | ServerError::Url(_)) => ApiFailure::Protocol,
        ServiceError::Env(_) | ServiceError::AccessToken(_) => ApiFailure::Protocol,
    }
}

async fn observe<T>(
    method: &'static str,
    fut: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, LiveKitError> {
    let started = Instant::now();
    let result = fut.await;
    let elapsed = started.elapsed().as_secs_f64();
    let result = result.map_err(|e| LiveKitError {
        method,
        failure: api_failure(&e),
    });
    let code = match &result {
        Ok(_) => "ok",
        Err(e) => e.failure.code_label(),
    };
    metrics::counter!(m::LIVEKIT_REQUESTS, "method" => method, "code" => code).increment(1);
    metrics::histogram!(m::LIVEKIT_REQUEST_SECONDS, "method" => method).record(elapsed);
    result
}

#[async_trait]
impl LiveKit for LiveKitApi {
    async fn create_room(
        &self,
        name: &str,
        metadata: &str,
        empty_timeout_s: u32,
    ) -> Result<proto::Room, LiveKitError> {
        let options = CreateRoomOptions {
            empty_timeout: empty_timeout_s,
            metadata: metadata.to_owned(),
            ..Default::default()
        };
        observe("CreateRoom", self.room.create_room(name, options)).await
    }

    async fn delete_room(&self, name: &str) -> Result<(), LiveKitError> {
        observe("DeleteRoom", self.room.delete_room(name)).await
    }

    async fn list_participants(
        &self,
        room: &str,
    ) -> Result<Vec<proto::ParticipantInfo>, LiveKitError> {
        observe("ListParticipants", self.room.list_participants(room)).await
    }

    async fn get_participant(
        &self,
        room: &str,
        identity: &str,
    ) -> Result<Option<proto::ParticipantInfo>, LiveKitError> {
        match observe("GetParticipant", self.room.get_participant(room, identity)).await {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn remove_participant(&self, room: &str, identity: &str) -> Result<(), LiveKitError> {
        observe(
            "RemoveParticipant",
            self.room.remove_participant(room, identity),
        )
        .await
    }

    async fn create_dispatch(
        &self,
        room: &str,
        agent_name: &str,
        metadata: &str,
    ) -> Result<proto::AgentDispatch, LiveKitError> {
        let request = proto::CreateAgentDispatchRequest {
            agent_name: agent_name.to_owned(),
            room: room.to_owned(),
            metadata: metadata.to_owned(),
            ..Default::default()
        };
        observe("CreateDispatch", self.dispatch.create_dispatch(request)).await
    }

    async fn list_dispatch(&self, room: &str) -> Result<Vec<proto::AgentDispatch>, LiveKitError> {
        observe("ListDispatch", self.dispatch.list_dispatch(room)).await
    }

    async fn delete_dispatch(&self, room: &str, dispatch_id: &str) -> Result<(), LiveKitError> {
        observe("DeleteDispatch", async {
            self.dispatch
                .delete_dispatch(dispatch_id, room)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn create_sip_participant(
        &self,
        request: DialRequest,
    ) -> Result<proto::SipParticipantInfo, LiveKitError> {
        let options = CreateSIPParticipantOptions {
            participant_identity: request.participant_identity,
            participant_name: request.participant_name,
            participant_metadata: request.participant_metadata,
            participant_attributes: Some(request.participant_attributes),
            sip_number: request.from_number,
            ringing_timeout: request.ringing_timeout,
            max_call_duration: request.max_call_duration,
            wait_until_answered: Some(request.wait_until_answered),
            ..Default::default()
        };
        observe(
            "CreateSIPParticipant",
            self.sip.create_sip_participant(
                request.trunk_id,
                request.call_to,
                request.room_name,
                options,
                None,
            ),
        )
        .await
    }

    async fn transfer_sip_participant(&self, request: TransferRequest) -> Result<(), LiveKitError> {
        let options = TransferSIPParticipantOptions {
            play_dialtone: Some(request.play_dialtone),
            ringing_timeout: request.ringing_timeout,
            headers: (!request.headers.is_empty()).then_some(request.headers),
            // The crate raises the request timeout above the ringing time itself.
            timeout: None,
        };
        observe(
            "TransferSIPParticipant",
            self.sip.transfer_sip_participant(
                request.room_name,
                request.participant_identity,
                request.to,
                options,
            ),
        )
        .await
    }
}
