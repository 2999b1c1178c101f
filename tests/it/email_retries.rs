//! An SMTP server in trouble: emails it refuses for a while (421, 451) are retried with
//! backoff and arrive once each when it accepts again.

use std::collections::BTreeMap;
use std::time::Duration;

use connwatch::domain::Health;

use crate::email::revoke;
use crate::helpers::{Kind, STAFF, TestApp, eventually, test_app};

/// Messages the server refuses before it accepts: 451 and 421 in turn. Each failed
/// attempt of the daemon tries twice (a pooled connection may have gone stale), so this
/// is several failed attempts, on several emails.
const REFUSED: u32 = 6;

/// (recipient, kind) of every email of `ids` in the outbox, and how many are sent.
async fn outbox(app: &TestApp, ids: &[&str]) -> (BTreeMap<(String, String), u32>, usize) {
    let mut planned = BTreeMap::new();
    let mut sent = 0;
    for id in ids {
        for (kind, _, recipient, state) in app.emails_of(id).await {
            *planned
                .entry((recipient, format!("{kind} {id}")))
                .or_default() += 1;
            sent += usize::from(state == "sent");
        }
    }
    (planned, sent)
}

#[tokio::test]
async fn emails_refused_with_421_and_451_for_a_while_arrive_exactly_once_when_smtp_accepts_again() {
    let ids = ["acme", "c1", "c2"];
    let app = test_app(Kind::Sqlite)
        .connections(ids)
        .email("reminders = []")
        .smtp_refusing_first(REFUSED, &[451, 421])
        .manual_clock()
        .spawn()
        .await;
    app.advance(Duration::from_secs(1));
    for id in ids {
        app.wait_health(id, Health::Healthy).await;
    }
    // Credentials change for three connections while the SMTP server refuses.
    revoke(&app, &ids).await;
    let (planned, _) = outbox(&app, &ids).await;
    let mut expected = BTreeMap::new();
    for id in ids {
        for recipient in [format!("it@{id}.example"), STAFF.to_owned()] {
            expected.insert((recipient, format!("reauth_required {id}")), 1);
        }
    }
    assert_eq!(planned, expected, "one opening email per recipient planned");
    // Time moves on only when nothing is due (so no lease runs out mid-send): past the
    // hold, then past each failed attempt's backoff, until every email is sent.
    eventually(
        Duration::from_secs(60),
        "every planned email sent",
        || async {
            let (_, sent) = outbox(&app, &ids).await;
            if sent == expected.len() {
                return Some(());
            }
            let (_, due) = app.running.store.outbox_stats(app.now()).await.ok()?;
            if due.is_none() {
                app.advance(Duration::from_secs(5));
            }
            None
        },
    )
    .await;
    app.wait_outbox_settled(Duration::from_secs(3600)).await;
    let smtp = app.smtp();
    let refused = smtp.refused();
    assert_eq!(refused.len(), REFUSED as usize, "{refused:?}");
    assert!(
        [451, 421]
            .iter()
            .all(|code| refused.iter().any(|(refused_with, _)| refused_with == code)),
        "both codes answered: {refused:?}"
    );
    let mut received: BTreeMap<(String, String), u32> = BTreeMap::new();
    for message in smtp.messages() {
        let subject = message.subject();
        let id = subject
            .strip_prefix("Action needed: reconnect Customer ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("an unexpected email: {subject}"));
        for recipient in &message.to {
            let kind = format!("reauth_required {id}");
            *received.entry((recipient.clone(), kind)).or_default() += 1;
        }
    }
    assert_eq!(
        received, expected,
        "every planned email arrived exactly once"
    );
    let metric = |result: &str| {
        format!("connwatch_emails_total{{kind=\"reauth_required\",result=\"{result}\"}}")
    };
    assert!(
        app.metric(&metric("failed")).await >= 1.0,
        "failed attempts counted"
    );
    assert_eq!(app.metric(&metric("sent")).await, expected.len() as f64);
    app.shutdown().await;
}
