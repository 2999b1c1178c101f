//! The outbox dispatcher: claims due emails with a lease, renders, sends, marks them;
//! retries with exponential backoff and jitter; recognises platform storms; enqueues the
//! daily staff digest.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Mailer;
use super::templates::{Templates, escape_html};
use crate::clock::Clock;
use crate::config::EmailConfig;
use crate::domain::time;
use crate::domain::time::millis;
use crate::metrics::Metrics;
use crate::relay::backoff_ms;
use crate::rules::{SharedRules, StormDecision};
use crate::store::{EmailJob, Store, UnreadableEmail};

/// Emails claimed per turn.
const EMAIL_BATCH: u32 = 2;

/// Drains the email outbox.
pub struct Dispatcher {
    pub store: Store,
    pub mailer: Mailer,
    pub templates: Templates,
    pub settings: EmailConfig,
    pub metrics: Metrics,
    pub owner: String,
    /// Storm detection and the outbox gauges run on the leader only.
    pub leadership: crate::leader::Leadership,
    /// Where the dispatcher reads the time.
    pub clock: Clock,
    /// Storms and follow-up emails are judged by these.
    pub rules: SharedRules,
}

impl Dispatcher {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let now = self.clock.now();
            if self.leadership.is_leader() {
                self.check_storms(now).await;
            }
            // One send takes at most two attempts of `timeout`; the lease covers the batch.
            let per_send = 2 * millis(self.settings.timeout) + 1_000;
            let lease_until = now + EMAIL_BATCH as i64 * per_send + 5_000;
            let jobs = match self
                .store
                .claim_emails(now, EMAIL_BATCH, &self.owner, lease_until)
                .await
            {
                Ok(jobs) => jobs,
                Err(error) => {
                    self.metrics
                        .store_errors
                        .with_label_values(&["claim_emails"])
                        .inc();
                    tracing::error!(%error, "cannot claim emails");
                    Vec::new()
                }
            };
            let busy = !jobs.is_empty();
            for job in jobs {
                // On shutdown, or when the lease could run out mid-send, stop: the rest
                // are claimed again when their lease expires, never sent twice at once.
                if cancel.is_cancelled() || self.clock.now() + per_send > lease_until {
                    break;
                }
                match job {
                    Ok(job) => {
                        let span = tracing::info_span!("email", connection_id = ?job.connection_id, kind = %job.kind);
                        self.deliver(job).instrument(span).await;
                    }
                    Err(unreadable) => self.fail_unreadable(unreadable).await,
                }
            }
            if self.leadership.is_leader() {
                self.refresh_gauges().await;
            }
            if cancel.is_cancelled() {
                return;
            }
            if !busy {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }

    async fn check_storms(&self, now: i64) {
        let rules = self.rules.current();
        let window = rules.storm.map(|storm| storm.window).unwrap_or_default();
        let decisions = self
            .store
            .update_storms(now, now - window, |platforms| rules.storms(platforms, now))
            .await;
        match decisions {
            Ok(decisions) => {
                for decision in decisions {
                    match decision {
                        StormDecision::Begin {
                            platform,
                            connections,
                            ..
                        } => tracing::warn!(
                            %platform, connections,
                            "many connections of one platform failing at once: staff digest sent, customer emails held"
                        ),
                        StormDecision::End { platform } => tracing::info!(
                            %platform, "platform storm over: held emails of connections still broken are released"
                        ),
                    }
                }
            }
            Err(error) => {
                self.metrics
                    .store_errors
                    .with_label_values(&["update_storms"])
                    .inc();
                tracing::error!(%error, "cannot check for platform storms");
            }
        }
    }

    /// An outbox row that cannot be sent as stored: logged, counted and failed for good
    /// (never sent as a guess).
    async fn fail_unreadable(&self, unreadable: UnreadableEmail) {
        self.metrics
            .store_errors
            .with_label_values(&["unreadable_email"])
            .inc();
        tracing::error!(email_id = unreadable.id, error = %unreadable.error, "outbox row unreadable; failed");
        let reason = unreadable.error.to_string();
        if let Err(error) = self
            .store
            .mark_email_failed(unreadable.id, &self.owner, &reason, None)
            .await
        {
            tracing::error!(%error, "cannot record the email's failure");
        }
    }

