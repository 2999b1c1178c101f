//! Reauthorization emails against a real SMTP server process (aiosmtpd).

use std::time::Duration;

use crate::helpers::smtp::{SmtpOptions, SmtpServer, free_port, read_messages, test_ca};
use crate::helpers::{Conn, Kind, TestDb, config_text, eventually, parse, token_file};
use connwatch::app::{self, Hooks, Running};
use connwatch::demo::platform::{Behaviour, FakePlatform};
use connwatch::domain::{ConnectionId, Health};

const STAFF: &str = "oncall@staff.example";

struct Setup {
    db: TestDb,
    platform: FakePlatform,
    running: Running,
}

fn email_section(port: u16, extra: &str) -> String {
    let hold = if extra.contains("hold =") {
        ""
    } else {
        "hold = \"500ms\"\n"
    };
    let timeout = if extra.contains("timeout =") {
        ""
    } else {
        "timeout = \"1s\"\n"
    };
    let staff = if extra.contains("staff =") {
        String::new()
    } else {
        format!("staff = [\"{STAFF}\"]\n")
    };
    format!(
        "\n[email]\nsmtp_url = \"smtp://127.0.0.1:{port}\"\nfrom = \"Connection Monitor <alerts@monitor.example>\"\n\
         {staff}{timeout}{hold}{extra}\n"
    )
}

async fn setup(kind: Kind, count: usize, smtp_port: u16, email_extra: &str) -> Setup {
    let db = TestDb::new(kind).await;
    let platform = FakePlatform::start().await.expect("platform");
    let ids: Vec<String> = (0..count)
        .map(|n| {
            if n == 0 {
                "acme".to_owned()
            } else {
                format!("c{n}")
            }
        })
        .collect();
    let connections: Vec<Conn> = ids
        .iter()
        .map(|id| {
            let token = format!("tok_SECRET_{id}");
            platform.set(&token, Behaviour::Healthy);
            Conn {
                id,
                platform: "makini",
                token_file: token_file(db.path(), id, &token),
            }
        })
        .collect();
    let mut text = config_text(
        &db.url,
        &[("makini", platform.base_url())],
        &connections,
        "",
    );
    text.push_str(&email_section(smtp_port, email_extra));
    let running = app::start(parse(&text), Hooks::default())
        .await
        .expect("start");
    Setup {
        db,
        platform,
        running,
    }
}

async fn health(running: &Running, raw: &str) -> Option<Health> {
    let listed = running.store.list_connections().await.ok()?;
    listed
        .into_iter()
        .find(|c| c.id.as_str() == raw)
        .map(|c| c.health)
}

async fn wait_health(running: &Running, raw: &str, wanted: Health, seconds: u64) {
    eventually(
        Duration::from_secs(seconds),
        &format!("{raw} {wanted}"),
        || async { (health(running, raw).await? == wanted).then_some(()) },
    )
    .await;
}

fn subjects_for(messages: &[crate::helpers::smtp::Received], recipient: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.to.iter().any(|to| to == recipient))
        .map(|m| m.subject())
        .collect()
}

