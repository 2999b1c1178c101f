//! Reading side: what `status`, the admin API and the gauges show.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::rows::{parse_health, parse_id, parse_outcome};
use super::{Store, StoreError};
use crate::domain::{ConnectionId, Health, Millis, Outcome, time};

/// A connection's current state, as listed by `status` and `GET /api/v1/connections`.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionSummary {
    pub id: ConnectionId,
    pub name: String,
    pub platform: String,
    pub remote_id: Option<String>,
    pub health: Health,
    #[serde(serialize_with = "time::serialize")]
    pub health_since: Millis,
    #[serde(serialize_with = "time::serialize")]
    pub next_due: Millis,
    #[serde(serialize_with = "time::serialize_optional")]
    pub last_probe_at: Option<Millis>,
    pub last_outcome: Option<Outcome>,
    pub last_status: Option<i64>,
    pub last_latency_ms: Option<i64>,
    pub last_request_id: Option<String>,
    pub last_error_code: Option<String>,
    pub last_message: Option<String>,
    pub open_incident: Option<IncidentRow>,
    #[serde(serialize_with = "time::serialize_optional")]
    pub last_webhook_at: Option<Millis>,
    /// No webhook within the expected interval + grace: polled for changes.
    pub quiet: bool,
    #[serde(serialize_with = "time::serialize_optional")]
    pub quiet_since: Option<Millis>,
    /// Changes up to this time are known (from webhooks or polling).
    #[serde(serialize_with = "time::serialize_optional")]
    pub watermark: Option<Millis>,
    #[serde(serialize_with = "time::serialize_optional")]
    pub last_poll_at: Option<Millis>,
    pub last_poll_result: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransitionRow {
    #[serde(serialize_with = "time::serialize")]
    pub at: Millis,
    pub from: Health,
    pub to: Health,
    pub cause: String,
    pub outcome: Option<Outcome>,
    pub error_code: Option<String>,
    pub request_id: Option<String>,
    #[serde(serialize_with = "time::serialize_optional")]
    pub first_failure_at: Option<Millis>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IncidentRow {
    pub id: i64,
    pub kind: Health,
    #[serde(serialize_with = "time::serialize")]
    pub opened_at: Millis,
    #[serde(serialize_with = "time::serialize_optional")]
    pub closed_at: Option<Millis>,
    #[serde(serialize_with = "time::serialize")]
    pub first_failure_at: Millis,
    pub error_code: Option<String>,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeRow {
    #[serde(serialize_with = "time::serialize")]
    pub at: Millis,
    pub outcome: Outcome,
    pub status: Option<i64>,
    pub latency_ms: i64,
    pub request_id: Option<String>,
    pub error_code: Option<String>,
    pub message: Option<String>,
}

/// One connection with its recent history.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionDetail {
    #[serde(flatten)]
    pub summary: ConnectionSummary,
    pub transitions: Vec<TransitionRow>,
    pub incidents: Vec<IncidentRow>,
    pub probes: Vec<ProbeRow>,
}

const SUMMARY_COLUMNS: &str = "c.id, c.name, c.platform, c.remote_id, c.health, c.health_since, \
     c.next_due, c.last_probe_at, c.last_outcome, c.last_status, c.last_latency_ms, \
     c.last_request_id, c.last_error_code, c.last_message, c.last_webhook_at, c.quiet, \
     c.quiet_since, c.watermark, c.last_poll_at, c.last_poll_result, i.id AS incident_id, \
     i.kind AS incident_kind, i.opened_at AS incident_opened_at, \
     i.first_failure_at AS incident_first_failure_at, i.error_code AS incident_error_code, \
     i.request_id AS incident_request_id";

const HISTORY_LIMIT: i64 = 50;

impl Store {
    /// Every active connection, ordered by id.
    pub async fn list_connections(&self) -> Result<Vec<ConnectionSummary>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM connections c \
             LEFT JOIN incidents i ON i.id = c.open_incident_id \
             WHERE c.active = 1 ORDER BY c.id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary_from_row).collect()
    }

    /// One active connection with its latest transitions, incidents and probes.
    pub async fn connection_detail(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<ConnectionDetail>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM connections c \
             LEFT JOIN incidents i ON i.id = c.open_incident_id \
             WHERE c.active = 1 AND c.id = $1"
        );
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let summary = summary_from_row(&row)?;
        let transitions = sqlx::query(
            "SELECT at, from_health, to_health, cause, outcome, error_code, request_id, \
             first_failure_at FROM transitions WHERE connection_id = $1 \
             ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(id.as_str())
        .bind(HISTORY_LIMIT)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(transition_from_row)
        .collect::<Result<_, _>>()?;
        let incidents = sqlx::query(
            "SELECT id, kind, opened_at, closed_at, first_failure_at, error_code, request_id \
             FROM incidents WHERE connection_id = $1 ORDER BY opened_at DESC, id DESC LIMIT $2",
        )
        .bind(id.as_str())
        .bind(HISTORY_LIMIT)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(incident_from_row)
        .collect::<Result<_, _>>()?;
        let probes = sqlx::query(
            "SELECT at, outcome, status, latency_ms, request_id, error_code, message \
             FROM probe_results WHERE connection_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(id.as_str())
        .bind(HISTORY_LIMIT)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(probe_from_row)
        .collect::<Result<_, _>>()?;
        Ok(Some(ConnectionDetail {
            summary,
            transitions,
            incidents,
            probes,
        }))
    }

    /// Active connections per health state (every state listed, zeros included).
    pub async fn health_counts(&self) -> Result<Vec<(Health, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT health, COUNT(*) FROM connections WHERE active = 1 GROUP BY health",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut counts: Vec<(Health, i64)> =
            Health::ALL.iter().map(|&health| (health, 0)).collect();
        for (health, count) in rows {
            let health = parse_health(&health)?;
            if let Some(entry) = counts
                .iter_mut()
                .find(|(candidate, _)| *candidate == health)
            {
                entry.1 = count;
            }
        }
        Ok(counts)
    }
}

