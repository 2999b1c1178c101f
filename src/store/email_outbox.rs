//! The email outbox: rows written in the same transaction as the transition that causes
//! them (as the rules planned them), claimed with leases by the dispatcher, marked sent
//! or failed; storms and digests.

use std::sync::LazyLock;

use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{LeaseClaim, Store, StoreError, Tx};
use crate::domain::{Audience, ConnectionId, EmailKind, Millis, time};
use crate::rules::storm::held_in_storm;
use crate::rules::{OutboxEmail, PlatformIncidents, Recipients, StormDecision};

/// An email claimed for sending, with everything its template needs.
#[derive(Debug, Clone)]
pub struct EmailJob {
    pub id: i64,
    pub message_id: String,
    pub kind: EmailKind,
    pub audience: Audience,
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

/// A claimed outbox row that cannot be sent as stored (an unknown kind or audience: a
/// newer schema, or a manual edit). The dispatcher logs it, counts it and fails it.
#[derive(Debug)]
pub struct UnreadableEmail {
    pub id: i64,
    pub error: StoreError,
}

/// One outbox row to write.
struct NewRow<'a> {
    dedupe_key: String,
    incident_id: Option<i64>,
    connection_id: Option<&'a str>,
    platform: Option<&'a str>,
    email: &'a OutboxEmail,
    audience: Audience,
    recipient: &'a str,
    now: Millis,
}

/// The kinds of email that open an incident (whose recipients a `resolved` notice tells).
fn opening_kinds() -> String {
    kind_list(|kind| match kind {
        EmailKind::ReauthRequired | EmailKind::Unreachable => true,
        EmailKind::Reminder | EmailKind::Resolved | EmailKind::StaffDigest => false,
    })
}

/// `('a', 'b')`: the kinds for which `wanted` holds, as an SQL list.
fn kind_list(wanted: impl Fn(EmailKind) -> bool) -> String {
    let names: Vec<String> = EmailKind::ALL
        .into_iter()
        .filter(|kind| wanted(*kind))
        .map(|kind| format!("'{}'", kind.as_str()))
        .collect();
    format!("({})", names.join(", "))
}

/// A pending email that is due; per-connection emails of a platform in a storm wait.
static PENDING_EMAIL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "state = 'pending' AND next_attempt_at <= $3 AND NOT (kind IN {} AND platform IN \
         (SELECT platform FROM storms WHERE ended_at IS NULL))",
        kind_list(held_in_storm)
    )
});

/// A Message-ID unique to this row: the dedupe key says what it is, the random part tells
/// apart databases (staging and production, a rebuilt one) that reach the same key.
fn message_id(dedupe_key: &str, domain: &str) -> String {
    let digest = Sha256::digest(dedupe_key.as_bytes());
    format!(
        "<cw.{}.{:016x}@{}>",
        &format!("{digest:x}")[..32],
        rand::random::<u64>(),
        domain
    )
}

/// Inserts one outbox row unless its dedupe key exists.
async fn insert(transaction: &mut Tx, row: NewRow<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO email_outbox (dedupe_key, message_id, incident_id, connection_id, platform, \
         kind, audience, recipient, sequence, payload, next_attempt_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING",
    )
    .bind(&row.dedupe_key)
    .bind(message_id(&row.dedupe_key, &row.email.message_domain))
    .bind(row.incident_id)
    .bind(row.connection_id)
    .bind(row.platform)
    .bind(row.email.kind.as_str())
    .bind(row.audience.as_str())
    .bind(row.recipient)
    .bind(i64::from(row.email.sequence))
    .bind(row.email.payload.as_deref())
    .bind(row.email.due_at)
    .bind(row.now)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Writes an incident's planned emails, one row per recipient, keyed
/// `{incident}:{kind}:{sequence}:{recipient}` (so once, however often it is planned).
pub(super) async fn enqueue_for_incident(
    transaction: &mut Tx,
    incident_id: i64,
    id: &ConnectionId,
    emails: &[OutboxEmail],
    now: Millis,
) -> Result<(), StoreError> {
    if emails.is_empty() {
        return Ok(());
    }
    let (platform, contacts): (String, String) =
        sqlx::query_as("SELECT platform, contacts FROM connections WHERE id = $1")
            .bind(id.as_str())
            .fetch_one(&mut **transaction)
            .await?;
    for email in emails {
        let recipients: Vec<(Audience, String)> = match &email.to {
            Recipients::Contacts => contacts
                .lines()
                .filter(|line| !line.is_empty())
                .map(|address| (Audience::Customer, address.to_owned()))
                .collect(),
            Recipients::Staff(staff) => staff
                .iter()
                .map(|address| (Audience::Staff, address.clone()))
                .collect(),
            Recipients::ToldOfOpening => told_of_opening(transaction, incident_id).await?,
        };
        for (audience, recipient) in &recipients {
            let row = NewRow {
                dedupe_key: format!(
                    "{incident_id}:{}:{}:{recipient}",
                    email.kind, email.sequence
                ),
                incident_id: Some(incident_id),
                connection_id: Some(id.as_str()),
                platform: Some(&platform),
                email,
                audience: *audience,
                recipient,
                now,
            };
            insert(transaction, row).await?;
        }
    }
    Ok(())
}

/// Cancels the incident's emails not yet sent (a `resolved` notice stays).
pub(super) async fn cancel_unsent(
    transaction: &mut Tx,
    incident_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE email_outbox SET state = 'cancelled' WHERE incident_id = $1 \
         AND state = 'pending' AND kind <> 'resolved'",
    )
    .bind(incident_id)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Whoever was sent the incident's opening email, with the audience they had.
async fn told_of_opening(
    transaction: &mut Tx,
    incident_id: i64,
) -> Result<Vec<(Audience, String)>, StoreError> {
    let told: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT audience, recipient FROM email_outbox \
         WHERE incident_id = $1 AND kind IN {} AND state = 'sent'",
        opening_kinds()
    )))
    .bind(incident_id)
    .fetch_all(&mut **transaction)
    .await?;
    told.into_iter()
        .map(|(audience, recipient)| Ok((parse_audience(&audience)?, recipient)))
        .collect()
}

