//! A Twirp client for LiveKit's SIP admin API (trunks and dispatch rules), with
//! `livekit-protocol`'s prost types on the wire.
//!
//! Why not `livekit-api`'s `SIPClient`: 0.10 writes a rule's `allowed_numbers` option into
//! `inbound_numbers` (the callers), has no way to set `numbers` (the DID), no Get*Trunk,
//! ignores list filters, and keeps its Twirp client private. So the requests are sent here
//! as the SDKs send them: `POST {url}/twirp/livekit.SIP/<Method>`, a protobuf body and a
//! `sip.admin` bearer token. No request-id header: no livekit-server code reads one for
//! these methods, and none of them is retried here.
//!
//! Failures are the fleet's [`LiveKitError`], classified like every other LiveKit call:
//! never sent (`Transport`), maybe carried out (`Timeout`, `Interrupted`), LiveKit's own
//! answer (`Twirp`) or an answer that makes no sense (`Protocol`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use livekit_api::access_token::{AccessToken, SIPGrants};
use livekit_protocol as proto;
use proto::update_sip_dispatch_rule_request::Action as RuleAction;
use proto::update_sip_inbound_trunk_request::Action as InboundAction;
use proto::update_sip_outbound_trunk_request::Action as OutboundAction;
use secrecy::{ExposeSecret, SecretString};

use crate::domain::sip_outcome::ApiFailure;
use crate::ports::livekit::LiveKitError;
use crate::telemetry::metrics as m;

/// How long each request's token is valid: one request, with room for clock skew.
const TOKEN_TTL: Duration = Duration::from_secs(600);

/// LiveKit's SIP admin API: trunks and dispatch rules.
pub struct LiveKitSip {
    http: reqwest::Client,
    base: String,
    api_key: String,
    api_secret: SecretString,
}

impl std::fmt::Debug for LiveKitSip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKitSip")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// The HTTP base of a LiveKit URL: `ws://` and `wss://` become `http://` and `https://`
/// (as the SDKs do), a trailing `/` is dropped.
pub fn http_base(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else {
        url.to_owned()
    }
}

