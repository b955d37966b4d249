//! The LiveKit steps a call goes through, for every kind of call (outbound today, inbound
//! next): the room, the agent's dispatch, the SIP dial. Each request that is not
//! idempotent is sent once; it is retried on the spot only when LiveKit cannot have acted
//! on it, and after an answer that may have been lost it is settled from LiveKit's state
//! (what `decide_dispatch` and `settle_backoff` decide), never sent again blindly. The
//! caller records each step in its journal before moving on.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use callfleet_core::domain::sip_outcome::ApiFailure;
use callfleet_core::ports::livekit::DialRequest;
use callfleet_core::ports::{LiveKit, LiveKitError};
use callfleet_core::ErrorClass;
use livekit_protocol as proto;
use serde_json::Value;

/// Quick jittered in-process retries for transient LiveKit errors; beyond them the job is
/// retried through the broker with exponential backoff.
fn quick_retries() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(3)
        .with_jitter()
}

pub fn transient(e: &LiveKitError) -> bool {
    e.class() == ErrorClass::Retryable
}

/// Transient, and LiveKit cannot have acted on it: the only failures after which a
/// request that is not idempotent may be sent again on the spot.
pub fn sent_nothing(e: &LiveKitError) -> bool {
    transient(e) && !e.failure.maybe_processed()
}

/// How long to wait before looking again for the effect of a request whose answer was
/// lost, `waited` after it was sent: 1 s, then half the time waited so far, at most 15 s
/// (a few looks a minute, not hundreds), jittered.
pub fn settle_backoff(waited: Duration) -> Duration {
    jitter((waited / 2).clamp(Duration::from_secs(1), Duration::from_secs(15)))
}

/// `base` ± 50 %, so deferred jobs do not come back in lockstep.
pub fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.5 + rand::random::<f64>())
}

/// CreateRoom, an upsert: safe to repeat.
pub async fn ensure_room(
    livekit: &dyn LiveKit,
    name: &str,
    metadata: &str,
    empty_timeout_s: u32,
) -> Result<proto::Room, LiveKitError> {
    (|| async { livekit.create_room(name, metadata, empty_timeout_s).await })
        .retry(quick_retries())
        .when(transient)
        .await
}

/// The `attempt` a dispatch's metadata names (dispatches the fleet created carry it).
pub fn metadata_attempt(metadata: &str) -> Option<u32> {
    serde_json::from_str::<Value>(metadata)
        .ok()?
        .get("attempt")?
        .as_u64()
        .map(|n| n as u32)
}

/// The dispatches in `room` (ListDispatch, read-only).
pub async fn list_dispatches(
    livekit: &dyn LiveKit,
    room: &str,
) -> Result<Vec<proto::AgentDispatch>, LiveKitError> {
    (|| async { livekit.list_dispatch(room).await })
        .retry(quick_retries())
        .when(transient)
        .await
}

/// The dispatch of `agent` for `attempt` already in `room`, if any (ListDispatch).
pub async fn find_dispatch(
    livekit: &dyn LiveKit,
    room: &str,
    agent: &str,
    attempt: u32,
) -> Result<Option<proto::AgentDispatch>, LiveKitError> {
    Ok(list_dispatches(livekit, room)
        .await?
        .into_iter()
        .find(|d| d.agent_name == agent && metadata_attempt(&d.metadata) == Some(attempt)))
}

/// What to do about a dispatch that `find_dispatch` did not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchDecision {
    /// None was ever sent, or the one sent is long past any time LiveKit could still be
    /// carrying it out: create it.
    Create,
    /// One was sent `waited` ago and may still land: look again after this long.
    LookAgain(Duration),
}

/// `sent_ago`: how long ago an earlier CreateDispatch of this attempt was sent, per the
/// journal (`None`: never); `settle`: how long LiveKit may still be carrying out a
/// request whose answer was lost.
pub fn decide_dispatch(sent_ago: Option<Duration>, settle: Duration) -> DispatchDecision {
    match sent_ago {
        Some(waited) if waited < settle => DispatchDecision::LookAgain(settle_backoff(waited)),
        _ => DispatchDecision::Create,
    }
}

