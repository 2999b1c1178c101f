//! The admin listener: `/metrics`, `/healthz`, `/readyz` and `/api/v1/…`. Never a token.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::domain::{ConnectionId, time};
use crate::metrics::Metrics;
use crate::schedule::{ProbeNowError, Scheduler};
use crate::store::Store;

/// `/readyz` fails when the scheduler loop has not turned for this long.
pub const STALL_AFTER_MS: i64 = 30_000;

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub scheduler: Scheduler,
    pub metrics: Metrics,
    /// Required as `Authorization: Bearer …` on everything but the health checks.
    pub admin_token: Option<Arc<SecretString>>,
}

pub fn admin_router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/connections", get(list_connections))
        .route("/api/v1/connections/{id}", get(connection_detail))
        .route("/api/v1/connections/{id}/probe", post(probe_connection))
        .route("/api/v1/connections/{id}/pause", post(pause_connection))
        .route("/api/v1/connections/{id}/resume", post(resume_connection))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(state)
}

async fn require_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.admin_token else {
        return next.run(request).await;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let matches: bool = presented
        .as_bytes()
        .ct_eq(expected.expose_secret().as_bytes())
        .into();
    if matches {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "admin token required"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if let Err(error) = state.store.ping().await {
        tracing::warn!(%error, "readyz: store unreachable");
        return (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response();
    }
    let stalled_for = state.scheduler.clock().now() - state.scheduler.last_tick();
    if stalled_for > STALL_AFTER_MS {
        let message = format!("scheduler stalled for {} s\n", stalled_for / 1000);
        return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    }
    "ready\n".into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn parse_id(raw: &str) -> Result<ConnectionId, Box<Response>> {
    ConnectionId::parse(raw).map_err(|message| Box::new(error(StatusCode::BAD_REQUEST, message)))
}

async fn list_connections(State(state): State<AdminState>) -> Response {
    match state.store.list_connections().await {
        Ok(connections) => Json(json!({ "connections": connections })).into_response(),
        Err(failure) => {
            tracing::error!(error = %failure, "cannot list connections");
            error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable".into())
        }
    }
}

async fn connection_detail(State(state): State<AdminState>, Path(raw): Path<String>) -> Response {
    let id = match parse_id(&raw) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    match state.store.connection_detail(&id).await {
        Ok(Some(detail)) => Json(detail).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no connection with id {id}")),
        Err(failure) => {
            tracing::error!(connection_id = %id, error = %failure, "cannot read connection");
            error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable".into())
        }
    }
}

async fn probe_connection(State(state): State<AdminState>, Path(raw): Path<String>) -> Response {
    let id = match parse_id(&raw) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    match state.scheduler.probe_now(&id).await {
        Ok(record) => Json(json!({
            "id": record.id,
            "at": time::rfc3339(record.at),
            "outcome": record.report.outcome,
            "status": record.report.status,
            "latency_ms": record.report.latency_ms,
            "request_id": record.report.request_id,
            "error_code": record.report.error_code,
            "message": record.report.message,
            "health": record.verdict.state.health,
            "transition": record.verdict.transition.as_ref().map(|transition| json!({
                "from": transition.from,
                "to": transition.to,
            })),
        }))
        .into_response(),
        Err(ProbeNowError::Unknown(id)) => {
            error(StatusCode::NOT_FOUND, format!("no connection with id {id}"))
        }
        Err(ProbeNowError::Busy(id)) => error(
            StatusCode::CONFLICT,
            format!("a probe of {id} is already in flight"),
        ),
        Err(ProbeNowError::Store(failure)) => {
            tracing::error!(connection_id = %id, error = %failure, "probe not stored");
            error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable".into())
        }
    }
}

async fn pause_connection(state: State<AdminState>, raw: Path<String>) -> Response {
    set_pause(state, raw, true).await
}

async fn resume_connection(state: State<AdminState>, raw: Path<String>) -> Response {
    set_pause(state, raw, false).await
}

/// Pausing silences a connection: still probed, no transitions, no emails; pending emails
/// of its open incident are cancelled.
async fn set_pause(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    paused: bool,
) -> Response {
    let id = match parse_id(&raw) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    match state
        .store
        .set_operator_pause(&id, paused, state.scheduler.clock().now())
        .await
    {
        Ok(Some(health)) => {
            Json(json!({ "id": id, "paused": paused, "health": health })).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no connection with id {id}")),
        Err(failure) => {
            tracing::error!(connection_id = %id, error = %failure, "cannot change pause");
            error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable".into())
        }
    }
}
