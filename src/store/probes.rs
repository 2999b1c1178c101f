//! The probes aggregate: lease claims of due connections, recording probe verdicts in
//! batches, pruning probe history.

use std::collections::{HashMap, HashSet};

use sqlx::Row;
use sqlx::any::AnyRow;

use super::incidents::record_transition;
use super::rows::{parse_id, parse_outcome, row_state};
use super::{Backend, LeaseClaim, Store, StoreError};
use crate::domain::{ConnectionId, Millis, Outcome, ProbeReport};
use crate::rules::{ConnectionState, Verdict};

/// A connection claimed for probing, with the state classification needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: ConnectionId,
    pub platform: String,
    pub state: ConnectionState,
    pub due: Millis,
    pub last_outcome: Option<Outcome>,
}

/// One probe and its verdict, ready to store.
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub id: ConnectionId,
    pub at: Millis,
    pub report: ProbeReport,
    pub verdict: Verdict,
    /// The previous probe's outcome: successes are stored only when they change something.
    pub last_outcome: Option<Outcome>,
    pub lease_owner: String,
}

const CLAIM_COLUMNS: &str = "id, platform, health, health_since, consecutive_failures, \
     consecutive_auth_failures, first_failure_at, next_due, last_outcome";

/// How often the SQLite claim reads the due connections from the start again, not from
/// its cursor (a connection whose due time moved back behind the cursor is found then).
const CURSOR_RESTART: Millis = 10_000;

/// The probe leases of this process on SQLite, held in memory instead of in the rows.
///
/// On SQLite one daemon owns the database (replicas share PostgreSQL), so a lease written
/// into the row told nobody anything, and it cost a second write of every probed row
/// (one commit for the claim, one for the result): about a third of the CPU at 15,000
/// probes a second. The claim reads the due rows instead, and skips those held here.
/// The claim reads on from a cursor in due order, so it does not read again, turn after
/// turn, the thousands of rows already in flight; it starts from the beginning when it
/// has caught up, when a lease expired (a result that was never stored) and every
/// `CURSOR_RESTART`.
#[derive(Debug, Default)]
pub(super) struct MemoryLeases {
    /// Connection id -> (owner, lease end).
    held: HashMap<String, (String, Millis)>,
    /// The due time the next claim reads on from; `None`: from the start.
    cursor: Option<Millis>,
    /// Rows due exactly at `cursor` that are held (read again and skipped).
    held_at_cursor: usize,
    /// When the claim last read from the start.
    restarted: Millis,
    /// A claim is reading (`Store::claim_due`): leases released meanwhile go to `released`.
    claiming: bool,
    /// Ids whose result was committed while the claim read. Its snapshot may predate that
    /// commit and show the row still due, so the claim skips them (else: probed twice).
    released: HashSet<String>,
    /// Ids whose result is being written (`record_probes`): their leases do not expire
    /// meanwhile, or a claim reading beside the commit could take them again.
    committing: HashSet<String>,
}

impl MemoryLeases {
    /// Drops leases that ended before `now`; a dropped one sends the cursor back.
    fn expire(&mut self, now: Millis) {
        let before = self.held.len();
        let committing = &self.committing;
        self.held
            .retain(|id, (_, until)| *until > now || committing.contains(id));
        if self.held.len() < before || now - self.restarted >= CURSOR_RESTART {
            self.cursor = None;
        }
    }

    fn holds(&self, id: &str, owner: &str) -> bool {
        self.held.get(id).is_some_and(|(holder, _)| holder == owner)
    }

    /// Ends the leases of results just committed.
    fn release<'a>(&mut self, ids: impl IntoIterator<Item = &'a String>) {
        for id in ids {
            self.held.remove(id);
            if self.claiming {
                self.released.insert(id.clone());
            }
        }
    }
}