impl LiveKitSip {
    /// A client for the LiveKit at `url` (http(s) or ws(s)), each request bounded by
    /// `timeout`. Fails only if the HTTP client cannot be built (TLS set-up).
    pub fn new(
        url: &str,
        api_key: &str,
        api_secret: &str,
        timeout: Duration,
    ) -> Result<Self, LiveKitError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| {
                tracing::error!(error = %e, "cannot build the HTTP client for LiveKit");
                LiveKitError {
                    method: "SIP",
                    failure: ApiFailure::Transport,
                }
            })?;
        Ok(Self {
            http,
            base: http_base(url),
            api_key: api_key.to_owned(),
            api_secret: SecretString::from(api_secret.to_owned()),
        })
    }

    /// The HTTP base requests go to (`https://host`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn token(&self) -> Result<String, ApiFailure> {
        AccessToken::with_api_key(&self.api_key, self.api_secret.expose_secret())
            .with_ttl(TOKEN_TTL)
            .with_sip_grants(SIPGrants {
                admin: true,
                call: false,
            })
            .to_jwt()
            .map_err(|_| ApiFailure::Protocol)
    }

    async fn call<Req, Resp>(
        &self,
        method: &'static str,
        request: &Req,
    ) -> Result<Resp, LiveKitError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let started = Instant::now();
        let result = self.send(method, request).await;
        let code = match &result {
            Ok(_) => "ok",
            Err(f) => f.code_label(),
        };
        metrics::counter!(m::LIVEKIT_REQUESTS, "method" => method, "code" => code).increment(1);
        metrics::histogram!(m::LIVEKIT_REQUEST_SECONDS, "method" => method)
            .record(started.elapsed().as_secs_f64());
        result.map_err(|failure| LiveKitError { method, failure })
    }

    async fn send<Req, Resp>(&self, method: &str, request: &Req) -> Result<Resp, ApiFailure>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let token = self.token()?;
        let response = self
            .http
            .post(format!("{}/twirp/livekit.SIP/{method}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/protobuf")
            .header(reqwest::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|e| transport_failure(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| transport_failure(&e))?;
        if status.is_success() {
            return Resp::decode(body.as_ref()).map_err(|_| ApiFailure::Protocol);
        }
        Err(error_answer(status.as_u16(), &body))
    }

    pub async fn create_inbound_trunk(
        &self,
        trunk: proto::SipInboundTrunkInfo,
    ) -> Result<proto::SipInboundTrunkInfo, LiveKitError> {
        let request = proto::CreateSipInboundTrunkRequest { trunk: Some(trunk) };
        self.call("CreateSIPInboundTrunk", &request).await
    }

    /// Changes the fields `update` names (lists through `ListUpdate`).
    pub async fn update_inbound_trunk(
        &self,
        id: &str,
        update: proto::SipInboundTrunkUpdate,
    ) -> Result<proto::SipInboundTrunkInfo, LiveKitError> {
        let request = proto::UpdateSipInboundTrunkRequest {
            sip_trunk_id: id.to_owned(),
            action: Some(InboundAction::Update(update)),
        };
        self.call("UpdateSIPInboundTrunk", &request).await
    }

    /// Replaces the whole trunk (the only way to change ringing timeout, max call
    /// duration, krisp, headers).
    pub async fn replace_inbound_trunk(
        &self,
        id: &str,
        trunk: proto::SipInboundTrunkInfo,
    ) -> Result<proto::SipInboundTrunkInfo, LiveKitError> {
        let request = proto::UpdateSipInboundTrunkRequest {
            sip_trunk_id: id.to_owned(),
            action: Some(InboundAction::Replace(trunk)),
        };
        self.call("UpdateSIPInboundTrunk", &request).await
    }

    /// A missing trunk is a `not_found` error ([`LiveKitError::is_not_found`]).
    pub async fn get_inbound_trunk(
        &self,
        id: &str,
    ) -> Result<proto::SipInboundTrunkInfo, LiveKitError> {
        let request = proto::GetSipInboundTrunkRequest {
            sip_trunk_id: id.to_owned(),
        };
        let response: proto::GetSipInboundTrunkResponse =
            self.call("GetSIPInboundTrunk", &request).await?;
        response.trunk.ok_or(LiveKitError {
            method: "GetSIPInboundTrunk",
            failure: ApiFailure::Protocol,
        })
    }

    /// Lists inbound trunks; the filters are LiveKit's (`trunk_ids`, `numbers` including
    /// wildcard trunks). Servers that ignore them return more, never fewer.
    pub async fn list_inbound_trunks(
        &self,
        request: proto::ListSipInboundTrunkRequest,
    ) -> Result<Vec<proto::SipInboundTrunkInfo>, LiveKitError> {
        let response: proto::ListSipInboundTrunkResponse =
            self.call("ListSIPInboundTrunk", &request).await?;
        Ok(response.items)
    }

    pub async fn create_outbound_trunk(
        &self,
        trunk: proto::SipOutboundTrunkInfo,
    ) -> Result<proto::SipOutboundTrunkInfo, LiveKitError> {
        let request = proto::CreateSipOutboundTrunkRequest { trunk: Some(trunk) };
        self.call("CreateSIPOutboundTrunk", &request).await
    }

    pub async fn update_outbound_trunk(
        &self,
        id: &str,
        update: proto::SipOutboundTrunkUpdate,
    ) -> Result<proto::SipOutboundTrunkInfo, LiveKitError> {
        let request = proto::UpdateSipOutboundTrunkRequest {
            sip_trunk_id: id.to_owned(),
            action: Some(OutboundAction::Update(update)),
        };
        self.call("UpdateSIPOutboundTrunk", &request).await
    }

    pub async fn replace_outbound_trunk(
        &self,
        id: &str,
        trunk: proto::SipOutboundTrunkInfo,
    ) -> Result<proto::SipOutboundTrunkInfo, LiveKitError> {
        let request = proto::UpdateSipOutboundTrunkRequest {
            sip_trunk_id: id.to_owned(),
            action: Some(OutboundAction::Replace(trunk)),
        };
        self.call("UpdateSIPOutboundTrunk", &request).await
    }

    pub async fn get_outbound_trunk(
        &self,
        id: &str,
    ) -> Result<proto::SipOutboundTrunkInfo, LiveKitError> {
        let request = proto::GetSipOutboundTrunkRequest {
            sip_trunk_id: id.to_owned(),
        };
        let response: proto::GetSipOutboundTrunkResponse =
            self.call("GetSIPOutboundTrunk", &request).await?;
        response.trunk.ok_or(LiveKitError {
            method: "GetSIPOutboundTrunk",
            failure: ApiFailure::Protocol,
        })
    }

    pub async fn list_outbound_trunks(
        &self,
        request: proto::ListSipOutboundTrunkRequest,
    ) -> Result<Vec<proto::SipOutboundTrunkInfo>, LiveKitError> {
        let response: proto::ListSipOutboundTrunkResponse =
            self.call("ListSIPOutboundTrunk", &request).await?;
        Ok(response.items)
    }

    /// Deletes an inbound or outbound trunk.
    pub async fn delete_trunk(&self, id: &str) -> Result<(), LiveKitError> {
        let request = proto::DeleteSipTrunkRequest {
            sip_trunk_id: id.to_owned(),
        };
        let _: proto::SipTrunkInfo = self.call("DeleteSIPTrunk", &request).await?;
        Ok(())
    }

    /// Creates a rule from the whole `SIPDispatchRuleInfo` (its id is ignored), so
    /// `numbers`, `inbound_numbers`, `room_config` and the rest arrive as written.
    pub async fn create_dispatch_rule(
        &self,
        rule: proto::SipDispatchRuleInfo,
    ) -> Result<proto::SipDispatchRuleInfo, LiveKitError> {
        let request = proto::CreateSipDispatchRuleRequest {
            dispatch_rule: Some(rule),
            ..Default::default()
        };
        self.call("CreateSIPDispatchRule", &request).await
    }

    /// Changes what an update may change: trunk ids, the rule, name, metadata, attributes,
    /// media.
    pub async fn update_dispatch_rule(
        &self,
        id: &str,
        update: proto::SipDispatchRuleUpdate,
    ) -> Result<proto::SipDispatchRuleInfo, LiveKitError> {
        let request = proto::UpdateSipDispatchRuleRequest {
            sip_dispatch_rule_id: id.to_owned(),
            action: Some(RuleAction::Update(update)),
        };
        self.call("UpdateSIPDispatchRule", &request).await
    }

    /// Replaces the whole rule (needed for `numbers`, `inbound_numbers`,
    /// `hide_phone_number`, `room_config`).
    pub async fn replace_dispatch_rule(
        &self,
        id: &str,
        rule: proto::SipDispatchRuleInfo,
    ) -> Result<proto::SipDispatchRuleInfo, LiveKitError> {
        let request = proto::UpdateSipDispatchRuleRequest {
            sip_dispatch_rule_id: id.to_owned(),
            action: Some(RuleAction::Replace(rule)),
        };
        self.call("UpdateSIPDispatchRule", &request).await
    }

    pub async fn list_dispatch_rules(
        &self,
        request: proto::ListSipDispatchRuleRequest,
    ) -> Result<Vec<proto::SipDispatchRuleInfo>, LiveKitError> {
        let response: proto::ListSipDispatchRuleResponse =
            self.call("ListSIPDispatchRule", &request).await?;
        Ok(response.items)
    }

    /// There is no GetSIPDispatchRule RPC: a listing by id, checked here because LiveKit
    /// answers a missing id with an empty item in its place.
    pub async fn get_dispatch_rule(
        &self,
        id: &str,
    ) -> Result<Option<proto::SipDispatchRuleInfo>, LiveKitError> {
        let items = self
            .list_dispatch_rules(proto::ListSipDispatchRuleRequest {
                dispatch_rule_ids: vec![id.to_owned()],
                ..Default::default()
            })
            .await?;
        Ok(items.into_iter().find(|r| r.sip_dispatch_rule_id == id))
    }

    pub async fn delete_dispatch_rule(&self, id: &str) -> Result<(), LiveKitError> {
        let request = proto::DeleteSipDispatchRuleRequest {
            sip_dispatch_rule_id: id.to_owned(),
        };
        let _: proto::SipDispatchRuleInfo = self.call("DeleteSIPDispatchRule", &request).await?;
        Ok(())
    }
}

