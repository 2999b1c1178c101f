//! The decision table: which event, in which state, does what to health, incidents and
//! emails — during a platform storm too. Read a row as
//! `(health before, event, storming) => "health after | incidents: emails"`;
//! `[held]` marks an email that waits until the storm is over.

use super::*;
use crate::domain::{EmailKind, Health, Outcome, ProbeReport};

const NOW: Millis = 10_000_000;
const HOUR: Millis = 3_600_000;

fn rules() -> Rules {
    Rules {
        probe: Policy {
            failure_threshold: 2,
            unreachable_threshold: 3,
            confirm_after: 30_000,
            reauth_backoff: 900_000,
        },
        mail: Some(MailPolicy {
            staff: vec!["oncall@example.com".into()],
            reminders: vec![24 * HOUR],
            send_resolved: true,
            hold: 60_000,
            domain: "example.com".into(),
        }),
        storm: Some(StormPolicy {
            window: 300_000,
            min_connections: 20,
            share: 0.5,
        }),
    }
}

fn state(health: Health, failures: u32, auth_failures: u32) -> ConnectionState {
    ConnectionState {
        health,
        health_since: 0,
        consecutive_failures: failures,
        consecutive_auth_failures: auth_failures,
        first_failure_at: (failures > 0).then_some(NOW - 1_000),
    }
}

fn report(outcome: Outcome) -> ProbeReport {
    ProbeReport {
        outcome,
        status: None,
        latency_ms: 5,
        request_id: Some("req-1".into()),
        error_code: None,
        message: None,
        retry_after_secs: None,
    }
}

/// The events of the table; probes carry their outcome.
#[derive(Debug, Clone, Copy)]
enum On {
    Probe(Outcome),
    WebhookReauth,
    WebhookReconnected,
    WebhooksResumed,
    WentQuiet,
    Pause,
    Resume,
}

/// One line for what a verdict does, as the table reads.
fn describe(verdict: &Verdict, storming: bool) -> String {
    let emails = |emails: &[OutboxEmail]| -> String {
        let list: Vec<String> = emails
            .iter()
            .map(|email| {
                let to = match &email.to {
                    Recipients::Contacts => "contacts",
                    Recipients::Staff(_) => "staff",
                    Recipients::ToldOfOpening => "told",
                };
                let sequence = match email.sequence {
                    0 => String::new(),
                    number => format!("#{number}"),
                };
                let held = if storming && storm::held_in_storm(email.kind) {
                    " [held]"
                } else {
                    ""
                };
                format!("{}{sequence}->{to}{held}", email.kind)
            })
            .collect();
        list.join(", ")
    };
    let mut line = verdict.state.health.to_string();
    if verdict.next_due == Some(NOW) {
        line.push_str(" (probe now)");
    }
    if let Some(transition) = &verdict.transition
        && transition.from == transition.to
    {
        line.push_str(&format!(" (history: {})", transition.cause.as_str()));
    }
    if let Some(closing) = &verdict.incident.close {
        line.push_str(" | closes");
        if !closing.is_empty() {
            line.push_str(&format!(": {}", emails(closing)));
        }
    }
    if let Some(opening) = &verdict.incident.open {
        line.push_str(&format!(" | opens: {}", emails(opening)));
    }
    line
}

