//! Persisting verdicts: transitions, incidents opened and closed, and the emails the rules
//! planned for them. Nothing here decides; `crate::rules` did.

use sqlx::Row;

use super::email_outbox;
use super::{StoreError, Tx};
use crate::domain::{ConnectionId, Outcome, Transition};
use crate::rules::{IncidentPlan, Verdict};

/// Writes a verdict of an event other than a probe (webhook, quiet, pause): the state
/// columns when health changed, the next due time when the verdict sets one, then the
/// transition and its incidents.
pub(super) async fn record_verdict(
    transaction: &mut Tx,
    id: &ConnectionId,
    verdict: &Verdict,
) -> Result<(), StoreError> {
    let changed = verdict
        .transition
        .as_ref()
        .is_some_and(|transition| transition.from != transition.to);
    if changed {
        let state = &verdict.state;
        sqlx::query(
            "UPDATE connections SET health = $2, health_since = $3, consecutive_failures = $4, \
             consecutive_auth_failures = $5, first_failure_at = $6 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(state.health.as_str())
        .bind(state.health_since)
        .bind(i64::from(state.consecutive_failures))
        .bind(i64::from(state.consecutive_auth_failures))
        .bind(state.first_failure_at)
        .execute(&mut **transaction)
        .await?;
    }
    if let Some(next_due) = verdict.next_due {
        sqlx::query("UPDATE connections SET next_due = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(next_due)
            .execute(&mut **transaction)
            .await?;
    }
    if let Some(transition) = &verdict.transition {
        record_transition(transaction, id, transition, &verdict.incident).await?;
    }
    Ok(())
}

/// Stores a transition, closes and opens the incidents of its plan, and enqueues the
/// plan's emails for them.
pub(super) async fn record_transition(
    transaction: &mut Tx,
    id: &ConnectionId,
    transition: &Transition,
    plan: &IncidentPlan,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO transitions (connection_id, at, from_health, to_health, cause, outcome, \
         error_code, request_id, first_failure_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.as_str())
    .bind(transition.at)
    .bind(transition.from.as_str())
    .bind(transition.to.as_str())
    .bind(transition.cause.as_str())
    .bind(transition.outcome.map(Outcome::as_str))
    .bind(transition.error_code.as_deref())
    .bind(transition.request_id.as_deref())
    .bind(transition.first_failure_at)
    .execute(&mut **transaction)
    .await?;
    if let Some(emails) = &plan.close {
        close_incident(transaction, id, transition, emails).await?;
    }
    if let Some(emails) = &plan.open {
        open_incident(transaction, id, transition, emails).await?;
    }
    Ok(())
}

/// Closes the connection's open incident: its unsent emails are cancelled, then `emails`.
async fn close_incident(
    transaction: &mut Tx,
    id: &ConnectionId,
    transition: &Transition,
    emails: &[crate::rules::OutboxEmail],
) -> Result<(), StoreError> {
    let closed: Vec<(i64,)> = sqlx::query_as(
        "UPDATE incidents SET closed_at = $2 WHERE connection_id = $1 AND closed_at IS NULL \
         RETURNING id",
    )
    .bind(id.as_str())
    .bind(transition.at)
    .fetch_all(&mut **transaction)
    .await?;
    for (incident_id,) in closed {
        email_outbox::cancel_unsent(transaction, incident_id).await?;
        email_outbox::enqueue_for_incident(transaction, incident_id, id, emails, transition.at)
            .await?;
    }
    sqlx::query("UPDATE connections SET open_incident_id = NULL WHERE id = $1")
        .bind(id.as_str())
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// Opens an incident of the transition's new health, with `emails`.
async fn open_incident(
    transaction: &mut Tx,
    id: &ConnectionId,
    transition: &Transition,
    emails: &[crate::rules::OutboxEmail],
) -> Result<(), StoreError> {
    let incident_id: i64 = sqlx::query(
        "INSERT INTO incidents (connection_id, kind, opened_at, first_failure_at, error_code, \
         request_id) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(id.as_str())
    .bind(transition.to.as_str())
    .bind(transition.at)
    .bind(transition.first_failure_at.unwrap_or(transition.at))
    .bind(transition.error_code.as_deref())
    .bind(transition.request_id.as_deref())
    .fetch_one(&mut **transaction)
    .await?
    .try_get(0)?;
    sqlx::query("UPDATE connections SET open_incident_id = $2 WHERE id = $1")
        .bind(id.as_str())
        .bind(incident_id)
        .execute(&mut **transaction)
        .await?;
    email_outbox::enqueue_for_incident(transaction, incident_id, id, emails, transition.at).await
}
