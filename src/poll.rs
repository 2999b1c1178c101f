//! Quiet detection and the recent-changes fallback.
//!
//! A connection whose last webhook is older than its expected interval + grace is quiet.
//! While quiet, it is polled every `poll_interval` from its watermark (less an overlap for
//! clock skew), page by page to the end; each page is stored with its cursor, so a restart
//! resumes without losing or repeating a change. Changes no webhook delivered are
//! recovered: counted, and queued for the relay.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{ChangesConfig, PlatformConfig, WebhooksConfig};
use crate::domain::time::millis;
use crate::domain::{ConnectionId, Millis, Outcome, ProbeReport, time};
use crate::events::Event;
use crate::metrics::Metrics;
use crate::probe::read_answer;
use crate::rules::changes::watermark_candidate;
use crate::schedule::Scheduler;
use crate::store::{PollClaim, PolledChange, Store, StoreError};
use crate::webhook::{text_at, time_value};
use crate::worker::{Crew, LeasedWork, Pause, Turn, run_leased};

/// Largest page of changes read.
const PAGE_LIMIT: usize = 8 * 1024 * 1024;
/// Polls in flight at once.
const POLL_CONCURRENCY: usize = 16;
/// Time between two turns of the poll loop.
const POLL_TURN: Duration = Duration::from_millis(500);
/// How long a claimed poll is leased (all its pages).
const POLL_LEASE: Millis = 10 * 60_000;

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
    /// Runs until `cancel`: marks quiet connections, claims due polls, runs them on
    /// `tracker` (at most `POLL_CONCURRENCY` at once).
    pub async fn run(self, cancel: CancellationToken, tracker: TaskTracker) {
        let crew = Crew::Spawned {
            concurrency: POLL_CONCURRENCY,
            batch: POLL_CONCURRENCY as u32,
            tracker,
        };
        run_leased(Arc::new(self), crew, cancel).await;
    }

    async fn poll(&self, claim: PollClaim) {
        let owner = self.scheduler.owner().to_owned();
        let now = self.scheduler.clock().now();
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
        self.record_end(&claim, end, &owner, now).await;
    }

    /// Counts how a poll ended; an unfinished one is deferred (its lease released).
    async fn record_end(&self, claim: &PollClaim, end: PollEnd, owner: &str, now: Millis) {
        let poll_interval = millis(self.settings.poll_interval);
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
                    .defer_poll(&claim.id, owner, now + poll_interval, "auth_failed", now)
                    .await
            }
            PollEnd::RateLimited { retry_after } => {
                count("rate_limited");
                let wait = retry_after
                    .map(|secs| secs as i64 * 1000)
                    .unwrap_or(poll_interval);
                self.store
                    .defer_poll(&claim.id, owner, now + wait.max(1000), "rate_limited", now)
                    .await
            }
            PollEnd::Failed(reason) => {
                count("error");
                tracing::warn!(%reason, "poll failed; retrying at the next poll interval");
                self.store
                    .defer_poll(&claim.id, owner, now + poll_interval, "error", now)
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
            let page = match self
                .fetch_page(claim, platform, changes, token, since, cursor.as_deref())
                .await
            {
                Ok(page) => page,
                Err(end) => return end,
            };
            let page = match read_page(&page, changes) {
                Ok(page) => page,
                Err(message) => return PollEnd::Failed(message),
            };
            let now = self.scheduler.clock().now();
            let polled = self.read_changes(claim, platform, &page, token, now);
            newest = newest.max(polled.iter().map(|change| change.updated_at).max());
            let next = page.next;
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
                    // Never past now + skew: a far-future update time would make every
                    // later poll ask for changes after it.
                    let covered_until = watermark_candidate(newest.unwrap_or(claim.watermark), now);
                    return self
                        .finish(claim, owner, covered_until, now, recovered)
                        .await;
                }
            }
        }
        PollEnd::Failed(format!(
            "pagination did not end within {} pages",
            changes.max_pages
        ))
    }

    /// Asks for one page of changes; a refusal or an unreadable page ends the poll.
    async fn fetch_page(
        &self,
        claim: &PollClaim,
        platform: &PlatformConfig,
        changes: &ChangesConfig,
        token: &SecretString,
        since: Millis,
        cursor: Option<&str>,
    ) -> Result<Value, PollEnd> {
        let url = page_url(platform, changes, since, cursor).map_err(PollEnd::Failed)?;
        let answer = self
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
            .map_err(|mut report| {
                report.redact(&[token.expose_secret()]);
                PollEnd::Failed(report.message.unwrap_or_default())
            })?;
        if !(200..300).contains(&answer.status) {
            let mut report = read_answer(
                platform,
                answer.status,
                &answer.headers,
                &answer.body,
                answer.latency_ms,
            );
            report.redact(&[token.expose_secret()]);
            return Err(self.refused(claim, report, answer.status).await);
        }
        serde_json::from_slice::<Value>(&answer.body)
            .map_err(|_| PollEnd::Failed("changes page is not JSON".into()))
    }

    /// How a poll ends when the changes endpoint refused a page.
    async fn refused(&self, claim: &PollClaim, report: ProbeReport, status: u16) -> PollEnd {
        match report.outcome {
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
                PollEnd::Failed(format!("changes endpoint answered {status}"))
            }
        }
    }

    /// The changes of one page (with their relay messages when the relay is on); those
    /// without an id or update time were skipped by `read_page`, with a warning here.
    fn read_changes(
        &self,
        claim: &PollClaim,
        platform: &PlatformConfig,
        page: &ChangesPage<'_>,
        token: &SecretString,
        now: Millis,
    ) -> Vec<PolledChange> {
        let polled: Vec<PolledChange> = page
            .changes
            .iter()
            .map(|change| {
                // A changed record is relayed as the platform gave it, less the token
                // (platforms echo it in records too).
                let relay = self.relay_enabled.then(|| {
                    let change = RecoveredChange {
                        id: &claim.id,
                        platform,
                        change_id: &change.change_id,
                        updated_at: change.updated_at,
                        item: change.item,
                    };
                    relay_message(&change, &[token.expose_secret()], now)
                });
                PolledChange {
                    change_id: change.change_id.clone(),
                    updated_at: change.updated_at,
                    relay,
                }
            })
            .collect();
        if page.skipped > 0 {
            tracing::warn!(
                skipped = page.skipped,
                "changes without id or update time skipped"
            );
        }
        polled
    }

    /// Moves the watermark once the last page is stored.
    async fn finish(
        &self,
        claim: &PollClaim,
        owner: &str,
        covered_until: Millis,
        now: Millis,
        recovered: usize,
    ) -> PollEnd {
        let next_poll = now + millis(self.settings.poll_interval);
        if let Err(error) = self
            .store
            .finish_poll(&claim.id, owner, covered_until, next_poll, now)
            .await
        {
            return PollEnd::Failed(format!("cannot finish the poll: {error}"));
        }
        PollEnd::Complete { recovered }
    }
}

