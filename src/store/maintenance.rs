//! Store upkeep the daemon runs from a task of its own: the SQLite WAL checkpoint.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Store;

/// How often the SQLite WAL is copied into the database (`Store::checkpoint`).
const WAL_CHECKPOINT: Duration = Duration::from_millis(500);

/// Checkpoints the SQLite WAL every `WAL_CHECKPOINT` beside the writers (no-op on
/// PostgreSQL) until `cancel`; a last one on shutdown.
pub async fn checkpoint_wal(store: Store, cancel: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(WAL_CHECKPOINT) => false,
        };
        if let Err(error) = store.checkpoint().await {
            tracing::warn!(%error, "cannot checkpoint the database");
        }
        if stopping {
            return;
        }
    }
}
