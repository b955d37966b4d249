//! What the emulator's test files share: starting one, and a token with every grant.

use livekit_api::access_token::{AccessToken, SIPGrants, VideoGrants};
use livekit_emulator::{Emulator, EmulatorConfig, RunningEmulator};

pub async fn start_with(config: EmulatorConfig) -> RunningEmulator {
    Emulator::start(config, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("emulator starts")
}

/// A token with every grant the Twirp methods check, room-scoped grants for `room`
/// (LiveKit's roomAdmin must name the request's room).
pub fn admin_token_for(room: &str) -> String {
    AccessToken::with_api_key("devkey", "secret")
        .with_grants(VideoGrants {
            room_create: true,
            room_list: true,
            room_admin: true,
            room: room.to_owned(),
            ..Default::default()
        })
        .with_sip_grants(SIPGrants {
            admin: true,
            call: true,
        })
        .to_jwt()
        .expect("jwt")
}
