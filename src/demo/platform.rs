//! A simulated integration platform over real HTTP on loopback, for the demo and tests.
//!
//! It answers the probe endpoint like Makini-style platforms do and can be told to revoke
//! a token, fail with 5xx, throttle with 429 + `Retry-After`, hang, or redirect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::RawQuery;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How the platform answers one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with `{"status":"active"}`.
    Healthy,
    /// 401 `AUTHENTICATION_FAILED`: the customer changed their password.
    Revoked,
    /// 200 with `{"status":"reauthorization_required"}`.
    ReauthRequired,
    /// 503 (an outage).
    ServerError,
    /// 429 with `Retry-After: N`.
    RateLimited(u64),
    /// Never answers (until the client gives up).
    Hang,
    /// 302 to another host.
    Redirect,
    /// 401 whose message and request id repeat the token, as careless APIs do.
    EchoesToken,
}

#[derive(Default)]
struct PlatformState {
    tokens: HashMap<String, Behaviour>,
    requests: HashMap<String, u64>,
    /// When each token's status requests arrived (ms since the epoch).
    request_times: HashMap<String, Vec<i64>>,
    served: u64,
    /// Changes per token: (id, updated at in ms).
    changes: HashMap<String, Vec<(String, i64)>>,
    /// Query strings of every `/v1/changes` request, in order.
    change_queries: Vec<String>,
    page_size: usize,
    /// Page index (0-based) from which `/v1/changes` answers 500, once per request.
    fail_from_page: Option<usize>,
}

/// A running fake platform; stops when dropped or on `stop`.
#[derive(Clone)]
pub struct FakePlatform {
    pub addr: SocketAddr,
    state: Arc<Mutex<PlatformState>>,
    stop: CancellationToken,
}

impl FakePlatform {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start() -> std::io::Result<FakePlatform> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(PlatformState {
            page_size: 2,
            ..PlatformState::default()
        }));
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/v1/connection", any(connection_status))
            .route("/v1/changes", get(recent_changes))
            .with_state(state.clone());
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(FakePlatform { addr, state, stop })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets how the platform answers `token` (adds the token if new).
    pub fn set(&self, token: &str, behaviour: Behaviour) {
        self.state
            .lock()
            .expect("platform state")
            .tokens
            .insert(token.to_owned(), behaviour);
    }

    /// Requests seen with `token`.
    pub fn requests(&self, token: &str) -> u64 {
        let state = self.state.lock().expect("platform state");
        state.requests.get(token).copied().unwrap_or_default()
    }

    /// When the status requests with `token` arrived (ms since the epoch).
    pub fn request_times(&self, token: &str) -> Vec<i64> {
        let state = self.state.lock().expect("platform state");
        state.request_times.get(token).cloned().unwrap_or_default()
    }

    /// All requests answered so far.
    pub fn served(&self) -> u64 {
        self.state.lock().expect("platform state").served
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Records a change visible to `token` on `/v1/changes`.
    pub fn add_change(&self, token: &str, id: &str, updated_ms: i64) {
        let mut state = self.state.lock().expect("platform state");
        state
            .changes
            .entry(token.to_owned())
            .or_default()
            .push((id.to_owned(), updated_ms));
    }

    /// Items per page of `/v1/changes` (default 2).
    pub fn set_page_size(&self, size: usize) {
        self.state.lock().expect("platform state").page_size = size.max(1);
    }

    /// From this page on, `/v1/changes` answers 500 (`None` heals it).
    pub fn fail_from_page(&self, page: Option<usize>) {
        self.state.lock().expect("platform state").fail_from_page = page;
    }

    /// The query strings of the `/v1/changes` requests so far.
    pub fn change_queries(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("platform state")
            .change_queries
            .clone()
    }
}

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .ok()?
        .query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// `GET /v1/changes?modified_after=RFC3339[&cursor=N]`: changes updated after the time,
