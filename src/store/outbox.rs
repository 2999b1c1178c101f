//! The email outbox: rows written in the same transaction as the transition that causes
//! them, claimed with leases by the dispatcher, marked sent or failed; storms and digests.

use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{LeaseClaim, Store, StoreError};
use crate::domain::{ConnectionId, Health, Millis, Transition, time};

/// What the outbox needs from `[email]` to plan emails inside a transition's transaction.
#[derive(Debug, Clone, Default)]
pub struct MailPolicy {
    pub staff: Vec<String>,
    /// Delays after the incident opened.
    pub reminders: Vec<Millis>,
    pub send_resolved: bool,
    /// Per-connection emails become due this long after the transition.
    pub hold: Millis,
    /// Domain of the From address, for Message-IDs.
    pub domain: String,
}

/// An email claimed for sending, with everything its template needs.
#[derive(Debug, Clone)]
pub struct EmailJob {
    pub id: i64,
    pub message_id: String,
    pub kind: String,
    pub audience: String,
    pub recipient: String,
    pub sequence: i64,
    pub attempts: i64,
    pub payload: Option<String>,
    pub connection_id: Option<String>,
    pub connection_name: Option<String>,
    pub platform: Option<String>,
    pub remote_id: Option<String>,
    pub reconnect_url: Option<String>,
    pub last_message: Option<String>,
    pub incident_id: Option<i64>,
    pub first_failure_at: Option<Millis>,
    pub closed_at: Option<Millis>,
    pub error_code: Option<String>,
    pub request_id: Option<String>,
}

/// A storm that began or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StormChange {
    Began { platform: String, connections: i64 },
    Ended { platform: String },
}

/// The share rule of storms needs at least this many failing connections: a platform with
/// three customers, two of them broken, still tells those two customers.
pub const STORM_SHARE_FLOOR: i64 = 5;

/// A pending email that is due; per-connection emails of a platform in a storm wait.
const PENDING_EMAIL: &str = "state = 'pending' AND next_attempt_at <= $3 \
     AND NOT (kind IN ('reauth_required', 'reminder', 'unreachable') AND platform IN \
     (SELECT platform FROM storms WHERE ended_at IS NULL))";

const OPENING_KINDS: &str = "('reauth_required', 'unreachable')";

fn message_id(dedupe_key: &str, domain: &str) -> String {
    let digest = Sha256::digest(dedupe_key.as_bytes());
    format!("<cw.{}@{}>", &format!("{digest:x}")[..32], domain)
}

