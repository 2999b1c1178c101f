//! The connections aggregate: the configured fleet synchronised into the store, pause
//! switches, probes asked for.

use std::collections::HashMap;

use sqlx::Row;

use super::incidents::record_verdict;
use super::rows::row_state;
use super::{Backend, Store, StoreError, Tx};
use crate::domain::{ConnectionId, Health, Millis};
use crate::rules::ConnectionState;
use crate::rules::health::pause_changed;

/// A connection as the config describes it, for `sync_connections`.
///
/// Borrowed from the config: a fleet of 100,000 is synchronised at start-up, and owned
/// copies of every name and id were ~20 MiB of the start-up peak.
#[derive(Debug, Clone)]
pub struct SyncConnection<'a> {
    pub id: &'a ConnectionId,
    pub name: &'a str,
    pub platform: &'a str,
    pub remote_id: Option<&'a str>,
    pub paused: bool,
    /// First due time for a connection the store has not seen yet.
    pub first_due: Millis,
    /// The customer's contacts (email addresses).
    pub contacts: Vec<&'a str>,
    pub reconnect_url: Option<&'a str>,
    /// Expected time between webhooks; `None` when its platform sends none.
    pub expected_webhook_ms: Option<Millis>,
}

/// Connections per multi-row upsert in `sync_connections` (13 parameters each).
const SYNC_CHUNK: usize = 64;

impl Store {
    /// Makes the stored connections match the config: inserts new ones, updates names,
    /// platforms and pause switches, and deactivates those no longer configured (their
    /// history is kept). Returns the number of connections deactivated.
    pub async fn sync_connections(
        &self,
        connections: &[SyncConnection<'_>],
        now: Millis,
    ) -> Result<u64, StoreError> {
        let mut transaction = self.begin_write().await?;
        let generation: i64 =
            sqlx::query("SELECT COALESCE(MAX(config_generation), 0) + 1 FROM connections")
                .fetch_one(&mut **transaction)
                .await?
                .try_get(0)?;
        // What is stored now, in one read; then multi-row upserts (a fleet of 100,000
        // costs a few thousand statements, not 200,000).
        let existing: HashMap<String, (i64, i64)> = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT id, paused, operator_paused FROM connections",
        )
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .map(|(id, paused, operator_paused)| (id, (paused, operator_paused)))
        .collect();
        // PostgreSQL: rows are locked in id order (as `record_probes` does), so replicas
        // starting together and probing meanwhile never deadlock. SQLite: new rows go in
        // in the order they fall due, so connections probed together sit side by side in
        // the file; a batch of 1,024 results then rewrites a few dozen pages instead of
        // one page per connection, and the claim reads them likewise.
        let mut sorted: Vec<&SyncConnection<'_>> = connections.iter().collect();
        match self.backend() {
            Backend::Sqlite => sorted
                .sort_by(|a, b| (a.first_due, a.id.as_str()).cmp(&(b.first_due, b.id.as_str()))),
            Backend::Postgres => sorted.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str())),
        }
        for chunk in sorted.chunks(SYNC_CHUNK) {
            self.upsert_connections(&mut transaction, chunk, generation, now)
                .await?;
        }
        for connection in connections {
            let Some((was_paused, operator_paused)) = existing.get(connection.id.as_str()) else {
                continue;
            };
            let was = *was_paused != 0 || *operator_paused != 0;
            let now_paused = connection.paused || *operator_paused != 0;
            if was != now_paused {
                let state = state_of(&mut transaction, connection.id).await?;
                let verdict = pause_changed(&state, now_paused, now);
                record_verdict(&mut transaction, connection.id, &verdict).await?;
            }
        }
        let deactivated = sqlx::query(
            "UPDATE connections SET active = 0, lease_owner = NULL, lease_until = 0 \
             WHERE active = 1 AND config_generation <> $1",
        )
        .bind(generation)
        .execute(&mut **transaction)
        .await?
        .rows_affected();
        transaction.commit().await?;
        Ok(deactivated)
    }

    /// Inserts or updates one chunk of configured connections in one statement.
    async fn upsert_connections(
        &self,
        transaction: &mut Tx,
        chunk: &[&SyncConnection<'_>],
        generation: i64,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut sql = String::from(
            "INSERT INTO connections (id, name, platform, remote_id, active, config_generation, \
             paused, health, health_since, next_due, created_at, expected_webhook_ms, contacts, \
             reconnect_url) VALUES ",
        );
        sql.push_str(&self.value_rows(chunk.len(), "(?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)"));
        sql.push_str(
            " ON CONFLICT (id) DO UPDATE SET name = excluded.name, platform = excluded.platform, \
             remote_id = excluded.remote_id, active = 1, \
             config_generation = excluded.config_generation, paused = excluded.paused, \
             expected_webhook_ms = excluded.expected_webhook_ms, contacts = excluded.contacts, \
             reconnect_url = excluded.reconnect_url",
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for connection in chunk {
            let initial_health = if connection.paused {
                "paused"
            } else {
                "unknown"
            };
            query = query
                .bind(connection.id.as_str().to_owned())
                .bind(connection.name.to_owned())
                .bind(connection.platform.to_owned())
                .bind(connection.remote_id.map(str::to_owned))
                .bind(generation)
                .bind(i64::from(connection.paused))
                .bind(initial_health)
                .bind(now)
                .bind(connection.first_due)
                .bind(now)
                .bind(connection.expected_webhook_ms)
                .bind(connection.contacts.join("\n"))
                .bind(connection.reconnect_url.map(str::to_owned));
        }
        query.execute(&mut **transaction).await?;
        Ok(())
    }

    /// Pauses or resumes a connection by operator action; returns the new health, or
    /// `None` for an unknown connection. The rules judge what the switch does to health.
    pub async fn set_operator_pause(
        &self,
        id: &ConnectionId,
        paused: bool,
        now: Millis,
    ) -> Result<Option<Health>, StoreError> {
        let mut transaction = self.begin_write().await?;
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT paused FROM connections WHERE id = $1 AND active = 1")
                .bind(id.as_str())
                .fetch_optional(&mut **transaction)
                .await?;
        let Some((config_paused,)) = row else {
            return Ok(None);
        };
        sqlx::query("UPDATE connections SET operator_paused = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(i64::from(paused))
            .execute(&mut **transaction)
            .await?;
        let state = state_of(&mut transaction, id).await?;
        let verdict = pause_changed(&state, paused || config_paused != 0, now);
        record_verdict(&mut transaction, id, &verdict).await?;
        transaction.commit().await?;
        Ok(Some(verdict.state.health))
    }

    /// Marks a connection due now (token rotated, probe requested). False if unknown.
    pub async fn request_probe(&self, id: &ConnectionId, now: Millis) -> Result<bool, StoreError> {
        let mut transaction = self.begin_write().await?;
        let updated =
            sqlx::query("UPDATE connections SET next_due = $2 WHERE id = $1 AND active = 1")
                .bind(id.as_str())
                .bind(now)
                .execute(&mut **transaction)
                .await?;
        transaction.commit().await?;
        Ok(updated.rows_affected() == 1)
    }
}

/// The judged state of one connection, read inside a write transaction.
pub(super) async fn state_of(
    transaction: &mut Tx,
    id: &ConnectionId,
) -> Result<ConnectionState, StoreError> {
    let row = sqlx::query(
        "SELECT health, health_since, consecutive_failures, consecutive_auth_failures, \
         first_failure_at FROM connections WHERE id = $1",
    )
    .bind(id.as_str())
    .fetch_one(&mut **transaction)
    .await?;
    row_state(&row)
}
