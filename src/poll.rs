//! Quiet detection and the recent-changes fallback.
//!
//! A connection whose last webhook is older than its expected interval + grace is quiet.
//! While quiet, it is polled every `poll_interval` from its watermark (less an overlap for
//! clock skew), page by page to the end; each page is stored with its cursor, so a restart
//! resumes without losing or repeating a change. Changes no webhook delivered are
//! recovered: counted, and queued for the relay.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{ChangesConfig, PlatformConfig, WebhooksConfig};
use crate::domain::time::millis;
use crate::domain::{ConnectionId, Millis, Outcome, time};
use crate::metrics::Metrics;
use crate::probe::read_answer;
use crate::schedule::{Event, Scheduler};
use crate::store::{PollClaim, PolledChange, Store};
use crate::webhook::{text_at, time_value};

/// Largest page of changes read.
const PAGE_LIMIT: usize = 8 * 1024 * 1024;
/// Polls in flight at once.
const POLL_CONCURRENCY: usize = 16;

/// Watches for quiet connections and polls them.
#[derive(Clone)]
pub struct Poller {
    pub store: Store,
    pub scheduler: Scheduler,
    pub metrics: Metrics,
    pub settings: WebhooksConfig,
    pub relay_enabled: bool,
    pub events: broadcast::Sender<Event>,
}

/// How one poll ended.
enum PollEnd {
    Complete { recovered: usize },
    AuthFailed,
    RateLimited { retry_after: Option<u64> },
    Failed(String),
}

