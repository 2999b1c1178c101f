//! Pure judgement: (previous state, probe report, policy) -> new state, transition, next due time.
//!
//! Every alerting decision of connwatch is made here, without I/O, so it can be tested
//! as a table. The store applies the verdict in one transaction.

use crate::domain::{Cause, Health, Millis, Outcome, ProbeReport, Transition};

/// The thresholds and delays that classification follows (from `[probe]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive auth failures before `needs_reauth`.
    pub failure_threshold: u32,
    /// Consecutive transient failures before `unreachable`.
    pub unreachable_threshold: u32,
    /// Delay of the quick re-probe that confirms a first failure.
    pub confirm_after: Millis,
    /// Circuit breaker: delay between probes of a connection in `needs_reauth`.
    pub reauth_backoff: Millis,
}

/// The part of a connection's stored state that classification reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionState {
    pub health: Health,
    pub health_since: Millis,
    pub consecutive_failures: u32,
    pub consecutive_auth_failures: u32,
    /// Start of the current failure streak.
    pub first_failure_at: Option<Millis>,
}

impl ConnectionState {
    pub fn new_unknown(now: Millis) -> Self {
        Self {
            health: Health::Unknown,
            health_since: now,
            consecutive_failures: 0,
            consecutive_auth_failures: 0,
            first_failure_at: None,
        }
    }
}

/// What to do after a probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub state: ConnectionState,
    pub transition: Option<Transition>,
    pub next_due: Millis,
}

/// How a failure of this outcome counts.
enum Kind {
    Success,
    Auth,
    Transient,
    Throttled,
}

fn kind_of(outcome: Outcome) -> Kind {
    match outcome {
        Outcome::Ok => Kind::Success,
        Outcome::AuthFailed => Kind::Auth,
        Outcome::RateLimited => Kind::Throttled,
        Outcome::ServerError
        | Outcome::ClientError
        | Outcome::Timeout
        | Outcome::NetworkError
        | Outcome::InvalidResponse => Kind::Transient,
    }
}

/// Judges one probe. `regular_due` is the connection's next slot on its normal schedule.
pub fn classify(
    previous: &ConnectionState,
    report: &ProbeReport,
    policy: &Policy,
    now: Millis,
    regular_due: Millis,
) -> Verdict {
    let mut state = previous.clone();
    let mut next_due = regular_due;
    let target = match kind_of(report.outcome) {
        Kind::Success => {
            state.consecutive_failures = 0;
            state.consecutive_auth_failures = 0;
            state.first_failure_at = None;
            Health::Healthy
        }
        Kind::Auth => {
            state.consecutive_auth_failures += 1;
            state.consecutive_failures += 1;
            state.first_failure_at.get_or_insert(now);
            if state.consecutive_auth_failures >= policy.failure_threshold {
                next_due = now + policy.reauth_backoff;
                Health::NeedsReauth
            } else {
                next_due = now + policy.confirm_after;
                match previous.health {
                    Health::NeedsReauth => Health::NeedsReauth,
                    Health::Unreachable => Health::Unreachable,
                    Health::Unknown | Health::Healthy | Health::Degraded | Health::Paused => {
                        Health::Degraded
                    }
                }
            }
        }
        Kind::Transient => {
            // An outage breaks an auth-failure streak: only consecutive auth failures count.
            state.consecutive_auth_failures = 0;
            state.consecutive_failures += 1;
            state.first_failure_at.get_or_insert(now);
            match previous.health {
                // An outage neither confirms nor resolves a reauthorization need.
                Health::NeedsReauth => {
                    next_due = now + policy.reauth_backoff;
                    Health::NeedsReauth
                }
                Health::Unknown
                | Health::Healthy
                | Health::Degraded
                | Health::Unreachable
                | Health::Paused => {
                    if state.consecutive_failures >= policy.unreachable_threshold {
                        Health::Unreachable
                    } else {
                        next_due = now + policy.confirm_after;
                        Health::Degraded
                    }
                }
            }
        }
        Kind::Throttled => {
            next_due = now + policy.confirm_after;
            previous.health
        }
    };
    if let Some(wait_secs) = report.retry_after_secs {
        let wait_ms = i64::try_from(wait_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2);
        next_due = next_due.max(now + wait_ms);
    }
    // A paused connection is still probed and its counters kept, but its health stays put.
    let target = if previous.health == Health::Paused {
        Health::Paused
    } else {
        target
    };
    let transition = (target != previous.health).then(|| Transition {
        from: previous.health,
        to: target,
        cause: Cause::Probe,
        at: now,
        first_failure_at: match target {
            Health::NeedsReauth | Health::Unreachable | Health::Degraded => state.first_failure_at,
            Health::Unknown | Health::Healthy | Health::Paused => None,
        },
        outcome: Some(report.outcome),
        error_code: report.error_code.clone(),
        request_id: report.request_id.clone(),
    });
    if transition.is_some() {
        state.health = target;
        state.health_since = now;
    }
    Verdict {
        state,
        transition,
        next_due,
    }
}

