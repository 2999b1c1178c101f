//! The vocabulary of connwatch: ids, outcomes, health, transitions, email kinds and time
//! helpers. No I/O.

use std::fmt;

use serde::Serialize;

pub mod email;
pub mod health;
pub mod time;

pub use email::{Audience, EmailKind, EmailState};
pub use health::{Cause, Health, Outcome, ProbeReport, Transition};

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

/// What replaces a secret found in text from a platform.
pub const REDACTED: &str = "[redacted]";

/// `text` without any of `secrets` (each replaced by `[redacted]`), or `None` when it
/// holds none. Secrets shorter than 4 characters are not looked for: they would match
/// ordinary text, and no platform issues such tokens.
pub fn redacted(text: &str, secrets: &[&str]) -> Option<String> {
    let found: Vec<&str> = secrets
        .iter()
        .copied()
        .filter(|secret| secret.len() >= 4 && text.contains(secret))
        .collect();
    if found.is_empty() {
        return None;
    }
    let mut clean = text.to_owned();
    for secret in found {
        clean = clean.replace(secret, REDACTED);
    }
    Some(clean)
}

/// Cuts `text` to at most `limit` characters, on a character boundary.
pub fn bounded(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((index, _)) => format!("{}…", &text[..index]),
        None => text.to_owned(),
    }
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
    fn secrets_echoed_by_a_platform_are_redacted_wherever_they_appear() {
        let token = "tok_SECRET_acme_v1";
        assert_eq!(
            redacted("rid-tok_SECRET_acme_v1-7", &[token]).as_deref(),
            Some("rid-[redacted]-7")
        );
        assert_eq!(redacted("nothing secret", &[token]), None);
        let mut report = ProbeReport {
            outcome: Outcome::AuthFailed,
            status: Some(401),
            latency_ms: 3,
            request_id: Some(format!("req-{token}")),
            error_code: Some(token.to_owned()),
            message: Some(format!("bad token {token}, try {token}")),
            retry_after_secs: None,
        };
        report.redact(&[token]);
        let shown = format!("{report:?}");
        assert!(!shown.contains(token), "{shown}");
        assert_eq!(
            report.message.as_deref(),
            Some("bad token [redacted], try [redacted]")
        );
    }

    #[test]
    fn bounded_cuts_on_character_boundaries() {
        assert_eq!(bounded("héllo", 2), "hé…");
        assert_eq!(bounded("hi", 5), "hi");
    }
}