impl LeasedWork for Poller {
    type Item = PollClaim;
    const CLAIM_OPERATION: &'static str = "claim_polls";
    const CLAIM_FAILED: &'static str = "cannot claim polls";
    const IDLE: Duration = POLL_TURN;

    fn clock(&self) -> &Clock {
        self.scheduler.clock()
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lease_until(&self, now: Millis) -> Millis {
        now + POLL_LEASE
    }

    async fn claim(
        &self,
        now: Millis,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<PollClaim>, StoreError> {
        self.store
            .claim_polls(now, limit, self.scheduler.owner(), lease_until)
            .await
    }

    async fn work(&self, claim: PollClaim) {
        let span =
            tracing::info_span!("poll", connection_id = %claim.id, platform = %claim.platform);
        self.poll(claim).instrument(span).await;
    }

    /// Quiet detection: connections whose webhooks stopped start being polled.
    async fn before_claim(&self, now: Millis) {
        let grace = millis(self.settings.grace);
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
    }

    /// Polls run in tasks of their own: every turn waits a full `POLL_TURN`, busy or not.
    fn pause(&self, _turn: Turn) -> Pause {
        Pause::Sleep(POLL_TURN)
    }
}

/// One change of a page: its id, its update time, and the item as the platform gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct PageChange<'a> {
    pub change_id: String,
    pub updated_at: Millis,
    pub item: &'a Value,
}

/// A page of changes, read: the usable changes, how many items were skipped (no id or no
/// update time), and the cursor of the next page (none on the last).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangesPage<'a> {
    pub changes: Vec<PageChange<'a>>,
    pub skipped: usize,
    pub next: Option<String>,
}

