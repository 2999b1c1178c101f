//! Reauthorization emails against a real SMTP server process (aiosmtpd).

use std::time::Duration;

use connwatch::demo::platform::Behaviour;
use connwatch::domain::{ConnectionId, Health};

use crate::helpers::process::Daemon;
use crate::helpers::smtp::{Received, SmtpOptions, SmtpServer, read_messages, test_ca};
use crate::helpers::{Kind, STAFF, TestApp, TestDb, config_text, eventually, test_app, token_of};

fn subjects_for(messages: &[Received], recipient: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.to.iter().any(|to| to == recipient))
        .map(|m| m.subject())
        .collect()
}

/// `acme`, `c1`, `c2`, … : `count` connection ids.
fn fleet(count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            if n == 0 {
                "acme".to_owned()
            } else {
                format!("c{n}")
            }
        })
        .collect()
}

/// Revokes the tokens of `ids` and moves the manual clock on to the next slot, then by
/// confirm_after (200 ms): two failed probes, and the connections need reauthorization.
pub(crate) async fn revoke(app: &TestApp, ids: &[&str]) {
    for id in ids {
        app.platform.set(&token_of(id), Behaviour::Revoked);
    }
    app.advance(Duration::from_secs(1));
    for id in ids {
        app.wait_health(id, Health::Degraded).await;
    }
    app.advance(Duration::from_millis(200));
    for id in ids {
        app.wait_health(id, Health::NeedsReauth).await;
    }
}

/// The first emails of acme's credential change: one to the customer with the reconnect
/// link, error code and request id (plain text and HTML, no internal message), one to
/// staff with the platform's own words.
fn assert_reauth_emails(first: &[Received], customer: &str) {
    let reauth: Vec<_> = first
        .iter()
        .filter(|m| {
            m.subject()
                .starts_with("Action needed: reconnect Customer acme")
        })
        .collect();
    assert_eq!(
        reauth.len(),
        2,
        "one for the customer, one for staff: {:?}",
        first.iter().map(|m| m.subject()).collect::<Vec<_>>()
    );
    let to_customer = reauth
        .iter()
        .find(|m| m.to == [customer])
        .expect("customer email");
    let to_staff = reauth
        .iter()
        .find(|m| m.to == [STAFF])
        .expect("staff email");
    let customer_body = to_customer.body();
    assert!(
        customer_body.contains("https://app.example.com/reconnect/acme"),
        "reconnect link"
    );
    assert!(
        customer_body.contains("AUTHENTICATION_FAILED"),
        "error code"
    );
    assert!(customer_body.contains("req_"), "request id");
    assert!(
        to_customer
            .header("Content-Type")
            .unwrap_or_default()
            .contains("multipart/alternative")
    );
    assert!(customer_body.contains("text/plain") && customer_body.contains("text/html"));
    assert!(
        !customer_body.contains("no longer valid"),
        "the platform's raw message is internal"
    );
    assert!(
        to_staff.body().contains("no longer valid"),
        "staff get the internal details"
    );
}

