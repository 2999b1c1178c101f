//! The deadline loop: who is due, spread evenly over the interval, claimed with leases.
//!
//! tick -> store.claim_due -> probe (network) -> rules (pure) -> writer batches
//! -> store.record_probes (one transaction) -> metrics and events.
//!
//! The loop is the shared leased-worker loop (`worker::run_leased`) over `DueProbes`;
//! `writer.rs` batches the results into the store, `tokens.rs` caches the connections'
//! tokens and watches their files, `roster.rs` holds the configured connections.

mod roster;
mod tokens;
mod writer;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::ProbeConfig;
use crate::domain::time::millis;
use crate::domain::{ConnectionId, Millis, Outcome, ProbeReport};
use crate::events::Event;
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::rules::{Event as RuleEvent, SharedRules};
use crate::store::{Claimed, ProbeRecord, Store, StoreError};
use crate::worker::{Crew, LeasedWork, Pause, Turn, run_leased};

pub use roster::Roster;
pub use tokens::{TokenCache, watch_token_files};

/// Time between loop turns when nothing more is due.
const TICK: Duration = Duration::from_millis(200);
/// Most connections claimed in one turn.
const CLAIM_BATCH: u32 = 1024;

/// Probes connections when they are due; shared by the loop, the API and the CLI.
#[derive(Clone)]
pub struct Scheduler {
    store: Store,
    prober: Arc<RwLock<Prober>>,
    metrics: Metrics,
    roster: Arc<RwLock<Arc<Roster>>>,
    settings: Arc<RwLock<Arc<ProbeConfig>>>,
    owner: Arc<str>,
    events: broadcast::Sender<Event>,
    last_tick: Arc<AtomicI64>,
    tokens: Arc<TokenCache>,
    clock: Clock,
    rules: SharedRules,
}