/// oldest first, a page at a time; `next` is the cursor of the next page or null.
async fn recent_changes(
    State(state): State<Arc<Mutex<PlatformState>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let token = bearer(&headers);
    let query = query.unwrap_or_default();
    let mut state = state.lock().expect("platform state");
    state.change_queries.push(query.clone());
    match state.tokens.get(&token).copied() {
        None | Some(Behaviour::Revoked) => {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": {"code": "AUTHENTICATION_FAILED"}})),
            )
                .into_response();
        }
        Some(Behaviour::RateLimited(seconds)) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", seconds.to_string())],
            )
                .into_response();
        }
        Some(_) => {}
    }
    let since = query_param(&query, "modified_after")
        .and_then(|text| humantime::parse_rfc3339(&text).ok())
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0);
    let offset: usize = query_param(&query, "cursor")
        .and_then(|cursor| cursor.parse().ok())
        .unwrap_or(0);
    let page_size = state.page_size;
    if state
        .fail_from_page
        .is_some_and(|page| offset / page_size >= page)
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut matching: Vec<(String, i64)> = state
        .changes
        .get(&token)
        .map(|changes| {
            changes
                .iter()
                .filter(|(_, at)| *at > since)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    matching.sort_by_key(|(id, at)| (*at, id.clone()));
    let page: Vec<serde_json::Value> = matching
        .iter()
        .skip(offset)
        .take(page_size)
        .map(|(id, at)| {
            let time = std::time::UNIX_EPOCH + Duration::from_millis(*at as u64);
            json!({"id": id, "_updatedAt": humantime::format_rfc3339_millis(time).to_string()})
        })
        .collect();
    let next = (offset + page_size < matching.len()).then(|| (offset + page_size).to_string());
    axum::Json(json!({"data": page, "next": next})).into_response()
}

async fn connection_status(
    State(state): State<Arc<Mutex<PlatformState>>>,
    headers: HeaderMap,
) -> Response {
    let token = bearer(&headers);
    let (behaviour, request_number) = {
        let mut state = state.lock().expect("platform state");
        state.served += 1;
        *state.requests.entry(token.clone()).or_default() += 1;
        let now = crate::clock::Clock::system().now();
        state
            .request_times
            .entry(token.clone())
            .or_default()
            .push(now);
        (state.tokens.get(&token).copied(), state.served)
    };
    let request_id = format!("req_{request_number:06}");
    let with_id = |status: StatusCode, body: serde_json::Value| {
        (
            status,
            [("x-request-id", request_id.clone())],
            axum::Json(body),
        )
            .into_response()
    };
    let unauthorized = json!({"error": {
        "code": "AUTHENTICATION_FAILED",
        "message": "The credentials for this connection are no longer valid",
    }});
    match behaviour {
        None | Some(Behaviour::Revoked) => with_id(StatusCode::UNAUTHORIZED, unauthorized),
        Some(Behaviour::Healthy) => with_id(StatusCode::OK, json!({"status": "active"})),
        Some(Behaviour::ReauthRequired) => with_id(
            StatusCode::OK,
            json!({"status": "reauthorization_required"}),
        ),
        Some(Behaviour::ServerError) => with_id(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"code": "UPSTREAM_UNAVAILABLE", "message": "try again later"}}),
        ),
        Some(Behaviour::RateLimited(seconds)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [
                ("retry-after", seconds.to_string()),
                ("x-request-id", request_id),
            ],
            "slow down",
        )
            .into_response(),
        Some(Behaviour::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            with_id(StatusCode::OK, json!({"status": "active"}))
        }
        Some(Behaviour::EchoesToken) => (
            StatusCode::UNAUTHORIZED,
            [("x-request-id", format!("rid-{token}"))],
            axum::Json(json!({"error": {
                "code": "AUTHENTICATION_FAILED",
                "message": format!("token {token} is no longer valid"),
            }})),
        )
            .into_response(),
        Some(Behaviour::Redirect) => (
            StatusCode::FOUND,
            [(header::LOCATION, "http://elsewhere.invalid/v1/connection")],
        )
            .into_response(),
    }
}