/// Reads one page of changes where the platform's `[changes]` profile points. Pure; an
/// error when there is no array at `items_pointer`.
pub fn read_page<'a>(page: &'a Value, changes: &ChangesConfig) -> Result<ChangesPage<'a>, String> {
    let Some(items) = page
        .pointer(&changes.items_pointer)
        .and_then(Value::as_array)
    else {
        return Err(format!(
            "no array at {} in the changes page",
            changes.items_pointer
        ));
    };
    let read: Vec<PageChange<'a>> = items
        .iter()
        .filter_map(|item| {
            Some(PageChange {
                change_id: text_at(item, &changes.id_pointer)?,
                updated_at: item
                    .pointer(&changes.updated_pointer)
                    .and_then(time_value)?,
                item,
            })
        })
        .collect();
    Ok(ChangesPage {
        skipped: items.len() - read.len(),
        changes: read,
        next: text_at(page, &changes.next_pointer),
    })
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

/// A change found by polling that no webhook delivered.
struct RecoveredChange<'a> {
    id: &'a ConnectionId,
    platform: &'a PlatformConfig,
    change_id: &'a str,
    updated_at: Millis,
    item: &'a Value,
}

/// The relay message of a recovered change: a stable id (connection + change id + update
/// time) so the receiver can de-duplicate, and the change as the platform gave it, less
/// any of `secrets` (platforms echo tokens in records too).
fn relay_message(change: &RecoveredChange<'_>, secrets: &[&str], now: Millis) -> (String, String) {
    let RecoveredChange {
        id,
        platform,
        change_id,
        updated_at,
        item,
    } = *change;
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
    })
    .to_string();
    let payload = crate::domain::redacted(&payload, secrets).unwrap_or(payload);
    (webhook_id, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_echoed_in_a_recovered_record_is_not_relayed() {
        let config = crate::config::Config::parse(&format!(
            "{}\n[[connections]]\nid = \"acme\"\nplatform = \"makini\"\n\
             token = {{ file = \"/etc/hostname\" }}\n",
            crate::config::PLATFORM
        ))
        .expect("valid");
        let id = ConnectionId::parse("acme").expect("id");
        let item = json!({"id": "rec_1", "note": "updated with tok_SECRET_acme_v1"});
        let change = RecoveredChange {
            id: &id,
            platform: &config.platforms["makini"],
            change_id: "rec_1",
            updated_at: 1_000,
            item: &item,
        };
        let (webhook_id, payload) = relay_message(&change, &["tok_SECRET_acme_v1"], 2_000);
        assert!(!payload.contains("tok_SECRET"), "{payload}");
        assert!(payload.contains("updated with [redacted]"), "{payload}");
        let (same_id, _) = relay_message(&change, &[], 3_000);
        assert_eq!(
            webhook_id, same_id,
            "the relay id does not depend on the redaction"
        );
    }

    fn profile() -> ChangesConfig {
        ChangesConfig {
            path: "/v1/changes".into(),
            since_param: "modified_after".into(),
            items_pointer: "/data".into(),
            next_pointer: "/next".into(),
            cursor_param: "cursor".into(),
            id_pointer: "/id".into(),
            updated_pointer: "/_updatedAt".into(),
            max_pages: 1000,
        }
    }

    #[test]
    fn a_page_gives_its_changes_the_skipped_count_and_the_next_cursor() {
        let page = json!({
            "data": [
                {"id": "rec_1", "_updatedAt": "1970-01-01T00:00:01Z"},
                {"id": 2, "_updatedAt": 3},
                {"id": null, "_updatedAt": 3},
                {"id": "rec_4", "_updatedAt": -99_999_999_999_999_999_i64},
            ],
            "next": "cur_2",
        });
        let read = read_page(&page, &profile()).expect("a page");
        let changes: Vec<(&str, Millis)> = read
            .changes
            .iter()
            .map(|change| (change.change_id.as_str(), change.updated_at))
            .collect();
        assert_eq!(changes, [("rec_1", 1000), ("2", 3000)]);
        assert_eq!(read.skipped, 2);
        assert_eq!(read.next.as_deref(), Some("cur_2"));
        let last = json!({"data": [], "next": null});
        assert_eq!(read_page(&last, &profile()).expect("a page").next, None);
        assert!(read_page(&json!({"items": []}), &profile()).is_err());
    }
}
