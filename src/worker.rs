//! The one leased-worker loop: claim a batch with a lease, work each item, pause, repeat
//! until cancelled.
//!
//! The scheduler, the poller, the email dispatcher and the relay each say what they claim
//! and how they work one item (`LeasedWork`); `run_leased` owns the turn that was written
//! four times before: read now from the clock, claim with a lease, on a store error count
//! `connwatch_store_errors_total{operation}` and log once and carry on, work the batch (in
//! the loop's task or spawned under a concurrency cap), pause, and stop claiming as soon as
//! the token is cancelled. What was claimed but not worked is left to its lease.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::domain::Millis;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// A loop over leased work: what it claims, how it works one item, how it paces itself.
pub trait LeasedWork: Send + Sync + 'static {
    /// One claimed piece of work (a due connection, a poll, an email, a relay message).
    type Item: Send + 'static;

    /// The `operation` label of `connwatch_store_errors_total` when a claim fails.
    const CLAIM_OPERATION: &'static str;
    /// What is logged (error level, with the error) when a claim fails.
    const CLAIM_FAILED: &'static str;
    /// The pause after a turn that claimed nothing (used by the default `pause`).
    const IDLE: Duration;

    /// Where the loop reads the time.
    fn clock(&self) -> &Clock;

    /// Where a failed claim is counted.
    fn metrics(&self) -> &Metrics;

    /// When a lease taken at `now` runs out.
    fn lease_until(&self, now: Millis) -> Millis;

    /// Claims up to `limit` items, leased to this process until `lease_until`.
    fn claim(
        &self,
        now: Millis,
        limit: u32,
        lease_until: Millis,
    ) -> impl Future<Output = Result<Vec<Self::Item>, StoreError>> + Send;

    /// Works one item; records its outcome and logs its own failures (never `Err`).
    fn work(&self, item: Self::Item) -> impl Future<Output = ()> + Send;

    /// Runs at the start of every turn, before the claim (quiet detection, storm checks,
    /// the watchdog). Nothing by default.
    fn before_claim(&self, now: Millis) -> impl Future<Output = ()> + Send {
        let _ = now;
        async {}
    }

    /// Runs at the end of every turn, after the batch (gauges). Nothing by default.
    fn after_batch(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Whether the next item of an in-line batch may start while its lease runs out at
    /// `lease_until`. Yes by default.
    fn may_start(&self, lease_until: Millis) -> bool {
        let _ = lease_until;
        true
    }

    /// How long to wait before the next turn. By default: at once after a turn that
    /// claimed something (more may be waiting), `IDLE` after one that claimed nothing.
    fn pause(&self, turn: Turn) -> Pause {
        if turn.claimed == 0 {
            Pause::Sleep(Self::IDLE)
        } else {
            Pause::None
        }
    }
}

/// How a turn's items are worked.
#[derive(Debug, Clone)]
pub enum Crew {
    /// One after another in the loop's own task; a claim takes up to `batch`. On cancel,
    /// or when `LeasedWork::may_start` says no, the rest of the batch is left to its lease.
    InLine { batch: u32 },
    /// Each in a task of its own on `tracker`, at most `concurrency` at once; a claim takes
    /// as many as there are free slots, up to `batch` (none when no slot is free). What
    /// was claimed is always started, so no claim waits out its lease unworked.
    Spawned {
        concurrency: usize,
        batch: u32,
        tracker: TaskTracker,
    },
}

/// What one turn did, for `LeasedWork::pause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// Items claimed (0 after a failed claim).
    pub claimed: usize,
    /// The most the claim could take (0 when no slot was free and nothing was claimed).
    pub limit: u32,
}

/// What the loop does between two turns; cancellation cuts every wait short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Claim again at once.
    None,
    /// Sleep this long.
    Sleep(Duration),
    /// Claim again once `slots` work slots are free, or after `at_most`. When they are
    /// free already (always, for an in-line crew), yield to the runtime and go on.
    UntilFree { slots: usize, at_most: Duration },
}

impl Turn {
    /// Whether the claim took all it could (more is probably due).
    pub fn was_full(&self) -> bool {
        self.limit > 0 && self.claimed == self.limit as usize
    }
}