/// Inserts one outbox row unless its dedupe key exists.
#[allow(clippy::too_many_arguments)]
async fn enqueue(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    policy: &MailPolicy,
    dedupe_key: String,
    incident_id: Option<i64>,
    connection: Option<(&str, &str)>,
    kind: &str,
    audience: &str,
    recipient: &str,
    sequence: i64,
    payload: Option<String>,
    due: Millis,
    now: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO email_outbox (dedupe_key, message_id, incident_id, connection_id, platform, \
         kind, audience, recipient, sequence, payload, next_attempt_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING",
    )
    .bind(&dedupe_key)
    .bind(message_id(&dedupe_key, &policy.domain))
    .bind(incident_id)
    .bind(connection.map(|(id, _)| id.to_owned()))
    .bind(connection.map(|(_, platform)| platform.to_owned()))
    .bind(kind)
    .bind(audience)
    .bind(recipient)
    .bind(sequence)
    .bind(payload)
    .bind(due)
    .bind(now)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// One `staff_digest` per staff recipient, keyed `{key}:{recipient}` (so once per key).
async fn enqueue_staff_digest(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    policy: &MailPolicy,
    key: &str,
    payload: &str,
    due: Millis,
    now: Millis,
) -> Result<(), StoreError> {
    for recipient in &policy.staff {
        let dedupe_key = format!("{key}:{recipient}");
        let payload = Some(payload.to_owned());
        enqueue(
            transaction,
            policy,
            dedupe_key,
            None,
            None,
            "staff_digest",
            "staff",
            recipient,
            0,
            payload,
            due,
            now,
        )
        .await?;
    }
    Ok(())
}

/// Plans the emails of an incident that just opened.
pub(super) async fn plan_opened(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    policy: &MailPolicy,
    id: &ConnectionId,
    incident_id: i64,
    transition: &Transition,
) -> Result<(), StoreError> {
    let (platform, contacts): (String, String) =
        sqlx::query_as("SELECT platform, contacts FROM connections WHERE id = $1")
            .bind(id.as_str())
            .fetch_one(&mut **transaction)
            .await?;
    let customer: Vec<&str> = contacts.lines().filter(|line| !line.is_empty()).collect();
    let mut recipients: Vec<(&str, &str)> = Vec::new();
    let opening = match transition.to {
        Health::NeedsReauth => {
            recipients.extend(customer.iter().map(|address| ("customer", *address)));
            recipients.extend(
                policy
                    .staff
                    .iter()
                    .map(|address| ("staff", address.as_str())),
            );
            "reauth_required"
        }
        Health::Unreachable => {
            // An outage is not the customer's to fix: staff only.
            recipients.extend(
                policy
                    .staff
                    .iter()
                    .map(|address| ("staff", address.as_str())),
            );
            "unreachable"
        }
        Health::Unknown | Health::Healthy | Health::Degraded | Health::Paused => return Ok(()),
    };
    let connection = Some((id.as_str(), platform.as_str()));
    for (audience, recipient) in &recipients {
        let key = format!("{incident_id}:{opening}:0:{recipient}");
        let due = transition.at + policy.hold;
        enqueue(
            transaction,
            policy,
            key,
            Some(incident_id),
            connection,
            opening,
            audience,
            recipient,
            0,
            None,
            due,
            transition.at,
        )
        .await?;
        if opening != "reauth_required" {
            continue;
        }
        for (index, delay) in policy.reminders.iter().enumerate() {
            let sequence = index as i64 + 1;
            let key = format!("{incident_id}:reminder:{sequence}:{recipient}");
            let due = transition.at + delay;
            enqueue(
                transaction,
                policy,
                key,
                Some(incident_id),
                connection,
                "reminder",
                audience,
                recipient,
                sequence,
                None,
                due,
                transition.at,
            )
            .await?;
        }
    }
    Ok(())
}

/// Plans the emails of an incident that just closed: unsent ones are cancelled (a flap
/// that ends before its first email sends nothing); `resolved` goes to those who were told.
pub(super) async fn plan_closed(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    policy: &MailPolicy,
    incident_id: i64,
    transition: &Transition,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE email_outbox SET state = 'cancelled' WHERE incident_id = $1 \
         AND state = 'pending' AND kind <> 'resolved'",
    )
    .bind(incident_id)
    .execute(&mut **transaction)
    .await?;
    if policy.send_resolved && transition.to == Health::Healthy {
        enqueue_resolved(transaction, policy, incident_id, transition.at).await?;
    }
    Ok(())
}

async fn enqueue_resolved(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    policy: &MailPolicy,
    incident_id: i64,
    now: Millis,
) -> Result<(), StoreError> {
    let told: Vec<(String, String, Option<String>, Option<String>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT DISTINCT audience, recipient, connection_id, platform FROM email_outbox \
         WHERE incident_id = $1 AND kind IN {OPENING_KINDS} AND state = 'sent'"
        )))
        .bind(incident_id)
        .fetch_all(&mut **transaction)
        .await?;
    for (audience, recipient, connection_id, platform) in told {
        let key = format!("{incident_id}:resolved:0:{recipient}");
        let connection = connection_id.as_deref().zip(platform.as_deref());
        enqueue(
            transaction,
            policy,
            key,
            Some(incident_id),
            connection,
            "resolved",
            &audience,
            &recipient,
            0,
            None,
            now,
            now,
        )
        .await?;
    }
    Ok(())
}

