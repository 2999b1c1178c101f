//! One replica at a time runs the jobs that must run once (pruning, digests, storm
//! detection) and exports the fleet-wide gauges: the holder of a PostgreSQL advisory
//! lock, kept on a dedicated connection (if that connection dies, PostgreSQL releases the
//! lock and another replica takes over). On SQLite, one process is the whole fleet.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Backend, Store};

/// The advisory lock key ("connwatch" in ASCII, truncated to 64 bits).
const LOCK_KEY: i64 = 0x636f_6e6e_7761_7463;

/// Whether this process is the leader, shared by the jobs that check it.
#[derive(Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Tries for the lock every few seconds and holds it until `cancel`.
    pub async fn run(self, store: Store, metrics: Metrics, cancel: CancellationToken) {
        if store.backend() == Backend::Sqlite {
            self.0.store(true, Ordering::Relaxed);
            metrics.leader.set(1);
            return;
        }
        loop {
            match store.hold_advisory_lock(LOCK_KEY).await {
                Ok(Some(mut held)) => {
                    tracing::info!("this replica now runs the once-only jobs (advisory lock held)");
                    self.0.store(true, Ordering::Relaxed);
                    metrics.leader.set(1);
                    // Check the lock's connection; losing it means losing the lock.
                    loop {
                        tokio::select! {
                            () = cancel.cancelled() => {
                                self.0.store(false, Ordering::Relaxed);
                                metrics.leader.set(0);
                                return;
                            }
                            () = tokio::time::sleep(Duration::from_secs(5)) => {}
                        }
                        if let Err(error) = held.check().await {
                            tracing::warn!(%error, "lost the advisory lock's connection; stepping down");
                            break;
                        }
                    }
                    self.0.store(false, Ordering::Relaxed);
                    metrics.leader.set(0);
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot try the advisory lock"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
}