/// Runs `worker`'s turns until `cancel`: claim, work, pause. A failed claim is counted
/// and logged once and the loop goes on. Returns once cancelled; spawned work still in
/// flight finishes on its tracker.
pub async fn run_leased<W: LeasedWork>(worker: Arc<W>, crew: Crew, cancel: CancellationToken) {
    let team = Team::from(crew);
    // Shutdown stops claiming at once, even while due work keeps the loop busy.
    while !cancel.is_cancelled() {
        let now = worker.clock().now();
        worker.before_claim(now).await;
        let limit = team.room();
        let lease_until = worker.lease_until(now);
        let items = if limit > 0 {
            claim_or_log(&*worker, now, limit, lease_until).await
        } else {
            Vec::new()
        };
        let claimed = items.len();
        match &team {
            Team::InLine { .. } => work_in_line(&*worker, items, lease_until, &cancel).await,
            Team::Spawned { slots, tracker, .. } => {
                spawn_each(&worker, items, slots, tracker).await;
            }
        }
        worker.after_batch().await;
        if !team
            .wait(worker.pause(Turn { claimed, limit }), &cancel)
            .await
        {
            return;
        }
    }
}

/// A `Crew` at work: the spawned crew's slots are a semaphore.
enum Team {
    InLine {
        batch: u32,
    },
    Spawned {
        slots: Arc<Semaphore>,
        batch: u32,
        tracker: TaskTracker,
    },
}

impl From<Crew> for Team {
    fn from(crew: Crew) -> Team {
        match crew {
            Crew::InLine { batch } => Team::InLine { batch },
            Crew::Spawned {
                concurrency,
                batch,
                tracker,
            } => Team::Spawned {
                slots: Arc::new(Semaphore::new(concurrency)),
                batch,
                tracker,
            },
        }
    }
}

impl Team {
    /// The most the next claim may take.
    fn room(&self) -> u32 {
        match self {
            Team::InLine { batch } => *batch,
            Team::Spawned { slots, batch, .. } => {
                slots.available_permits().min(*batch as usize) as u32
            }
        }
    }

    /// Waits as `pause` says; false when cancelled meanwhile (the loop ends).
    async fn wait(&self, pause: Pause, cancel: &CancellationToken) -> bool {
        match pause {
            Pause::None => true,
            Pause::Sleep(duration) => {
                tokio::select! {
                    () = cancel.cancelled() => false,
                    () = tokio::time::sleep(duration) => true,
                }
            }
            Pause::UntilFree {
                slots: wanted,
                at_most,
            } => match self {
                Team::Spawned { slots, .. } if slots.available_permits() < wanted => {
                    tokio::select! {
                        () = cancel.cancelled() => false,
                        free = slots.clone().acquire_many_owned(wanted as u32) => {
                            drop(free);
                            true
                        }
                        () = tokio::time::sleep(at_most) => true,
                    }
                }
                Team::Spawned { .. } | Team::InLine { .. } => {
                    tokio::task::yield_now().await;
                    true
                }
            },
        }
    }
}

/// The claim; a store error is counted and logged here, once, and reads as nothing due.
async fn claim_or_log<W: LeasedWork>(
    worker: &W,
    now: Millis,
    limit: u32,
    lease_until: Millis,
) -> Vec<W::Item> {
    match worker.claim(now, limit, lease_until).await {
        Ok(items) => items,
        Err(error) => {
            worker
                .metrics()
                .store_errors
                .with_label_values(&[W::CLAIM_OPERATION])
                .inc();
            tracing::error!(%error, "{}", W::CLAIM_FAILED);
            Vec::new()
        }
    }
}

/// Works the batch in this task, stopping on cancel or when the lease could run out.
async fn work_in_line<W: LeasedWork>(
    worker: &W,
    items: Vec<W::Item>,
    lease_until: Millis,
    cancel: &CancellationToken,
) {
    for item in items {
        // The rest are claimed again when their lease expires, never worked twice at once.
        if cancel.is_cancelled() || !worker.may_start(lease_until) {
            break;
        }
        worker.work(item).await;
    }
}

