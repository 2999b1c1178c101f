//! The polls aggregate: quiet connections, their pagination progress and watermarks, and
//! the changes recovered by polling (handed to the relay outbox).

use sqlx::Row;

use super::connections::state_of;
use super::incidents::record_verdict;
use super::rows::parse_id;
use super::{LeaseClaim, Store, StoreError};
use crate::domain::{Cause, ConnectionId, Millis};
use crate::rules::health::quiet_changed;

/// A quiet connection claimed for polling.
#[derive(Debug, Clone)]
pub struct PollClaim {
    pub id: ConnectionId,
    pub platform: String,
    /// `since` of the pagination run in progress, if one was interrupted.
    pub resume_since: Option<Millis>,
    pub resume_cursor: Option<String>,
    /// Newest update time seen by the run in progress.
    pub max_seen: Option<Millis>,
    /// The stored watermark, or the last webhook, or when monitoring began.
    pub watermark: Millis,
}

/// One polled change.
#[derive(Debug, Clone)]
pub struct PolledChange {
    pub change_id: String,
    pub updated_at: Millis,
    /// The relay message, if a relay is configured: (stable webhook id, JSON payload).
    pub relay: Option<(String, String)>,
}

impl Store {
    /// Marks connections whose last webhook (or start of monitoring) is older than their
    /// expected interval + `grace` as quiet; returns them. Their first poll is due at once.
    pub async fn mark_quiet(
        &self,
        now: Millis,
        grace: Millis,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        let mut transaction = self.begin_write().await?;
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE connections SET quiet = 1, quiet_since = $1, next_poll_at = $1 \
             WHERE active = 1 AND quiet = 0 AND expected_webhook_ms IS NOT NULL \
             AND COALESCE(last_webhook_at, created_at) + expected_webhook_ms + $2 < $1 \
             RETURNING id",
        )
        .bind(now)
        .bind(grace)
        .fetch_all(&mut **transaction)
        .await?;
        let mut quiet = Vec::with_capacity(rows.len());
        for (raw_id,) in rows {
            let id = parse_id(&raw_id)?;
            let state = state_of(&mut transaction, &id).await?;
            let verdict = quiet_changed(&state, Cause::Quiet, now);
            record_verdict(&mut transaction, &id, &verdict).await?;
            quiet.push(id);
        }
        transaction.commit().await?;
        Ok(quiet)
    }

    /// Claims quiet connections whose next poll is due, with a lease.
    pub async fn claim_polls(
        &self,
        now: Millis,
        limit: u32,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Vec<PollClaim>, StoreError> {
        let claim = LeaseClaim {
            table: "connections",
            owner_column: "poll_lease_owner",
            until_column: "poll_lease_until",
            due: "active = 1 AND quiet = 1 AND next_poll_at <= $3",
            order: "next_poll_at",
            returning: "id, platform, poll_since, poll_cursor, poll_max_seen, \
                        COALESCE(watermark, last_webhook_at, created_at) AS watermark",
        };
        let rows = self
            .claim_leased(&claim, now, limit, owner, lease_until)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(PollClaim {
                    id: parse_id(&row.try_get::<String, _>("id")?)?,
                    platform: row.try_get("platform")?,
                    resume_since: row.try_get("poll_since")?,
                    resume_cursor: row.try_get("poll_cursor")?,
                    max_seen: row.try_get("poll_max_seen")?,
                    watermark: row.try_get("watermark")?,
                })
            })
            .collect()
    }

    /// Stores one page of a poll: changes no webhook delivered become recovered changes
    /// (and relay messages), and the cursor is saved so a restart resumes after this page.
    /// Returns how many changes were recovered; none if the lease was lost.
    pub async fn record_poll_page(
        &self,
        id: &ConnectionId,
        owner: &str,
        since: Millis,
        next_cursor: Option<&str>,
        changes: &[PolledChange],
        now: Millis,
    ) -> Result<usize, StoreError> {
        let mut transaction = self.begin_write().await?;
        let page_max = changes.iter().map(|change| change.updated_at).max();
        let updated = sqlx::query(
            "UPDATE connections SET poll_since = $3, poll_cursor = $4, \
             poll_max_seen = CASE WHEN $5 IS NULL THEN poll_max_seen \
               WHEN poll_max_seen IS NULL OR poll_max_seen < $5 THEN $5 ELSE poll_max_seen END \
             WHERE id = $1 AND poll_lease_owner = $2",
        )
        .bind(id.as_str())
        .bind(owner)
        .bind(since)
        .bind(next_cursor)
        .bind(page_max)
        .execute(&mut **transaction)
        .await?
        .rows_affected();
        if updated == 0 {
            return Ok(0);
        }
        let mut recovered = 0;
        for change in changes {
            let known: Option<(i64,)> = sqlx::query_as(
                "SELECT 1 FROM seen_changes WHERE connection_id = $1 AND change_id = $2 \
                 AND (updated_at = $3 OR updated_at = -1) LIMIT 1",
            )
            .bind(id.as_str())
            .bind(&change.change_id)
            .bind(change.updated_at)
            .fetch_optional(&mut **transaction)
            .await?;
            if known.is_some() {
                continue;
            }
            insert_seen_change(
                &mut transaction,
                id,
                &change.change_id,
                change.updated_at,
                "poll",
                now,
            )
            .await?;
            if let Some((webhook_id, payload)) = &change.relay {
                sqlx::query(
                    "INSERT INTO relay_outbox (webhook_id, connection_id, payload, next_attempt_at, \
                     created_at) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (webhook_id) DO NOTHING",
                )
                .bind(webhook_id)
                .bind(id.as_str())
                .bind(payload)
                .bind(now)
                .execute(&mut **transaction)
                .await?;
            }
            recovered += 1;
        }
        transaction.commit().await?;
        Ok(recovered)
    }

    /// Ends a complete poll: the watermark moves to `covered_until` (or the newest change
    /// seen) but never backwards; the next poll is due at `next_poll_at`.
    pub async fn finish_poll(
        &self,
        id: &ConnectionId,
        owner: &str,
        covered_until: Millis,
        next_poll_at: Millis,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        sqlx::query(
            "UPDATE connections SET \
             watermark = CASE WHEN watermark IS NULL OR watermark < $3 THEN $3 ELSE watermark END, \
             poll_since = NULL, poll_cursor = NULL, poll_max_seen = NULL, \
             poll_lease_owner = NULL, poll_lease_until = 0, next_poll_at = $4, \
             last_poll_at = $5, last_poll_result = 'ok' \
             WHERE id = $1 AND poll_lease_owner = $2",
        )
        .bind(id.as_str())
        .bind(owner)
        .bind(covered_until)
        .bind(next_poll_at)
        .bind(now)
        .execute(&mut **transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Puts a poll off (rate limit, error); the cursor is kept to resume from.
    pub async fn defer_poll(
        &self,
        id: &ConnectionId,
        owner: &str,
        next_poll_at: Millis,
        result: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        sqlx::query(
            "UPDATE connections SET poll_lease_owner = NULL, poll_lease_until = 0, \
             next_poll_at = $3, last_poll_at = $4, last_poll_result = $5 \
             WHERE id = $1 AND poll_lease_owner = $2",
        )
        .bind(id.as_str())
        .bind(owner)
        .bind(next_poll_at)
        .bind(now)
        .bind(result)
        .execute(&mut **transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Active quiet connections.
    pub async fn quiet_count(&self) -> Result<i64, StoreError> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM connections WHERE active = 1 AND quiet = 1")
                .fetch_one(&self.pool)
                .await?;
        Ok(count)
    }
}

async fn insert_seen_change(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: &ConnectionId,
    change_id: &str,
    updated_at: Millis,
    source: &str,
    now: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO seen_changes (connection_id, change_id, updated_at, source, seen_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (connection_id, change_id, updated_at) DO NOTHING",
    )
    .bind(id.as_str())
    .bind(change_id)
    .bind(updated_at)
    .bind(source)
    .bind(now)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}
