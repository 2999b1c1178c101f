//! What probes see and what a connection's health is: outcomes, health states, causes,
//! transitions.

use std::fmt;

use serde::Serialize;

use super::Millis;

/// What one probe saw. Platform failures are values of this type, never errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The platform accepted the token and the connection works.
    Ok,
    /// The platform refused the token or said the connection needs reauthorization.
    AuthFailed,
    /// 429: the platform asked us to slow down.
    RateLimited,
    /// 5xx from the platform.
    ServerError,
    /// Another 4xx: usually a wrong probe path or platform profile.
    ClientError,
    /// No complete answer within the probe timeout.
    Timeout,
    /// DNS, connect or TLS failure.
    NetworkError,
    /// An answer we could not read (unparseable body, redirect not followed).
    InvalidResponse,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::AuthFailed,
        Outcome::RateLimited,
        Outcome::ServerError,
        Outcome::ClientError,
        Outcome::Timeout,
        Outcome::NetworkError,
        Outcome::InvalidResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::AuthFailed => "auth_failed",
            Outcome::RateLimited => "rate_limited",
            Outcome::ServerError => "server_error",
            Outcome::ClientError => "client_error",
            Outcome::Timeout => "timeout",
            Outcome::NetworkError => "network_error",
            Outcome::InvalidResponse => "invalid_response",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == raw)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A connection's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Never probed.
    Unknown,
    /// The last probe succeeded.
    Healthy,
    /// Transient failures, below the threshold.
    Degraded,
    /// Transient failures over the threshold: an outage.
    Unreachable,
    /// Auth failure confirmed (or the platform said so): the customer must reconnect.
    NeedsReauth,
    /// Silenced by an operator: still probed, never alerts.
    Paused,
}

impl Health {
    pub const ALL: [Health; 6] = [
        Health::Unknown,
        Health::Healthy,
        Health::Degraded,
        Health::Unreachable,
        Health::NeedsReauth,
        Health::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unreachable => "unreachable",
            Health::NeedsReauth => "needs_reauth",
            Health::Paused => "paused",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|health| health.as_str() == raw)
    }

    /// Whether being in this state is an open incident.
    pub fn is_incident(self) -> bool {
        match self {
            Health::NeedsReauth | Health::Unreachable => true,
            Health::Unknown | Health::Healthy | Health::Degraded | Health::Paused => false,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Everything one probe observed, ready to be classified and stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    pub outcome: Outcome,
    /// HTTP status, when an answer arrived.
    pub status: Option<u16>,
    pub latency_ms: i64,
    /// The platform's request id header, for support tickets.
    pub request_id: Option<String>,
    /// The platform's error code read from the body, e.g. `AUTHENTICATION_FAILED`.
    pub error_code: Option<String>,
    /// A short description (bounded length); never contains the token.
    pub message: Option<String>,
    /// Seconds the platform asked us to wait (429/503 `Retry-After`).
    pub retry_after_secs: Option<u64>,
}

impl ProbeReport {
    /// Removes every secret in `secrets` from what the platform said (message, error code,
    /// request id), before it is stored, logged, shown or emailed.
    pub fn redact(&mut self, secrets: &[&str]) {
        for text in [
            &mut self.message,
            &mut self.error_code,
            &mut self.request_id,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(clean) = super::redacted(text, secrets) {
                *text = clean;
            }
        }
    }
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A scheduled or requested probe.
    Probe,
    /// A webhook from the platform.
    Webhook,
    /// An operator (pause, resume).
    Operator,
    /// No webhook within the expected interval + grace.
    Quiet,
    /// A webhook arrived for a quiet connection.
    WebhooksResumed,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Probe => "probe",
            Cause::Webhook => "webhook",
            Cause::Operator => "operator",
            Cause::Quiet => "quiet",
            Cause::WebhooksResumed => "webhooks_resumed",
        }
    }
}

/// A change of health, with what caused it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
    pub cause: Cause,
    pub at: Millis,
    /// When the failure streak that led here began (for incidents).
    pub first_failure_at: Option<Millis>,
    pub outcome: Option<Outcome>,
    pub error_code: Option<String>,
    pub request_id: Option<String>,
}