/// Why a requested probe did not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeNowError {
    /// No such active connection.
    #[error("no connection with id {0}")]
    Unknown(String),
    /// Another probe of this connection is in flight.
    #[error("a probe of {0} is already in flight")]
    Busy(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The deadline loop's work: due connections, each probed in a task of its own, its
/// result handed to the writer. One copy is shared by the probe tasks (a clone of the
/// scheduler is some forty reference counts, per probe).
struct DueProbes {
    scheduler: Scheduler,
    results: mpsc::Sender<ProbeRecord>,
    on_tick: Arc<dyn Fn() + Send + Sync>,
    /// The concurrency limit the loop started with (kept until restart).
    concurrency: usize,
}

/// What a scheduler is built from.
pub struct SchedulerParts {
    pub store: Store,
    pub prober: Prober,
    pub metrics: Metrics,
    pub roster: Roster,
    pub settings: ProbeConfig,
    pub events: broadcast::Sender<Event>,
    pub clock: Clock,
    pub rules: SharedRules,
}

impl Scheduler {
    pub fn new(parts: SchedulerParts) -> Scheduler {
        let SchedulerParts {
            store,
            prober,
            metrics,
            roster,
            settings,
            events,
            clock,
            rules,
        } = parts;
        let owner = format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>()
        );
        Scheduler {
            store,
            prober: Arc::new(RwLock::new(prober)),
            metrics,
            roster: Arc::new(RwLock::new(Arc::new(roster))),
            settings: Arc::new(RwLock::new(Arc::new(settings))),
            owner: owner.into(),
            events,
            last_tick: Arc::new(AtomicI64::new(clock.now())),
            tokens: Arc::default(),
            clock,
            rules,
        }
    }

    /// The rules every judgement follows (shared with the webhook writer, the poller, the
    /// dispatcher and the admin API; a reload replaces them).
    pub fn rules(&self) -> &SharedRules {
        &self.rules
    }

    /// The probe settings in force.
    pub fn settings(&self) -> Arc<ProbeConfig> {
        self.settings.read().expect("settings lock").clone()
    }

    /// The HTTP clients in force (shared with polling).
    pub fn prober(&self) -> Prober {
        self.prober.read().expect("prober lock").clone()
    }

    /// Replaces the probe settings and platform clients (reload). The concurrency limit
    /// of the running loop is kept until restart.
    pub fn reconfigure(&self, prober: Prober, settings: ProbeConfig) {
        *self.prober.write().expect("prober lock") = prober;
        *self.settings.write().expect("settings lock") = Arc::new(settings);
    }

    /// Replaces the configured connections (reload).
    pub fn set_roster(&self, roster: Roster) {
        *self.roster.write().expect("roster lock") = Arc::new(roster);
        self.tokens.forget();
    }

    /// The cached tokens (the token watcher drops them when a file changes).
    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    pub fn roster(&self) -> Arc<Roster> {
        self.roster.read().expect("roster lock").clone()
    }

    /// The clock every part of the daemon reads.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// When the loop last turned (milliseconds), for `/readyz`.
    pub fn last_tick(&self) -> Millis {
        self.last_tick.load(Ordering::Relaxed)
    }

    /// The first due time of a connection: its slot in the interval, after `now`.
    pub fn first_due(&self, id: &ConnectionId, now: Millis) -> Millis {
        next_slot(id, now, millis(self.settings().interval))
    }

    /// This process's lease owner name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs the deadline loop until `cancel`; probes run on `tracker`. `on_tick` is called
    /// every turn (the systemd watchdog is pinged from there, so a stuck loop is noticed).
    pub async fn run(
        self,
        cancel: CancellationToken,
        tracker: TaskTracker,
        on_tick: Arc<dyn Fn() + Send + Sync>,
    ) {
        let concurrency = self.settings().concurrency as usize;
        let (results, writer) = self.spawn_writer();
        let due = DueProbes {
            scheduler: self,
            results,
            on_tick,
            concurrency,
        };
        let crew = Crew::Spawned {
            concurrency,
            batch: CLAIM_BATCH,
            tracker,
        };
        run_leased(Arc::new(due), crew, cancel).await;
        // In-flight probes finish on the tracker, each holding the results channel until
        // it has sent; the writer stores them, then ends.
        let _ = writer.await;
    }

    /// Probes one connection now, stores the result and returns it (API, CLI).
    pub async fn probe_now(&self, id: &ConnectionId) -> Result<ProbeRecord, ProbeNowError> {
        let claim = self.claim_now(id).await?;
        let record = self.probe_claimed(claim, true).await;
        self.store
            .record_probes(std::slice::from_ref(&record))
            .await?;
        self.observe(&record);
        Ok(record)
    }

    /// Applies an outcome observed elsewhere (an auth failure while polling) as if a probe
    /// had seen it: classified and stored like one.
    pub async fn apply_report(
        &self,
        id: &ConnectionId,
        report: ProbeReport,
    ) -> Result<ProbeRecord, ProbeNowError> {
        let claim = self.claim_now(id).await?;
        let record = self.judge(claim, report);
        self.store
            .record_probes(std::slice::from_ref(&record))
            .await?;
        self.observe(&record);
        Ok(record)
    }

    fn lease_until(&self, now: Millis) -> Millis {
        // Claim, wait for a platform slot, probe (timeout), record: well within this.
        now + 3 * millis(self.settings().timeout) + 5_000
    }

    /// Probes one claimed connection and classifies the answer.
    async fn probe_claimed(&self, claim: Claimed, fresh_token: bool) -> ProbeRecord {
        let lateness_ms = (self.clock.now() - claim.due).max(0);
        self.metrics
            .probe_lateness
            .observe(lateness_ms as f64 / 1000.0);
        let connection = self.roster().connections.get(&claim.id).cloned();
        self.metrics.probes_in_flight.inc();
        let report = match &connection {
            Some(connection) => match if fresh_token {
                self.tokens.refresh(&connection.token)
            } else {
                self.tokens.get(&connection.token)
            } {
                Ok(token) => {
                    // Debug level: nothing in a probe logs above it, and a span at the
                    // daemon's level formatted its fields on every probe.
                    let span = tracing::debug_span!(
                        "probe",
                        connection_id = %claim.id,
                        platform = %claim.platform
                    );
                    self.prober()
                        .probe(&connection.platform, &token)
                        .instrument(span)
                        .await
                }
                Err(error) => {
                    tracing::warn!(connection_id = %claim.id, %error, "cannot read the token");
                    unreadable_token(&error.to_string())
                }
            },
            None => unreadable_token("connection is no longer configured"),
        };
        self.metrics.probes_in_flight.dec();
        self.judge(claim, report)
    }

    /// Classifies a report on a claimed connection, now, into the record to store.
    fn judge(&self, claim: Claimed, report: ProbeReport) -> ProbeRecord {
        let now = self.clock.now();
        let regular_due = next_slot(&claim.id, now, millis(self.settings().interval));
        let event = RuleEvent::Probe {
            report: &report,
            regular_due,
        };
        let verdict = self.rules.current().judge(&claim.state, event, now);
        ProbeRecord {
            id: claim.id,
            at: now,
            report,
            verdict,
            last_outcome: claim.last_outcome,
            lease_owner: self.owner.to_string(),
        }
    }

    async fn claim_now(&self, id: &ConnectionId) -> Result<Claimed, ProbeNowError> {
        let now = self.clock.now();
        let claim = self
            .store
            .claim_one(id, now, &self.owner, self.lease_until(now))
            .await?;
        match claim {
            Some(claim) => Ok(claim),
            None => Err(match self.store.connection_detail(id).await? {
                Some(_) => ProbeNowError::Busy(id.to_string()),
                None => ProbeNowError::Unknown(id.to_string()),
            }),
        }
    }
}

