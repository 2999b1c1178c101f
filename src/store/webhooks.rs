//! Webhook deliveries, quiet tracking, polling progress and the relay outbox.

use std::collections::{HashMap, HashSet};

use sqlx::Row;

use super::probes::{apply_transition, parse_health, parse_id};
use super::{LeaseClaim, Store, StoreError};
use crate::classify::{ConnectionState, reauth_by_webhook};
use crate::domain::{Cause, ConnectionId, Health, Millis, Transition};

/// id, health, health_since, consecutive_failures, quiet, first_failure_at.
type ConnectionRow = (String, String, i64, i64, i64, Option<i64>);

/// What a batch of deliveries did for one connection.
#[derive(Debug, Default)]
struct Activity {
    last: Millis,
    newest_change: Option<Millis>,
    reauth: bool,
    reconnected: bool,
}

/// A verified webhook delivery, ready to store.
#[derive(Debug, Clone)]
pub struct WebhookDelivery {
    pub platform: String,
    pub webhook_id: String,
    pub received_at: Millis,
    pub remote_id: String,
    pub event_type: Option<String>,
    pub change_id: Option<String>,
    /// The change's update time; `None` when the event does not say.
    pub change_updated: Option<Millis>,
    /// The event asks for reauthorization.
    pub reauth: bool,
    /// The event says the customer reconnected.
    pub reconnected: bool,
    pub body: String,
}

/// What storing a delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookStored {
    /// New, for a known connection.
    Accepted {
        connection: ConnectionId,
        transition: Option<Health>,
    },
    /// Seen before (same platform and webhook id).
    Duplicate,
    /// New, but no active connection has this remote id (stored all the same).
    UnknownConnection,
}

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

/// A relay message claimed for sending.
#[derive(Debug, Clone)]
pub struct RelayMessage {
    pub id: i64,
    pub webhook_id: String,
    pub payload: String,
    pub attempts: i64,
}