#[tokio::test]
async fn a_credential_change_sends_one_email_per_recipient_then_reminders_and_a_recovery_notice() {
    let folder = tempfile::tempdir().expect("dir");
    let smtp = SmtpServer::start(folder.path(), SmtpOptions::default());
    let setup = setup(
        Kind::Sqlite,
        1,
        smtp.port,
        "reminders = [\"1500ms\", \"3s\"]",
    )
    .await;
    let running = &setup.running;
    wait_health(running, "acme", Health::Healthy, 5).await;
    setup.platform.set("tok_SECRET_acme", Behaviour::Revoked);
    wait_health(running, "acme", Health::NeedsReauth, 5).await;
    eventually(Duration::from_secs(10), "first emails", || async {
        (smtp.messages().len() >= 2).then_some(())
    })
    .await;
    let customer = "it@acme.example";
    let first = smtp.messages();
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
    setup.platform.set("tok_SECRET_acme_v2", Behaviour::Healthy);
    token_file(setup.db.path(), "acme", "tok_SECRET_acme_v2");
    wait_health(running, "acme", Health::Healthy, 5).await;
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = smtp.messages();
    for recipient in [customer, STAFF] {
        let mut kinds: Vec<String> = subjects_for(&all, recipient)
            .iter()
            .map(|s| {
                s.split(':')
                    .next()
                    .unwrap_or_default()
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
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
    let metrics = reqwest::get(format!("http://{}/metrics", running.admin_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("connwatch_emails_total{kind=\"reauth_required\",result=\"sent\"} 2"),
        "{metrics}"
    );
    setup.running.shutdown().await;
}

#[tokio::test]
async fn emails_queued_while_smtp_is_down_are_delivered_exactly_once_when_it_returns() {
    let folder = tempfile::tempdir().expect("dir");
    let port = free_port();
    let setup = setup(Kind::Postgres, 3, port, "").await;
    let running = &setup.running;
    for id in ["acme", "c1", "c2"] {
        wait_health(running, id, Health::Healthy, 5).await;
    }
    for id in ["acme", "c1", "c2"] {
        setup
            .platform
            .set(&format!("tok_SECRET_{id}"), Behaviour::Revoked);
    }
    for id in ["acme", "c1", "c2"] {
        wait_health(running, id, Health::NeedsReauth, 5).await;
    }
    // SMTP is down: attempts fail and are retried with backoff.
    eventually(Duration::from_secs(10), "failed attempts", || async {
        let metrics = reqwest::get(format!("http://{}/metrics", running.admin_addr))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let failed: f64 = metrics
            .lines()
            .find(|line| {
                line.starts_with(
                    "connwatch_emails_total{kind=\"reauth_required\",result=\"failed\"}",
                )
            })?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?;
        (failed >= 1.0).then_some(())
    })
    .await;
    let smtp = SmtpServer::start(
        folder.path(),
        SmtpOptions {
            port: Some(port),
            ..SmtpOptions::default()
        },
    );
    for _ in 0..60 {
        if smtp.messages().len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let states = running
        .store
        .emails_of(&ConnectionId::parse("acme").expect("id"))
        .await
        .expect("emails");
    assert!(
        smtp.messages().len() >= 6,
        "{} delivered; acme: {states:?}",
        smtp.messages().len()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let messages = smtp.messages();
    assert_eq!(
        messages.len(),
        6,
        "3 customers + 3 staff copies, none twice"
    );
    let mut ids: Vec<String> = messages
        .iter()
        .filter_map(|m| m.header("Message-ID"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    setup.running.shutdown().await;
}

#[tokio::test]
async fn a_platform_outage_across_fifty_connections_sends_one_staff_digest_and_no_customer_email() {
    let folder = tempfile::tempdir().expect("dir");
    let smtp = SmtpServer::start(folder.path(), SmtpOptions::default());
    let setup = setup(
        Kind::Sqlite,
        50,
        smtp.port,
        "hold = \"3s\"\nstorm_min_connections = 10",
    )
    .await;
    let running = &setup.running;
    eventually(Duration::from_secs(10), "all healthy", || async {
        let listed = running.store.list_connections().await.ok()?;
        listed
            .iter()
            .all(|c| c.health == Health::Healthy)
            .then_some(())
    })
    .await;
    let ids: Vec<String> = (0..50)
        .map(|n| {
            if n == 0 {
                "acme".to_owned()
            } else {
                format!("c{n}")
            }
        })
        .collect();
    for id in &ids {
        setup
            .platform
            .set(&format!("tok_SECRET_{id}"), Behaviour::Revoked);
    }
    eventually(Duration::from_secs(10), "all needs_reauth", || async {
        let listed = running.store.list_connections().await.ok()?;
        listed
            .iter()
            .all(|c| c.health == Health::NeedsReauth)
            .then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the digest", || async {
        (!smtp.messages().is_empty()).then_some(())
    })
    .await;
    // The platform recovers for all but two connections.
    for id in &ids[2..] {
        setup
            .platform
            .set(&format!("tok_SECRET_{id}"), Behaviour::Healthy);
        running
            .store
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
    tokio::time::sleep(Duration::from_secs(4)).await;
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
    setup.running.shutdown().await;
}

#[tokio::test]
async fn a_flap_shorter_than_the_hold_sends_nothing_and_a_paused_connection_sends_nothing() {
    let folder = tempfile::tempdir().expect("dir");
    let smtp = SmtpServer::start(folder.path(), SmtpOptions::default());
    let setup = setup(Kind::Sqlite, 2, smtp.port, "hold = \"4s\"").await;
    let running = &setup.running;
    wait_health(running, "acme", Health::Healthy, 5).await;
    wait_health(running, "c1", Health::Healthy, 5).await;
    setup.platform.set("tok_SECRET_acme", Behaviour::Revoked);
    setup.platform.set("tok_SECRET_c1", Behaviour::Revoked);
    wait_health(running, "acme", Health::NeedsReauth, 5).await;
    wait_health(running, "c1", Health::NeedsReauth, 5).await;
    // acme recovers before its first email is due; c1 is paused by an operator.
    setup.platform.set("tok_SECRET_acme_v2", Behaviour::Healthy);
    token_file(setup.db.path(), "acme", "tok_SECRET_acme_v2");
    let paused = reqwest::Client::new()
        .post(format!(
            "http://{}/api/v1/connections/c1/pause",
            running.admin_addr
        ))
        .send()
        .await
        .expect("pause");
    assert_eq!(paused.status(), 200);
    wait_health(running, "acme", Health::Healthy, 5).await;
    assert_eq!(health(running, "c1").await, Some(Health::Paused));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        smtp.messages().is_empty(),
        "nothing sent: {:?}",
        smtp.messages()
            .iter()
            .map(|m| m.subject())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        health(running, "c1").await,
        Some(Health::Paused),
        "still probed, still paused"
    );
    let states: Vec<String> = running
        .store
        .emails_of(&ConnectionId::parse("c1").expect("id"))
        .await
        .expect("emails")
        .into_iter()
        .map(|(_, _, _, state)| state)
        .collect();
    assert!(
        !states.is_empty() && states.iter().all(|state| state == "cancelled"),
        "{states:?}"
    );
    setup.running.shutdown().await;
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
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_connwatch"))
        .args([
            "send-test-email",
            "--to",
            "ops@example.com",
            "--config",
            config.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run");
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
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_connwatch"))
        .args([
            "send-test-email",
            "--to",
            "ops@example.com",
            "--config",
            config.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert_eq!(smtp.messages().len(), 1);
    smtp.stop();

    // A plain server with tls=required: refused rather than sent in clear.
    let plain_folder = folder.path().join("plain");
    let plain = SmtpServer::start(&plain_folder, SmtpOptions::default());
    let config = write_config(format!("smtp://127.0.0.1:{}?tls=required", plain.port), "");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_connwatch"))
        .args([
            "send-test-email",
            "--to",
            "ops@example.com",
            "--config",
            config.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(read_messages(&plain_folder).is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("smtp-pass-SECRET"));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_between_send_and_mark_sent_loses_nothing_and_resends_with_the_same_message_id() {
    let folder = tempfile::tempdir().expect("dir");
    // The server stores each message, then waits 2 s before answering 250.
    let smtp = SmtpServer::start(
        folder.path(),
        SmtpOptions {
            delay_secs: 2.0,
            ..SmtpOptions::default()
        },
    );
    let db = TestDb::new(Kind::Sqlite).await;
    let platform = FakePlatform::start().await.expect("platform");
    platform.set("tok_SECRET_acme", Behaviour::Revoked);
    let connections = [Conn {
        id: "acme",
        platform: "makini",
        token_file: token_file(db.path(), "acme", "tok_SECRET_acme"),
    }];
    let mut text = config_text(
        &db.url,
        &[("makini", platform.base_url())],
        &connections,
        "",
    );
    text.push_str(&email_section(smtp.port, "staff = []\ntimeout = \"4s\""));
    let config = db.path().join("connwatch.toml");
    std::fs::write(&config, &text).expect("config");
    let spawn = || {
        crate::helpers::process::Daemon(
            std::process::Command::new(env!("CARGO_BIN_EXE_connwatch"))
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
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = restarted.kill();
    let _ = restarted.wait();
    let messages = smtp.messages();
    assert_eq!(messages.len(), 2, "a duplicate at most, never a loss");
    assert_eq!(
        messages[0].header("Message-ID"),
        messages[1].header("Message-ID"),
        "the same Message-ID"
    );
    let store = connwatch::store::Store::connect(&db.url, 1)
        .await
        .expect("store");
    let states = store
        .emails_of(&ConnectionId::parse("acme").expect("id"))
        .await
        .expect("emails");
    assert!(
        states
            .iter()
            .any(|(kind, _, _, state)| kind == "reauth_required" && state == "sent"),
        "{states:?}"
    );
}

#[tokio::test]
async fn the_daily_digest_lists_open_incidents_once_per_local_date() {
    let folder = tempfile::tempdir().expect("dir");
    let smtp = SmtpServer::start(folder.path(), SmtpOptions::default());
    let setup = setup(Kind::Sqlite, 2, smtp.port, "hold = \"30s\"").await;
    let running = &setup.running;
    let now = crate::helpers::now_millis();
    assert!(
        !running
            .store
            .enqueue_daily_digest("2026-11-28", now)
            .await
            .expect("digest"),
        "nothing open, no digest"
    );
    wait_health(running, "acme", Health::Healthy, 5).await;
    setup.platform.set("tok_SECRET_acme", Behaviour::Revoked);
    wait_health(running, "acme", Health::NeedsReauth, 5).await;
    // The cron job calls this every minute after the configured local time; repeats (and
    // other replicas) enqueue nothing more for the same date.
    for _ in 0..3 {
        running
            .store
            .enqueue_daily_digest("2026-11-28", now)
            .await
            .expect("digest");
    }
    eventually(Duration::from_secs(10), "the digest", || async {
        (!smtp.messages().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    setup.running.shutdown().await;
}
