//! Wall-clock jobs on tokio-cron-scheduler (nightly pruning), guarded against its traps:
//! overlapping runs are skipped and counted, every run's end is a metric, and shutdown
//! is driven by our own cancellation token.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::clock::Clock;
use crate::config::Config;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::rules::SharedRules;
use crate::store::Store;

/// The running cron jobs.
pub struct CronJobs {
    scheduler: JobScheduler,
    busy: Vec<Arc<AtomicBool>>,
    metrics: Metrics,
    clock: Clock,
    /// Once-only work runs on the leader.
    leadership: Leadership,
}

impl CronJobs {
    /// Starts the pruning of history older than `[store] retention` on
    /// `[store] prune_schedule`, and the daily digest when `[email] daily_digest` is set.
    pub async fn start(
        config: &Config,
        store: Store,
        metrics: Metrics,
        leadership: Leadership,
        clock: Clock,
        rules: SharedRules,
    ) -> Result<CronJobs, JobSchedulerError> {
        let mut jobs = CronJobs {
            scheduler: JobScheduler::new().await?,
            busy: Vec::new(),
            metrics,
            clock,
            leadership,
        };
        jobs.add_prune(config, store.clone()).await?;
        if let Some((hour, minute)) = config.email.as_ref().and_then(|email| email.daily_digest) {
            jobs.add_daily_digest(hour, minute, store, rules).await?;
        }
        jobs.scheduler.start().await?;
        Ok(jobs)
    }

    /// Prunes probe history, webhook ids and relayed changes past their retention.
    async fn add_prune(&mut self, config: &Config, store: Store) -> Result<(), JobSchedulerError> {
        let retention_ms = crate::domain::time::millis(config.store.retention);
        let webhook_retention = crate::domain::time::millis(config.webhooks.retention);
        let overlap = crate::domain::time::millis(config.webhooks.overlap);
        let clock = self.clock.clone();
        let leadership = self.leadership.clone();
        self.add("prune", &config.store.prune_schedule, move || {
            let store = store.clone();
            let now = clock.now();
            let leader = leadership.is_leader();
            async move {
                if !leader {
                    return;
                }
                match store.prune_probe_results(now - retention_ms).await {
                    Ok(deleted) => tracing::info!(deleted, "pruned probe history"),
                    Err(error) => tracing::error!(%error, "pruning failed; next run retries"),
                }
                match store.prune_webhooks(now - webhook_retention, overlap).await {
                    Ok(deleted) => tracing::info!(deleted, "pruned webhook ids"),
                    Err(error) => {
                        tracing::error!(%error, "webhook pruning failed; next run retries")
                    }
                }
            }
        })
        .await
    }

    /// Every minute in UTC, compares the *local* wall clock with the configured time; the
    /// digest is keyed by local date, so DST shifts neither skip nor repeat it, and several
    /// replicas enqueue it once.
    async fn add_daily_digest(
        &mut self,
        hour: u32,
        minute: u32,
        store: Store,
        rules: SharedRules,
    ) -> Result<(), JobSchedulerError> {
        let clock = self.clock.clone();
        let leadership = self.leadership.clone();
        self.add("daily_digest", "0 * * * * *", move || {
            let store = store.clone();
            let now = clock.now();
            let rules = rules.current();
            let leader = leadership.is_leader();
            async move {
                let local = chrono::Local::now();
                let due = chrono::Timelike::hour(&local) * 60 + chrono::Timelike::minute(&local)
                    >= hour * 60 + minute;
                if !leader || !due {
                    return;
                }
                let date = local.format("%Y-%m-%d").to_string();
                let Some(digest) = rules.daily_digest(&date, now) else {
                    return;
                };
                match store.enqueue_daily_digest(&date, &digest, now).await {
                    Ok(true) => tracing::debug!(%date, "daily digest enqueued (once per date)"),
                    Ok(false) => {}
                    Err(error) => tracing::error!(%error, "cannot enqueue the daily digest"),
                }
            }
        })
        .await
    }

    async fn add<F, Fut>(
        &mut self,
        name: &'static str,
        schedule: &str,
        run: F,
    ) -> Result<(), JobSchedulerError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let busy = Arc::new(AtomicBool::new(false));
        self.busy.push(busy.clone());
        let run = Arc::new(run);
        let metrics = self.metrics.clone();
        let clock = self.clock.clone();
        let job = Job::new_async(schedule, move |_id, _scheduler| {
            let busy = busy.clone();
            let metrics = metrics.clone();
            let clock = clock.clone();
            let run = run.clone();
            Box::pin(async move {
                if busy.swap(true, Ordering::AcqRel) {
                    metrics.jobs_skipped.with_label_values(&[name]).inc();
                    tracing::warn!(job = name, "previous run still going; skipped");
                    return;
                }
                run().await;
                metrics
                    .job_last_run
                    .with_label_values(&[name])
                    .set(clock.now() as f64 / 1000.0);
                busy.store(false, Ordering::Release);
            })
        })?;
        self.scheduler.add(job).await?;
        Ok(())
    }

    /// Stops firing and waits (up to `deadline`) for runs in flight.
    pub async fn shutdown(mut self, deadline: Duration) {
        if let Err(error) = self.scheduler.shutdown().await {
            tracing::warn!(%error, "cron scheduler did not stop cleanly");
        }
        let waiting = async {
            while self.busy.iter().any(|busy| busy.load(Ordering::Acquire)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(deadline, waiting).await.is_err() {
            tracing::warn!("a cron job was still running at shutdown");
        }
    }
}
