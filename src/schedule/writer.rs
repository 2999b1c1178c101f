//! The result writer: gathers probe results into batches, stores each batch in one
//! transaction, then counts, tells watchers and logs what was stored.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Roster, Scheduler};
use crate::domain::{Health, Outcome};
use crate::events::Event;
use crate::metrics::Metrics;
use crate::store::ProbeRecord;

/// Most probe results written in one transaction.
const WRITE_BATCH: usize = 1024;
/// How long the writer gathers results before a commit. Every commit writes the pages
/// it touched to the WAL: at 333 probes a second (100,000 every 5 minutes) a 25 ms gather
/// made 40 small commits a second; 100 ms makes 10 larger ones at a fraction of the cost.
const WRITE_GATHER: Duration = Duration::from_millis(100);

/// The probe metrics of one platform, looked up once per batch of results rather than
/// once per result (a label lookup hashes its values and takes a lock).
#[derive(Default)]
struct ProbeCounters {
    platform: String,
    outcomes: HashMap<Outcome, prometheus::IntCounter>,
    duration: Option<prometheus::Histogram>,
}

impl Scheduler {
    /// Starts the writer; it ends once every sender is dropped and what they sent is stored.
    pub(super) fn spawn_writer(&self) -> (mpsc::Sender<ProbeRecord>, JoinHandle<()>) {
        let (results, receiver) = mpsc::channel::<ProbeRecord>(4 * WRITE_BATCH);
        let writer = tokio::spawn(self.clone().write_results(receiver));
        (results, writer)
    }

    /// Counts a stored probe, tells watchers and logs a change of health.
    pub(super) fn observe(&self, record: &ProbeRecord) {
        self.observe_with(&self.roster(), &mut ProbeCounters::default(), record);
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
