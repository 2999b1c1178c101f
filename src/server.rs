//! The admin listener: `/metrics`, `/healthz`, `/readyz` and `/api/v1/…`. Never a token.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::domain::{ConnectionId, Millis, time};
use crate::metrics::Metrics;
use crate::rules::health::manual_probe_wait;
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
    /// Host names the listener answers to (`None`: any). A loopback listener answers only
    /// to loopback names, so a page using DNS rebinding cannot reach it.
    pub allowed_hosts: Option<Arc<Vec<String>>>,
    /// When each connection's circuit breaker was last overridden (`?force=true`).
    pub forced: Arc<std::sync::Mutex<std::collections::HashMap<ConnectionId, Millis>>>,
}

/// The host names a listener bound to `address` answers to: the defaults
/// (`default_allowed_hosts`) and `[server] admin_hosts`; `None`: any.
pub fn allowed_hosts(
    address: std::net::SocketAddr,
    configured: Option<&[String]>,
) -> Option<Vec<String>> {
    match (default_allowed_hosts(address), configured) {
        (Some(mut hosts), configured) => {
            hosts.extend(configured.unwrap_or_default().iter().cloned());
            Some(hosts)
        }
        (None, Some(configured)) => {
            let mut hosts = configured.to_vec();
            hosts.push(address.ip().to_string());
            Some(hosts)
        }
        (None, None) => None,
    }
}

/// The host names a listener bound to `address` answers to by default: loopback names
/// for a loopback listener; any for others (they require a token).
pub fn default_allowed_hosts(address: std::net::SocketAddr) -> Option<Vec<String>> {
    address.ip().is_loopback().then(|| {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]", "::1"]
            .map(str::to_owned)
            .to_vec();
        hosts.push(address.ip().to_string());
        hosts
    })
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
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard_browsers,
        ))
        .with_state(state)
}

/// Keeps web pages the operator visits away from the admin API: a foreign `Host` (DNS
/// rebinding) is refused, and so is a mutation a browser marks cross-site (`Origin`,
/// `Sec-Fetch-Site`) or sends as a form (`Content-Type` other than JSON).
async fn guard_browsers(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if let Some(allowed) = &state.allowed_hosts
        && !host_allowed(headers, allowed)
    {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "this listener does not answer to that Host".into(),
        );
    }
    let mutation = !matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if mutation && let Some(reason) = cross_site(headers) {
        tracing::warn!(reason, method = %request.method(), path = %request.uri().path(), "admin request refused");
        return error(StatusCode::FORBIDDEN, format!("request refused: {reason}"));
    }
    next.run(request).await
}

/// Whether the `Host` header names one of `allowed` (any port).
fn host_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(host) = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        // `[::1]:9464`, `localhost:9464`; a bare IPv6 address has colons but no port.
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        Some(_) | None => host,
    };
    allowed.iter().any(|known| known.eq_ignore_ascii_case(name))
}

