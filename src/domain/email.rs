//! The email vocabulary: what kind of email, for whom, and where it stands in the outbox.
//! Stored as text; an unknown stored value is an error, never a default.

use std::fmt;

use serde::Serialize;

/// What an email says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailKind {
    /// A connection needs reauthorization: customer contacts and staff.
    ReauthRequired,
    /// Still needs reauthorization, at a configured delay.
    Reminder,
    /// A connection is unreachable (an outage): staff only.
    Unreachable,
    /// The incident is over, to whoever was told it began.
    Resolved,
    /// Staff: the open incidents (daily) or a platform storm.
    StaffDigest,
}

/// Who an email is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// The customer's contacts: never internal details.
    Customer,
    /// Staff: everything.
    Staff,
}

/// Where an outbox row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailState {
    /// Waiting to be sent (or retried).
    Pending,
    /// Accepted by the SMTP server.
    Sent,
    /// Refused for good, or out of retries.
    Failed,
    /// No longer to be sent (its incident closed first, or its connection was removed).
    Cancelled,
}

impl EmailKind {
    pub const ALL: [EmailKind; 5] = [
        EmailKind::ReauthRequired,
        EmailKind::Reminder,
        EmailKind::Unreachable,
        EmailKind::Resolved,
        EmailKind::StaffDigest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EmailKind::ReauthRequired => "reauth_required",
            EmailKind::Reminder => "reminder",
            EmailKind::Unreachable => "unreachable",
            EmailKind::Resolved => "resolved",
            EmailKind::StaffDigest => "staff_digest",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == raw)
    }
}

impl Audience {
    pub const ALL: [Audience; 2] = [Audience::Customer, Audience::Staff];

    pub fn as_str(self) -> &'static str {
        match self {
            Audience::Customer => "customer",
            Audience::Staff => "staff",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|audience| audience.as_str() == raw)
    }
}

impl EmailState {
    pub const ALL: [EmailState; 4] = [
        EmailState::Pending,
        EmailState::Sent,
        EmailState::Failed,
        EmailState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EmailState::Pending => "pending",
            EmailState::Sent => "sent",
            EmailState::Failed => "failed",
            EmailState::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == raw)
    }
}

impl fmt::Display for EmailKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Display for EmailState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_names_round_trip_and_unknown_names_are_refused() {
        for kind in EmailKind::ALL {
            assert_eq!(EmailKind::parse(kind.as_str()), Some(kind));
        }
        for audience in Audience::ALL {
            assert_eq!(Audience::parse(audience.as_str()), Some(audience));
        }
        for state in EmailState::ALL {
            assert_eq!(EmailState::parse(state.as_str()), Some(state));
        }
        assert_eq!(Audience::parse("nobody"), None);
        assert_eq!(EmailKind::parse("REMINDER"), None);
    }
}