/// CreateDispatch, sent once (again on the spot only if LiveKit cannot have acted on it).
pub async fn create_dispatch(
    livekit: &dyn LiveKit,
    room: &str,
    agent: &str,
    metadata: &str,
) -> Result<proto::AgentDispatch, LiveKitError> {
    (|| async { livekit.create_dispatch(room, agent, metadata).await })
        .retry(quick_retries())
        .when(sent_nothing)
        .await
}

/// CreateSIPParticipant, sent once (again on the spot only if LiveKit cannot have acted
/// on it). `on_send` runs before each send (a metric).
pub async fn dial(
    livekit: &dyn LiveKit,
    request: &DialRequest,
    on_send: impl Fn(),
) -> Result<proto::SipParticipantInfo, LiveKitError> {
    (|| async {
        on_send();
        livekit.create_sip_participant(request.clone()).await
    })
    .retry(quick_retries())
    // A dial LiveKit canceled was real (an operator hung it up, its room went): the
    // caller decides what follows, not a redial on the spot.
    .when(|e| sent_nothing(e) && !is_canceled(e))
    .await
}

fn is_canceled(e: &LiveKitError) -> bool {
    matches!(&e.failure, ApiFailure::Twirp { code, .. } if code == "canceled")
}

/// The participant a dial created, if LiveKit has it (GetParticipant, read-only).
pub async fn find_participant(
    livekit: &dyn LiveKit,
    room: &str,
    identity: &str,
) -> Result<Option<proto::ParticipantInfo>, LiveKitError> {
    (|| async { livekit.get_participant(room, identity).await })
        .retry(quick_retries())
        .when(transient)
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use async_trait::async_trait;
    use callfleet_core::domain::sip_outcome::ApiFailure;

    use super::*;

    #[test]
    fn a_lost_dispatch_is_looked_for_until_livekit_is_done_with_it() {
        let settle = Duration::from_secs(15);
        assert_eq!(decide_dispatch(None, settle), DispatchDecision::Create);
        assert!(matches!(
            decide_dispatch(Some(Duration::from_secs(3)), settle),
            DispatchDecision::LookAgain(d) if d >= Duration::from_millis(500) && d <= Duration::from_millis(2_250)
        ));
        assert_eq!(
            decide_dispatch(Some(Duration::from_secs(16)), settle),
            DispatchDecision::Create
        );
    }

    #[test]
    fn settling_looks_back_off_to_a_few_a_minute() {
        let looks = |waited_s: u64| settle_backoff(Duration::from_secs(waited_s));
        assert!(looks(0) >= Duration::from_millis(500) && looks(0) <= Duration::from_millis(1_500));
        assert!(looks(20) >= Duration::from_secs(5));
        assert!(looks(600) <= Duration::from_millis(22_500));
    }

    #[test]
    fn jitter_stays_within_half() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(2));
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(3));
        }
    }

    /// A LiveKit whose CreateDispatch and CreateSIPParticipant fail a scripted way, and
    /// that records how often each was sent: what the send-once rule is about.
    struct Scripted {
        failure: ApiFailure,
        failures_left: AtomicU32,
        sent: Mutex<HashMap<&'static str, u32>>,
    }

    impl Scripted {
        fn new(failure: ApiFailure, times: u32) -> Self {
            Self {
                failure,
                failures_left: AtomicU32::new(times),
                sent: Mutex::new(HashMap::new()),
            }
        }
        fn sent(&self, method: &'static str) -> u32 {
            self.sent
                .lock()
                .map(|s| s.get(method).copied().unwrap_or(0))
                .unwrap_or(0)
        }
        fn answer<T: Default>(&self, method: &'static str) -> Result<T, LiveKitError> {
            if let Ok(mut sent) = self.sent.lock() {
                *sent.entry(method).or_default() += 1;
            }
            let left = self.failures_left.load(Ordering::SeqCst);
            if left > 0 {
                self.failures_left.store(left - 1, Ordering::SeqCst);
                return Err(LiveKitError {
                    method,
                    failure: self.failure.clone(),
                });
            }
            Ok(T::default())
        }
    }

    #[async_trait]
    impl LiveKit for Scripted {
        async fn create_room(&self, _: &str, _: &str, _: u32) -> Result<proto::Room, LiveKitError> {
            self.answer("CreateRoom")
        }
        async fn delete_room(&self, _: &str) -> Result<(), LiveKitError> {
            Ok(())
        }
        async fn list_participants(
            &self,
            _: &str,
        ) -> Result<Vec<proto::ParticipantInfo>, LiveKitError> {
            Ok(vec![])
        }
        async fn get_participant(
            &self,
            _: &str,
            _: &str,
        ) -> Result<Option<proto::ParticipantInfo>, LiveKitError> {
            Ok(None)
        }
        async fn remove_participant(&self, _: &str, _: &str) -> Result<(), LiveKitError> {
            Ok(())
        }
        async fn create_dispatch(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<proto::AgentDispatch, LiveKitError> {
            self.answer("CreateDispatch")
        }
        async fn list_dispatch(&self, _: &str) -> Result<Vec<proto::AgentDispatch>, LiveKitError> {
            Ok(vec![])
        }
        async fn delete_dispatch(&self, _: &str, _: &str) -> Result<(), LiveKitError> {
            Ok(())
        }
        async fn create_sip_participant(
            &self,
            _: DialRequest,
        ) -> Result<proto::SipParticipantInfo, LiveKitError> {
            self.answer("CreateSIPParticipant")
        }
        async fn transfer_sip_participant(
            &self,
            _: callfleet_core::ports::TransferRequest,
        ) -> Result<(), LiveKitError> {
            Ok(())
        }
    }

    fn twirp(code: &str) -> ApiFailure {
        ApiFailure::Twirp {
            code: code.into(),
            msg: String::new(),
            sip_status_code: None,
            sip_status: None,
        }
    }

    #[tokio::test]
    async fn requests_that_may_have_been_carried_out_are_sent_once() {
        for failure in [ApiFailure::Timeout, ApiFailure::Interrupted] {
            let lk = Scripted::new(failure.clone(), 1);
            let err = create_dispatch(&lk, "r", "agent", "{}")
                .await
                .expect_err("lost");
            assert!(err.failure.maybe_processed());
            assert_eq!(lk.sent("CreateDispatch"), 1, "{failure:?} re-sent");
            let lk = Scripted::new(failure.clone(), 1);
            dial(&lk, &DialRequest::default(), || {})
                .await
                .expect_err("lost");
            assert_eq!(lk.sent("CreateSIPParticipant"), 1, "{failure:?} re-sent");
        }
    }

    #[tokio::test]
    async fn requests_livekit_refused_or_never_got_are_retried_at_once() {
        for failure in [ApiFailure::Transport, twirp("unavailable")] {
            let lk = Scripted::new(failure.clone(), 2);
            create_dispatch(&lk, "r", "agent", "{}")
                .await
                .expect("third try");
            assert_eq!(lk.sent("CreateDispatch"), 3, "{failure:?}");
            let lk = Scripted::new(failure.clone(), 2);
            dial(&lk, &DialRequest::default(), || {})
                .await
                .expect("third try");
            assert_eq!(lk.sent("CreateSIPParticipant"), 3, "{failure:?}");
        }
        // CreateRoom is an upsert: even a lost answer is simply asked again.
        let lk = Scripted::new(ApiFailure::Timeout, 1);
        ensure_room(&lk, "r", "{}", 60).await.expect("second try");
        assert_eq!(lk.sent("CreateRoom"), 2);
    }

    #[tokio::test]
    async fn permanent_refusals_are_not_retried() {
        let lk = Scripted::new(twirp("permission_denied"), 1);
        create_dispatch(&lk, "r", "agent", "{}")
            .await
            .expect_err("refused");
        assert_eq!(lk.sent("CreateDispatch"), 1);
    }

    #[test]
    fn dispatch_metadata_names_its_attempt() {
        assert_eq!(
            metadata_attempt(r#"{"attempt": 2, "call_id": "x"}"#),
            Some(2)
        );
        assert_eq!(metadata_attempt("not json"), None);
    }
}