impl Poller {
    /// Runs until `cancel`: marks quiet connections, claims due polls, runs them.
    pub async fn run(self, cancel: CancellationToken, tracker: TaskTracker) {
        let permits = Arc::new(tokio::sync::Semaphore::new(POLL_CONCURRENCY));
        let grace = millis(self.settings.grace);
        loop {
            let now = self.scheduler.clock().now();
            match self.store.mark_quiet(now, grace).await {
                Ok(quiet) => {
                    for id in quiet {
                        tracing::warn!(connection_id = %id, "no webhook within the expected interval; polling for changes");
                    }
                }
                Err(error) => {
                    self.metrics
                        .store_errors
                        .with_label_values(&["mark_quiet"])
                        .inc();
                    tracing::error!(%error, "cannot check for quiet connections");
                }
            }
            let available = permits.available_permits() as u32;
            if available > 0 {
                let lease_until = now + 10 * 60_000;
                match self
                    .store
                    .claim_polls(now, available, self.scheduler.owner(), lease_until)
                    .await
                {
                    Ok(claims) => {
                        for claim in claims {
                            let Ok(permit) = permits.clone().acquire_owned().await else {
                                break;
                            };
                            let poller = self.clone();
                            let span = tracing::info_span!("poll", connection_id = %claim.id, platform = %claim.platform);
                            tracker.spawn(
                                async move {
                                    poller.poll(claim).await;
                                    drop(permit);
                                }
                                .instrument(span),
                            );
                        }
                    }
                    Err(error) => {
                        self.metrics
                            .store_errors
                            .with_label_values(&["claim_polls"])
                            .inc();
                        tracing::error!(%error, "cannot claim polls");
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn poll(&self, claim: PollClaim) {
        let owner = self.scheduler.owner().to_owned();
        let now = self.scheduler.clock().now();
        let poll_interval = millis(self.settings.poll_interval);
        let platform = self.scheduler.prober().platform(&claim.platform);
        let changes = platform
            .as_ref()
            .and_then(|platform| platform.changes.clone());
        let token = self
            .scheduler
            .roster()
            .connections
            .get(&claim.id)
            .map(|connection| connection.token.read());
        let end = match (platform, changes, token) {
            (Some(platform), Some(changes), Some(Ok(token))) => {
                self.paginate(&claim, &platform, &changes, &token, &owner)
                    .await
            }
            (_, None, _) => {
                PollEnd::Failed("the platform has no [changes] endpoint configured".into())
            }
            (_, _, Some(Err(error))) => PollEnd::Failed(error.to_string()),
            (None, _, _) | (_, _, None) => {
                PollEnd::Failed("connection no longer configured".into())
            }
        };
        let count = |result: &str| {
            self.metrics
                .polls
                .with_label_values(&[claim.platform.as_str(), result])
                .inc();
        };
        let stored = match end {
            PollEnd::Complete { recovered } => {
                count("ok");
                if recovered > 0 {
                    self.metrics
                        .changes_recovered
                        .with_label_values(&[claim.platform.as_str()])
                        .inc_by(recovered as u64);
                    tracing::info!(recovered, "changes recovered that no webhook delivered");
                    let _ = self.events.send(Event::Recovered {
                        id: claim.id.clone(),
                        changes: recovered,
                    });
                }
                return;
            }
            PollEnd::AuthFailed => {
                count("auth_failed");
                self.store
                    .defer_poll(&claim.id, &owner, now + poll_interval, "auth_failed", now)
                    .await
            }
            PollEnd::RateLimited { retry_after } => {
                count("rate_limited");
                let wait = retry_after
                    .map(|secs| secs as i64 * 1000)
                    .unwrap_or(poll_interval);
                self.store
                    .defer_poll(&claim.id, &owner, now + wait.max(1000), "rate_limited", now)
                    .await
            }
            PollEnd::Failed(reason) => {
                count("error");
                tracing::warn!(%reason, "poll failed; retrying at the next poll interval");
                self.store
                    .defer_poll(&claim.id, &owner, now + poll_interval, "error", now)
                    .await
            }
        };
        if let Err(error) = stored {
            tracing::error!(%error, "cannot store the poll's end; its lease expires");
        }
    }

    /// Follows pagination to the end, storing each page; finishes the poll when complete.
    async fn paginate(
        &self,
        claim: &PollClaim,
        platform: &PlatformConfig,
        changes: &ChangesConfig,
        token: &SecretString,
        owner: &str,
    ) -> PollEnd {
        let since = claim
            .resume_since
            .unwrap_or(claim.watermark - millis(self.settings.overlap));
        let mut cursor = claim.resume_cursor.clone();
        let mut newest = claim.max_seen;
        let mut recovered = 0;
        for _ in 0..changes.max_pages {
            let url = match page_url(platform, changes, since, cursor.as_deref()) {
                Ok(url) => url,
                Err(reason) => return PollEnd::Failed(reason),
            };
            let answer = match self
                .scheduler
                .prober()
                .request(
                    &platform.name,
                    reqwest::Method::GET,
                    &url,
                    token,
                    PAGE_LIMIT,
                )
                .await
            {
                Ok(answer) => answer,
                Err(report) => return PollEnd::Failed(report.message.unwrap_or_default()),
            };
            if !(200..300).contains(&answer.status) {
                let report = read_answer(
                    platform,
                    answer.status,
                    &answer.headers,
                    &answer.body,
                    answer.latency_ms,
                );
                return match report.outcome {
                    Outcome::AuthFailed => {
                        // An auth failure here is an auth failure of the connection.
                        if let Err(error) = self.scheduler.apply_report(&claim.id, report).await {
                            tracing::warn!(%error, "poll auth failure not applied; the next probe will see it");
                        }
                        PollEnd::AuthFailed
                    }
                    Outcome::RateLimited => PollEnd::RateLimited {
                        retry_after: report.retry_after_secs,
                    },
                    Outcome::Ok
                    | Outcome::ServerError
                    | Outcome::ClientError
                    | Outcome::Timeout
                    | Outcome::NetworkError
                    | Outcome::InvalidResponse => {
                        PollEnd::Failed(format!("changes endpoint answered {}", answer.status))
                    }
                };
            }
            let Ok(page) = serde_json::from_slice::<Value>(&answer.body) else {
                return PollEnd::Failed("changes page is not JSON".into());
            };
            let Some(items) = page
                .pointer(&changes.items_pointer)
                .and_then(Value::as_array)
            else {
                return PollEnd::Failed(format!(
                    "no array at {} in the changes page",
                    changes.items_pointer
                ));
            };
            let now = self.scheduler.clock().now();
            let polled: Vec<PolledChange> = items
                .iter()
                .filter_map(|item| {
                    let change_id = text_at(item, &changes.id_pointer)?;
                    let updated_at = item
                        .pointer(&changes.updated_pointer)
                        .and_then(time_value)?;
                    let relay = self.relay_enabled.then(|| {
                        relay_message(&claim.id, platform, &change_id, updated_at, item, now)
                    });
                    Some(PolledChange {
                        change_id,
                        updated_at,
                        relay,
                    })
                })
                .collect();
            if polled.len() < items.len() {
                tracing::warn!(
                    skipped = items.len() - polled.len(),
                    "changes without id or update time skipped"
                );
            }
            newest = newest.max(polled.iter().map(|change| change.updated_at).max());
            let next = text_at(&page, &changes.next_pointer);
            match self
                .store
                .record_poll_page(&claim.id, owner, since, next.as_deref(), &polled, now)
                .await
            {
                Ok(count) => recovered += count,
                Err(error) => return PollEnd::Failed(format!("cannot store the page: {error}")),
            }
            match next {
                Some(next) => cursor = Some(next),
                None => {
                    let covered_until = newest.unwrap_or(claim.watermark);
                    let next_poll = now + millis(self.settings.poll_interval);
                    if let Err(error) = self
                        .store
                        .finish_poll(&claim.id, owner, covered_until, next_poll, now)
                        .await
                    {
                        return PollEnd::Failed(format!("cannot finish the poll: {error}"));
                    }
                    return PollEnd::Complete { recovered };
                }
            }
        }
        PollEnd::Failed(format!(
            "pagination did not end within {} pages",
            changes.max_pages
        ))
    }
}

/// The URL of one page: the first with `since`, the next with the cursor (or the cursor
/// itself when it is a URL on the platform's own host; the token never goes elsewhere).
fn page_url(
    platform: &PlatformConfig,
    changes: &ChangesConfig,
    since: Millis,
    cursor: Option<&str>,
) -> Result<String, String> {
    if let Some(cursor) =
        cursor.filter(|cursor| cursor.starts_with("http://") || cursor.starts_with("https://"))
    {
        let base = reqwest::Url::parse(&platform.base_url).map_err(|error| error.to_string())?;
        let next =
            reqwest::Url::parse(cursor).map_err(|_| "the next-page URL is not a URL".to_owned())?;
        if next.origin() != base.origin() {
            return Err(
                "the next-page URL points to another host; not sending the token there".into(),
            );
        }
        return Ok(cursor.to_owned());
    }
    let mut url = reqwest::Url::parse(&format!("{}{}", platform.base_url, changes.path))
        .map_err(|error| error.to_string())?;
    url.query_pairs_mut()
        .append_pair(&changes.since_param, &time::rfc3339(since));
    if let Some(cursor) = cursor {
        url.query_pairs_mut()
            .append_pair(&changes.cursor_param, cursor);
    }
    Ok(url.to_string())
}

/// The relay message of a recovered change: a stable id (connection + change id + update
/// time) so the receiver can de-duplicate, and the change as the platform gave it.
fn relay_message(
    id: &ConnectionId,
    platform: &PlatformConfig,
    change_id: &str,
    updated_at: Millis,
    item: &Value,
    now: Millis,
) -> (String, String) {
    let digest = Sha256::digest(format!("{id}|{change_id}|{updated_at}").as_bytes());
    let webhook_id = format!("rc_{}", &format!("{digest:x}")[..32]);
    let payload = json!({
        "type": "change.recovered",
        "connection_id": id,
        "platform": platform.name,
        "change_id": change_id,
        "updated_at": time::rfc3339(updated_at),
        "recovered_at": time::rfc3339(now),
        "change": item,
    });
    (webhook_id, payload.to_string())
}
