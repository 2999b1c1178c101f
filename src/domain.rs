//! The vocabulary of connwatch: connections, outcomes, health and transitions. No I/O.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;

/// Milliseconds since the Unix epoch; every stored time uses this unit.
pub type Millis = i64;

/// A connection's id as written in the config: 1–128 of `A-Z a-z 0-9 _ . -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ConnectionId(String);

impl ConnectionId {
    /// Checks the characters and length; the only way to make a `ConnectionId`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if raw.is_empty() || raw.len() > 128 {
            return Err(format!(
                "connection id {raw:?} must be 1 to 128 characters long"
            ));
        }
        if !raw.chars().all(valid_char) {
            return Err(format!(
                "connection id {raw:?} may only contain letters, digits, '_', '.' and '-'"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// An email address, checked for the one `@` and a dotted domain; nothing fancier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim();
        let valid = match trimmed.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !trimmed
                        .chars()
                        .any(|c| c.is_whitespace() || c == '<' || c == '>')
            }
            None => false,
        };
        if valid {
            Ok(Self(trimmed.to_owned()))
        } else {
            Err(format!("{raw:?} is not an email address"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

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

/// Serde helpers: times on the wire are RFC 3339 UTC, stored times are milliseconds.
pub mod wire {
    use serde::Serializer;

    use super::Millis;

    /// Formats epoch milliseconds as RFC 3339 UTC with milliseconds.
    pub fn rfc3339(millis: Millis) -> String {
        let time = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(u64::try_from(millis).unwrap_or_default());
        humantime::format_rfc3339_millis(time).to_string()
    }

    pub fn time<S: Serializer>(millis: &Millis, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&rfc3339(*millis))
    }

    pub fn optional_time<S: Serializer>(
        millis: &Option<Millis>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match millis {
            Some(millis) => serializer.serialize_str(&rfc3339(*millis)),
            None => serializer.serialize_none(),
        }
    }
}

/// Cuts `text` to at most `limit` characters, on a character boundary.
pub fn bounded(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((index, _)) => format!("{}…", &text[..index]),
        None => text.to_owned(),
    }
}

/// Decodes a Standard Webhooks secret: `whsec_` + base64 of 24 to 64 bytes.
///
/// Here rather than in `webhook/` because the config check, webhook verification and
/// the relay's signing all read it.
pub fn decode_standard_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("a Standard Webhooks secret starts with whsec_")?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| "the part after whsec_ is not base64".to_owned())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "the secret decodes to {} bytes; 24 to 64 are required",
            key.len()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_reject_spaces_and_empty_strings() {
        assert!(ConnectionId::parse("acme-1.prod_x").is_ok());
        assert!(ConnectionId::parse("").is_err());
        assert!(ConnectionId::parse("a b").is_err());
    }

    #[test]
    fn email_addresses_need_one_at_and_a_domain() {
        assert!(EmailAddress::parse("it@acme.example").is_ok());
        assert!(EmailAddress::parse("not-an-address").is_err());
        assert!(EmailAddress::parse("a@@b").is_err());
        assert!(EmailAddress::parse("a@").is_err());
    }

    #[test]
    fn outcome_and_health_names_round_trip() {
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::parse(outcome.as_str()), Some(outcome));
        }
        for health in Health::ALL {
            assert_eq!(Health::parse(health.as_str()), Some(health));
        }
    }

    #[test]
    fn bounded_cuts_on_character_boundaries() {
        assert_eq!(bounded("héllo", 2), "hé…");
        assert_eq!(bounded("hi", 5), "hi");
    }

    #[test]
    fn short_long_and_malformed_secrets_are_refused() {
        assert!(decode_standard_secret("whsec_").is_err(), "empty");
        assert!(decode_standard_secret("whsec_c2hvcnQ=").is_err(), "5 bytes");
        assert!(decode_standard_secret(&format!("whsec_{}", STANDARD.encode([7u8; 65]))).is_err());
        assert!(
            decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err(),
            "no prefix"
        );
        assert!(decode_standard_secret("whsec_!!!").is_err(), "not base64");
    }
}