/// The platform said by webhook that the connection needs reauthorization.
pub fn reauth_by_webhook(previous: &ConnectionState, now: Millis) -> Option<Transition> {
    match previous.health {
        Health::NeedsReauth | Health::Paused => None,
        Health::Unknown | Health::Healthy | Health::Degraded | Health::Unreachable => {
            Some(Transition {
                from: previous.health,
                to: Health::NeedsReauth,
                cause: Cause::Webhook,
                at: now,
                first_failure_at: Some(previous.first_failure_at.unwrap_or(now)),
                outcome: None,
                error_code: None,
                request_id: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        failure_threshold: 2,
        unreachable_threshold: 3,
        confirm_after: 30_000,
        reauth_backoff: 900_000,
    };
    const NOW: Millis = 1_000_000;
    const REGULAR: Millis = NOW + 300_000;

    fn state(health: Health, failures: u32, auth_failures: u32) -> ConnectionState {
        ConnectionState {
            health,
            health_since: 0,
            consecutive_failures: failures,
            consecutive_auth_failures: auth_failures,
            first_failure_at: (failures > 0).then_some(500),
        }
    }

    fn report(outcome: Outcome) -> ProbeReport {
        ProbeReport {
            outcome,
            status: None,
            latency_ms: 5,
            request_id: Some("req-1".into()),
            error_code: Some("AUTHENTICATION_FAILED".into()),
            message: None,
            retry_after_secs: None,
        }
    }

    #[test]
    fn classification_follows_the_table() {
        use Health::*;
        use Outcome::*;
        // (previous health, failures, auth failures, outcome) -> (health, next due)
        let table: &[(Health, u32, u32, Outcome, Health, Millis)] = &[
            (Unknown, 0, 0, Ok, Healthy, REGULAR),
            (Healthy, 0, 0, Ok, Healthy, REGULAR),
            (Healthy, 0, 0, AuthFailed, Degraded, NOW + 30_000),
            (Degraded, 1, 1, AuthFailed, NeedsReauth, NOW + 900_000),
            (Degraded, 1, 0, AuthFailed, Degraded, NOW + 30_000),
            (NeedsReauth, 5, 5, AuthFailed, NeedsReauth, NOW + 900_000),
            (NeedsReauth, 5, 5, Ok, Healthy, REGULAR),
            (NeedsReauth, 5, 5, ServerError, NeedsReauth, NOW + 900_000),
            (NeedsReauth, 5, 5, Timeout, NeedsReauth, NOW + 900_000),
            (Healthy, 0, 0, ServerError, Degraded, NOW + 30_000),
            (Degraded, 1, 0, Timeout, Degraded, NOW + 30_000),
            (Degraded, 2, 0, NetworkError, Unreachable, REGULAR),
            (Unreachable, 3, 0, ServerError, Unreachable, REGULAR),
            (Unreachable, 3, 0, Ok, Healthy, REGULAR),
            (Degraded, 2, 1, ServerError, Unreachable, REGULAR),
            (Healthy, 0, 0, RateLimited, Healthy, NOW + 30_000),
            (Healthy, 0, 0, ClientError, Degraded, NOW + 30_000),
            (Healthy, 0, 0, InvalidResponse, Degraded, NOW + 30_000),
            (Paused, 0, 0, AuthFailed, Paused, NOW + 30_000),
            (Paused, 1, 1, AuthFailed, Paused, NOW + 900_000),
            (Paused, 0, 0, Ok, Paused, REGULAR),
            (Unknown, 0, 0, AuthFailed, Degraded, NOW + 30_000),
        ];
        for &(health, failures, auth_failures, outcome, expected, due) in table {
            let verdict = classify(
                &state(health, failures, auth_failures),
                &report(outcome),
                &POLICY,
                NOW,
                REGULAR,
            );
            let case = format!("{health} ({failures}/{auth_failures}) + {outcome}");
            assert_eq!(verdict.state.health, expected, "{case}");
            assert_eq!(verdict.next_due, due, "{case}");
            assert_eq!(verdict.transition.is_some(), expected != health, "{case}");
        }
    }

    #[test]
    fn credentials_change_needs_exactly_the_threshold_of_auth_failures() {
        let mut current = state(Health::Healthy, 0, 0);
        let mut transitions = Vec::new();
        for attempt in 0..3 {
            let verdict = classify(
                &current,
                &report(Outcome::AuthFailed),
                &POLICY,
                NOW + attempt,
                REGULAR,
            );
            transitions.extend(verdict.transition.clone());
            current = verdict.state;
        }
        let to: Vec<Health> = transitions.iter().map(|t| t.to).collect();
        assert_eq!(to, vec![Health::Degraded, Health::NeedsReauth]);
        let reauth = &transitions[1];
        assert_eq!(reauth.first_failure_at, Some(NOW), "streak start is kept");
        assert_eq!(reauth.error_code.as_deref(), Some("AUTHENTICATION_FAILED"));
        assert_eq!(reauth.request_id.as_deref(), Some("req-1"));
    }

    #[test]
    fn a_storm_of_server_errors_never_becomes_needs_reauth() {
        let mut current = state(Health::Healthy, 0, 0);
        for attempt in 0..50 {
            let outcome = if attempt % 2 == 0 {
                Outcome::ServerError
            } else {
                Outcome::Timeout
            };
            current = classify(&current, &report(outcome), &POLICY, NOW, REGULAR).state;
            assert_ne!(current.health, Health::NeedsReauth);
        }
        assert_eq!(current.health, Health::Unreachable);
    }

    #[test]
    fn an_outage_between_auth_failures_restarts_the_auth_streak() {
        let mut current = state(Health::Healthy, 0, 0);
        for outcome in [
            Outcome::AuthFailed,
            Outcome::ServerError,
            Outcome::AuthFailed,
        ] {
            current = classify(&current, &report(outcome), &POLICY, NOW, REGULAR).state;
        }
        assert_eq!(current.health, Health::Degraded);
    }

    #[test]
    fn retry_after_pushes_the_next_probe_back() {
        let mut throttled = report(Outcome::RateLimited);
        throttled.retry_after_secs = Some(120);
        let verdict = classify(
            &state(Health::Healthy, 0, 0),
            &throttled,
            &POLICY,
            NOW,
            NOW + 1,
        );
        assert_eq!(verdict.next_due, NOW + 120_000);
    }

    #[test]
    fn a_reauth_webhook_opens_needs_reauth_once() {
        let healthy = state(Health::Healthy, 0, 0);
        let transition = reauth_by_webhook(&healthy, NOW).expect("transition");
        assert_eq!(transition.to, Health::NeedsReauth);
        assert_eq!(transition.cause, Cause::Webhook);
        assert!(reauth_by_webhook(&state(Health::NeedsReauth, 2, 2), NOW).is_none());
    }
}
