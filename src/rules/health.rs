//! Health judgement: (state, what happened, policy, now) -> new state, transition, next
//! probe. Probes are classified here; so are the platform's word by webhook, quiet
//! periods and operator pauses.

use super::IncidentPlan;
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

/// The part of a connection's stored state that the rules read and write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionState {
    pub health: Health,
    pub health_since: Millis,
    pub consecutive_failures: u32,
    pub consecutive_auth_failures: u32,
    /// Start of the current failure streak.
    pub first_failure_at: Option<Millis>,
}

/// What one event decides for one connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The connection's state afterwards (unchanged when nothing changed).
    pub state: ConnectionState,
    /// The change of health (or, for quiet periods, a history entry at the same health).
    pub transition: Option<Transition>,
    /// Incidents to close and open, with their emails.
    pub incident: IncidentPlan,
    /// When to probe next; `None` leaves the due time alone.
    pub next_due: Option<Millis>,
}

/// How a failure of this outcome counts.
enum Kind {
    Success,
    Auth,
    Transient,
    Throttled,
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

impl Verdict {
    /// Nothing changes.
    fn unchanged(state: &ConnectionState) -> Verdict {
        Verdict {
            state: state.clone(),
            transition: None,
            incident: IncidentPlan::default(),
            next_due: None,
        }
    }