impl Store {
    /// Claims up to `limit` connections whose due time has passed, leasing them to
    /// `owner` until `lease_until` so no other replica (or tick) probes them meanwhile.
    pub async fn claim_due(
        &self,
        now: Millis,
        limit: u32,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Vec<Claimed>, StoreError> {
        if self.backend() == Backend::Sqlite {
            return self
                .claim_due_in_memory(now, limit, owner, lease_until)
                .await;
        }
        let claim = LeaseClaim {
            table: "connections",
            owner_column: "lease_owner",
            until_column: "lease_until",
            due: "active = 1 AND next_due <= $3",
            order: "next_due",
            returning: CLAIM_COLUMNS,
        };
        let rows = self
            .claim_leased(&claim, now, limit, owner, lease_until)
            .await?;
        rows.iter().map(claimed_from_row).collect()
    }

    /// `claim_due` on SQLite: reads due rows on a reader connection, beside the writer (a
    /// claim that waited for the writer's turn waited for a commit of 1,024 results, and
    /// the probes ran dry meanwhile), and leases them in memory (`MemoryLeases`). A row
    /// leased in the database (a probe asked for by the CLI, another process) is left
    /// alone until that lease ends. Claims take turns among themselves.
    async fn claim_due_in_memory(
        &self,
        now: Millis,
        limit: u32,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Vec<Claimed>, StoreError> {
        let _claiming = self.claim_lock.lock().await;
        let (from, skip) = {
            let mut leases = self.leases.lock().expect("leases lock");
            // The read below sees every commit released before this point.
            leases.claiming = true;
            leases.released.clear();
            leases.expire(now);
            match leases.cursor {
                Some(cursor) => (cursor, leases.held_at_cursor),
                None => {
                    leases.restarted = now;
                    (Millis::MIN, leases.held.len())
                }
            }
        };
        let asked = i64::from(limit) + skip as i64;
        let sql = format!(
            "SELECT {CLAIM_COLUMNS} FROM connections WHERE active = 1 AND next_due <= $1 \
             AND next_due >= $2 AND lease_until <= $1 ORDER BY next_due LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(from)
            .bind(asked)
            .fetch_all(&self.pool)
            .await;
        let mut leases = self.leases.lock().expect("leases lock");
        leases.claiming = false;
        let rows = rows?;
        let mut claims = Vec::with_capacity(limit as usize);
        let mut last_due = from;
        for row in &rows {
            if claims.len() == limit as usize {
                break;
            }
            let id: String = row.try_get("id")?;
            last_due = row.try_get("next_due")?;
            if leases.held.contains_key(&id) || leases.released.contains(&id) {
                continue;
            }
            let claim = claimed_from_row(row)?;
            leases.held.insert(id, (owner.to_owned(), lease_until));
            claims.push(claim);
        }
        if (rows.len() as i64) < asked {
            // Every due row was read: the next claim starts from the beginning.
            leases.cursor = None;
        } else {
            leases.cursor = Some(last_due);
            let mut held_at_cursor = 0;
            for row in &rows {
                let due: Millis = row.try_get("next_due")?;
                if due == last_due && leases.held.contains_key(&row.try_get::<String, _>("id")?) {
                    held_at_cursor += 1;
                }
            }
            leases.held_at_cursor = held_at_cursor;
        }
        Ok(claims)
    }

    /// Claims one connection now, whatever its due time, unless another probe holds it.
    pub async fn claim_one(
        &self,
        id: &ConnectionId,
        now: Millis,
        owner: &str,
        lease_until: Millis,
    ) -> Result<Option<Claimed>, StoreError> {
        let sql = format!(
            "UPDATE connections SET lease_owner = $1, lease_until = $2 \
             WHERE id = $3 AND active = 1 AND lease_until <= $4 RETURNING {CLAIM_COLUMNS}"
        );
        let mut transaction = self.begin_write().await?;
        let sqlite = self.backend() == Backend::Sqlite;
        if sqlite {
            // Leased in memory first (where the daemon's claim and `record_probes` look on
            // SQLite), so a claim reading beside this transaction skips the row.
            let mut leases = self.leases.lock().expect("leases lock");
            leases.expire(now);
            if leases.held.contains_key(id.as_str()) {
                return Ok(None);
            }
            leases
                .held
                .insert(id.to_string(), (owner.to_owned(), lease_until));
        }
        let row = match sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(lease_until)
            .bind(id.as_str())
            .bind(now)
            .fetch_optional(&mut **transaction)
            .await
        {
            Ok(row) => transaction.commit().await.map(|()| row),
            Err(error) => Err(error),
        };
        if sqlite && !matches!(row, Ok(Some(_))) {
            self.leases
                .lock()
                .expect("leases lock")
                .held
                .remove(id.as_str());
        }
        row?.as_ref().map(claimed_from_row).transpose()
    }

    /// Stores a batch of probe verdicts in one transaction: latest result, health,
    /// transitions, incidents; releases the leases. A record whose lease was lost
    /// (expired and taken by another replica) is dropped. Returns the ids applied.
    ///
    /// Rows go in multi-row statements (`Store::chunk_sizes`): at 10,000 probes a second
    /// the per-statement round trips to sqlx's SQLite worker, not SQLite, were most of
    /// the cost.
    pub async fn record_probes(
        &self,
        records: &[ProbeRecord],
    ) -> Result<HashSet<String>, StoreError> {
        let transaction = self.begin_write().await?;
        if self.backend() == Backend::Postgres {
            let records: Vec<&ProbeRecord> = records.iter().collect();
            return self.write_probes(transaction, &records).await;
        }
        // On SQLite the leases are in memory (`MemoryLeases`): a record whose lease was
        // taken over is dropped here, as the owner check in the statement does on
        // PostgreSQL. The leases kept cannot expire until the transaction has ended, and
        // are released once it is committed.
        let records: Vec<&ProbeRecord> = {
            let mut leases = self.leases.lock().expect("leases lock");
            let kept: Vec<&ProbeRecord> = records
                .iter()
                .filter(|record| leases.holds(record.id.as_str(), &record.lease_owner))
                .collect();
            leases
                .committing
                .extend(kept.iter().map(|record| record.id.to_string()));
            kept
        };
        let written = self.write_probes(transaction, &records).await;
        let mut leases = self.leases.lock().expect("leases lock");
        for record in &records {
            leases.committing.remove(record.id.as_str());
        }
        if let Ok(applied) = &written {
            leases.release(applied);
        }
        written
    }

    /// `record_probes` once the records whose lease is held are known: writes and commits.
    async fn write_probes(
        &self,
        mut transaction: super::WriteTransaction,
        records: &[&ProbeRecord],
    ) -> Result<HashSet<String>, StoreError> {
        let sizes = self.chunk_sizes();
        let mut applied: HashSet<String> = HashSet::with_capacity(records.len());
        // Most probes change no health: their statement leaves `health` alone, so SQLite
        // does not rewrite the connection's entry in the (active, health) index each time.
        // Rows go in id order (runs of the same kind), like `sync_connections`: on
        // PostgreSQL two transactions locking rows in one order wait instead of deadlocking.
        let mut ordered: Vec<&ProbeRecord> = records.to_vec();
        ordered.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        for run in ordered
            .chunk_by(|a, b| a.verdict.transition.is_some() == b.verdict.transition.is_some())
        {
            let with_health = run[0].verdict.transition.is_some();
            for chunk in super::chunks_of(run, sizes) {
                let ids =
                    update_latest(&mut transaction, self.backend(), chunk, with_health).await?;
                applied.extend(ids);
            }
        }
        // History keeps every failure and every change; a steady stream of successes is
        // summarised by the connection's latest result (bounded storage at scale).
        let history: Vec<&ProbeRecord> = records
            .iter()
            .copied()
            .filter(|record| applied.contains(record.id.as_str()))
            .filter(|record| {
                !(record.report.outcome == Outcome::Ok && record.last_outcome == Some(Outcome::Ok))
            })
            .collect();
        for chunk in super::chunks_of(&history, sizes) {
            insert_history(&mut transaction, self.backend(), chunk).await?;
        }
        for record in &ordered {
            if let Some(transition) = &record.verdict.transition
                && applied.contains(record.id.as_str())
            {
                record_transition(
                    &mut transaction,
                    &record.id,
                    transition,
                    &record.verdict.incident,
                )
                .await?;
            }
        }
        transaction.commit().await?;
        Ok(applied)
    }

    /// Deletes probe results older than `before`; returns how many.
    pub async fn prune_probe_results(&self, before: Millis) -> Result<u64, StoreError> {
        let mut transaction = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM probe_results WHERE at < $1")
            .bind(before)
            .execute(&mut **transaction)
            .await?
            .rows_affected();
        transaction.commit().await?;
        Ok(deleted)
    }
}

/// Writes the latest result of each record whose lease this process still holds, in one
/// statement (`health` and `health_since` only `with_health`); returns the ids written.
async fn update_latest(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    chunk: &[&ProbeRecord],
    with_health: bool,
) -> Result<Vec<String>, StoreError> {
    let sql = latest_statement(backend, chunk.len(), with_health);
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for record in chunk {
        let report = &record.report;
        let state = &record.verdict.state;
        query = query
            .bind(record.id.as_str().to_owned())
            .bind(record.lease_owner.clone());
        if with_health {
            query = query.bind(state.health.as_str()).bind(state.health_since);
        }
        query = query
            .bind(i64::from(state.consecutive_failures))
            .bind(i64::from(state.consecutive_auth_failures))
            .bind(state.first_failure_at)
            // A probe verdict always sets the next due time.
            .bind(record.verdict.next_due.unwrap_or(record.at))
            .bind(record.at)
            .bind(report.outcome.as_str())
            .bind(report.status.map(i64::from))
            .bind(report.latency_ms)
            .bind(report.request_id.clone())
            .bind(report.error_code.clone())
            .bind(report.message.clone());
    }
    if backend == Backend::Postgres {
        let rows = query.fetch_all(&mut **transaction).await?;
        return rows.iter().map(|row| Ok(row.try_get(0)?)).collect();
    }
    // On SQLite the count says whether every row was written (almost always); only when
    // one was not (removed meanwhile) are the written ones looked up. RETURNING sent one
    // row per probe back from sqlx's worker thread, a few per cent of the CPU.
    let written = query.execute(&mut **transaction).await?.rows_affected();
    if written == chunk.len() as u64 {
        return Ok(chunk
            .iter()
            .map(|record| record.id.as_str().to_owned())
            .collect());
    }
    let sql = format!(
        "SELECT id FROM connections WHERE active = 1 AND id IN ({})",
        super::value_rows(backend, chunk.len(), "?")
    );
    let mut query = sqlx::query_as::<_, (String,)>(sqlx::AssertSqlSafe(sql));
    for record in chunk {
        query = query.bind(record.id.as_str().to_owned());
    }
    let rows = query.fetch_all(&mut **transaction).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The statement of `update_latest` for `rows` records.
fn latest_statement(backend: Backend, rows: usize, with_health: bool) -> String {
    // Column, SQL type. Explicit casts: PostgreSQL cannot type a VALUES column from a NULL.
    const HEALTH: [(&str, &str); 2] = [("health", "TEXT"), ("health_since", "BIGINT")];
    const LATEST: [(&str, &str); 11] = [
        ("consecutive_failures", "BIGINT"),
        ("consecutive_auth_failures", "BIGINT"),
        ("first_failure_at", "BIGINT"),
        ("next_due", "BIGINT"),
        ("last_probe_at", "BIGINT"),
        ("last_outcome", "TEXT"),
        ("last_status", "BIGINT"),
        ("last_latency_ms", "BIGINT"),
        ("last_request_id", "TEXT"),
        ("last_error_code", "TEXT"),
        ("last_message", "TEXT"),
    ];
    let mut columns: Vec<(&str, &str)> = vec![("cid", "TEXT"), ("owner", "TEXT")];
    if with_health {
        columns.extend(HEALTH);
    }
    columns.extend(LATEST);
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let mut sql = format!("WITH v ({}) AS (VALUES ", names.join(", "));
    let row: Vec<String> = columns
        .iter()
        .map(|(_, kind)| format!("CAST(? AS {kind})"))
        .collect();
    sql.push_str(&super::value_rows(
        backend,
        rows,
        &format!("({})", row.join(", ")),
    ));
    sql.push_str(") UPDATE connections SET lease_owner = NULL, lease_until = 0");
    for (name, _) in &columns[2..] {
        sql.push_str(&format!(", {name} = v.{name}"));
    }
    // On SQLite the lease was checked in memory (`record_probes`); a connection removed
    // by a reload while its probe was in flight is left alone (on PostgreSQL the sync
    // cleared its lease owner). The `+` keeps SQLite from planning the update around an
    // index on `active` (a scan of every connection per statement: 3,800 probes a second
    // instead of 26,000).
    sql.push_str(match backend {
        Backend::Sqlite => " FROM v WHERE connections.id = v.cid AND +connections.active = 1",
        Backend::Postgres => {
            " FROM v WHERE connections.id = v.cid AND connections.lease_owner = v.owner \
             RETURNING id"
        }
    });
    sql
}

/// Appends probe history rows, one statement for the chunk.
async fn insert_history(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    chunk: &[&ProbeRecord],
) -> Result<(), StoreError> {
    let mut sql = String::from(
        "INSERT INTO probe_results (connection_id, at, outcome, status, latency_ms, request_id, \
         error_code, message) VALUES ",
    );
    sql.push_str(&super::value_rows(
        backend,
        chunk.len(),
        "(?, ?, ?, ?, ?, ?, ?, ?)",
    ));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for record in chunk {
        let report = &record.report;
        query = query
            .bind(record.id.as_str().to_owned())
            .bind(record.at)
            .bind(report.outcome.as_str())
            .bind(report.status.map(i64::from))
            .bind(report.latency_ms)
            .bind(report.request_id.clone())
            .bind(report.error_code.clone())
            .bind(report.message.clone());
    }
    query.execute(&mut **transaction).await?;
    Ok(())
}

fn claimed_from_row(row: &AnyRow) -> Result<Claimed, StoreError> {
    Ok(Claimed {
        id: parse_id(&row.try_get::<String, _>("id")?)?,
        platform: row.try_get("platform")?,
        state: row_state(row)?,
        due: row.try_get("next_due")?,
        last_outcome: parse_outcome(row.try_get("last_outcome")?)?,
    })
}
