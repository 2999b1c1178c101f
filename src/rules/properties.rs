//! Properties of the rules over random event sequences (proptest): what must hold whatever
//! a platform, its webhooks and the operators do, in any order.

use proptest::prelude::*;

use super::*;
use crate::domain::{Cause, Health, Outcome, ProbeReport};

const THRESHOLD: u32 = 2;

fn rules() -> Rules {
    Rules {
        probe: Policy {
            failure_threshold: THRESHOLD,
            unreachable_threshold: 3,
            confirm_after: 30_000,
            reauth_backoff: 900_000,
        },
        mail: Some(MailPolicy {
            staff: vec!["oncall@example.com".into()],
            reminders: vec![3_600_000, 7_200_000],
            send_resolved: true,
            hold: 60_000,
            domain: "example.com".into(),
        }),
        storm: None,
    }
}

/// One event of a random sequence.
#[derive(Debug, Clone, Copy)]
enum Step {
    Probe(Outcome),
    WebhookReauth,
    WebhookReconnected,
    WebhooksResumed,
    WentQuiet,
    Pause(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => proptest::sample::select(Outcome::ALL.to_vec()).prop_map(Step::Probe),
        1 => Just(Step::WebhookReauth),
        1 => Just(Step::WebhookReconnected),
        1 => Just(Step::WebhooksResumed),
        1 => Just(Step::WentQuiet),
        1 => any::<bool>().prop_map(Step::Pause),
    ]
}

fn report(outcome: Outcome) -> ProbeReport {
    ProbeReport {
        outcome,
        status: None,
        latency_ms: 1,
        request_id: None,
        error_code: None,
        message: None,
        retry_after_secs: None,
    }
}

proptest! {
    /// `needs_reauth` comes only from `failure_threshold` consecutive auth failures or
    /// from the platform's word; an incident opens only when none is open, closes only
    /// when one is; no plan lists one email (kind, sequence, recipients) twice.
    #[test]
    fn needs_reauth_incidents_and_emails_follow_the_events(
        steps in proptest::collection::vec(step(), 1..60)
    ) {
        let rules = rules();
        let mut state = ConnectionState::new_unknown(0);
        let mut auth_streak = 0u32;
        let mut incident_open = false;
        for (index, step) in steps.iter().enumerate() {
            let now = 1_000 + index as i64 * 1_000;
            let report_of;
            let event = match *step {
                Step::Probe(outcome) => {
                    report_of = report(outcome);
                    Event::Probe { report: &report_of, regular_due: now + 300_000 }
                }
                Step::WebhookReauth => Event::WebhookReauth,
                Step::WebhookReconnected => Event::WebhookReconnected,
                Step::WebhooksResumed => Event::WebhooksResumed,
                Step::WentQuiet => Event::WentQuiet,
                Step::Pause(paused) => Event::PauseChanged { paused },
            };
            let verdict = rules.judge(&state, event, now);
            match *step {
                Step::Probe(Outcome::AuthFailed) => auth_streak += 1,
                Step::Probe(Outcome::RateLimited) => {}
                Step::Probe(_) => auth_streak = 0,
                Step::Pause(_) if verdict.transition.is_some() => auth_streak = 0,
                _ => {}
            }
            if let Some(transition) = &verdict.transition
                && transition.to == Health::NeedsReauth
                && transition.from != Health::NeedsReauth
            {
                match transition.cause {
                    Cause::Probe => prop_assert!(auth_streak >= THRESHOLD, "{steps:?} at {index}"),
                    Cause::Webhook => prop_assert!(matches!(step, Step::WebhookReauth)),
                    other => prop_assert!(false, "needs_reauth caused by {other:?}"),
                }
            }
            if verdict.incident.close.is_some() {
                prop_assert!(incident_open, "closed none: {steps:?} at {index}");
                incident_open = false;
            }
            if let Some(opening) = &verdict.incident.open {
                prop_assert!(!incident_open, "opened twice: {steps:?} at {index}");
                incident_open = true;
                let mut seen = std::collections::HashSet::new();
                for email in opening {
                    let key = (email.kind, email.sequence, format!("{:?}", email.to));
                    prop_assert!(seen.insert(key), "planned twice: {opening:?}");
                }
            }
            prop_assert_eq!(incident_open, verdict.state.health.is_incident());
            state = verdict.state;
        }
    }

    /// The watermark, advanced by any update times, never moves backwards nor past now +
    /// the clock skew allowed.
    #[test]
    fn the_watermark_never_moves_backwards_nor_into_the_future(
        times in proptest::collection::vec(any::<i64>(), 1..50),
        now in 0i64..4_000_000_000_000,
    ) {
        let mut watermark: Option<i64> = None;
        for updated in times {
            let next = watermark.max(Some(changes::watermark_candidate(updated, now)));
            prop_assert!(next >= watermark);
            prop_assert!(next.is_some_and(|mark| mark <= now + changes::CLOCK_SKEW));
            watermark = next;
        }
    }
}
