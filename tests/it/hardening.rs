//! Hostile input and careless platforms: what the user sees must hold up.

use std::time::Duration;

use connwatch::demo::platform::Behaviour;
use connwatch::domain::Health;
use connwatch::rules::changes::CLOCK_SKEW;
use connwatch::store::{Store, WebhookDelivery};

use crate::helpers::{Kind, TestDb, both_backends, eventually, spawn_app, test_app, token_of};

#[tokio::test]
async fn a_token_echoed_by_the_platform_reaches_no_answer_email_or_database_row() {
    let app = test_app(Kind::Sqlite).email("").spawn().await;
    let token = token_of("acme");
    app.wait_health("acme", Health::Healthy).await;
    app.platform.set(&token, Behaviour::EchoesToken);
    app.wait_health("acme", Health::NeedsReauth).await;
    eventually(
        Duration::from_secs(10),
        "the reauthorization emails",
        || async { (app.smtp().messages().len() >= 2).then_some(()) },
    )
    .await;
    let client = reqwest::Client::new();
    let detail = client
        .get(format!("http://{}/api/v1/connections/acme", app.admin_addr))
        .send()
        .await
        .expect("detail")
        .text()
        .await
        .expect("body");
    assert!(
        detail.contains("[redacted]"),
        "the echo is visible, redacted: {detail}"
    );
    assert!(!detail.contains(&token), "API answer: {detail}");
    for message in app.smtp().messages() {
        assert!(!message.raw.contains(&token), "email: {}", message.raw);
    }
    // The database in clear: the SQLite file and its WAL, byte for byte.
    let mut stored = Vec::new();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", app.db.path().join("connwatch.db").display());
        stored.extend(std::fs::read(&path).unwrap_or_default());
    }
    assert!(!stored.is_empty(), "the database file was read");
    let needle = token.as_bytes();
    assert!(
        !stored.windows(needle.len()).any(|window| window == needle),
        "the token is in the database file"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_admin_listener_refuses_browser_requests_and_foreign_hosts() {
    let app = spawn_app(Kind::Sqlite).await;
    app.wait_health("acme", Health::Healthy).await;
    let client = reqwest::Client::new();
    let pause = format!("http://{}/api/v1/connections/acme/pause", app.admin_addr);
    // A page on another site submitting a form to the loopback listener.
    let form = client
        .post(&pause)
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("x=1")
        .send()
        .await
        .expect("form post");
    assert_eq!(form.status(), 403);
    let fetch = client
        .post(&pause)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .expect("cross-site fetch");
    assert_eq!(fetch.status(), 403);
    // DNS rebinding: the page's own name resolving to 127.0.0.1.
    let rebound = client
        .get(format!("http://{}/api/v1/connections", app.admin_addr))
        .header("host", "evil.example")
        .send()
        .await
        .expect("rebound");
    assert_eq!(rebound.status(), 421);
    assert_eq!(
        app.health("acme").await,
        Some(Health::Healthy),
        "nothing paused"
    );
    // A tool (curl, a script) still can.
    let tool = client.post(&pause).send().await.expect("tool post");
    assert_eq!(tool.status(), 200);
    assert_eq!(app.health("acme").await, Some(Health::Paused));
    app.shutdown().await;
}

#[tokio::test]
async fn a_manual_probe_of_a_broken_connection_waits_for_the_circuit_breaker() {
    let app = test_app(Kind::Sqlite).manual_clock().spawn().await;
    let token = token_of("acme");
    app.advance(Duration::from_secs(1));
    app.wait_health("acme", Health::Healthy).await;
    app.platform.set(&token, Behaviour::Revoked);
    app.advance(Duration::from_secs(1));
    app.wait_health("acme", Health::Degraded).await;
    app.advance(Duration::from_millis(200));
    app.wait_health("acme", Health::NeedsReauth).await;
    let logins = app.platform.requests(&token);
    let client = reqwest::Client::new();
    let probe = |force: bool| {
        let url = format!(
            "http://{}/api/v1/connections/acme/probe{}",
            app.admin_addr,
            if force { "?force=true" } else { "" }
        );
        let client = client.clone();
        async move { client.post(url).send().await.expect("probe") }
    };
    for _ in 0..5 {
        let refused = probe(false).await;
        assert_eq!(refused.status(), 429);
        let wait: u64 = refused.headers()["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!((1..=900).contains(&wait), "{wait}");
    }
    assert_eq!(
        app.platform.requests(&token),
        logins,
        "no login with the dead token"
    );
    assert_eq!(probe(true).await.status(), 200, "forced once");
    assert_eq!(probe(true).await.status(), 429, "not twice a minute");
    assert_eq!(app.platform.requests(&token), logins + 1);
    app.shutdown().await;
}

async fn a_far_future_change_time_moves_the_watermark_no_further_than_now(kind: Kind) {
    let db = TestDb::new(kind).await;
    let store = Store::connect(&db.url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    let id = connwatch::domain::ConnectionId::parse("a").expect("id");
    let connection = connwatch::store::SyncConnection {
        id: &id,
        name: "A",
        platform: "makini",
        remote_id: Some("conn_a"),
        paused: false,
        first_due: 0,
        contacts: Vec::new(),
        reconnect_url: None,
        expected_webhook_ms: Some(60_000),
    };
    store
        .sync_connections(&[connection], 0)
        .await
        .expect("sync");
    let received = 1_764_800_000_000;
    let year_2999 = 32_503_680_000_000;
    let delivery = WebhookDelivery {
        platform: "makini".into(),
        webhook_id: "msg_future".into(),
        received_at: received,
        remote_id: "conn_a".into(),
        event_type: Some("record.updated".into()),
        change_id: Some("rec_1".into()),
        change_updated: Some(year_2999),
        reauth: false,
        reconnected: false,
        body: "{}".into(),
    };
    let rules = connwatch::rules::Rules {
        probe: connwatch::rules::Policy {
            failure_threshold: 2,
            unreachable_threshold: 3,
            confirm_after: 1_000,
            reauth_backoff: 60_000,
        },
        mail: None,
        storm: None,
    };
    store
        .record_webhooks(&[delivery], &rules)
        .await
        .expect("record");
    let listed = store.list_connections().await.expect("list");
    assert_eq!(listed[0].watermark, Some(received + CLOCK_SKEW));
    store.close().await;
    db.drop_postgres().await;
}

both_backends!(a_far_future_change_time_moves_the_watermark_no_further_than_now);
