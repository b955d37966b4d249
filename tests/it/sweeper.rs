//! The sweeper repairs calls that stopped moving, on RabbitMQ and Redis, and each repair
//! happens once: the lost retry is dialed once, the call whose end was never heard is
//! ended from LiveKit's state.

use std::time::Duration;

use callfleet_workers::SweepSettings;
use livekit_emulator::{Faults, Outcome};
use serde_json::json;

use crate::fleet::{Backing, FleetOptions, TestFleet};
use crate::harness::{eventually, script};

const SLOW: Duration = Duration::from_secs(30);

fn sweeping() -> FleetOptions {
    FleetOptions {
        backing: Backing::RabbitRedis,
        sweep: SweepSettings {
            every: Duration::from_millis(500),
            quiet: Duration::from_secs(2),
            batch: 100,
        },
        ..Default::default()
    }
}

/// A retry whose job never comes when due (here: it waits an hour in a delay tier while
/// the fleet's clock has moved past its due time, as a job lost between recording the
/// busy attempt and publishing the retry would never come) is queued by the sweeper and
/// dialed exactly once.
#[tokio::test]
async fn a_retry_that_never_came_is_queued_by_the_sweeper_and_dialed_once() {
    let fleet = TestFleet::start("sweep-retry", sweeping()).await;
    let number = "+15105550191";
    fleet.emulator.script(number, script(Outcome::Busy, None));
    let id = fleet
        .submit(json!({"to": number, "wait_until_answered": true,
                       "max_attempts": 2, "retry_delay_s": 3600}))
        .await;
    fleet.wait_for(&id, "scheduled", SLOW).await;
    assert_eq!(fleet.dials_to(number).len(), 1);
    // The retry job is parked in a delay tier before the clock moves (moved earlier, the
    // worker would publish it due at once and the sweeper would have nothing to do).
    eventually("the retry job in a delay tier", SLOW, || async {
        let census = fleet.broker.census().await.ok()?;
        let delayed: u64 = census
            .iter()
            .filter(|(q, _)| q.starts_with("delay."))
            .map(|(_, n)| *n)
            .sum();
        (delayed == 1).then_some(())
    })
    .await;
    // An hour later by the fleet's clock; the retry job still waits in the 1 h tier.
    fleet
        .clock
        .set(chrono::Utc::now() + chrono::Duration::seconds(3_700));
    let call = fleet.wait_for(&id, "busy", SLOW).await;
    assert_eq!(call["attempts"].as_array().map(Vec::len), Some(2), "{call}");
    let dials = fleet.dials_to(number);
    assert_eq!(dials.len(), 2, "one dial per attempt");
    let identities: std::collections::HashSet<_> =
        dials.iter().filter_map(|d| d.identity.clone()).collect();
    assert_eq!(identities.len(), 2, "{identities:?}");
    // Left behind: only the original retry job, still in its delay tier, so the second dial
    // came from the sweeper (the job is harmless when it comes: its attempt is over).
    eventually("the fleet to go quiet", SLOW, || async {
        let census = fleet.broker.census().await.ok()?;
        let (delayed, rest): (Vec<_>, Vec<_>) =
            census.iter().partition(|(q, _)| q.starts_with("delay."));
        let delayed: u64 = delayed.iter().map(|(_, n)| **n).sum();
        let rest: u64 = rest.iter().map(|(_, n)| **n).sum();
        (delayed == 1 && rest == 0).then_some(())
    })
    .await;
    fleet.stop().await;
}

/// An answered call whose end LiveKit never reported (webhooks lost) does not stay
/// `in_progress` for ever: the sweeper asks LiveKit, finds the participant gone, ends the
/// call and frees its trunk slot.
#[tokio::test]
async fn a_call_whose_end_was_never_heard_is_ended_from_livekits_state() {
    let fleet = TestFleet::start("sweep-live", sweeping()).await;
    let number = "+15105550192";
    fleet
        .emulator
        .script(number, script(Outcome::Answer, Some(300)));
    let mut faults = Faults::default();
    faults.webhooks.paused = true;
    fleet.emulator.set_faults(faults);
    let id = fleet
        .submit(json!({"to": number, "wait_until_answered": true}))
        .await;
    fleet.wait_for(&id, "in_progress", SLOW).await;
    let call = fleet.wait_for(&id, "completed", SLOW).await;
    assert!(
        call.to_string().contains("sweeper"),
        "ended by the sweeper: {call}"
    );
    assert_eq!(fleet.dials_to(number).len(), 1);
    eventually("the fleet to go quiet", SLOW, || async {
        let census = fleet.broker.census().await.ok()?;
        census.values().all(|n| *n == 0).then_some(())
    })
    .await;
    fleet.stop().await;
}
