//! The routing table every ingress and worker holds in memory, kept current by polling
//! the routing store's version (one small read per tick) and fetching only what changed.
//! Resolving a call reads memory only; the store is never on that path.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::domain::routing::{Decision, Loads, Profile, RouteQuery, RoutingTable};
use crate::ports::routing::RoutingStore;
use crate::ports::StoreError;
use crate::telemetry::metrics as m;

/// How often every instance looks for routing changes (a change is seen within this,
/// plus one store round trip).
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);

pub struct RoutingCache {
    store: Arc<dyn RoutingStore>,
    table: RwLock<Arc<RoutingTable>>,
    loads: RwLock<Arc<HashMap<String, u32>>>,
    version: AtomicU64,
    /// Serialises refreshes (the poller and an admin write applying its own change).
    refreshing: tokio::sync::Mutex<()>,
    /// Profiles whose load gauge is set, so one that drops to zero is zeroed.
    exported: Mutex<HashSet<String>>,
}

impl RoutingCache {
    /// Loads the whole table (fails when the store cannot be read: an instance that
    /// cannot route must not start).
    pub async fn load(
        store: Arc<dyn RoutingStore>,
        default_profile: Option<String>,
    ) -> Result<Arc<Self>, StoreError> {
        let cache = Arc::new(Self {
            store,
            table: RwLock::new(Arc::new(RoutingTable::new(default_profile))),
            loads: RwLock::new(Arc::new(HashMap::new())),
            version: AtomicU64::new(0),
            refreshing: tokio::sync::Mutex::new(()),
            exported: Mutex::new(HashSet::new()),
        });
        cache.refresh().await?;
        Ok(cache)
    }

    pub fn store(&self) -> &Arc<dyn RoutingStore> {
        &self.store
    }

    /// The current table (a snapshot: later changes do not affect it).
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.read().clone()
    }

    /// Calls in progress per profile, as of the last refresh.
    pub fn loads(&self) -> Arc<HashMap<String, u32>> {
        self.loads.read().clone()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Resolves a call from memory, counting the decision and its latency.
    pub fn resolve(&self, q: &RouteQuery<'_>, loads: &dyn Loads) -> Decision {
        let started = Instant::now();
        let decision = self.table().resolve(q, loads);
        metrics::histogram!(m::ROUTING_RESOLVE_SECONDS).record(started.elapsed().as_secs_f64());
        let cause = decision.reason.cause().map_or("none", |c| c.as_str());
        metrics::counter!(m::ROUTING_DECISIONS, "result" => decision.reason.result(), "cause" => cause)
            .increment(1);
        decision
    }

    /// Brings the table up to the store's version (true if anything changed), then reads
    /// the profiles' loads. Serialised: the poller and an admin write that wants its own
    /// change served at once never apply out of order.
    pub async fn refresh(&self) -> Result<bool, StoreError> {
        let _one = self.refreshing.lock().await;
        let ours = self.version();
        let theirs = self.store.version().await?;
        let changed = if theirs == ours {
            false
        } else if theirs < ours {
            // The store went back (flushed, restored, failed over without the latest
            // writes): what it holds now is the truth, deletions included.
            tracing::warn!(
                ours,
                theirs,
                "the routing store's version went back; reloading the whole table"
            );
            let all = self.store.changes_since(0).await?;
            let mut table = RoutingTable::new(self.table().default_profile().map(str::to_owned));
            for p in all.upserts {
                table.upsert(p);
            }
            self.swap(table, all.version, true);
            true
        } else {
            let changes = self.store.changes_since(ours).await?;
            self.apply(changes.upserts, &changes.deletes, changes.version);
            true
        };
        // Loads are read after the table, and their failure does not hold the table back.
        match self.store.loads().await {
            Ok(loads) => {
                self.export_loads(&loads);
                *self.loads.write() = Arc::new(loads);
            }
            Err(e) => tracing::debug!(error = %e, "profile loads not refreshed"),
        }
        Ok(changed)
    }

    /// Applies changes to a copy of the table and swaps it in (readers keep their
    /// snapshot). Only `refresh` calls it, under its lock.
    fn apply(&self, upserts: Vec<Profile>, deletes: &[String], version: u64) {
        if upserts.is_empty() && deletes.is_empty() {
            self.version.fetch_max(version, Ordering::AcqRel);
            return;
        }
        let mut table = (*self.table()).clone();
        for id in deletes {
            table.remove(id);
        }
        for p in upserts {
            table.upsert(p);
        }
        self.swap(table, version, false);
    }

    fn swap(&self, table: RoutingTable, version: u64, reset: bool) {
        metrics::gauge!(m::ROUTING_PROFILES).set(table.len() as f64);
        *self.table.write() = Arc::new(table);
        if reset {
            self.version.store(version, Ordering::Release);
        } else {
            self.version.fetch_max(version, Ordering::AcqRel);
        }
        metrics::gauge!(m::ROUTING_TABLE_VERSION).set(self.version() as f64);
    }

    fn export_loads(&self, loads: &HashMap<String, u32>) {
        let mut exported = self.exported.lock();
        for gone in exported.iter().filter(|p| !loads.contains_key(*p)) {
            metrics::gauge!(m::PROFILE_CALLS_IN_PROGRESS, "profile" => gone.clone()).set(0.0);
        }
        exported.clear();
        for (p, n) in loads {
            metrics::gauge!(m::PROFILE_CALLS_IN_PROGRESS, "profile" => p.clone())
                .set(f64::from(*n));
            exported.insert(p.clone());
        }
    }

    /// Polls for changes every `every` until `stop`; failures are counted and retried.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration, stop: CancellationToken) {
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = cache.refresh().await {
                    metrics::counter!(m::ROUTING_REFRESH_FAILURES).increment(1);
                    tracing::warn!(error = %e, "routing table not refreshed; serving the last one");
                }
            }
        });
    }
}
