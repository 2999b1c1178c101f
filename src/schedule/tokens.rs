//! Connection tokens: read once, cached, and dropped when their file changes (the token
//! watcher), so a scheduled probe costs no file read and a rotated token is probed at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Scheduler;
use crate::config::secret::FileStamp;
use crate::config::{SecretError, SecretRef};
use crate::domain::ConnectionId;
use crate::store::Store;

/// Tokens read once and kept until their file changes: the token watcher stats every
/// file each `token_check_interval` and calls `forget` on a change (then probes at once),
/// so a scheduled probe costs no file reads. Probes asked for by a person read afresh.
#[derive(Default)]
pub struct TokenCache {
    tokens: RwLock<HashMap<SecretRef, secrecy::SecretString>>,
}

impl TokenCache {
    /// Drops every cached token (a token file changed, or the config was reloaded).
    pub fn forget(&self) {
        self.tokens.write().expect("token cache").clear();
    }

    /// The cached token, read on first use.
    pub(super) fn get(&self, secret: &SecretRef) -> Result<secrecy::SecretString, SecretError> {
        if let Some(token) = self.tokens.read().expect("token cache").get(secret) {
            return Ok(token.clone());
        }
        self.refresh(secret)
    }

    /// The token read afresh (and cached).
    pub(super) fn refresh(&self, secret: &SecretRef) -> Result<secrecy::SecretString, SecretError> {
        let token = secret.read()?;
        self.tokens
            .write()
            .expect("token cache")
            .insert(secret.clone(), token.clone());
        Ok(token)
    }
}

/// Re-stats token files every `every` until `cancel`; a changed file (rotated token)
/// drops the cached tokens and gets its connections an immediate probe.
pub async fn watch_token_files(
    scheduler: Scheduler,
    store: Store,
    every: Duration,
    cancel: CancellationToken,
) {
    // One stat per distinct file, however many connections share it.
    let mut known: HashMap<PathBuf, Option<FileStamp>> = HashMap::new();
    let mut first_pass = true;
    loop {
        check_token_files(&scheduler, &store, &mut known).await;
        if first_pass {
            // A token cached before its file's first stamp was taken may be older than it.
            scheduler.tokens().forget();
            first_pass = false;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// One pass of the watcher: stats each file of the roster against its last stamp.
async fn check_token_files(
    scheduler: &Scheduler,
    store: &Store,
    known: &mut HashMap<PathBuf, Option<FileStamp>>,
) {
    let roster = scheduler.roster();
    let mut by_file: HashMap<PathBuf, Vec<&ConnectionId>> = HashMap::new();
    for (id, connection) in &roster.connections {
        if let Some(path) = connection.token.path() {
            by_file.entry(path).or_default().push(id);
        }
    }
    for (path, ids) in &by_file {
        let stamp = FileStamp::of(path);
        let previous = known.insert(path.clone(), stamp);
        if !matches!(previous, Some(old) if old != stamp) {
            continue;
        }
        scheduler.tokens().forget();
        for id in ids {
            tracing::info!(connection_id = %id, "token file changed; probing now");
            if let Err(error) = store.request_probe(id, scheduler.clock().now()).await {
                tracing::warn!(connection_id = %id, %error, "cannot schedule the probe");
            }
        }
    }
    known.retain(|path, _| by_file.contains_key(path));
}