/// Why a mutation looks like it came from another site's page, if it does.
fn cross_site(headers: &HeaderMap) -> Option<&'static str> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(site) = headers
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Some("cross-site (Sec-Fetch-Site)");
    }
    if let Some(origin) = text(header::ORIGIN) {
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(origin);
        if Some(origin_host) != text(header::HOST) {
            return Some("cross-origin (Origin)");
        }
    }
    if let Some(kind) = text(header::CONTENT_TYPE) {
        let kind = kind.split(';').next().unwrap_or_default().trim();
        if !(kind == "application/json" || kind.ends_with("+json")) {
            return Some("mutations take JSON (Content-Type)");
        }
    }
    None
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
    // Logged where the write failed; a full disk still answers the ping.
    if let Some(error) = state.store.write_failure() {
        let message = format!("store cannot write: {error}\n");
        return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
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

/// `POST …/probe?force=true`: whether to override the circuit breaker.
#[derive(Debug, Default, serde::Deserialize)]
struct ProbeQuery {
    #[serde(default)]
    force: bool,
}

/// Forced probes of one connection: at most one per this period.
pub const FORCE_EVERY_MS: i64 = 60_000;

async fn probe_connection(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    query: Result<Query<ProbeQuery>, QueryRejection>,
) -> Response {
    let id = match parse_id(&raw) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    // Errors are JSON like every other answer (axum's own rejection is plain text).
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if let Err(response) = circuit_breaker(&state, &id, query.force).await {
        return *response;
    }
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

/// A probe asked for by a person respects the circuit breaker of a `needs_reauth`
/// connection (429 with `Retry-After`); `force` overrides it once a minute per connection,
/// and is logged for the audit trail.
async fn circuit_breaker(
    state: &AdminState,
    id: &ConnectionId,
    force: bool,
) -> Result<(), Box<Response>> {
    let Ok(Some(detail)) = state.store.connection_detail(id).await else {
        // Unknown or unreadable: `probe_now` answers for it.
        return Ok(());
    };
    let now = state.scheduler.clock().now();
    let rules = state.scheduler.rules().current();
    let summary = &detail.summary;
    let Some(wait) = manual_probe_wait(summary.health, summary.last_probe_at, &rules.probe, now)
    else {
        return Ok(());
    };
    if force {
        let mut forced = state
            .forced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = forced.get(id).copied();
        if last.is_none_or(|last| now - last >= FORCE_EVERY_MS) {
            forced.insert(id.clone(), now);
            tracing::warn!(audit = true, connection_id = %id, "forced probe of a connection that needs reauthorization");
            return Ok(());
        }
    }
    let seconds = (wait + 999) / 1000;
    let response = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, seconds.to_string())],
        Json(json!({
            "error": format!(
                "{id} needs reauthorization: probed again in {seconds} s (the circuit breaker \
                 keeps dead credentials from locking the customer's account); \
                 ?force=true overrides it once a minute"
            )
        })),
    )
        .into_response();
    Err(Box::new(response))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn a_loopback_listener_answers_to_loopback_names_only() {
        let allowed = default_allowed_hosts("127.0.0.1:9464".parse().expect("address"))
            .expect("loopback has a list");
        for host in [
            "localhost:9464",
            "127.0.0.1:9464",
            "[::1]:9464",
            "LOCALHOST",
        ] {
            assert!(
                host_allowed(&headers(&[("host", host)]), &allowed),
                "{host}"
            );
        }
        for host in [
            "evil.example:9464",
            "evil.example",
            "127.0.0.1.evil.example",
        ] {
            assert!(
                !host_allowed(&headers(&[("host", host)]), &allowed),
                "{host}"
            );
        }
        assert!(!host_allowed(&headers(&[]), &allowed), "no Host at all");
        assert!(default_allowed_hosts("0.0.0.0:9464".parse().expect("address")).is_none());
        let proxied = allowed_hosts(
            "127.0.0.1:9464".parse().expect("address"),
            Some(&["connwatch.internal".to_owned()]),
        )
        .expect("a list");
        assert!(host_allowed(
            &headers(&[("host", "connwatch.internal")]),
            &proxied
        ));
        let public = allowed_hosts(
            "0.0.0.0:9464".parse().expect("address"),
            Some(&["connwatch.example.com".to_owned()]),
        )
        .expect("a list once configured");
        assert!(host_allowed(
            &headers(&[("host", "connwatch.example.com:9464")]),
            &public
        ));
        assert!(!host_allowed(
            &headers(&[("host", "evil.example")]),
            &public
        ));
    }

    #[test]
    fn cross_site_form_posts_are_told_apart_from_tools() {
        let host = ("host", "127.0.0.1:9464");
        // curl, the CLI, scripts: no Origin, no Sec-Fetch-Site, JSON or no body.
        assert_eq!(cross_site(&headers(&[host])), None);
        assert_eq!(
            cross_site(&headers(&[host, ("content-type", "application/json")])),
            None
        );
        assert_eq!(
            cross_site(&headers(&[host, ("origin", "http://127.0.0.1:9464")])),
            None
        );
        for refused in [
            vec![host, ("origin", "http://evil.example")],
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![host, ("content-type", "application/x-www-form-urlencoded")],
            vec![host, ("content-type", "text/plain")],
        ] {
            assert!(cross_site(&headers(&refused)).is_some(), "{refused:?}");
        }
    }
}
