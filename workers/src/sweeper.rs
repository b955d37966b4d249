//! The sweeper: finds calls that stopped moving before they were final and repairs them.
//!
//! Every call not yet final sits on the store's watch list. A worker that dies between two
//! steps (after recording an attempt's end, before queueing the retry; mid-dial) or a
//! webhook that never comes leaves a call quiet; past a bound the sweeper publishes the
//! job that resumes it (the job reconciles with LiveKit from its journal) or asks LiveKit
//! whether a joined participant is still there, and ends the call if not. One worker
//! sweeps at a time (a store lock); every repair is counted.

use std::time::Duration;

use callfleet_core::calls::CallJob;
use callfleet_core::domain::sip_outcome::SipOutcome;
use callfleet_core::domain::{participant_identity, EndDetails, Stuck};
use callfleet_core::telemetry::metrics as m;
use tokio_util::sync::CancellationToken;

use crate::calls::{CallDeps, InfraError};

/// How the sweeper runs.
#[derive(Debug, Clone)]
pub struct SweepSettings {
    /// How often a sweep runs.
    pub every: Duration,
    /// How long a call may stay quiet past its due time before it counts as stuck.
    pub quiet: Duration,
    /// Calls looked at per sweep at most.
    pub batch: usize,
}

impl Default for SweepSettings {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(30),
            quiet: Duration::from_secs(120),
            batch: 500,
        }
    }
}

pub struct Sweeper {
    deps: CallDeps,
    settings: SweepSettings,
}

const LOCK: &str = "sweeper";

impl Sweeper {
    pub fn new(deps: CallDeps, settings: SweepSettings) -> Self {
        Self { deps, settings }
    }

    /// Sweeps every `every` until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "sweep failed; trying again next time");
            }
        }
    }

    /// One sweep; returns how many calls it repaired (0 when another worker holds the
    /// sweep).
    pub async fn sweep_once(&self) -> Result<usize, InfraError> {
        let store = self.deps.calls.store();
        let Some(token) = store.try_lock(LOCK, self.settings.every).await? else {
            return Ok(0);
        };
        let result = self.sweep_locked().await;
        if let Err(e) = store.unlock(LOCK, &token).await {
            tracing::debug!(error = %e, "sweeper lock not released; it expires");
        }
        result
    }

    async fn sweep_locked(&self) -> Result<usize, InfraError> {
        let store = self.deps.calls.store();
        let now = self.deps.clock.now();
        let quiet = chrono::Duration::from_std(self.settings.quiet).unwrap_or_default();
        // Watched at the time each call is due to move; quiet for `quiet` since then.
        let due = store
            .due_watches((now - quiet).timestamp_millis(), self.settings.batch)
            .await?;
        let mut repaired = 0;
        for id in due {
            let Some(call) = self.deps.calls.get(&id).await? else {
                store.unwatch(&id).await?;
                continue;
            };
            let Some(due_at) = call.look_at() else {
                store.unwatch(&id).await?;
                continue;
            };
            if let Some(stuck) = call.stuck(now, quiet) {
                let action = self.repair(&call, stuck).await?;
                metrics::counter!(m::SWEEPER_REPAIRS, "stuck" => stuck.as_str(), "action" => action)
                    .increment(1);
                tracing::warn!(call_id = %call.id, status = call.status.as_str(), stuck = stuck.as_str(), action, "repaired a stuck call");
                repaired += 1;
            }
            // Looked at now: quiet again for `quiet` before the next look (a due time
            // still ahead keeps its place).
            let next = due_at.max(now);
            store.watch(&id, next.timestamp_millis()).await?;
        }
        Ok(repaired)
    }

    async fn repair(
        &self,
        call: &callfleet_core::domain::Call,
        stuck: Stuck,
    ) -> Result<&'static str, InfraError> {
        let deps = &self.deps;
        match stuck {
            Stuck::CheckInbound => {
                // The inbound call's job looks at LiveKit itself (under the call's lock).
                let job = CallJob {
                    call_id: call.id.clone(),
                    attempt: 1,
                };
                deps.broker.publish(job.message(None)).await?;
                metrics::counter!(m::JOBS_ENQUEUED, "queue" => "call_jobs").increment(1);
                Ok("inbound_job_published")
            }
            Stuck::QueueAttempt(attempt) | Stuck::ResumeAttempt(attempt) => {
                let job = CallJob {
                    call_id: call.id.clone(),
                    attempt,
                };
                deps.broker.publish(job.message(None)).await?;
                metrics::counter!(m::JOBS_ENQUEUED, "queue" => "call_jobs").increment(1);
                Ok("job_published")
            }
            Stuck::CheckLive(attempt) => {
                let identity = participant_identity(&call.id, attempt);
                match deps
                    .livekit
                    .get_participant(&call.room_name, &identity)
                    .await
                {
                    Ok(Some(_)) => Ok("still_live"),
                    Ok(None) => {
                        let now = deps.clock.now();
                        let mut after = None;
                        let updated = deps
                            .calls
                            .update(&call.id, |c| {
                                after = None;
                                if c.current_attempt().map(|a| a.number) != Some(attempt) {
                                    return;
                                }
                                let details = EndDetails {
                                    reason: Some("participant gone from LiveKit (sweeper)".into()),
                                    ..Default::default()
                                };
                                after = c.callee_gone(SipOutcome::Failed, details, now);
                            })
                            .await?;
                        match (updated, after) {
                            (Some((call, ())), Some(after)) => {
                                deps.settle(&call, after).await?;
                                Ok("ended")
                            }
                            _ => Ok("unchanged"),
                        }
                    }
                    Err(e) => {
                        tracing::debug!(call_id = %call.id, error = %e, "LiveKit not asked; next sweep");
                        Ok("livekit_unreachable")
                    }
                }
            }
        }
    }
}
