//! Delayed delivery without the delayed-message plugin: a fixed set of TTL tiers. A delay of
//! any length is composed by hopping: each hop goes through the largest tier not longer than
//! what remains, so a message never arrives early, and is late by at most the smallest tier
//! plus the broker's own latency.

use std::time::Duration;

/// The delay tiers, shortest first. Nine queues cover 0 to 7 days (and beyond) in at most
/// `7 + 8` hops; the smallest tier bounds lateness.
pub const DELAY_TIERS: [Duration; 9] = [
    Duration::from_millis(100),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
    Duration::from_secs(3_600),
    Duration::from_secs(21_600),
    Duration::from_secs(86_400),
];

/// The longest delay accepted for a single publish.
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 86_400);

/// The next hop for a message still `remaining` away from its due time: `None` when it is
/// due now; otherwise the tier to park it in.
pub fn next_hop(remaining: Duration) -> Option<Duration> {
    if remaining.is_zero() {
        return None;
    }
    let tier = DELAY_TIERS
        .iter()
        .rev()
        .find(|tier| **tier <= remaining)
        .copied()
        .unwrap_or(DELAY_TIERS[0]);
    Some(tier)
}

/// Queue-name suffix of a tier, e.g. `100ms`, `5s`, `86400s`.
pub fn tier_name(tier: Duration) -> String {
    if tier < Duration::from_secs(1) {
        format!("{}ms", tier.as_millis())
    } else {
        format!("{}s", tier.as_secs())
    }
}

/// Remaining time before `due_ms` (epoch milliseconds) at `now_ms`, ignoring sub-millisecond
/// noise: anything within 5 ms counts as due so a message is not bounced for clock jitter.
pub fn remaining(due_ms: i64, now_ms: i64) -> Duration {
    let left = due_ms - now_ms;
    if left <= 5 {
        Duration::ZERO
    } else {
        Duration::from_millis(left as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_early_and_bounded_hops() {
        for ms in [
            1u64,
            99,
            100,
            101,
            999,
            1_000,
            4_321,
            59_999,
            3_600_000,
            7 * 86_400_000,
        ] {
            let mut left = Duration::from_millis(ms);
            let mut elapsed = Duration::ZERO;
            let mut hops = 0;
            while let Some(tier) = next_hop(left) {
                elapsed += tier;
                left = left.saturating_sub(tier);
                hops += 1;
            }
            assert!(elapsed >= Duration::from_millis(ms), "{ms} delivered early");
            assert!(
                elapsed - Duration::from_millis(ms) <= DELAY_TIERS[0],
                "{ms} too late"
            );
            assert!(hops <= 20, "{ms} took {hops} hops");
        }
    }

    #[test]
    fn due_now_has_no_hop_and_names_are_stable() {
        assert_eq!(next_hop(Duration::ZERO), None);
        assert_eq!(remaining(1_000, 996), Duration::ZERO);
        assert_eq!(remaining(1_000, 900), Duration::from_millis(100));
        assert_eq!(tier_name(Duration::from_millis(100)), "100ms");
        assert_eq!(tier_name(Duration::from_secs(30)), "30s");
    }
}
