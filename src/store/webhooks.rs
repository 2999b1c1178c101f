//! The webhooks aggregate: deliveries stored once per webhook id, activity that ends a
//! quiet period, the platform's reauth and reconnect words (judged by the rules).

use std::collections::{HashMap, HashSet};

use super::incidents::record_verdict;
use super::rows::{parse_health, parse_id};
use super::{Store, StoreError, Tx};
use crate::domain::{ConnectionId, Health, Millis};
use crate::rules::changes::watermark_candidate;
use crate::rules::{ConnectionState, Event, Rules};

/// id, health, health_since, consecutive_failures, consecutive_auth_failures, quiet,
/// first_failure_at.
type ConnectionRow = (String, String, i64, i64, i64, i64, Option<i64>);

/// What a batch of deliveries did for one connection.
#[derive(Debug, Default)]
struct Activity {
    last: Millis,
    newest_change: Option<Millis>,
    reauth: bool,
    reconnected: bool,
}

/// A change a webhook delivered: connection, change id, its update time, seen at.
type DeliveredChange = (String, String, Millis, Millis);

/// What a batch of deliveries comes to: an answer each, activity per connection, the
/// changes delivered.
#[derive(Debug, Default)]
struct Batch {
    results: Vec<WebhookStored>,
    activity: Vec<(ConnectionId, Activity)>,
    changes: Vec<DeliveredChange>,
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

impl Store {
    /// Stores deliveries in one transaction (durable before any is answered): de-duplicates
    /// by webhook id, marks activity, leaves quiet, records delivered changes, advances the
    /// watermark and applies reauth / reconnect events. Statements are per batch and per
    /// connection, not per delivery, so a busy platform's deliveries share the cost.
    pub async fn record_webhooks(
        &self,
        deliveries: &[WebhookDelivery],
        rules: &Rules,
    ) -> Result<Vec<WebhookStored>, StoreError> {
        let mut transaction = self.begin_write().await?;
        let connections = self
            .lookup_connections(&mut transaction, deliveries)
            .await?;
        let mut inserted = self
            .insert_deliveries(&mut transaction, deliveries, &connections)
            .await?;
        let mut batch = Batch::default();
        for delivery in deliveries {
            let connection = connections
                .get(&(delivery.platform.as_str(), delivery.remote_id.as_str()))
                .and_then(Option::as_ref);
            batch.add(delivery, connection, &mut inserted)?;
        }
        for chunk in super::chunks_of(&batch.changes, self.chunk_sizes()) {
            self.insert_delivered_changes(&mut transaction, chunk)
                .await?;
        }
        // In id order, like `record_probes`: no deadlock between the two on PostgreSQL.
        batch
            .activity
            .sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        for chunk in super::chunks_of(&batch.activity, self.chunk_sizes()) {
            touch_activity(&mut transaction, self.backend(), chunk).await?;
        }
        let activity = std::mem::take(&mut batch.activity);
        for (id, seen) in &activity {
            let row = connections
                .values()
                .flatten()
                .find(|row| row.0 == id.as_str())
                .expect("every active connection was looked up");
            let entered = self
                .apply_activity(&mut transaction, rules, id, row, seen)
                .await?;
            batch.note_entered(id, entered);
        }
        transaction.commit().await?;
        Ok(batch.results)
    }

