//! The relay outbox: recovered changes waiting to be handed on, claimed with leases,
//! sent with retries.

use sqlx::Row;

use super::{LeaseClaim, Store, StoreError};
use crate::domain::Millis;

/// A relay message claimed for sending.
#[derive(Debug, Clone)]
pub struct RelayMessage {
    pub id: i64,
    pub webhook_id: String,
    pub payload: String,
    pub attempts: i64,
}

impl Store {
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
}
