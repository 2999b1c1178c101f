//! The deadline loop: who is due, spread evenly over the interval, claimed with leases.
//!
//! tick -> store.claim_due -> probe (network) -> rules (pure) -> writer batches
//! -> store.record_probes (one transaction) -> metrics and events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{ConnectionConfig, ProbeConfig, SecretError, SecretRef};
use crate::domain::time::millis;
use crate::domain::{ConnectionId, Health, Millis, Outcome, ProbeReport, Transition};
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::rules::{Event as RuleEvent, SharedRules};
use crate::store::{Claimed, ProbeRecord, Store, StoreError};

/// Time between loop turns when nothing more is due.
const TICK: Duration = Duration::from_millis(200);
/// Most connections claimed in one turn.
const CLAIM_BATCH: u32 = 1024;
/// Most probe results written in one transaction.
const WRITE_BATCH: usize = 1024;
/// How long the writer gathers results before a commit. Every commit writes the pages
/// it touched to the WAL: at 333 probes a second (100,000 every 5 minutes) a 25 ms gather
/// made 40 small commits a second; 100 ms makes 10 larger ones at a fraction of the cost.
const WRITE_GATHER: Duration = Duration::from_millis(100);

/// Something worth telling a watcher of the daemon (the demo, tests).
#[derive(Debug, Clone)]
pub enum Event {
    /// A probe was stored.
    Probed {
        id: ConnectionId,
        report: ProbeReport,
    },
    /// A connection changed health.
    Transition {
        id: ConnectionId,
        name: String,
        transition: Transition,
    },
    /// A webhook said the connection needs reauthorization.
    WebhookReauth { id: ConnectionId },
    /// A poll found changes no webhook delivered.
    Recovered { id: ConnectionId, changes: usize },
}

/// The configured connections, swapped whole on reload.
#[derive(Debug, Default)]
pub struct Roster {
    pub connections: HashMap<ConnectionId, Arc<ConnectionConfig>>,
}

impl Roster {
    pub fn new(connections: &[Arc<ConnectionConfig>]) -> Roster {
        Roster {
            connections: connections
                .iter()
                .map(|connection| (connection.id.clone(), connection.clone()))
                .collect(),
        }
    }
}

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

/// Tokens read once and kept until their file changes: the token watcher stats every
/// file each `token_check_interval` and calls `forget` on a change (then probes at once),
/// so a scheduled probe costs no file reads. Probes asked for by a person read afresh.
#[derive(Default)]
pub struct TokenCache {
    tokens: RwLock<HashMap<SecretRef, secrecy::SecretString>>,
}

impl TokenCache {
    fn get(&self, secret: &SecretRef) -> Result<secrecy::SecretString, SecretError> {
        if let Some(token) = self.tokens.read().expect("token cache").get(secret) {
            return Ok(token.clone());
        }
        self.refresh(secret)
    }

    fn refresh(&self, secret: &SecretRef) -> Result<secrecy::SecretString, SecretError> {
        let token = secret.read()?;
        self.tokens
            .write()
            .expect("token cache")
            .insert(secret.clone(), token.clone());
        Ok(token)
    }