/// Writes a staff digest, one row per recipient keyed `{key}:{recipient}` (once per key).
async fn enqueue_digest(
    transaction: &mut Tx,
    key: &str,
    email: &OutboxEmail,
    now: Millis,
) -> Result<(), StoreError> {
    let Recipients::Staff(staff) = &email.to else {
        return Ok(());
    };
    for recipient in staff {
        let row = NewRow {
            dedupe_key: format!("{key}:{recipient}"),
            incident_id: None,
            connection_id: None,
            platform: None,
            email,
            audience: Audience::Staff,
            recipient,
            now,
        };
        insert(transaction, row).await?;
    }
    Ok(())
}

fn parse_audience(raw: &str) -> Result<Audience, StoreError> {
    Audience::parse(raw).ok_or_else(|| StoreError::Corrupt {
        column: "email_outbox.audience",
        value: raw.to_owned(),
    })
}

fn parse_kind(raw: &str) -> Result<EmailKind, StoreError> {
    EmailKind::parse(raw).ok_or_else(|| StoreError::Corrupt {
        column: "email_outbox.kind",
        value: raw.to_owned(),
    })
}

impl Store {
    /// Claims emails due for a (re)try; per-connection emails of a platform in a storm wait.
    pub async fn claim_emails(
        &self,
        now: Millis,
        limit: u32,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Vec<Result<EmailJob, UnreadableEmail>>, StoreError> {
        let claim = LeaseClaim {
            table: "email_outbox",
            owner_column: "lease_owner",
            until_column: "lease_until",
            due: PENDING_EMAIL.as_str(),
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
            let kind = parse_kind(&row.try_get::<String, _>(2)?);
            let audience = parse_audience(&row.try_get::<String, _>(3)?);
            let (kind, audience) = match (kind, audience) {
                (Ok(kind), Ok(audience)) => (kind, audience),
                (Err(error), _) | (_, Err(error)) => {
                    jobs.push(Err(UnreadableEmail { id, error }));
                    continue;
                }
            };
            jobs.push(Ok(EmailJob {
                id: row.try_get(0)?,
                message_id: row.try_get(1)?,
                kind,
                audience,
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
            }));
        }
        Ok(jobs)
    }

    /// Marks an email sent. If it opened an incident that has closed since (the connection
    /// recovered while it was being sent), `follow_up` (the rules' resolved notice) is
    /// written for it in the same transaction.
    pub async fn mark_email_sent(
        &self,
        id: i64,
        owner: &str,
        now: Millis,
        follow_up: Option<&OutboxEmail>,
    ) -> Result<(), StoreError> {
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
        let closed: Option<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT i.id, c.id FROM email_outbox o JOIN incidents i ON i.id = o.incident_id \
             JOIN connections c ON c.id = i.connection_id WHERE o.id = $1 \
             AND o.kind IN {} AND i.closed_at IS NOT NULL AND c.health = 'healthy'",
            opening_kinds()
        )))
        .bind(id)
        .fetch_optional(&mut **transaction)
        .await?;
        if let (Some((incident_id, connection)), Some(follow_up)) = (closed, follow_up) {
            let connection = super::rows::parse_id(&connection)?;
            enqueue_for_incident(
                &mut transaction,
                incident_id,
                &connection,
                std::slice::from_ref(follow_up),
                now,
            )
            .await?;
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

    /// Starts and ends storms as `decide` (the rules) says, from each platform's incident
    /// counts (`recent`: opened since `recent_since`), in one transaction. A storm begun
    /// writes its staff digest; one ended releases the held emails of its platform.
    pub async fn update_storms(
        &self,
        now: Millis,
        recent_since: Millis,
        decide: impl FnOnce(&[PlatformIncidents]) -> Vec<StormDecision>,
    ) -> Result<Vec<StormDecision>, StoreError> {
        let mut transaction = self.begin_write().await?;
        let platforms = platform_incidents(&mut transaction, recent_since).await?;
        let decisions = decide(&platforms);
        for decision in &decisions {
            match decision {
                StormDecision::Begin {
                    platform,
                    connections,
                    digest,
                } => {
                    let storm_id: i64 = sqlx::query(
                        "INSERT INTO storms (platform, started_at, connections) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING RETURNING id",
                    )
                    .bind(platform)
                    .bind(now)
                    .bind(connections)
                    .fetch_one(&mut **transaction)
                    .await?
                    .try_get(0)?;
                    if let Some(digest) = digest {
                        let key = format!("storm:{storm_id}");
                        enqueue_digest(&mut transaction, &key, digest, now).await?;
                    }
                }
                StormDecision::End { platform } => {
                    sqlx::query(
                        "UPDATE storms SET ended_at = $2 WHERE platform = $1 AND ended_at IS NULL",
                    )
                    .bind(platform)
                    .bind(now)
                    .execute(&mut **transaction)
                    .await?;
                }
            }
        }
        transaction.commit().await?;
        Ok(decisions)
    }

    /// Enqueues the daily staff digest of open incidents for `date` (once per date), when
    /// any incident is open.
    pub async fn enqueue_daily_digest(
        &self,
        date: &str,
        digest: &OutboxEmail,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        if open_incidents(&mut transaction, None).await?.is_empty() {
            return Ok(false);
        }
        let key = format!("daily:{date}");
        enqueue_digest(&mut transaction, &key, digest, now).await?;
        transaction.commit().await?;
        Ok(true)
    }
}