    async fn deliver(&self, job: EmailJob) {
        let Some(rendered) = self.templates.render(job.kind, job.audience, &values(&job)) else {
            tracing::error!(kind = %job.kind, audience = %job.audience, "no template; email failed");
            let _ = self
                .store
                .mark_email_failed(job.id, &self.owner, "no template", None)
                .await;
            return;
        };
        let sent = self
            .mailer
            .send(&job.recipient, &job.message_id, &rendered)
            .await;
        let now = self.clock.now();
        let (result, stored) = match sent {
            Ok(()) => ("sent", {
                let follow_up = self.rules.current().after_opening_sent(now);
                self.store
                    .mark_email_sent(job.id, &self.owner, now, follow_up.as_ref())
                    .await
            }),
            Err(failure) if failure.permanent => {
                tracing::error!(reason = %failure.message, "SMTP refused the email for good");
                (
                    "rejected",
                    self.store
                        .mark_email_failed(job.id, &self.owner, &failure.message, None)
                        .await,
                )
            }
            Err(failure) => {
                let retry_at = now + backoff_ms(job.attempts + 1);
                tracing::warn!(reason = %failure.message, attempts = job.attempts + 1, "email not sent; retrying later");
                (
                    "failed",
                    self.store
                        .mark_email_failed(job.id, &self.owner, &failure.message, Some(retry_at))
                        .await,
                )
            }
        };
        self.metrics
            .emails
            .with_label_values(&[job.kind.as_str(), result])
            .inc();
        if let Err(error) = stored {
            // The lease expires and the email is sent again, with the same Message-ID.
            tracing::error!(%error, "cannot record the email's delivery");
        }
    }

    async fn refresh_gauges(&self) {
        let now = self.clock.now();
        match self.store.outbox_stats(now).await {
            Ok((pending, oldest)) => {
                self.metrics.email_outbox_pending.set(pending);
                let age = oldest
                    .map(|due| (now - due).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                self.metrics.email_outbox_oldest_age.set(age);
            }
            Err(error) => tracing::warn!(%error, "cannot read the outbox size"),
        }
    }
}

/// The placeholder values of one email.
fn values(job: &EmailJob) -> BTreeMap<&'static str, String> {
    let mut values = BTreeMap::new();
    let mut put = |name: &'static str, value: Option<String>| {
        if let Some(value) = value {
            values.insert(name, value);
        }
    };
    put("connection_id", job.connection_id.clone());
    put(
        "connection_name",
        job.connection_name
            .clone()
            .or_else(|| job.connection_id.clone()),
    );
    put("platform", job.platform.clone());
    put("reconnect_url", job.reconnect_url.clone());
    put("since", job.first_failure_at.map(time::rfc3339));
    put("error_code", job.error_code.clone());
    put("request_id", job.request_id.clone());
    put("incident_id", job.incident_id.map(|id| id.to_string()));
    put("reminder_number", Some(job.sequence.to_string()));
    put("resolved_at", job.closed_at.map(time::rfc3339));
    put("last_message", job.last_message.clone());
    put("remote_id", job.remote_id.clone());
    if let Some(payload) = job
        .payload
        .as_deref()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
    {
        let listed = payload["connections"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let field = |entry: &Value, name: &str| entry[name].as_str().unwrap_or("-").to_owned();
        let lines: Vec<String> = listed
            .iter()
            .map(|entry| {
                format!(
                    "- {} ({}) on {}: {} since {}, error {}",
                    field(entry, "id"),
                    field(entry, "name"),
                    field(entry, "platform"),
                    field(entry, "kind"),
                    field(entry, "since"),
                    field(entry, "error_code")
                )
            })
            .collect();
        let items: Vec<String> = lines
            .iter()
            .map(|line| format!("<li>{}</li>", escape_html(line.trim_start_matches("- "))))
            .collect();
        put("title", payload["title"].as_str().map(str::to_owned));
        put("count", Some(listed.len().to_string()));
        put("connections", Some(lines.join("\n")));
        put("connections_html", Some(items.join("\n")));
    }
    values
}