    /// Drops every cached token (a token file changed, or the config was reloaded).
    pub fn forget(&self) {
        self.tokens.write().expect("token cache").clear();
    }
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

impl Scheduler {
    pub fn new(
        store: Store,
        prober: Prober,
        metrics: Metrics,
        roster: Roster,
        settings: ProbeConfig,
        events: broadcast::Sender<Event>,
        clock: Clock,
        rules: SharedRules,
    ) -> Scheduler {
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

    fn lease_until(&self, now: Millis) -> Millis {
        // Claim, wait for a platform slot, probe (timeout), record: well within this.
        now + 3 * millis(self.settings().timeout) + 5_000
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
        let permits = Arc::new(Semaphore::new(concurrency));
        let (results, receiver) = mpsc::channel::<ProbeRecord>(4 * WRITE_BATCH);
        let writer = tokio::spawn(self.clone().write_results(receiver));
        // One shared copy for the probe tasks (a clone of the scheduler is some forty
        // reference counts, per probe).
        let shared = Arc::new(self.clone());
        // Shutdown stops claiming at once, even while due work keeps the loop busy.
        while !cancel.is_cancelled() {
            let now = self.clock.now();
            self.last_tick.store(now, Ordering::Relaxed);
            self.metrics.scheduler_last_tick.set(now as f64 / 1000.0);
            on_tick();
            let available = permits.available_permits().min(CLAIM_BATCH as usize) as u32;
            let mut claimed_full_batch = false;
            if available > 0 {
                match self
                    .store
                    .claim_due(now, available, &self.owner, self.lease_until(now))
                    .await
                {
                    Ok(claims) => {
                        claimed_full_batch = claims.len() as u32 == available;
                        for claim in claims {
                            let Ok(permit) = permits.clone().acquire_owned().await else {
                                break;
                            };
                            let scheduler = shared.clone();
                            let results = results.clone();
                            tracker.spawn(async move {
                                let record = scheduler.probe_claimed(claim, false).await;
                                let _ = results.send(record).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => {
                        self.metrics
                            .store_errors
                            .with_label_values(&["claim_due"])
                            .inc();
                        tracing::error!(%error, "cannot claim due connections; retrying");
                    }
                }
            }
            if claimed_full_batch {
                // More is due. Claim again once half the slots are free (or a turn has
                // passed): claiming whenever one slot frees made a claim, which waits
                // for the writer's turn, per probe.
                let wanted = (concurrency / 2).clamp(1, CLAIM_BATCH as usize);
                if permits.available_permits() >= wanted {
                    tokio::task::yield_now().await;
                    continue;
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    free = permits.clone().acquire_many_owned(wanted as u32) => drop(free),
                    () = tokio::time::sleep(TICK) => {}
                }
                continue;
            }
            // A little jitter keeps replicas from ticking in lock-step, so they share the
            // due connections evenly over time.
            let pause = TICK.mul_f64(0.75 + rand::random::<f64>() / 2.0);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        drop(results);
        // In-flight probes finish on the tracker; the writer stores them, then ends.
        let _ = writer.await;
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

    /// Stores probe results in batches: whatever has arrived, up to `WRITE_BATCH`.
    async fn write_results(self, mut receiver: mpsc::Receiver<ProbeRecord>) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while receiver.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            // Gather for a moment: one commit for many results costs a fraction of many
            // commits (the WAL pages of the table and its index are written once).
            let gather = tokio::time::sleep(WRITE_GATHER);
            tokio::pin!(gather);
            while batch.len() < WRITE_BATCH {
                let room = WRITE_BATCH - batch.len();
                tokio::select! {
                    () = &mut gather => break,
                    received = receiver.recv_many(&mut batch, room) => {
                        if received == 0 {
                            break;
                        }
                    }
                }
            }
            self.store_batch(&batch).await;
            batch.clear();
        }
    }

    async fn store_batch(&self, batch: &[ProbeRecord]) {
        let mut attempt = 0;
        loop {
            match self.store.record_probes(batch).await {
                Ok(applied) => {
                    // A result whose lease was lost was dropped: it is not counted either.
                    let roster = self.roster();
                    let mut counters = ProbeCounters::default();
                    for record in batch {
                        if applied.contains(record.id.as_str()) {
                            self.observe_with(&roster, &mut counters, record);
                        }
                    }
                    return;
                }
                Err(error) if attempt < 3 => {
                    attempt += 1;
                    self.metrics
                        .store_errors
                        .with_label_values(&["record_probes"])
                        .inc();
                    tracing::warn!(%error, attempt, "cannot store probe results; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(error) => {
                    // The leases expire and the connections are probed again.
                    self.metrics
                        .store_errors
                        .with_label_values(&["record_probes"])
                        .inc();
                    tracing::error!(%error, probes = batch.len(), "probe results lost; they will be re-probed");
                    return;
                }
            }
        }
    }

    fn observe(&self, record: &ProbeRecord) {
        self.observe_with(&self.roster(), &mut ProbeCounters::default(), record);
    }

    /// Counts a stored probe, tells watchers and logs a change of health.
    fn observe_with(&self, roster: &Roster, counters: &mut ProbeCounters, record: &ProbeRecord) {
        let connection = roster.connections.get(&record.id);
        let platform = connection
            .map(|connection| connection.platform.as_str())
            .unwrap_or("unknown");
        counters
            .get(&self.metrics, platform, record.report.outcome)
            .inc();
        counters
            .duration(&self.metrics, platform)
            .observe(record.report.latency_ms as f64 / 1000.0);
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Event::Probed {
                id: record.id.clone(),
                report: record.report.clone(),
            });
        }
        if let Some(transition) = &record.verdict.transition {
            self.metrics
                .transitions
                .with_label_values(&[transition.to.as_str()])
                .inc();
            // A first success is routine (100,000 of them at start-up): debug only.
            if transition.from == Health::Unknown && transition.to == Health::Healthy {
                tracing::debug!(connection_id = %record.id, "first probe ok");
            } else {
                tracing::info!(
                    connection_id = %record.id,
                    from = %transition.from,
                    to = %transition.to,
                    outcome = ?transition.outcome.map(Outcome::as_str),
                    error_code = ?transition.error_code,
                    request_id = ?transition.request_id,
                    "health changed"
                );
            }
            let _ = self.events.send(Event::Transition {
                id: record.id.clone(),
                name: connection
                    .map(|connection| connection.name.clone())
                    .unwrap_or_default(),
                transition: transition.clone(),
            });
        }
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
        let now = self.clock.now();
        let regular_due = next_slot(&claim.id, now, millis(self.settings().interval));
        let event = RuleEvent::Probe {
            report: &report,
            regular_due,
        };
        let verdict = self.rules.current().judge(&claim.state, event, now);
        let record = ProbeRecord {
            id: claim.id,
            at: now,
            report,
            verdict,
            last_outcome: claim.last_outcome,
            lease_owner: self.owner.to_string(),
        };
        self.store
            .record_probes(std::slice::from_ref(&record))
            .await?;
        self.observe(&record);
        Ok(record)
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

    /// This process's lease owner name.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

/// The probe metrics of one platform, looked up once per batch of results rather than
/// once per result (a label lookup hashes its values and takes a lock).
#[derive(Default)]
struct ProbeCounters {
    platform: String,
    outcomes: HashMap<Outcome, prometheus::IntCounter>,
    duration: Option<prometheus::Histogram>,
}

impl ProbeCounters {
    fn switch_to(&mut self, platform: &str) {
        if self.platform != platform {
            self.platform = platform.to_owned();
            self.outcomes.clear();
            self.duration = None;
        }
    }

    fn get(
        &mut self,
        metrics: &Metrics,
        platform: &str,
        outcome: Outcome,
    ) -> &prometheus::IntCounter {
        self.switch_to(platform);
        self.outcomes.entry(outcome).or_insert_with(|| {
            metrics
                .probes
                .with_label_values(&[platform, outcome.as_str()])
        })
    }

    fn duration(&mut self, metrics: &Metrics, platform: &str) -> &prometheus::Histogram {
        self.switch_to(platform);
        self.duration
            .get_or_insert_with(|| metrics.probe_duration.with_label_values(&[platform]))
    }
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

/// The connection's next slot after `now`: a fixed phase within the interval, from a
/// stable hash of its id, so a fleet is spread evenly and never probed all at once.
pub fn next_slot(id: &ConnectionId, now: Millis, interval: Millis) -> Millis {
    let interval = interval.max(1);
    let phase = (fnv1a(id.as_str().as_bytes()) % interval as u64) as i64;
    let since_phase = (now - phase).rem_euclid(interval);
    now - since_phase + interval
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