impl Store {
    /// Claims emails due for a (re)try; per-connection emails of a platform in a storm wait.
    pub async fn claim_emails(
        &self,
        now: Millis,
        limit: u32,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Vec<EmailJob>, StoreError> {
        let claim = LeaseClaim {
            table: "email_outbox",
            owner_column: "lease_owner",
            until_column: "lease_until",
            due: PENDING_EMAIL,
            order: "next_attempt_at",
            returning: "id",
        };
        let ids = self
            .claim_leased(&claim, now, limit, owner, lease_until)
            .await?
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>(0)?,)))
            .collect::<Result<Vec<(i64,)>, StoreError>>()?;
        let mut jobs = Vec::with_capacity(ids.len());
        for (id,) in ids {
            let row = sqlx::query(
                "SELECT o.id, o.message_id, o.kind, o.audience, o.recipient, o.sequence, o.attempts, \
                 o.payload, o.connection_id, c.name, o.platform, c.remote_id, c.reconnect_url, \
                 c.last_message, o.incident_id, i.first_failure_at, i.closed_at, i.error_code, \
                 i.request_id FROM email_outbox o LEFT JOIN connections c ON c.id = o.connection_id \
                 LEFT JOIN incidents i ON i.id = o.incident_id WHERE o.id = $1",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
            let mut payload: Option<String> = row.try_get(7)?;
            if let Some(text) = payload.as_deref()
                && let Ok(mut value) = serde_json::from_str::<serde_json::Value>(text)
            {
                let platform = value["platform"].as_str().map(str::to_owned);
                let mut connection = self.pool.acquire().await?;
                let mut read = sqlx::Connection::begin(&mut *connection).await?;
                value["connections"] = json!(open_incidents(&mut read, platform.as_deref()).await?);
                read.rollback().await?;
                payload = Some(value.to_string());
            }
            jobs.push(EmailJob {
                id: row.try_get(0)?,
                message_id: row.try_get(1)?,
                kind: row.try_get(2)?,
                audience: row.try_get(3)?,
                recipient: row.try_get(4)?,
                sequence: row.try_get(5)?,
                attempts: row.try_get(6)?,
                payload,
                connection_id: row.try_get(8)?,
                connection_name: row.try_get(9)?,
                platform: row.try_get(10)?,
                remote_id: row.try_get(11)?,
                reconnect_url: row.try_get(12)?,
                last_message: row.try_get(13)?,
                incident_id: row.try_get(14)?,
                first_failure_at: row.try_get(15)?,
                closed_at: row.try_get(16)?,
                error_code: row.try_get(17)?,
                request_id: row.try_get(18)?,
            });
        }
        Ok(jobs)
    }

    /// Marks an email sent. If its incident closed meanwhile, `resolved` follows it.
    pub async fn mark_email_sent(
        &self,
        id: i64,
        owner: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        let policy = self.mail_policy();
        let mut transaction = self.begin_write().await?;
        sqlx::query(
            "UPDATE email_outbox SET state = 'sent', sent_at = $3, attempts = attempts + 1, \
             lease_owner = NULL, lease_until = 0, last_error = NULL WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .bind(now)
        .execute(&mut **transaction)
        .await?;
        let closed: Option<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT i.id FROM email_outbox o JOIN incidents i ON i.id = o.incident_id \
             JOIN connections c ON c.id = i.connection_id WHERE o.id = $1 \
             AND o.kind IN {OPENING_KINDS} AND i.closed_at IS NOT NULL AND c.health = 'healthy'"
        )))
        .bind(id)
        .fetch_optional(&mut **transaction)
        .await?;
        if let (Some((incident_id,)), Some(policy)) = (closed, policy.as_ref())
            && policy.send_resolved
        {
            enqueue_resolved(&mut transaction, policy, incident_id, now).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Records a failed attempt: retried at `retry_at`, or failed for good (`None`).
    pub async fn mark_email_failed(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        retry_at: Option<Millis>,
    ) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        sqlx::query(
            "UPDATE email_outbox SET attempts = attempts + 1, lease_owner = NULL, lease_until = 0, \
             last_error = $3, \
             state = CASE WHEN state = 'cancelled' THEN 'cancelled' \
               WHEN $4 IS NULL THEN 'failed' ELSE 'pending' END, \
             next_attempt_at = COALESCE($4, next_attempt_at) WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .bind(error.to_owned())
        .bind(retry_at)
        .execute(&mut **transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Emails waiting (due or not yet due) and the creation time of the oldest due one.
    pub async fn outbox_stats(&self, now: Millis) -> Result<(i64, Option<Millis>), StoreError> {
        let (pending, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(CASE WHEN next_attempt_at <= $1 THEN next_attempt_at END) \
             FROM email_outbox WHERE state = 'pending'",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok((pending, oldest))
    }

    /// Every email of a connection (status, tests): (kind, audience, recipient, state).
    pub async fn emails_of(
        &self,
        id: &ConnectionId,
    ) -> Result<Vec<(String, String, String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT kind, audience, recipient, state FROM email_outbox WHERE connection_id = $1 ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Starts and ends storms. A storm begins when at least `min` connections of one
    /// platform opened an incident within `window`, or at least `share` of its connections
    /// (and `STORM_SHARE_FLOOR` or more) did; staff then get one digest. It ends when the platform's open
    /// incidents fall below both thresholds; the held emails of connections still broken
    /// are then released.
    pub async fn update_storms(
        &self,
        now: Millis,
        window: Millis,
        min: i64,
        share: f64,
    ) -> Result<Vec<StormChange>, StoreError> {
        let policy = self.mail_policy().unwrap_or_default();
        let mut transaction = self.begin_write().await?;
        let rows: Vec<(String, i64, i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT c.platform, COUNT(*), \
             SUM(CASE WHEN i.opened_at >= $1 THEN 1 ELSE 0 END), \
             (SELECT COUNT(*) FROM connections t WHERE t.platform = c.platform AND t.active = 1), \
             (SELECT s.id FROM storms s WHERE s.platform = c.platform AND s.ended_at IS NULL) \
             FROM incidents i JOIN connections c ON c.id = i.connection_id \
             WHERE i.closed_at IS NULL AND c.active = 1 GROUP BY c.platform",
        )
        .bind(now - window)
        .fetch_all(&mut **transaction)
        .await?;
        let storming = |count: i64, total: i64| {
            count >= min
                || (count >= STORM_SHARE_FLOOR && total > 0 && count as f64 / total as f64 >= share)
        };
        let mut changes = Vec::new();
        let mut still_open = Vec::new();
        for (platform, open, recent, total, storm) in rows {
            match storm {
                None if storming(recent, total) => {
                    let storm_id: i64 = sqlx::query(
                        "INSERT INTO storms (platform, started_at, connections) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING RETURNING id",
                    )
                    .bind(&platform)
                    .bind(now)
                    .bind(open)
                    .fetch_one(&mut **transaction)
                    .await?
                    .try_get(0)?;
                    // The list is read when the digest is sent (after the hold), so it names
                    // every connection caught in the storm by then.
                    let payload = json!({
                        "title": format!(
                            "Platform {platform}: many connections failing at once (customer emails held)"
                        ),
                        "platform": platform,
                    })
                    .to_string();
                    let key = format!("storm:{storm_id}");
                    enqueue_staff_digest(
                        &mut transaction,
                        &policy,
                        &key,
                        &payload,
                        now + policy.hold,
                        now,
                    )
                    .await?;
                    changes.push(StormChange::Began {
                        platform: platform.clone(),
                        connections: open,
                    });
                    still_open.push(platform);
                }
                Some(_) if storming(open, total) => still_open.push(platform),
                None | Some(_) => {}
            }
        }
        let ended: Vec<(String,)> =
            sqlx::query_as("SELECT platform FROM storms WHERE ended_at IS NULL")
                .fetch_all(&mut **transaction)
                .await?;
        for (platform,) in ended {
            if still_open.contains(&platform) {
                continue;
            }
            sqlx::query("UPDATE storms SET ended_at = $2 WHERE platform = $1 AND ended_at IS NULL")
                .bind(&platform)
                .bind(now)
                .execute(&mut **transaction)
                .await?;
            changes.push(StormChange::Ended { platform });
        }
        transaction.commit().await?;
        Ok(changes)
    }

    /// Enqueues the daily staff digest of open incidents for `date` (once per date).
    pub async fn enqueue_daily_digest(&self, date: &str, now: Millis) -> Result<bool, StoreError> {
        let Some(policy) = self.mail_policy() else {
            return Ok(false);
        };
        let mut transaction = self.begin_write().await?;
        if open_incidents(&mut transaction, None).await?.is_empty() {
            return Ok(false);
        }
        let payload = json!({ "title": format!("Open incidents on {date}") }).to_string();
        let key = format!("daily:{date}");
        enqueue_staff_digest(&mut transaction, &policy, &key, &payload, now, now).await?;
        transaction.commit().await?;
        Ok(true)
    }

    /// Pauses or resumes a connection by operator action; returns the new health.
    pub async fn set_operator_pause(
        &self,
        id: &ConnectionId,
        paused: bool,
        now: Millis,
    ) -> Result<Option<Health>, StoreError> {
        let policy = self.mail_policy();
        let mut transaction = self.begin_write().await?;
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT health, paused FROM connections WHERE id = $1 AND active = 1")
                .bind(id.as_str())
                .fetch_optional(&mut **transaction)
                .await?;
        let Some((health, config_paused)) = row else {
            return Ok(None);
        };
        sqlx::query("UPDATE connections SET operator_paused = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(i64::from(paused))
            .execute(&mut **transaction)
            .await?;
        let from = super::probes::parse_health(&health)?;
        let effective = paused || config_paused != 0;
        let to = match (effective, from) {
            (true, _) => Health::Paused,
            (false, Health::Paused) => Health::Unknown,
            (false, other) => other,
        };
        super::probes::set_health_by_operator(&mut transaction, policy.as_ref(), id, from, to, now)
            .await?;
        transaction.commit().await?;
        Ok(Some(to))
    }
}

/// The open incidents (of one platform), as a digest lists them.
async fn open_incidents(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    platform: Option<&str>,
) -> Result<Vec<serde_json::Value>, StoreError> {
    let rows: Vec<(String, String, String, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT c.id, c.name, c.platform, i.kind, i.first_failure_at, i.error_code \
         FROM incidents i JOIN connections c ON c.id = i.connection_id \
         WHERE i.closed_at IS NULL AND c.active = 1 AND ($1 IS NULL OR c.platform = $1) ORDER BY c.id",
    )
    .bind(platform)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, platform, kind, since, code)| {
            json!({"id": id, "name": name, "platform": platform, "kind": kind,
                   "since": time::rfc3339(since), "error_code": code})
        })
        .collect())
}
