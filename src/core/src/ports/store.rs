//! The store port: versioned records, idempotency keys, event dedupe, locks, rate limits and
//! concurrency leases. Every operation is atomic on its own.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unreachable: {0}")]
    Unavailable(String),
    #[error("store protocol error: {0}")]
    Protocol(String),
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Retryable
    }
}

/// A record with the version a conditional update must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub data: Bytes,
}

/// The outcome of a conditional update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written; the record now has this version.
    Updated(u64),
    /// Someone else wrote first (or the record is gone); re-read and retry.
    Conflict,
}

/// Proof of holding a lock; release and extension only succeed with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken(pub String);

/// Rate-limit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// Denied; the next slot opens after this long.
    RetryAfter(Duration),
}

/// A page of record ids from an index, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPage {
    pub ids: Vec<String>,
    /// Opaque cursor for the next page, `None` at the end.
    pub next: Option<String>,
}

/// The index cursor every adapter uses: `<score>:<id>`, pointing just past that entry.
/// Public so a caller that filters a page can resume after the last id it kept.
pub fn index_cursor(score: i64, id: &str) -> String {
    format!("{score}:{id}")
}

pub fn parse_index_cursor(cursor: &str) -> Option<(i64, String)> {
    let (score, id) = cursor.split_once(':')?;
    Some((score.parse().ok()?, id.to_owned()))
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- records (call records) -------------------------------------------------------
    /// Creates `id` with version 1 if absent; returns whether it was created. With
    /// `index_score`, also adds `id` to the creation index (newest first listing); with
    /// `watch_ms`, also puts it on the watch list due then (see [`Store::watch`]); and
    /// appends `events` to the event log ([`crate::ports::EventLog`]), all in the same
    /// atomic step.
    async fn create_record(
        &self,
        id: &str,
        data: Bytes,
        index_score: Option<i64>,
        watch_ms: Option<i64>,
        events: &[Bytes],
    ) -> Result<bool, StoreError>;
    async fn get_record(&self, id: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes `data` only if the record is still at `expected_version`, appending `events`
    /// to the event log in the same atomic step (nothing is appended on a conflict).
    async fn update_record(
        &self,
        id: &str,
        expected_version: u64,
        data: Bytes,
        events: &[Bytes],
    ) -> Result<CasOutcome, StoreError>;
    /// Ids from the creation index, newest first, `limit` at most, after `cursor`.
    async fn list_index(&self, cursor: Option<&str>, limit: usize)
        -> Result<IndexPage, StoreError>;

    // --- idempotency keys --------------------------------------------------------------
    /// Claims `key` for `value` if unclaimed; returns the existing value when already claimed.
    async fn claim_key(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError>;
    async fn get_key(&self, key: &str) -> Result<Option<String>, StoreError>;
    async fn delete_key(&self, key: &str) -> Result<(), StoreError>;

    // --- event dedupe ------------------------------------------------------------------
    /// Marks `event_id` seen; true the first time within `ttl`.
    async fn first_seen(&self, event_id: &str, ttl: Duration) -> Result<bool, StoreError>;

    // --- watch list ----------------------------------------------------------------------
    /// Puts `id` on the watch list, to be looked at from `due_ms` (epoch milliseconds) on;
    /// replaces an earlier due time. The sweeper's list of calls not yet final.
    async fn watch(&self, id: &str, due_ms: i64) -> Result<(), StoreError>;
    /// Takes `id` off the watch list.
    async fn unwatch(&self, id: &str) -> Result<(), StoreError>;
    /// Up to `limit` watched ids due at or before `now_ms`, earliest first.
    async fn due_watches(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError>;

    // --- locks -------------------------------------------------------------------------
    async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockToken>, StoreError>;
    /// Extends a held lock; false if it expired or someone else holds it.
    async fn extend_lock(
        &self,
        name: &str,
        token: &LockToken,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Compare-and-delete; false if the lock was not ours any more.
    async fn unlock(&self, name: &str, token: &LockToken) -> Result<bool, StoreError>;

    // --- limits --------------------------------------------------------------------------
    /// GCRA rate limit: `per_second` sustained, `burst` at once, shared by every caller.
    async fn rate_limit(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<RateDecision, StoreError>;
    /// Takes (or renews) `holder`'s lease in `pool` if fewer than `max` live leases exist.
    /// A lease not renewed or released within `ttl` expires (its holder died).
    async fn acquire_lease(
        &self,
        pool: &str,
        holder: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    async fn release_lease(&self, pool: &str, holder: &str) -> Result<bool, StoreError>;
    async fn live_leases(&self, pool: &str) -> Result<u64, StoreError>;

    /// Round-trips to the store (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
}