/// Each platform's open and recent incidents, with its storm state; platforms in a storm
/// with no open incident are listed too (with zeros), so the rules can end it.
async fn platform_incidents(
    transaction: &mut Tx,
    recent_since: Millis,
) -> Result<Vec<PlatformIncidents>, StoreError> {
    let rows: Vec<(String, i64, i64, i64, Option<i64>)> = sqlx::query_as(
        "SELECT c.platform, COUNT(*), \
         SUM(CASE WHEN i.opened_at >= $1 THEN 1 ELSE 0 END), \
         (SELECT COUNT(*) FROM connections t WHERE t.platform = c.platform AND t.active = 1), \
         (SELECT s.id FROM storms s WHERE s.platform = c.platform AND s.ended_at IS NULL) \
         FROM incidents i JOIN connections c ON c.id = i.connection_id \
         WHERE i.closed_at IS NULL AND c.active = 1 GROUP BY c.platform",
    )
    .bind(recent_since)
    .fetch_all(&mut **transaction)
    .await?;
    let mut platforms: Vec<PlatformIncidents> = rows
        .into_iter()
        .map(
            |(platform, open, recent, connections, storm)| PlatformIncidents {
                platform,
                open,
                recent,
                connections,
                storming: storm.is_some(),
            },
        )
        .collect();
    let storming: Vec<(String,)> =
        sqlx::query_as("SELECT platform FROM storms WHERE ended_at IS NULL")
            .fetch_all(&mut **transaction)
            .await?;
    for (platform,) in storming {
        if !platforms.iter().any(|known| known.platform == platform) {
            platforms.push(PlatformIncidents {
                platform,
                open: 0,
                recent: 0,
                connections: 0,
                storming: true,
            });
        }
    }
    Ok(platforms)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_of_one_key_differ_between_databases_and_name_the_domain() {
        let first = message_id("41:reauth_required:0:it@acme.example", "example.com");
        let second = message_id("41:reauth_required:0:it@acme.example", "example.com");
        assert_ne!(
            first, second,
            "a rebuilt database must not repeat Message-IDs"
        );
        assert!(
            first.starts_with("<cw.") && first.ends_with("@example.com>"),
            "{first}"
        );
    }

    #[test]
    fn storms_hold_per_connection_emails_only() {
        assert_eq!(
            kind_list(held_in_storm),
            "('reauth_required', 'reminder', 'unreachable')"
        );
        assert_eq!(opening_kinds(), "('reauth_required', 'unreachable')");
    }
}