impl Store {
    /// Stores deliveries in one transaction (durable before any is answered): de-duplicates
    /// by webhook id, marks activity, leaves quiet, records delivered changes, advances the
    /// watermark and applies reauth / reconnect events. Statements are per batch and per
    /// connection, not per delivery, so a busy platform's deliveries share the cost.
    pub async fn record_webhooks(
        &self,
        deliveries: &[WebhookDelivery],
    ) -> Result<Vec<WebhookStored>, StoreError> {
        let mail = self.mail_policy();
        let mut transaction = self.begin_write().await?;
        // The connections the batch names, looked up together (a statement is a round
        // trip to sqlx's SQLite worker: one per connection was most of a batch's cost).
        let mut connections: HashMap<(&str, &str), Option<ConnectionRow>> = HashMap::new();
        for delivery in deliveries {
            connections.insert(
                (delivery.platform.as_str(), delivery.remote_id.as_str()),
                None,
            );
        }
        let mut wanted: Vec<(&str, &str)> = connections.keys().copied().collect();
        wanted.sort_unstable();
        for run in wanted.chunk_by(|a, b| a.0 == b.0) {
            for chunk in super::chunks_of(run, self.chunk_sizes()) {
                let platform = chunk[0].0;
                let mut sql = String::from(
                    "SELECT id, health, health_since, consecutive_failures, quiet, \
                     first_failure_at, remote_id FROM connections WHERE remote_id IN (",
                );
                sql.push_str(&self.value_rows(chunk.len(), "?"));
                let platform_parameter = match self.backend() {
                    super::Backend::Sqlite => "?".to_owned(),
                    super::Backend::Postgres => format!("${}", chunk.len() + 1),
                };
                sql.push_str(&format!(
                    ") AND platform = {platform_parameter} AND active = 1 ORDER BY id"
                ));
                let mut query = sqlx::query_as::<
                    _,
                    (String, String, i64, i64, i64, Option<i64>, String),
                >(sqlx::AssertSqlSafe(sql));
                for (_, remote_id) in chunk {
                    query = query.bind(*remote_id);
                }
                for (id, health, since, failures, quiet, first_failure_at, remote_id) in
                    query.bind(platform).fetch_all(&mut **transaction).await?
                {
                    // Two connections with one remote id: the first by id, as before.
                    let key = chunk
                        .iter()
                        .find(|(_, wanted)| *wanted == remote_id)
                        .copied()
                        .expect("a remote id asked for");
                    connections
                        .get_mut(&key)
                        .expect("looked up")
                        .get_or_insert((id, health, since, failures, quiet, first_failure_at));
                }
            }
        }
        // Every delivery in multi-row inserts; the ids returned are the new ones.
        let mut inserted: HashSet<(String, String)> = HashSet::new();
        for chunk in super::chunks_of(deliveries, self.chunk_sizes()) {
            let mut sql = String::from(
                "INSERT INTO webhook_events (platform, webhook_id, received_at, connection_id, \
                 remote_id, event_type, change_id, change_updated, body) VALUES ",
            );
            sql.push_str(&self.value_rows(chunk.len(), "(?, ?, ?, ?, ?, ?, ?, ?, ?)"));
            sql.push_str(
                " ON CONFLICT (platform, webhook_id) DO NOTHING RETURNING platform, webhook_id",
            );
            let mut query = sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(sql));
            for delivery in chunk {
                let connection = connections
                    .get(&(delivery.platform.as_str(), delivery.remote_id.as_str()))
                    .and_then(|row| row.as_ref().map(|row| row.0.clone()));
                query = query
                    .bind(delivery.platform.clone())
                    .bind(delivery.webhook_id.clone())
                    .bind(delivery.received_at)
                    .bind(connection)
                    .bind(delivery.remote_id.clone())
                    .bind(delivery.event_type.clone())
                    .bind(delivery.change_id.clone())
                    .bind(delivery.change_updated)
                    .bind(delivery.body.clone());
            }
            inserted.extend(query.fetch_all(&mut **transaction).await?);
        }
        let mut results = Vec::with_capacity(deliveries.len());
        let mut activity: Vec<(ConnectionId, Activity)> = Vec::new();
        let mut changes: Vec<(String, String, Millis, Millis)> = Vec::new();
        for delivery in deliveries {
            // The first delivery of an id in the batch is the new one; repeats are duplicates.
            if !inserted.remove(&(delivery.platform.clone(), delivery.webhook_id.clone())) {
                results.push(WebhookStored::Duplicate);
                continue;
            }
            let row = connections
                .get(&(delivery.platform.as_str(), delivery.remote_id.as_str()))
                .and_then(Option::as_ref);
            let Some(row) = row else {
                results.push(WebhookStored::UnknownConnection);
                continue;
            };
            let id = parse_id(&row.0)?;
            if let Some(change_id) = &delivery.change_id {
                changes.push((
                    row.0.clone(),
                    change_id.clone(),
                    delivery.change_updated.unwrap_or(-1),
                    delivery.received_at,
                ));
            }
            let position = match activity.iter().position(|(known, _)| *known == id) {
                Some(position) => position,
                None => {
                    activity.push((id.clone(), Activity::default()));
                    activity.len() - 1
                }
            };
            let entry = &mut activity[position].1;
            entry.last = entry.last.max(delivery.received_at);
            entry.newest_change = entry.newest_change.max(delivery.change_updated);
            entry.reauth |= delivery.reauth;
            entry.reconnected |= delivery.reconnected;
            results.push(WebhookStored::Accepted {
                connection: id,
                transition: None,
            });
        }
        for chunk in super::chunks_of(&changes, self.chunk_sizes()) {
            let mut sql = String::from(
                "INSERT INTO seen_changes (connection_id, change_id, updated_at, source, seen_at) VALUES ",
            );
            sql.push_str(&self.value_rows(chunk.len(), "(?, ?, ?, 'webhook', ?)"));
            sql.push_str(" ON CONFLICT (connection_id, change_id, updated_at) DO NOTHING");
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (connection, change_id, updated_at, seen_at) in chunk {
                query = query
                    .bind(connection.clone())
                    .bind(change_id.clone())
                    .bind(*updated_at)
                    .bind(*seen_at);
            }
            query.execute(&mut **transaction).await?;
        }
        // In id order, like `record_probes`: no deadlock between the two on PostgreSQL.
        activity.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        for chunk in super::chunks_of(&activity, self.chunk_sizes()) {
            touch_activity(&mut transaction, self.backend(), chunk).await?;
        }
        for (id, seen) in &activity {
            let row = connections
                .values()
                .flatten()
                .find(|row| row.0 == id.as_str())
                .expect("every active connection was looked up");
            let entered = self
                .apply_activity(&mut transaction, mail.as_ref(), id, row, seen)
                .await?;
            if entered.is_some() {
                for result in results.iter_mut() {
                    if let WebhookStored::Accepted {
                        connection,
                        transition,
                    } = result
                        && connection == id
                        && transition.is_none()
                    {
                        *transition = entered;
                        break;
                    }
                }
            }
        }
        transaction.commit().await?;
        Ok(results)
    }

    /// One connection's webhook events of a batch, after `touch_activity`: the end of its
    /// quiet, reauth (a transition at once) and reconnect (a probe at once).
    async fn apply_activity(
        &self,
        transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
        mail: Option<&super::MailPolicy>,
        id: &ConnectionId,
        row: &ConnectionRow,
        seen: &Activity,
    ) -> Result<Option<Health>, StoreError> {
        let (_, health, health_since, failures, quiet, first_failure_at) = row;
        let health = parse_health(health)?;
        let now = seen.last;
        if *quiet != 0 {
            apply_transition(
                transaction,
                mail,
                id,
                &quiet_transition(health, Cause::WebhooksResumed, now),
            )
            .await?;
        }
        let mut entered = None;
        if seen.reauth {
            let state = ConnectionState {
                health,
                health_since: *health_since,
                consecutive_failures: u32::try_from(*failures).unwrap_or(u32::MAX),
                consecutive_auth_failures: 0,
                first_failure_at: *first_failure_at,
            };
            if let Some(transition) = reauth_by_webhook(&state, now) {
                sqlx::query(
                    "UPDATE connections SET health = 'needs_reauth', health_since = $2, \
                     first_failure_at = COALESCE(first_failure_at, $2) WHERE id = $1",
                )
                .bind(id.as_str())
                .bind(now)
                .execute(&mut **transaction)
                .await?;
                apply_transition(transaction, mail, id, &transition).await?;
                entered = Some(Health::NeedsReauth);
            }
        }
        if seen.reauth || seen.reconnected {
            // A confirming probe now: the circuit breaker yields to the platform's word.
            sqlx::query("UPDATE connections SET next_due = $2 WHERE id = $1")
                .bind(id.as_str())
                .bind(now)
                .execute(&mut **transaction)
                .await?;
        }
        Ok(entered)
    }

    /// Marks connections whose last webhook (or start of monitoring) is older than their
    /// expected interval + `grace` as quiet; returns them. Their first poll is due at once.
    pub async fn mark_quiet(
        &self,
        now: Millis,
        grace: Millis,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        let mut transaction = self.begin_write().await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "UPDATE connections SET quiet = 1, quiet_since = $1, next_poll_at = $1 \
             WHERE active = 1 AND quiet = 0 AND expected_webhook_ms IS NOT NULL \
             AND COALESCE(last_webhook_at, created_at) + expected_webhook_ms + $2 < $1 \
             RETURNING id, health",
        )
        .bind(now)
        .bind(grace)
        .fetch_all(&mut **transaction)
        .await?;
        let mut quiet = Vec::with_capacity(rows.len());
        for (raw_id, health) in rows {
            let id = parse_id(&raw_id)?;
            let transition = quiet_transition(parse_health(&health)?, Cause::Quiet, now);
            apply_transition(&mut transaction, None, &id, &transition).await?;
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

    /// Claims relay messages due for a (re)try.
    pub async fn claim_relay(
        &self,
        now: Millis,
        limit: u32,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Vec<RelayMessage>, StoreError> {
        let claim = LeaseClaim {
            table: "relay_outbox",
            owner_column: "lease_owner",
            until_column: "lease_until",
            due: "state = 'pending' AND next_attempt_at <= $3",
            order: "next_attempt_at",
            returning: "id, webhook_id, payload, attempts",
        };
        let rows = self
            .claim_leased(&claim, now, limit, owner, lease_until)
            .await?
            .iter()
            .map(|row| {
                Ok((
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                    row.try_get(3)?,
                ))
            })
            .collect::<Result<Vec<(i64, String, String, i64)>, StoreError>>()?;
        Ok(rows
            .into_iter()
            .map(|(id, webhook_id, payload, attempts)| RelayMessage {
                id,
                webhook_id,
                payload,
                attempts,
            })
            .collect())
    }

    /// Records a relay attempt: sent, retried at `retry_at`, or dead (`retry_at` None).
    pub async fn finish_relay(
        &self,
        message_id: i64,
        owner: &str,
        outcome: Result<(), (&str, Option<Millis>)>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut transaction = self.begin_write().await?;
        let query = match outcome {
            Ok(()) => sqlx::query(
                "UPDATE relay_outbox SET state = 'sent', sent_at = $3, attempts = attempts + 1, \
                 lease_owner = NULL, lease_until = 0, last_error = NULL \
                 WHERE id = $1 AND lease_owner = $2",
            )
            .bind(message_id)
            .bind(owner)
            .bind(now),
            Err((error, retry_at)) => sqlx::query(
                "UPDATE relay_outbox SET attempts = attempts + 1, lease_owner = NULL, \
                 lease_until = 0, last_error = $3, \
                 state = CASE WHEN $4 IS NULL THEN 'dead' ELSE 'pending' END, \
                 next_attempt_at = COALESCE($4, next_attempt_at) \
                 WHERE id = $1 AND lease_owner = $2",
            )
            .bind(message_id)
            .bind(owner)
            .bind(error.to_owned())
            .bind(retry_at),
        };
        query.execute(&mut **transaction).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Relay messages still to send, and those given up on.
    pub async fn relay_counts(&self) -> Result<(i64, i64), StoreError> {
        let (pending, dead): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN state = 'dead' THEN 1 ELSE 0 END), 0) FROM relay_outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((pending, dead))
    }

    /// Forgets webhook ids received before `before`, and known changes older than both
    /// `before` and their connection's watermark less `overlap` (still needed to compare).
    pub async fn prune_webhooks(&self, before: Millis, overlap: Millis) -> Result<u64, StoreError> {
        let mut transaction = self.begin_write().await?;
        let events = sqlx::query("DELETE FROM webhook_events WHERE received_at < $1")
            .bind(before)
            .execute(&mut **transaction)
            .await?
            .rows_affected();
        sqlx::query(
            "DELETE FROM seen_changes WHERE seen_at < $1 AND updated_at < \
             (SELECT COALESCE(watermark, 0) FROM connections c WHERE c.id = connection_id) - $2",
        )
        .bind(before)
        .bind(overlap)
        .execute(&mut **transaction)
        .await?;
        sqlx::query("DELETE FROM relay_outbox WHERE state = 'sent' AND sent_at < $1")
            .bind(before)
            .execute(&mut **transaction)
            .await?;
        transaction.commit().await?;
        Ok(events)
    }

    /// Whether a webhook with this id was stored (tests and support).
    pub async fn webhook_stored(
        &self,
        platform: &str,
        webhook_id: &str,
    ) -> Result<bool, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM webhook_events WHERE platform = $1 AND webhook_id = $2")
                .bind(platform)
                .bind(webhook_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// How many deliveries are stored for a platform.
    pub async fn webhook_count(&self, platform: &str) -> Result<i64, StoreError> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM webhook_events WHERE platform = $1")
                .bind(platform)
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

fn quiet_transition(health: Health, cause: Cause, now: Millis) -> Transition {
    Transition {
        from: health,
        to: health,
        cause,
        at: now,
        first_failure_at: None,
        outcome: None,
        error_code: None,
        request_id: None,
    }
}

/// Marks the connections of a batch active (last webhook, quiet over) and advances their
/// watermarks, in one statement.
async fn touch_activity(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: super::Backend,
    chunk: &[(ConnectionId, Activity)],
) -> Result<(), StoreError> {
    let mut sql = String::from("WITH v (cid, seen, newest) AS (VALUES ");
    sql.push_str(&super::value_rows(
        backend,
        chunk.len(),
        "(CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS BIGINT))",
    ));
    sql.push_str(
        ") UPDATE connections SET last_webhook_at = v.seen, quiet = 0, quiet_since = NULL, \
         watermark = CASE WHEN v.newest IS NULL THEN connections.watermark \
           WHEN connections.watermark IS NULL OR connections.watermark < v.newest \
           THEN v.newest ELSE connections.watermark END \
         FROM v WHERE connections.id = v.cid",
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (id, seen) in chunk {
        query = query
            .bind(id.as_str().to_owned())
            .bind(seen.last)
            .bind(seen.newest_change);
    }
    query.execute(&mut **transaction).await?;
    Ok(())
}