impl LeasedWork for DueProbes {
    type Item = Claimed;
    const CLAIM_OPERATION: &'static str = "claim_due";
    const CLAIM_FAILED: &'static str = "cannot claim due connections; retrying";
    const IDLE: Duration = TICK;

    fn clock(&self) -> &Clock {
        &self.scheduler.clock
    }

    fn metrics(&self) -> &Metrics {
        &self.scheduler.metrics
    }

    fn lease_until(&self, now: Millis) -> Millis {
        self.scheduler.lease_until(now)
    }

    async fn claim(
        &self,
        now: Millis,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<Claimed>, StoreError> {
        let scheduler = &self.scheduler;
        scheduler
            .store
            .claim_due(now, limit, &scheduler.owner, lease_until)
            .await
    }

    async fn work(&self, claim: Claimed) {
        let record = self.scheduler.probe_claimed(claim, false).await;
        let _ = self.results.send(record).await;
    }

    async fn before_claim(&self, now: Millis) {
        self.scheduler.last_tick.store(now, Ordering::Relaxed);
        self.scheduler
            .metrics
            .scheduler_last_tick
            .set(now as f64 / 1000.0);
        (self.on_tick)();
    }

    fn pause(&self, turn: Turn) -> Pause {
        if turn.was_full() {
            // More is due. Claim again once half the slots are free (or a turn has
            // passed): claiming whenever one slot frees made a claim, which waits for
            // the writer's turn, per probe.
            let wanted = (self.concurrency / 2).clamp(1, CLAIM_BATCH as usize);
            return Pause::UntilFree {
                slots: wanted,
                at_most: TICK,
            };
        }
        // A little jitter keeps replicas from ticking in lock-step, so they share the
        // due connections evenly over time.
        Pause::Sleep(TICK.mul_f64(0.75 + rand::random::<f64>() / 2.0))
    }
}

/// The connection's next slot after `now`: a fixed phase within the interval, from a
/// stable hash of its id, so a fleet is spread evenly and never probed all at once.
pub fn next_slot(id: &ConnectionId, now: Millis, interval: Millis) -> Millis {
    let interval = interval.max(1);
    let phase = (fnv1a(id.as_str().as_bytes()) % interval as u64) as i64;
    let since_phase = (now - phase).rem_euclid(interval);
    now - since_phase + interval
}

fn unreadable_token(detail: &str) -> ProbeReport {
    ProbeReport {
        outcome: Outcome::ClientError,
        status: None,
        latency_ms: 0,
        request_id: None,
        error_code: None,
        message: Some(format!("not probed: {detail}")),
        retry_after_secs: None,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "connwatch".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_spread_ten_thousand_connections_evenly_over_the_interval() {
        let interval = 300_000;
        let now = 1_700_000_000_000;
        let mut per_second = vec![0u32; 300];
        for index in 0..10_000 {
            let id = ConnectionId::parse(&format!("customer-{index}")).expect("id");
            let slot = next_slot(&id, now, interval);
            assert!(slot > now && slot <= now + interval);
            per_second[((slot - now - 1) / 1000) as usize] += 1;
        }
        let busiest = per_second.iter().max().copied().unwrap_or_default();
        assert!(
            busiest < 80,
            "at most ~2x the mean of 33 per second, got {busiest}"
        );
    }

    #[test]
    fn a_connection_keeps_its_phase_from_interval_to_interval() {
        let id = ConnectionId::parse("acme").expect("id");
        let first = next_slot(&id, 1_000_000, 60_000);
        assert_eq!(next_slot(&id, first, 60_000), first + 60_000);
        assert_eq!(next_slot(&id, first + 1, 60_000), first + 60_000);
    }
}
