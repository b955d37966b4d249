//! The routing port: agent profiles with a change log every instance follows, and the
//! concurrent-call slots of each profile. Every instance keeps the whole table in memory
//! ([`crate::routing::RoutingCache`]) and asks this port only what changed since the
//! version it holds, so a call's routing never waits on the store.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::routing::Profile;
use crate::ports::StoreError;

/// Profiles changed after a version.
#[derive(Debug, Clone, Default)]
pub struct ProfileChanges {
    /// The version these changes bring a reader to.
    pub version: u64,
    /// Created or changed profiles, current state.
    pub upserts: Vec<Profile>,
    /// Deleted profile ids.
    pub deletes: Vec<String>,
}

#[async_trait]
pub trait RoutingStore: Send + Sync + 'static {
    /// Creates or replaces `profile`; returns the table version it made.
    async fn put(&self, profile: &Profile) -> Result<u64, StoreError>;
    /// Deletes `id`; `Ok(None)` when there was no such profile.
    async fn delete(&self, id: &str) -> Result<Option<u64>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Profile>, StoreError>;
    /// Writes many profiles (an import); with `keep`, every stored profile whose id is not
    /// in it is deleted (a replacing import keeps the profiles it did not need to rewrite).
    /// Returns the version after the last write.
    async fn import(
        &self,
        profiles: &[Profile],
        keep: Option<&HashSet<String>>,
    ) -> Result<u64, StoreError>;
    /// The current table version (one cheap read: what every instance polls).
    async fn version(&self) -> Result<u64, StoreError>;
    /// Every change after `version` (all profiles when `version` is 0).
    async fn changes_since(&self, version: u64) -> Result<ProfileChanges, StoreError>;

    /// Takes a slot of `profile` for `call` if fewer than `cap` are taken (no cap:
    /// always). Idempotent per call: a call holding a slot gets `true` again. A slot not
    /// released within `ttl` expires (its call's end was never seen).
    async fn claim_slot(
        &self,
        profile: &str,
        call: &str,
        cap: Option<u32>,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Frees `call`'s slot; false if it held none.
    async fn release_slot(&self, profile: &str, call: &str) -> Result<bool, StoreError>;
    /// Calls in progress per profile (profiles with none are left out).
    async fn loads(&self) -> Result<HashMap<String, u32>, StoreError>;
}