    /// A verdict carrying `transition`, with the incidents it closes and opens.
    fn with_transition(
        state: ConnectionState,
        transition: Option<Transition>,
        next_due: Option<Millis>,
    ) -> Verdict {
        let incident = transition
            .as_ref()
            .map(IncidentPlan::of)
            .unwrap_or_default();
        Verdict {
            state,
            transition,
            incident,
            next_due,
        }
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
    let (target, mut next_due) = match kind_of(report.outcome) {
        Kind::Success => {
            state.consecutive_failures = 0;
            state.consecutive_auth_failures = 0;
            state.first_failure_at = None;
            (Health::Healthy, regular_due)
        }
        Kind::Auth => auth_failure(previous, &mut state, policy, now),
        Kind::Transient => transient_failure(previous, &mut state, policy, now, regular_due),
        Kind::Throttled => (previous.health, now + policy.confirm_after),
    };
    if let Some(wait_secs) = report.retry_after_secs {
        let wait_ms = i64::try_from(wait_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2);
        next_due = next_due.max(now.saturating_add(wait_ms));
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
    Verdict::with_transition(state, transition, Some(next_due))
}

/// The platform said by webhook that the connection needs reauthorization: `needs_reauth`
/// at once (unless paused or already there), and a confirming probe now either way.
pub fn reauth_by_webhook(previous: &ConnectionState, now: Millis) -> Verdict {
    match previous.health {
        Health::NeedsReauth | Health::Paused => Verdict {
            next_due: Some(now),
            ..Verdict::unchanged(previous)
        },
        Health::Unknown | Health::Healthy | Health::Degraded | Health::Unreachable => {
            let first_failure_at = previous.first_failure_at.unwrap_or(now);
            let state = ConnectionState {
                health: Health::NeedsReauth,
                health_since: now,
                first_failure_at: Some(first_failure_at),
                ..previous.clone()
            };
            let transition = Transition {
                from: previous.health,
                to: Health::NeedsReauth,
                cause: Cause::Webhook,
                at: now,
                first_failure_at: Some(first_failure_at),
                outcome: None,
                error_code: None,
                request_id: None,
            };
            Verdict::with_transition(state, Some(transition), Some(now))
        }
    }
}

/// The platform said by webhook that the customer reconnected: the circuit breaker
/// yields to the platform's word and a probe runs now; health follows that probe.
pub fn reconnected_by_webhook(previous: &ConnectionState, now: Millis) -> Verdict {
    Verdict {
        next_due: Some(now),
        ..Verdict::unchanged(previous)
    }
}

/// Webhooks went quiet (`Cause::Quiet`) or resumed (`Cause::WebhooksResumed`): a history
/// entry at the same health; quiet alone is no incident (the poller recovers changes).
pub fn quiet_changed(previous: &ConnectionState, cause: Cause, now: Millis) -> Verdict {
    let transition = Transition {
        from: previous.health,
        to: previous.health,
        cause,
        at: now,
        first_failure_at: None,
        outcome: None,
        error_code: None,
        request_id: None,
    };
    Verdict::with_transition(previous.clone(), Some(transition), None)
}

/// The pause switch (operator or config) is now `paused`. Pausing makes the connection
/// `paused` (closing any incident: a paused connection never alerts); resuming makes it
/// `unknown` until the probe that runs at once says otherwise. Counters start over.
pub fn pause_changed(previous: &ConnectionState, paused: bool, now: Millis) -> Verdict {
    let target = match (paused, previous.health) {
        (true, _) => Health::Paused,
        (false, Health::Paused) => Health::Unknown,
        (
            false,
            health @ (Health::Unknown
            | Health::Healthy
            | Health::Degraded
            | Health::Unreachable
            | Health::NeedsReauth),
        ) => health,
    };
    if target == previous.health {
        return Verdict::unchanged(previous);
    }
    let state = ConnectionState {
        health: target,
        health_since: now,
        consecutive_failures: 0,
        consecutive_auth_failures: 0,
        first_failure_at: None,
    };
    let transition = Transition {
        from: previous.health,
        to: target,
        cause: Cause::Operator,
        at: now,
        first_failure_at: None,
        outcome: None,
        error_code: None,
        request_id: None,
    };
    Verdict::with_transition(state, Some(transition), Some(now))
}

/// How long a probe asked for by a person must wait: a connection in `needs_reauth` is
/// probed no sooner than `reauth_backoff` after its last probe (repeated logins with dead
/// credentials can lock the customer's account in their own system). `None`: now.
pub fn manual_probe_wait(
    health: Health,
    last_probe_at: Option<Millis>,
    policy: &Policy,
    now: Millis,
) -> Option<Millis> {
    match health {
        Health::NeedsReauth => {
            let next = last_probe_at?.saturating_add(policy.reauth_backoff);
            (next > now).then(|| next - now)
        }
        Health::Unknown
        | Health::Healthy
        | Health::Degraded
        | Health::Unreachable
        | Health::Paused => None,
    }
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

/// An auth failure: `needs_reauth` at the threshold (then the circuit breaker's backoff),
/// else a quick confirming re-probe.
fn auth_failure(
    previous: &ConnectionState,
    state: &mut ConnectionState,
    policy: &Policy,
    now: Millis,
) -> (Health, Millis) {
    state.consecutive_auth_failures += 1;
    state.consecutive_failures += 1;
    state.first_failure_at.get_or_insert(now);
    if state.consecutive_auth_failures >= policy.failure_threshold {
        return (Health::NeedsReauth, now + policy.reauth_backoff);
    }
    let health = match previous.health {
        Health::NeedsReauth => Health::NeedsReauth,
        Health::Unreachable => Health::Unreachable,
        Health::Unknown | Health::Healthy | Health::Degraded | Health::Paused => Health::Degraded,
    };
    (health, now + policy.confirm_after)
}

/// An outage: breaks an auth-failure streak (only consecutive auth failures count),
/// `unreachable` at its own threshold; never confirms or resolves `needs_reauth`.
fn transient_failure(
    previous: &ConnectionState,
    state: &mut ConnectionState,
    policy: &Policy,
    now: Millis,
    regular_due: Millis,
) -> (Health, Millis) {
    state.consecutive_auth_failures = 0;
    state.consecutive_failures += 1;
    state.first_failure_at.get_or_insert(now);
    match previous.health {
        Health::NeedsReauth => (Health::NeedsReauth, now + policy.reauth_backoff),
        Health::Unknown
        | Health::Healthy
        | Health::Degraded
        | Health::Unreachable
        | Health::Paused => {
            if state.consecutive_failures >= policy.unreachable_threshold {
                (Health::Unreachable, regular_due)
            } else {
                (Health::Degraded, now + policy.confirm_after)
            }
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
            assert_eq!(verdict.next_due, Some(due), "{case}");
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
        assert_eq!(verdict.next_due, Some(NOW + 120_000));
    }

    #[test]
    fn a_reauth_webhook_opens_needs_reauth_once() {
        let healthy = state(Health::Healthy, 0, 0);
        let verdict = reauth_by_webhook(&healthy, NOW);
        let transition = verdict.transition.expect("transition");
        assert_eq!(transition.to, Health::NeedsReauth);
        assert_eq!(transition.cause, Cause::Webhook);
        assert_eq!(verdict.next_due, Some(NOW), "a confirming probe now");
        assert!(verdict.incident.open.is_some(), "an incident opens");
        let again = reauth_by_webhook(&state(Health::NeedsReauth, 2, 2), NOW);
        assert!(again.transition.is_none());
        assert_eq!(again.next_due, Some(NOW));
    }

    #[test]
    fn manual_probes_of_a_broken_connection_wait_for_the_circuit_breaker() {
        let wait = |health, last| manual_probe_wait(health, last, &POLICY, NOW);
        assert_eq!(wait(Health::NeedsReauth, Some(NOW - 1_000)), Some(899_000));
        assert_eq!(wait(Health::NeedsReauth, Some(NOW - 900_000)), None);
        assert_eq!(wait(Health::NeedsReauth, None), None);
        assert_eq!(wait(Health::Healthy, Some(NOW - 1_000)), None);
        assert_eq!(wait(Health::Degraded, Some(NOW)), None);
    }

    #[test]
    fn pausing_closes_the_incident_and_resuming_starts_from_unknown() {
        let broken = state(Health::NeedsReauth, 3, 3);
        let paused = pause_changed(&broken, true, NOW);
        assert_eq!(paused.state.health, Health::Paused);
        assert_eq!(paused.state.consecutive_failures, 0);
        assert!(paused.incident.close.is_some());
        assert!(paused.incident.open.is_none());
        let resumed = pause_changed(&paused.state, false, NOW + 1);
        assert_eq!(resumed.state.health, Health::Unknown);
        assert_eq!(resumed.next_due, Some(NOW + 1));
        let untouched = pause_changed(&state(Health::Healthy, 0, 0), false, NOW);
        assert!(untouched.transition.is_none());
        assert_eq!(untouched.next_due, None);
    }
}
