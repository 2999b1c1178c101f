//! Reading stored values back into the vocabulary: every aggregate decodes rows here, so
//! an unknown stored value is refused the same way everywhere (`StoreError::Corrupt`).

use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use crate::domain::{ConnectionId, Health, Outcome};
use crate::rules::ConnectionState;

pub(super) fn parse_health(raw: &str) -> Result<Health, StoreError> {
    Health::parse(raw).ok_or_else(|| StoreError::Corrupt {
        column: "health",
        value: raw.to_owned(),
    })
}

pub(super) fn parse_outcome(raw: Option<String>) -> Result<Option<Outcome>, StoreError> {
    raw.map(|text| {
        Outcome::parse(&text).ok_or(StoreError::Corrupt {
            column: "outcome",
            value: text,
        })
    })
    .transpose()
}

pub(super) fn parse_id(raw: &str) -> Result<ConnectionId, StoreError> {
    ConnectionId::parse(raw).map_err(|_| StoreError::Corrupt {
        column: "id",
        value: raw.to_owned(),
    })
}

/// The judged state in a row (columns `health`, `health_since`, the two failure counts,
/// `first_failure_at`).
pub(super) fn row_state(row: &AnyRow) -> Result<ConnectionState, StoreError> {
    let count = |name: &str| -> Result<u32, StoreError> {
        Ok(u32::try_from(row.try_get::<i64, _>(name)?).unwrap_or(u32::MAX))
    };
    Ok(ConnectionState {
        health: parse_health(&row.try_get::<String, _>("health")?)?,
        health_since: row.try_get("health_since")?,
        consecutive_failures: count("consecutive_failures")?,
        consecutive_auth_failures: count("consecutive_auth_failures")?,
        first_failure_at: row.try_get("first_failure_at")?,
    })
}