/// A request that got no HTTP answer: never sent when the connection could not be made,
/// maybe carried out when it broke or timed out afterwards.
fn transport_failure(err: &reqwest::Error) -> ApiFailure {
    if err.is_connect() {
        ApiFailure::Transport
    } else if err.is_timeout() {
        ApiFailure::Timeout
    } else if err.is_builder() {
        // A URL reqwest refuses: nothing was sent.
        ApiFailure::Transport
    } else {
        ApiFailure::Interrupted
    }
}

/// Twirp's JSON error body.
#[derive(serde::Deserialize)]
struct TwirpBody {
    code: String,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    meta: HashMap<String, String>,
}

/// A non-2xx answer. LiveKit's handlers answer Twirp JSON; its auth middleware (a bad key
/// or token) and proxies in front answer plain text, which gets the code Twirp's own
/// clients give a non-Twirp answer from its HTTP status.
pub fn error_answer(status: u16, body: &[u8]) -> ApiFailure {
    if let Ok(twirp) = serde_json::from_slice::<TwirpBody>(body) {
        return ApiFailure::Twirp {
            sip_status_code: twirp
                .meta
                .get("sip_status_code")
                .and_then(|v| v.parse().ok()),
            sip_status: twirp.meta.get("sip_status").cloned(),
            code: twirp.code,
            msg: twirp.msg,
        };
    }
    let code = match status {
        401 => "unauthenticated",
        403 => "permission_denied",
        404 => "bad_route",
        429 | 502 | 503 | 504 => "unavailable",
        300..=400 => "internal",
        _ => "unknown",
    };
    let text = String::from_utf8_lossy(body);
    let text: String = text.trim().chars().take(200).collect();
    ApiFailure::Twirp {
        code: code.to_owned(),
        msg: if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        },
        sip_status_code: None,
        sip_status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_become_http() {
        assert_eq!(
            http_base("wss://x.livekit.cloud/"),
            "https://x.livekit.cloud"
        );
        assert_eq!(http_base("ws://127.0.0.1:7880"), "http://127.0.0.1:7880");
        assert_eq!(
            http_base("https://lk.example.com"),
            "https://lk.example.com"
        );
    }

    #[test]
    fn twirp_errors_keep_code_message_and_sip_status() {
        let body = br#"{"code":"not_found","msg":"twirp error unknown: requested sip trunk does not exist","meta":{"sip_status_code":"404"}}"#;
        match error_answer(404, body) {
            ApiFailure::Twirp {
                code,
                msg,
                sip_status_code,
                ..
            } => {
                assert_eq!(code, "not_found");
                assert!(msg.contains("sip trunk does not exist"));
                assert_eq!(sip_status_code, Some(404));
            }
            other => panic!("not a Twirp failure: {other:?}"),
        }
    }

    #[test]
    fn plain_text_answers_get_a_code_from_their_status() {
        let failure = error_answer(401, b"invalid authorization token\n");
        assert_eq!(failure.code_label(), "unauthenticated");
        assert!(!failure.maybe_processed());
        assert_eq!(
            error_answer(502, b"<html>bad gateway</html>").code_label(),
            "unavailable"
        );
        assert_eq!(error_answer(500, b"").code_label(), "unknown");
    }

    #[tokio::test]
    async fn a_refused_connection_was_never_sent() {
        // Port 1 on loopback: nothing listens there.
        let sip = LiveKitSip::new("http://127.0.0.1:1", "k", "s", Duration::from_secs(2))
            .expect("client");
        let err = sip
            .list_dispatch_rules(Default::default())
            .await
            .expect_err("nothing listens");
        assert_eq!(err.failure, ApiFailure::Transport);
        assert_eq!(err.method, "ListSIPDispatchRule");
    }
}