    /// The active connections a batch names, by (platform, remote id), looked up together
    /// (a statement is a round trip to sqlx's SQLite worker: one per connection was most
    /// of a batch's cost). Two connections with one remote id: the first by id.
    async fn lookup_connections<'d>(
        &self,
        transaction: &mut Tx,
        deliveries: &'d [WebhookDelivery],
    ) -> Result<HashMap<(&'d str, &'d str), Option<ConnectionRow>>, StoreError> {
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
                    "SELECT id, health, health_since, consecutive_failures, \
                     consecutive_auth_failures, quiet, first_failure_at, remote_id \
                     FROM connections WHERE remote_id IN (",
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
                    (String, String, i64, i64, i64, i64, Option<i64>, String),
                >(sqlx::AssertSqlSafe(sql));
                for (_, remote_id) in chunk {
                    query = query.bind(*remote_id);
                }
                for (
                    id,
                    health,
                    since,
                    failures,
                    auth_failures,
                    quiet,
                    first_failure_at,
                    remote_id,
                ) in query.bind(platform).fetch_all(&mut **transaction).await?
                {
                    let key = chunk
                        .iter()
                        .find(|(_, wanted)| *wanted == remote_id)
                        .copied()
                        .expect("a remote id asked for");
                    connections
                        .get_mut(&key)
                        .expect("looked up")
                        .get_or_insert((
                            id,
                            health,
                            since,
                            failures,
                            auth_failures,
                            quiet,
                            first_failure_at,
                        ));
                }
            }
        }
        Ok(connections)
    }

    /// Every delivery in multi-row inserts; returns the (platform, webhook id) pairs that
    /// were new (the others are duplicates).
    async fn insert_deliveries(
        &self,
        transaction: &mut Tx,
        deliveries: &[WebhookDelivery],
        connections: &HashMap<(&str, &str), Option<ConnectionRow>>,
    ) -> Result<HashSet<(String, String)>, StoreError> {
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
        Ok(inserted)
    }

    /// Records the changes webhooks delivered (so polling does not recover them again).
    async fn insert_delivered_changes(
        &self,
        transaction: &mut Tx,
        chunk: &[DeliveredChange],
    ) -> Result<(), StoreError> {
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
        Ok(())
    }

    /// One connection's webhook events of a batch, after `touch_activity`, judged by the
    /// rules in order: the end of its quiet, the platform's reauth and reconnect words.
    /// Returns the health it entered, if it changed.
    async fn apply_activity(
        &self,
        transaction: &mut Tx,
        rules: &Rules,
        id: &ConnectionId,
        row: &ConnectionRow,
        seen: &Activity,
    ) -> Result<Option<Health>, StoreError> {
        let (_, health, health_since, failures, auth_failures, quiet, first_failure_at) = row;
        let mut state = ConnectionState {
            health: parse_health(health)?,
            health_since: *health_since,
            consecutive_failures: u32::try_from(*failures).unwrap_or(u32::MAX),
            // Read, not assumed: the verdict's state is written back whole, and a reset
            // streak would let the next dead-token probe use confirm_after, not the backoff.
            consecutive_auth_failures: u32::try_from(*auth_failures).unwrap_or(u32::MAX),
            first_failure_at: *first_failure_at,
        };
        let events = [
            (*quiet != 0).then_some(Event::WebhooksResumed),
            seen.reauth.then_some(Event::WebhookReauth),
            seen.reconnected.then_some(Event::WebhookReconnected),
        ];
        let mut entered = None;
        for event in events.into_iter().flatten() {
            let verdict = rules.judge(&state, event, seen.last);
            if let Some(transition) = &verdict.transition
                && transition.from != transition.to
            {
                entered = Some(transition.to);
            }
            record_verdict(transaction, id, &verdict).await?;
            state = verdict.state;
        }
        Ok(entered)
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

impl Batch {
    /// Adds one delivery: the first of its id is new (repeats are duplicates), one for no
    /// active connection is stored all the same, the rest count as their connection's activity.
    fn add(
        &mut self,
        delivery: &WebhookDelivery,
        connection: Option<&ConnectionRow>,
        inserted: &mut HashSet<(String, String)>,
    ) -> Result<(), StoreError> {
        if !inserted.remove(&(delivery.platform.clone(), delivery.webhook_id.clone())) {
            self.results.push(WebhookStored::Duplicate);
            return Ok(());
        }
        let Some(row) = connection else {
            self.results.push(WebhookStored::UnknownConnection);
            return Ok(());
        };
        let id = parse_id(&row.0)?;
        if let Some(change_id) = &delivery.change_id {
            self.changes.push((
                row.0.clone(),
                change_id.clone(),
                delivery.change_updated.unwrap_or(-1),
                delivery.received_at,
            ));
        }
        let position = match self.activity.iter().position(|(known, _)| *known == id) {
            Some(position) => position,
            None => {
                self.activity.push((id.clone(), Activity::default()));
                self.activity.len() - 1
            }
        };
        let entry = &mut self.activity[position].1;
        entry.last = entry.last.max(delivery.received_at);
        let credible = delivery
            .change_updated
            .map(|updated| watermark_candidate(updated, delivery.received_at));
        entry.newest_change = entry.newest_change.max(credible);
        entry.reauth |= delivery.reauth;
        entry.reconnected |= delivery.reconnected;
        self.results.push(WebhookStored::Accepted {
            connection: id,
            transition: None,
        });
        Ok(())
    }

    /// The first accepted delivery of `id` reports the health it entered.
    fn note_entered(&mut self, id: &ConnectionId, entered: Option<Health>) {
        if entered.is_none() {
            return;
        }
        for result in self.results.iter_mut() {
            if let WebhookStored::Accepted {
                connection,
                transition,
            } = result
                && connection == id
                && transition.is_none()
            {
                *transition = entered;
                return;
            }
        }
    }
}