/// Starts every item in a task of its own, each holding a work slot until it is done.
async fn spawn_each<W: LeasedWork>(
    worker: &Arc<W>,
    items: Vec<W::Item>,
    slots: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    for item in items {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        // One shared copy of the worker per task: a reference count, not a deep clone.
        let worker = worker.clone();
        tracker.spawn(async move {
            worker.work(item).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Hands out numbered items from a fixed list of claim answers; cancels the loop once
    /// they are used up, so every test ends on its own.
    struct Script {
        clock: Clock,
        metrics: Metrics,
        cancel: CancellationToken,
        answers: Mutex<Vec<Result<Vec<u32>, StoreError>>>,
        limits: Mutex<Vec<u32>>,
        worked: Mutex<Vec<u32>>,
        running: AtomicUsize,
        most_running: AtomicUsize,
        starts_allowed: AtomicUsize,
    }

    impl Script {
        fn new(answers: Vec<Result<Vec<u32>, StoreError>>) -> Arc<Script> {
            Arc::new(Script {
                clock: Clock::system(),
                metrics: Metrics::new("test"),
                cancel: CancellationToken::new(),
                answers: Mutex::new(answers.into_iter().rev().collect()),
                limits: Mutex::default(),
                worked: Mutex::default(),
                running: AtomicUsize::new(0),
                most_running: AtomicUsize::new(0),
                starts_allowed: AtomicUsize::new(usize::MAX),
            })
        }

        fn claim_errors(&self) -> u64 {
            self.metrics
                .store_errors
                .with_label_values(&["claim_script"])
                .get()
        }
    }

    impl LeasedWork for Script {
        type Item = u32;
        const CLAIM_OPERATION: &'static str = "claim_script";
        const CLAIM_FAILED: &'static str = "cannot claim the script";
        const IDLE: Duration = Duration::from_millis(1);

        fn clock(&self) -> &Clock {
            &self.clock
        }

        fn metrics(&self) -> &Metrics {
            &self.metrics
        }

        fn lease_until(&self, now: Millis) -> Millis {
            now + 60_000
        }

        async fn claim(
            &self,
            _now: Millis,
            limit: u32,
            _lease_until: Millis,
        ) -> Result<Vec<u32>, StoreError> {
            self.limits.lock().expect("limits").push(limit);
            let answer = self.answers.lock().expect("answers").pop();
            answer.unwrap_or_else(|| {
                self.cancel.cancel();
                Ok(Vec::new())
            })
        }

        async fn work(&self, item: u32) {
            let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(running, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.worked.lock().expect("worked").push(item);
            self.running.fetch_sub(1, Ordering::SeqCst);
        }

        fn may_start(&self, _lease_until: Millis) -> bool {
            self.starts_allowed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok()
        }
    }

    #[tokio::test]
    async fn a_failed_claim_is_counted_once_and_the_loop_carries_on() {
        let script = Script::new(vec![
            Err(StoreError::Lock("database down".into())),
            Ok(vec![1, 2]),
        ]);
        let cancel = script.cancel.clone();
        run_leased(script.clone(), Crew::InLine { batch: 2 }, cancel).await;
        assert_eq!(script.claim_errors(), 1);
        assert_eq!(*script.worked.lock().expect("worked"), vec![1, 2]);
    }

    #[tokio::test]
    async fn an_in_line_batch_stops_where_the_lease_could_run_out() {
        let script = Script::new(vec![Ok(vec![1, 2, 3])]);
        script.starts_allowed.store(2, Ordering::SeqCst);
        let cancel = script.cancel.clone();
        run_leased(script.clone(), Crew::InLine { batch: 3 }, cancel).await;
        assert_eq!(*script.worked.lock().expect("worked"), vec![1, 2]);
    }

    #[tokio::test]
    async fn nothing_is_claimed_once_cancelled() {
        let script = Script::new(vec![Ok(vec![1])]);
        script.cancel.cancel();
        let cancel = script.cancel.clone();
        run_leased(script.clone(), Crew::InLine { batch: 1 }, cancel).await;
        assert!(script.limits.lock().expect("limits").is_empty());
        assert!(script.worked.lock().expect("worked").is_empty());
    }

    #[tokio::test]
    async fn spawned_work_claims_only_free_slots_and_keeps_within_them() {
        let script = Script::new(vec![Ok(vec![1, 2, 3]), Ok(vec![4, 5, 6])]);
        let tracker = TaskTracker::new();
        let crew = Crew::Spawned {
            concurrency: 3,
            batch: 8,
            tracker: tracker.clone(),
        };
        let cancel = script.cancel.clone();
        run_leased(script.clone(), crew, cancel).await;
        tracker.close();
        tracker.wait().await;
        let limits = script.limits.lock().expect("limits").clone();
        assert_eq!(limits.first(), Some(&3), "{limits:?}");
        assert!(limits.iter().all(|limit| *limit <= 3), "{limits:?}");
        let mut worked = script.worked.lock().expect("worked").clone();
        worked.sort_unstable();
        assert_eq!(worked, vec![1, 2, 3, 4, 5, 6]);
        assert!(script.most_running.load(Ordering::SeqCst) <= 3);
    }
}
