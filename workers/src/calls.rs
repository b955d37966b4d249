//! What both call handlers share: their dependencies, the per-trunk limits, and settling an
//! attempt that ended (release the trunk slot, clean up, schedule the retry or count the
//! final status).

use std::sync::Arc;
use std::time::Duration;

use callfleet_core::calls::{wall_time, CallBook, CallBookError, CallJob, Clock};
use callfleet_core::domain::{AfterAttempt, AttemptOutcome, Call, CallStatus};
use callfleet_core::ports::{Broker, BrokerError, LiveKit, StoreError};
use callfleet_core::telemetry::metrics as m;

use crate::HandlerOutcome;

/// Outbound settings from configuration.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// Agent dispatched when a call names none.
    pub default_agent: String,
    /// Concurrent calls per trunk, across every worker.
    pub trunk_max_concurrent: u32,
    /// Calls started per second per trunk, across every worker.
    pub trunk_cps: f64,
    /// How long a call's trunk slot survives without its end-of-call event.
    pub lease_ttl: Duration,
    /// Empty-room timeout given to CreateRoom.
    pub room_empty_timeout_s: u32,
    /// How long one worker keeps a call to itself before another may take over (a worker
    /// that died holds it this long; a dial waiting for an answer adds its ringing time).
    pub call_lock_ttl: Duration,
    /// How long a dial whose request may have reached LiveKit waits for evidence (a
    /// participant or a webhook) before it is declared unknown rather than repeated.
    pub dial_evidence_grace: Duration,
    /// How long LiveKit may still be carrying out a request whose answer we lost (our
    /// request timeout plus a margin): before then, not finding its effect proves nothing.
    pub livekit_settle: Duration,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        Self {
            default_agent: "callfleet-agent".into(),
            trunk_max_concurrent: 50,
            trunk_cps: 10.0,
            lease_ttl: Duration::from_secs(3_600),
            room_empty_timeout_s: 300,
            call_lock_ttl: Duration::from_secs(10),
            dial_evidence_grace: Duration::from_secs(60),
            livekit_settle: Duration::from_secs(15),
        }
    }
}

/// The dependencies of the call handlers.
#[derive(Clone)]
pub struct CallDeps {
    pub calls: CallBook,
    pub broker: Arc<dyn Broker>,
    pub livekit: Arc<dyn LiveKit>,
    pub clock: Arc<dyn Clock>,
    pub settings: OutboundSettings,
}

/// A failure of the fleet's own dependencies while handling a job.
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error(transparent)]
    Calls(#[from] CallBookError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl InfraError {
    /// Infrastructure trouble is transient: retry through the broker.
    pub fn retry(&self) -> HandlerOutcome {
        HandlerOutcome::RetryAfter {
            after: Duration::from_secs(1),
            reason: self.to_string(),
        }
    }
}

pub fn trunk_pool(trunk: &str) -> String {
    format!("trunk:{trunk}")
}

impl CallDeps {
    /// Frees the call's slot on its trunk and republishes the active-calls gauge.
    pub async fn release_trunk(&self, call: &Call) {
        let Some(trunk) = &call.trunk_id else { return };
        let pool = trunk_pool(trunk);
        if let Err(e) = self.calls.store().release_lease(&pool, &call.id).await {
            // The lease expires on its own; only capacity is lost until then.
            tracing::warn!(call_id = %call.id, error = %e, "could not release a trunk slot");
        }
        self.publish_active(trunk).await;
    }

    pub async fn publish_active(&self, trunk: &str) {
        if let Ok(n) = self.calls.store().live_leases(&trunk_pool(trunk)).await {
            metrics::gauge!(m::ACTIVE_CALLS, "trunk" => trunk.to_owned()).set(n as f64);
        }
    }

    /// Follows up an ended attempt: frees the trunk slot, closes the room of an unanswered
    /// attempt (so a dispatched agent does not wait for nobody), then either queues the
    /// next attempt or counts the final status.
    pub async fn settle(&self, call: &Call, after: AfterAttempt) -> Result<(), InfraError> {
        self.release_trunk(call).await;
        let outcome = call.current_attempt().and_then(|a| a.outcome);
        metrics::counter!(m::CALL_ATTEMPTS, "outcome" => outcome.map_or("unknown", AttemptOutcome::as_str))
            .increment(1);
        if outcome != Some(AttemptOutcome::Completed) {
            if let Err(e) = self.livekit.delete_room(&call.room_name).await {
                if !e.is_not_found() {
                    tracing::debug!(call_id = %call.id, error = %e, "room not closed");
                }
            }
        }
        match after {
            AfterAttempt::Retry { attempt, at } => {
                self.queue_attempt(call, attempt, at).await?;
            }
            AfterAttempt::Final(status) => {
                metrics::counter!(m::CALLS_FINISHED, "direction" => "outbound", "status" => status.as_str())
                    .increment(1);
                tracing::info!(call_id = %call.id, status = status.as_str(), "call finished");
            }
        }
        Ok(())
    }

    /// Publishes the job for `attempt`, due at `at` (on the fleet's clock).
    pub async fn queue_attempt(
        &self,
        call: &Call,
        attempt: u32,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), InfraError> {
        let job = CallJob {
            call_id: call.id.clone(),
            attempt,
        };
        let deliver_at = (at > self.clock.now()).then(|| wall_time(self.clock.as_ref(), at));
        self.broker.publish(job.message(deliver_at)).await?;
        metrics::counter!(m::JOBS_ENQUEUED, "queue" => "call_jobs").increment(1);
        Ok(())
    }

    /// When the current attempt is over and the call waits for its next one, makes sure
    /// that attempt's job exists (a crash between recording the end and publishing the
    /// retry would otherwise strand the call; a duplicate job is harmless).
    pub async fn ensure_next_attempt(&self, call: &Call) -> Result<(), InfraError> {
        let Some(current) = call.current_attempt() else {
            return Ok(());
        };
        if call.status == CallStatus::Scheduled && current.is_over() {
            let at = call.scheduled_for.unwrap_or_else(|| self.clock.now());
            self.queue_attempt(call, current.number + 1, at).await?;
        }
        Ok(())
    }
}
