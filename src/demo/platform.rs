//! A simulated integration platform over real HTTP on loopback, for the demo and tests.
//!
//! It answers the probe endpoint like Makini-style platforms do and can be told to revoke
//! a token, fail with 5xx, throttle with 429 + `Retry-After`, hang, or redirect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
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
}

#[derive(Default)]
struct PlatformState {
    tokens: HashMap<String, Behaviour>,
    requests: HashMap<String, u64>,
    served: u64,
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
        let state = Arc::new(Mutex::new(PlatformState::default()));
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/v1/connection", any(connection_status))
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

    /// All requests answered so far.
    pub fn served(&self) -> u64 {
        self.state.lock().expect("platform state").served
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn connection_status(
    State(state): State<Arc<Mutex<PlatformState>>>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let (behaviour, request_number) = {
        let mut state = state.lock().expect("platform state");
        state.served += 1;
        *state.requests.entry(token.clone()).or_default() += 1;
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
        Some(Behaviour::Redirect) => (
            StatusCode::FOUND,
            [(header::LOCATION, "http://elsewhere.invalid/v1/connection")],
        )
            .into_response(),
    }
}