fn summary_from_row(row: &AnyRow) -> Result<ConnectionSummary, StoreError> {
    let incident_id: Option<i64> = row.try_get("incident_id")?;
    let open_incident = match incident_id {
        Some(id) => Some(IncidentRow {
            id,
            kind: parse_health(&row.try_get::<String, _>("incident_kind")?)?,
            opened_at: row.try_get("incident_opened_at")?,
            closed_at: None,
            first_failure_at: row.try_get("incident_first_failure_at")?,
            error_code: row.try_get("incident_error_code")?,
            request_id: row.try_get("incident_request_id")?,
        }),
        None => None,
    };
    Ok(ConnectionSummary {
        id: parse_id(&row.try_get::<String, _>("id")?)?,
        name: row.try_get("name")?,
        platform: row.try_get("platform")?,
        remote_id: row.try_get("remote_id")?,
        health: parse_health(&row.try_get::<String, _>("health")?)?,
        health_since: row.try_get("health_since")?,
        next_due: row.try_get("next_due")?,
        last_probe_at: row.try_get("last_probe_at")?,
        last_outcome: parse_outcome(row.try_get("last_outcome")?)?,
        last_status: row.try_get("last_status")?,
        last_latency_ms: row.try_get("last_latency_ms")?,
        last_request_id: row.try_get("last_request_id")?,
        last_error_code: row.try_get("last_error_code")?,
        last_message: row.try_get("last_message")?,
        open_incident,
        last_webhook_at: row.try_get("last_webhook_at")?,
        quiet: row.try_get::<i64, _>("quiet")? != 0,
        quiet_since: row.try_get("quiet_since")?,
        watermark: row.try_get("watermark")?,
        last_poll_at: row.try_get("last_poll_at")?,
        last_poll_result: row.try_get("last_poll_result")?,
    })
}

fn transition_from_row(row: &AnyRow) -> Result<TransitionRow, StoreError> {
    Ok(TransitionRow {
        at: row.try_get("at")?,
        from: parse_health(&row.try_get::<String, _>("from_health")?)?,
        to: parse_health(&row.try_get::<String, _>("to_health")?)?,
        cause: row.try_get("cause")?,
        outcome: parse_outcome(row.try_get("outcome")?)?,
        error_code: row.try_get("error_code")?,
        request_id: row.try_get("request_id")?,
        first_failure_at: row.try_get("first_failure_at")?,
    })
}

fn incident_from_row(row: &AnyRow) -> Result<IncidentRow, StoreError> {
    Ok(IncidentRow {
        id: row.try_get("id")?,
        kind: parse_health(&row.try_get::<String, _>("kind")?)?,
        opened_at: row.try_get("opened_at")?,
        closed_at: row.try_get("closed_at")?,
        first_failure_at: row.try_get("first_failure_at")?,
        error_code: row.try_get("error_code")?,
        request_id: row.try_get("request_id")?,
    })
}

fn probe_from_row(row: &AnyRow) -> Result<ProbeRow, StoreError> {
    let outcome: String = row.try_get("outcome")?;
    Ok(ProbeRow {
        at: row.try_get("at")?,
        outcome: parse_outcome(Some(outcome))?.unwrap_or(Outcome::InvalidResponse),
        status: row.try_get("status")?,
        latency_ms: row.try_get("latency_ms")?,
        request_id: row.try_get("request_id")?,
        error_code: row.try_get("error_code")?,
        message: row.try_get("message")?,
    })
}