#[tokio::test]
async fn a_credential_change_sends_one_email_per_recipient_then_reminders_and_a_recovery_notice() {
    let app = test_app(Kind::Sqlite)
        .email("reminders = [\"1500ms\", \"3s\"]")
        .spawn()
        .await;
    let smtp = app.smtp();
    app.wait_health("acme", Health::Healthy).await;
    app.platform.set(&token_of("acme"), Behaviour::Revoked);
    app.wait_health("acme", Health::NeedsReauth).await;
    eventually(Duration::from_secs(10), "first emails", || async {
        (smtp.messages().len() >= 2).then_some(())
    })
    .await;
    let customer = "it@acme.example";
    assert_reauth_emails(&smtp.messages(), customer);

    // Reminders at 1.5 s and 3 s after the incident opened, then recovery.
    eventually(Duration::from_secs(10), "two reminders each", || async {
        (subjects_for(&smtp.messages(), customer)
            .iter()
            .filter(|s| s.starts_with("Reminder"))
            .count()
            == 2)
            .then_some(())
    })
    .await;
    app.rotate_token("acme");
    app.wait_health("acme", Health::Healthy).await;
    eventually(Duration::from_secs(10), "resolved notices", || async {
        (smtp
            .messages()
            .iter()
            .filter(|m| m.subject().starts_with("Resolved"))
            .count()
            == 2)
            .then_some(())
    })
    .await;
    // Nothing else is due for an hour: every email has gone out (and none again).
    app.wait_outbox_settled(Duration::from_secs(3600)).await;
    let all = smtp.messages();
    for recipient in [customer, STAFF] {
        // The first word of each subject: Action, Reminder, Resolved.
        let mut kinds: Vec<String> = subjects_for(&all, recipient)
            .iter()
            .map(|s| s.split([' ', ':']).next().unwrap_or_default().to_owned())
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            vec!["Action", "Reminder", "Reminder", "Resolved"],
            "{recipient}: {all:#?}"
        );
    }
    for message in &all {
        assert!(!message.raw.contains("tok_SECRET"), "no token in any email");
        let message_id = message.header("Message-ID").expect("Message-ID");
        assert!(message_id.ends_with("@monitor.example>"), "{message_id}");
    }
    assert_eq!(
        app.metric("connwatch_emails_total{kind=\"reauth_required\",result=\"sent\"}")
            .await,
        2.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn emails_queued_while_smtp_is_down_are_delivered_exactly_once_when_it_returns() {
    let ids = fleet(3);
    let mut app = test_app(Kind::Postgres)
        .connections(&ids)
        .email("")
        .smtp_down()
        .spawn()
        .await;
    for id in &ids {
        app.wait_health(id, Health::Healthy).await;
    }
    for id in &ids {
        app.platform.set(&token_of(id), Behaviour::Revoked);
    }
    for id in &ids {
        app.wait_health(id, Health::NeedsReauth).await;
    }
    // SMTP is down: attempts fail and are retried with backoff.
    eventually(Duration::from_secs(10), "failed attempts", || async {
        let failed = app
            .metric("connwatch_emails_total{kind=\"reauth_required\",result=\"failed\"}")
            .await;
        (failed >= 1.0).then_some(())
    })
    .await;
    app.start_smtp();
    // Every reauth email recorded as sent: none of them can go out again.
    eventually(
        Duration::from_secs(30),
        "every reauth email sent",
        || async {
            let mut sent = 0;
            for id in &ids {
                for (kind, _, _, state) in app.emails_of(id).await {
                    if kind != "reauth_required" {
                        continue;
                    }
                    if state != "sent" {
                        return None;
                    }
                    sent += 1;
                }
            }
            (sent == 6).then_some(())
        },
    )
    .await;
    let messages = app.smtp().messages();
    assert_eq!(
        messages.len(),
        6,
        "3 customers + 3 staff copies, none twice"
    );
    let mut message_ids: Vec<String> = messages
        .iter()
        .filter_map(|m| m.header("Message-ID"))
        .collect();
    message_ids.sort();
    message_ids.dedup();
    assert_eq!(message_ids.len(), 6);
    app.shutdown().await;
}

#[tokio::test]
async fn a_platform_outage_across_fifty_connections_sends_one_staff_digest_and_no_customer_email() {
    let ids = fleet(50);
    let app = test_app(Kind::Sqlite)
        .connections(&ids)
        .email("hold = \"3s\"\nstorm_min_connections = 10")
        .spawn()
        .await;
    let smtp = app.smtp();
    let store = &app.running.store;
    for id in &ids {
        app.wait_health(id, Health::Healthy).await;
    }
    for id in &ids {
        app.platform.set(&token_of(id), Behaviour::Revoked);
    }
    for id in &ids {
        app.wait_health(id, Health::NeedsReauth).await;
    }
    eventually(Duration::from_secs(10), "the digest", || async {
        (!smtp.messages().is_empty()).then_some(())
    })
    .await;
    // The platform recovers for all but two connections.
    for id in &ids[2..] {
        app.platform.set(&token_of(id), Behaviour::Healthy);
        store
            .request_probe(&ConnectionId::parse(id).expect("id"), 0)
            .await
            .expect("probe");
    }
    eventually(
        Duration::from_secs(10),
        "held emails released for the two still broken",
        || async { (smtp.messages().len() >= 5).then_some(()) },
    )
    .await;
    // Nothing else is due for an hour: every email has gone out (and none again).
    app.wait_outbox_settled(Duration::from_secs(3600)).await;
    let messages = smtp.messages();
    let digests: Vec<_> = messages
        .iter()
        .filter(|m| m.subject().contains("many connections failing"))
        .collect();
    assert_eq!(
        digests.len(),
        1,
        "one staff digest: {:#?}",
        messages
            .iter()
            .map(|m| (m.to.clone(), m.subject()))
            .collect::<Vec<_>>()
    );
    assert_eq!(digests[0].to, [STAFF]);
    assert!(
        digests[0].body().contains("50 connection(s)")
            || digests[0].subject().contains("50 connection(s)")
    );
    let per_connection: Vec<String> = messages
        .iter()
        .filter(|m| !m.subject().contains("many connections failing"))
        .flat_map(|m| m.to.clone())
        .collect();
    let mut expected = vec![
        "it@acme.example".to_owned(),
        "it@c1.example".to_owned(),
        STAFF.to_owned(),
        STAFF.to_owned(),
    ];
    expected.sort();
    let mut got = per_connection.clone();
    got.sort();
    assert_eq!(
        got, expected,
        "only the two still broken are told, once each"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_flap_shorter_than_the_hold_sends_nothing_and_a_paused_connection_sends_nothing() {
    // c2 is the control: its credentials change too, and stay changed.
    let app = test_app(Kind::Sqlite)
        .connections(["acme", "c1", "c2"])
        .email("hold = \"4s\"")
        .manual_clock()
        .spawn()
        .await;
    let smtp = app.smtp();
    app.advance(Duration::from_secs(1));
    for id in ["acme", "c1", "c2"] {
        app.wait_health(id, Health::Healthy).await;
    }
    revoke(&app, &["acme", "c1"]).await;
    // c2's emails fall due after those of acme and c1.
    revoke(&app, &["c2"]).await;
    // acme recovers before its first email is due; c1 is paused by an operator.
    app.rotate_token("acme");
    let paused = reqwest::Client::new()
        .post(format!(
            "http://{}/api/v1/connections/c1/pause",
            app.admin_addr
        ))
        .send()
        .await
        .expect("pause");
    assert_eq!(paused.status(), 200);
    app.wait_health("acme", Health::Healthy).await;
    assert_eq!(app.health("c1").await, Some(Health::Paused));
    // A minute on, every hold is over. Emails go out in the order they fell due, so
    // once c2's have arrived, any of acme or c1 would have arrived before them.
    app.advance(Duration::from_secs(60));
    eventually(Duration::from_secs(10), "c2's emails", || async {
        (smtp
            .messages()
            .iter()
            .filter(|m| m.subject().contains("Customer c2"))
            .count()
            == 2)
            .then_some(())
    })
    .await;
    let messages = smtp.messages();
    assert!(
        messages.len() == 2 && messages.iter().all(|m| m.subject().contains("Customer c2")),
        "nothing sent for acme or c1: {:?}",
        messages.iter().map(|m| m.subject()).collect::<Vec<_>>()
    );
    assert_eq!(
        app.health("c1").await,
        Some(Health::Paused),
        "still probed, still paused"
    );
    let states: Vec<String> = app
        .emails_of("c1")
        .await
        .into_iter()
        .map(|(_, _, _, state)| state)
        .collect();
    assert!(
        !states.is_empty() && states.iter().all(|state| state == "cancelled"),
        "{states:?}"
    );
    app.shutdown().await;
}

/// `connwatch send-test-email --to ops@example.com` with `config`.
fn send_test_email(config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(crate::helpers::process::BINARY)
        .args(["send-test-email", "--to", "ops@example.com", "--config"])
        .arg(config)
        .output()
        .expect("run connwatch send-test-email")
}

#[tokio::test]
async fn send_test_email_works_over_starttls_with_a_test_ca_and_refuses_clear_text_when_tls_is_required()
 {
    let folder = tempfile::tempdir().expect("dir");
    let (ca, leaf, key) = test_ca(folder.path());
    let mail = folder.path().join("mail");
    let smtp = SmtpServer::start(
        &mail,
        SmtpOptions {
            tls: Some((&leaf, &key)),
            ..SmtpOptions::default()
        },
    );
    let db = TestDb::new(Kind::Sqlite).await;
    let password = db.path().join("smtp.password");
    std::fs::write(&password, "smtp-pass-SECRET").expect("password");
    let write_config = |url: String, extra: &str| {
        let path = db.path().join("connwatch.toml");
        let text = format!(
            "{}\n[email]\nsmtp_url = \"{url}\"\nfrom = \"Monitor <alerts@monitor.example>\"\ntimeout = \"5s\"\n{extra}\n",
            config_text(&db.url, &[], &[], "")
        );
        std::fs::write(&path, text).expect("config");
        path
    };
    let config = write_config(
        format!("smtp://127.0.0.1:{}?tls=required", smtp.port),
        &format!("ca_file = \"{}\"", ca.display()),
    );
    let output = send_test_email(&config);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let received = smtp.messages();
    assert_eq!(received.len(), 1);
    assert!(received[0].tls, "delivered over STARTTLS");
    assert_eq!(received[0].to, ["ops@example.com"]);

    // Without the test CA the certificate is refused; nothing is sent in clear.
    let config = write_config(format!("smtp://127.0.0.1:{}?tls=required", smtp.port), "");
    let output = send_test_email(&config);
    assert!(!output.status.success());
    assert_eq!(smtp.messages().len(), 1);
    smtp.stop();

    // A plain server with tls=required: refused rather than sent in clear.
    let plain_folder = folder.path().join("plain");
    let plain = SmtpServer::start(&plain_folder, SmtpOptions::default());
    let config = write_config(format!("smtp://127.0.0.1:{}?tls=required", plain.port), "");
    let output = send_test_email(&config);
    assert!(!output.status.success());
    assert!(read_messages(&plain_folder).is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("smtp-pass-SECRET"));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_between_send_and_mark_sent_loses_nothing_and_resends_with_the_same_message_id() {
    // The server stores each message, then waits 2 s before answering 250.
    let fixture = test_app(Kind::Sqlite)
        .email("staff = []\ntimeout = \"4s\"")
        .smtp_answering_after(Duration::from_secs(2))
        .prepare()
        .await;
    fixture.platform.set(&token_of("acme"), Behaviour::Revoked);
    let config = fixture.config_file();
    let smtp = fixture.smtp();
    let spawn = || {
        Daemon(
            std::process::Command::new(crate::helpers::process::BINARY)
                .args(["run", "--config", config.to_str().expect("utf-8")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn"),
        )
    };
    let mut daemon = spawn();
    eventually(
        Duration::from_secs(15),
        "the message stored by the server",
        || async { (!smtp.messages().is_empty()).then_some(()) },
    )
    .await;
    // The server has the message but has not answered: the daemon dies before mark-sent.
    let _ = daemon.kill();
    let _ = daemon.wait();
    let mut restarted = spawn();
    eventually(
        Duration::from_secs(30),
        "the resend after the lease expired",
        || async { (smtp.messages().len() >= 2).then_some(()) },
    )
    .await;
    // Read beside the daemon: once the resend is recorded as sent, nothing sends it again.
    let store = connwatch::store::Store::connect(&fixture.db.url, 1)
        .await
        .expect("store");
    let id = ConnectionId::parse("acme").expect("id");
    eventually(
        Duration::from_secs(15),
        "the resend recorded as sent",
        || async {
            let states = store.emails_of(&id).await.ok()?;
            states
                .iter()
                .any(|(kind, _, _, state)| kind == "reauth_required" && state == "sent")
                .then_some(())
        },
    )
    .await;
    let _ = restarted.kill();
    let _ = restarted.wait();
    let messages = smtp.messages();
    assert_eq!(messages.len(), 2, "a duplicate at most, never a loss");
    assert_eq!(
        messages[0].header("Message-ID"),
        messages[1].header("Message-ID"),
        "the same Message-ID"
    );
}

#[tokio::test]
async fn the_daily_digest_lists_open_incidents_once_per_local_date() {
    let app = test_app(Kind::Sqlite)
        .connections(["acme", "c1"])
        .email("hold = \"30s\"")
        .spawn()
        .await;
    let smtp = app.smtp();
    let store = &app.running.store;
    let now = app.now();
    let digest = app
        .running
        .scheduler
        .rules()
        .current()
        .daily_digest("2026-11-28", now)
        .expect("[email] is configured");
    assert!(
        !store
            .enqueue_daily_digest("2026-11-28", &digest, now)
            .await
            .expect("digest"),
        "nothing open, no digest"
    );
    app.wait_health("acme", Health::Healthy).await;
    app.platform.set(&token_of("acme"), Behaviour::Revoked);
    app.wait_health("acme", Health::NeedsReauth).await;
    // The cron job calls this every minute after the configured local time; repeats (and
    // other replicas) enqueue nothing more for the same date.
    for _ in 0..3 {
        store
            .enqueue_daily_digest("2026-11-28", &digest, now)
            .await
            .expect("digest");
    }
    eventually(Duration::from_secs(10), "the digest", || async {
        (!smtp.messages().is_empty()).then_some(())
    })
    .await;
    // Nothing else is due within 10 s: whatever was enqueued for the date has gone out.
    app.wait_outbox_settled(Duration::from_secs(10)).await;
    let messages = smtp.messages();
    assert_eq!(
        messages.len(),
        1,
        "one digest, and the 30 s hold keeps the per-connection emails back"
    );
    assert_eq!(messages[0].to, [STAFF]);
    assert!(
        messages[0]
            .subject()
            .starts_with("Open incidents on 2026-11-28: 1 connection(s)"),
        "{}",
        messages[0].subject()
    );
    assert!(
        messages[0]
            .body()
            .contains("acme (Customer acme) on makini: needs_reauth"),
        "{}",
        messages[0].body()
    );
    app.shutdown().await;
}