// The table is the specification; it reads best in one piece.
#[allow(clippy::too_many_lines)]
#[test]
fn every_event_in_every_state_decides_health_incidents_and_emails() {
    use Health::*;
    use On::*;
    use Outcome::{AuthFailed, Ok as Success, RateLimited, ServerError, Timeout};
    const REAUTH_EMAILS: &str = "reauth_required->contacts, reauth_required->staff, \
         reminder#1->contacts, reminder#1->staff";
    const REAUTH_EMAILS_HELD: &str = "reauth_required->contacts [held], \
         reauth_required->staff [held], reminder#1->contacts [held], reminder#1->staff [held]";
    let reauth_opened = format!("needs_reauth | opens: {REAUTH_EMAILS}");
    let reauth_opened_held = format!("needs_reauth | opens: {REAUTH_EMAILS_HELD}");
    let reauth_by_webhook = format!("needs_reauth (probe now) | opens: {REAUTH_EMAILS}");
    let outage_to_reauth = format!("needs_reauth (probe now) | closes | opens: {REAUTH_EMAILS}");
    let reauth_by_webhook_held = format!("needs_reauth (probe now) | opens: {REAUTH_EMAILS_HELD}");
    // (health, failures, auth failures, event, storming) => what happens
    let table: Vec<(Health, u32, u32, On, bool, &str)> = vec![
        // Probes.
        (Unknown, 0, 0, Probe(Success), false, "healthy"),
        (Healthy, 0, 0, Probe(AuthFailed), false, "degraded"),
        (Degraded, 1, 1, Probe(AuthFailed), false, &reauth_opened),
        (Degraded, 1, 1, Probe(AuthFailed), true, &reauth_opened_held),
        (NeedsReauth, 2, 2, Probe(AuthFailed), false, "needs_reauth"),
        (NeedsReauth, 2, 2, Probe(ServerError), false, "needs_reauth"),
        (
            NeedsReauth,
            2,
            2,
            Probe(Success),
            false,
            "healthy | closes: resolved->told",
        ),
        (
            NeedsReauth,
            2,
            2,
            Probe(Success),
            true,
            "healthy | closes: resolved->told",
        ),
        (
            Degraded,
            2,
            0,
            Probe(Timeout),
            false,
            "unreachable | opens: unreachable->staff",
        ),
        (
            Degraded,
            2,
            0,
            Probe(Timeout),
            true,
            "unreachable | opens: unreachable->staff [held]",
        ),
        (
            Unreachable,
            3,
            0,
            Probe(Success),
            false,
            "healthy | closes: resolved->told",
        ),
        (Healthy, 0, 0, Probe(RateLimited), false, "healthy"),
        (Paused, 1, 1, Probe(AuthFailed), false, "paused"),
        // The platform's word by webhook.
        (Healthy, 0, 0, WebhookReauth, false, &reauth_by_webhook),
        (Healthy, 0, 0, WebhookReauth, true, &reauth_by_webhook_held),
        (Unreachable, 3, 0, WebhookReauth, false, &outage_to_reauth),
        (
            NeedsReauth,
            2,
            2,
            WebhookReauth,
            false,
            "needs_reauth (probe now)",
        ),
        (Paused, 0, 0, WebhookReauth, true, "paused (probe now)"),
        (
            NeedsReauth,
            2,
            2,
            WebhookReconnected,
            false,
            "needs_reauth (probe now)",
        ),
        // Quiet periods are history, never incidents.
        (Healthy, 0, 0, WentQuiet, false, "healthy (history: quiet)"),
        (
            NeedsReauth,
            2,
            2,
            WebhooksResumed,
            false,
            "needs_reauth (history: webhooks_resumed)",
        ),
        // Operators.
        (
            NeedsReauth,
            2,
            2,
            Pause,
            false,
            "paused (probe now) | closes",
        ),
        (Healthy, 0, 0, Pause, true, "paused (probe now)"),
        (Paused, 0, 0, Resume, false, "unknown (probe now)"),
        (Healthy, 0, 0, Resume, false, "healthy"),
    ];
    let rules = rules();
    let mut failures = Vec::new();
    for (health, failed, auth_failed, on, storming, expected) in table {
        let report_of;
        let event = match on {
            Probe(outcome) => {
                report_of = report(outcome);
                Event::Probe {
                    report: &report_of,
                    regular_due: NOW + 300_000,
                }
            }
            WebhookReauth => Event::WebhookReauth,
            WebhookReconnected => Event::WebhookReconnected,
            WebhooksResumed => Event::WebhooksResumed,
            WentQuiet => Event::WentQuiet,
            Pause => Event::PauseChanged { paused: true },
            Resume => Event::PauseChanged { paused: false },
        };
        let verdict = rules.judge(&state(health, failed, auth_failed), event, NOW);
        let seen = describe(&verdict, storming);
        if seen != expected {
            failures.push(format!(
                "{health} ({failed}/{auth_failed}) + {on:?}, storming {storming}:\n  expected {expected}\n  seen     {seen}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn reauth_emails_wait_for_the_hold_and_reminders_for_their_delay() {
    let rules = rules();
    let verdict = rules.judge(
        &state(Health::Degraded, 1, 1),
        Event::Probe {
            report: &report(Outcome::AuthFailed),
            regular_due: NOW + 300_000,
        },
        NOW,
    );
    let opening = verdict.incident.open.expect("an incident opens");
    let due: Vec<(EmailKind, Millis)> = opening
        .iter()
        .map(|email| (email.kind, email.due_at - NOW))
        .collect();
    assert_eq!(
        due,
        vec![
            (EmailKind::ReauthRequired, 60_000),
            (EmailKind::ReauthRequired, 60_000),
            (EmailKind::Reminder, 24 * HOUR),
            (EmailKind::Reminder, 24 * HOUR),
        ]
    );
}

#[test]
fn without_email_settings_incidents_still_open_and_close_but_send_nothing() {
    let rules = Rules {
        mail: None,
        ..rules()
    };
    let verdict = rules.judge(&state(Health::Healthy, 0, 0), Event::WebhookReauth, NOW);
    assert_eq!(verdict.incident.open, Some(Vec::new()));
    assert!(rules.daily_digest("2026-12-04", NOW).is_none());
    assert!(rules.after_opening_sent(NOW).is_none());
}

#[test]
fn storms_begin_on_many_recent_incidents_and_end_when_few_stay_open() {
    let rules = rules();
    let platform = |open, recent, connections, storming| PlatformIncidents {
        platform: "makini".into(),
        open,
        recent,
        connections,
        storming,
    };
    // (open, recent, connections, storming) => decision
    let table: &[(i64, i64, i64, bool, &str)] = &[
        (25, 20, 1_000, false, "begin"),
        (25, 19, 1_000, false, "none"),
        (5, 5, 10, false, "begin"),
        (4, 4, 5, false, "none"),
        (19, 0, 1_000, true, "end"),
        (20, 0, 1_000, true, "none"),
        (0, 0, 0, true, "end"),
    ];
    for &(open, recent, connections, storming, expected) in table {
        let decisions = rules.storms(&[platform(open, recent, connections, storming)], NOW);
        let seen = match decisions.as_slice() {
            [] => "none",
            [StormDecision::Begin { digest, .. }] => {
                let digest = digest.as_ref().expect("staff digest");
                assert_eq!(digest.kind, EmailKind::StaffDigest);
                assert_eq!(digest.due_at, NOW + 60_000);
                "begin"
            }
            [StormDecision::End { .. }] => "end",
            more => panic!("one decision per platform: {more:?}"),
        };
        assert_eq!(
            seen, expected,
            "{open} open, {recent} recent of {connections}, storming {storming}"
        );
    }
}
