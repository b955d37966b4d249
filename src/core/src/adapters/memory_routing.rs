//! In-memory routing profiles and slots, with the Redis adapter's semantics (one change
//! log entry per id, versions from one counter, slots that expire). Dev mode and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::domain::routing::Profile;
use crate::ports::routing::{ProfileChanges, RoutingStore};
use crate::ports::StoreError;

#[derive(Clone, Default)]
pub struct MemoryRouting {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    version: u64,
    profiles: HashMap<String, Profile>,
    /// id → version of its last change.
    changes: BTreeMap<String, u64>,
    /// profile → call → expiry.
    slots: HashMap<String, HashMap<String, Instant>>,
}

impl MemoryRouting {
    pub fn new() -> Self {
        Self::default()
    }
}

impl State {
    fn bump(&mut self, ids: impl IntoIterator<Item = String>) -> u64 {
        self.version += 1;
        for id in ids {
            self.changes.insert(id, self.version);
        }
        self.version
    }

    fn live_slots(&mut self, profile: &str) -> Option<&mut HashMap<String, Instant>> {
        let now = Instant::now();
        let slots = self.slots.get_mut(profile)?;
        slots.retain(|_, expiry| *expiry > now);
        Some(slots)
    }
}

#[async_trait]
impl RoutingStore for MemoryRouting {
    async fn put(&self, profile: &Profile) -> Result<u64, StoreError> {
        let mut s = self.state.lock().await;
        s.profiles.insert(profile.id.clone(), profile.clone());
        Ok(s.bump([profile.id.clone()]))
    }

    async fn delete(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let mut s = self.state.lock().await;
        if s.profiles.remove(id).is_none() {
            return Ok(None);
        }
        Ok(Some(s.bump([id.to_owned()])))
    }

    async fn get(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        Ok(self.state.lock().await.profiles.get(id).cloned())
    }

    async fn import(
        &self,
        profiles: &[Profile],
        keep: Option<&std::collections::HashSet<String>>,
    ) -> Result<u64, StoreError> {
        let mut s = self.state.lock().await;
        if let Some(keep) = keep {
            let gone: Vec<String> = s
                .profiles
                .keys()
                .filter(|id| !keep.contains(*id))
                .cloned()
                .collect();
            if !gone.is_empty() {
                for id in &gone {
                    s.profiles.remove(id);
                }
                s.bump(gone);
            }
        }
        if profiles.is_empty() {
            return Ok(s.version);
        }
        for p in profiles {
            s.profiles.insert(p.id.clone(), p.clone());
        }
        Ok(s.bump(profiles.iter().map(|p| p.id.clone())))
    }

    async fn version(&self) -> Result<u64, StoreError> {
        Ok(self.state.lock().await.version)
    }

    async fn changes_since(&self, version: u64) -> Result<ProfileChanges, StoreError> {
        let s = self.state.lock().await;
        let mut out = ProfileChanges {
            version: s.version,
            ..Default::default()
        };
        for (id, v) in &s.changes {
            if *v <= version {
                continue;
            }
            match s.profiles.get(id) {
                Some(p) => out.upserts.push(p.clone()),
                None => out.deletes.push(id.clone()),
            }
        }
        Ok(out)
    }

    async fn claim_slot(
        &self,
        profile: &str,
        call: &str,
        cap: Option<u32>,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        s.slots.entry(profile.to_owned()).or_default();
        let Some(slots) = s.live_slots(profile) else {
            return Ok(false);
        };
        let held = slots.contains_key(call);
        if !held && cap.is_some_and(|cap| slots.len() >= cap as usize) {
            return Ok(false);
        }
        slots.insert(call.to_owned(), Instant::now() + ttl);
        Ok(true)
    }

    async fn release_slot(&self, profile: &str, call: &str) -> Result<bool, StoreError> {
        let mut s = self.state.lock().await;
        let Some(slots) = s.slots.get_mut(profile) else {
            return Ok(false);
        };
        let removed = slots.remove(call).is_some();
        if slots.is_empty() {
            s.slots.remove(profile);
        }
        Ok(removed)
    }

    async fn loads(&self) -> Result<HashMap<String, u32>, StoreError> {
        let mut s = self.state.lock().await;
        let profiles: Vec<String> = s.slots.keys().cloned().collect();
        let mut out = HashMap::new();
        for p in profiles {
            let n = s.live_slots(&p).map_or(0, |slots| slots.len());
            if n == 0 {
                s.slots.remove(&p);
            } else {
                out.insert(p, n as u32);
            }
        }
        Ok(out)
    }
}
