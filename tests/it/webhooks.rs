//! Webhooks, quiet detection, the polling fallback and the relay, end to end over real HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use connwatch::demo::platform::Behaviour;
use connwatch::domain::{Health, Outcome};
use connwatch::webhook::verify::{
    decode_standard_secret, sign_hex, sign_standard, verify_standard,
};

use crate::helpers::{
    Kind, NANGO_SECRET, RELAY_SECRET, TestApp, WEBHOOK_SECRET as SECRET, both_backends, eventually,
    now_millis, test_app, token_of,
};

type Headers = Vec<(&'static str, String)>;
/// A delivery of the contract: what it is, its headers and body, the expected status.
type Case = (&'static str, Headers, String, u16);

fn signed(id: &str, timestamp: i64, body: &str, secret: &str) -> Headers {
    let key = decode_standard_secret(secret).expect("secret");
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            sign_standard(&key, id, timestamp, body.as_bytes()),
        ),
    ]
}

async fn deliver(
    client: &reqwest::Client,
    app: &TestApp,
    platform: &str,
    headers: Vec<(&'static str, String)>,
    body: String,
) -> (u16, String) {
    let url = format!(
        "http://{}/webhooks/{platform}",
        app.webhook_addr.expect("webhook listener")
    );
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("deliver");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

fn change_event(remote: &str, change_id: &str, updated_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(updated_ms as u64);
    serde_json::json!({
        "type": "record.updated",
        "connectionId": remote,
        "data": {"id": change_id, "_updatedAt": humantime::format_rfc3339_millis(time).to_string()},
    })
    .to_string()
}

/// Deliveries signed at `now` (seconds) and what each must be answered: a valid one, a
/// duplicate, tampered, wrongly signed, stale, future, unsigned, malformed, unknown.
fn contract_cases(now: i64, body: &str) -> Vec<Case> {
    let body = body.to_owned();
    vec![
        (
            "valid",
            signed("msg_1", now, &body, SECRET),
            body.clone(),
            200,
        ),
        (
            "duplicate",
            signed("msg_1", now, &body, SECRET),
            body.clone(),
            200,
        ),
        (
            "tampered body",
            signed("msg_2", now, &body, SECRET),
            body.replace("rec_1", "rec_9"),
            401,
        ),
        (
            "wrong secret",
            signed("msg_3", now, &body, RELAY_SECRET),
            body.clone(),
            401,
        ),
        (
            "stale timestamp",
            signed("msg_4", now - 400, &body, SECRET),
            body.clone(),
            401,
        ),
        (
            "future timestamp",
            signed("msg_5", now + 400, &body, SECRET),
            body.clone(),
            401,
        ),
        ("missing headers", Vec::new(), body.clone(), 401),
        (
            "not json",
            signed("msg_6", now, "{nope", SECRET),
            "{nope".into(),
            400,
        ),
        (
            "no connection field",
            signed("msg_7", now, "{\"type\":\"x\"}", SECRET),
            "{\"type\":\"x\"}".into(),
            400,
        ),
        (
            "unknown connection",
            signed("msg_8", now, &change_event("conn_nobody", "r", 1), SECRET),
            change_event("conn_nobody", "r", 1),
            202,
        ),
    ]
}

#[tokio::test]
async fn deliveries_are_verified_and_answered_as_the_contract_says() {
    let app = test_app(Kind::Sqlite).webhooks("").spawn().await;
    let client = reqwest::Client::new();
    let now = now_millis() / 1000;
    let body = change_event("conn_acme", "rec_1", now_millis());
    for (case, headers, body, expected) in contract_cases(now, &body) {
        let (status, answer) = deliver(&client, &app, "makini", headers, body).await;
        assert_eq!(status, expected, "{case}: {answer}");
    }
    let large = format!(
        "{{\"connectionId\":\"conn_acme\",\"pad\":\"{}\"}}",
        "x".repeat(5000)
    );
    let (status, _) = deliver(
        &client,
        &app,
        "makini",
        signed("msg_9", now, &large, SECRET),
        large.clone(),
    )
    .await;
    assert_eq!(status, 413, "over webhook_max_bytes");

    let store = &app.running.store;
    assert!(store.webhook_stored("makini", "msg_1").await.expect("read"));
    assert!(
        store.webhook_stored("makini", "msg_8").await.expect("read"),
        "unknown connections are stored"
    );
    assert!(!store.webhook_stored("makini", "msg_2").await.expect("read"));
    for (result, count) in [
        ("accepted", 1.0),
        ("duplicate", 1.0),
        ("bad_signature", 5.0),
        ("malformed", 2.0),
        ("too_large", 1.0),
        ("unknown_connection", 1.0),
    ] {
        let needle =
            format!("connwatch_webhooks_received_total{{platform=\"makini\",result=\"{result}\"}}");
        assert_eq!(app.metric(&needle).await, count, "{result}");
    }
    let acme = app.summary("acme").await.expect("acme");
    assert!(acme.last_webhook_at.is_some(), "activity recorded");
    app.shutdown().await;
}

#[tokio::test]
async fn hex_hmac_signatures_are_verified_for_platforms_that_use_them() {
    let app = test_app(Kind::Sqlite).webhooks("").spawn().await;
    let client = reqwest::Client::new();
    let body = "{\"connectionId\":\"conn_acme\",\"type\":\"sync\"}".to_owned();
    let good = sign_hex(NANGO_SECRET.as_bytes(), body.as_bytes());
    let (status, _) = deliver(
        &client,
        &app,
        "nango",
        vec![("x-nango-hmac-sha256", good)],
        body.clone(),
    )
    .await;
    assert_eq!(
        status, 202,
        "verified; conn_acme is a makini connection, so unknown here"
    );
    let bad = sign_hex(b"another-secret-entirely-123", body.as_bytes());
    let (status, _) = deliver(
        &client,
        &app,
        "nango",
        vec![("x-nango-hmac-sha256", bad)],
        body,
    )
    .await;
    assert_eq!(status, 401);
    app.shutdown().await;
}

#[tokio::test]
async fn a_thousand_concurrent_deliveries_of_a_hundred_ids_store_exactly_a_hundred() {
    let app = test_app(Kind::Sqlite).webhooks("").spawn().await;
    let client = reqwest::Client::new();
    let now = now_millis() / 1000;
    let mut tasks = Vec::new();
    for attempt in 0..1000 {
        let id = format!("msg_{}", attempt % 100);
        let body = change_event(
            "conn_acme",
            &format!("rec_{}", attempt % 100),
            1_000 + (attempt % 100) as i64,
        );
        let headers = signed(&id, now, &body, SECRET);
        let client = client.clone();
        let url = format!(
            "http://{}/webhooks/makini",
            app.webhook_addr.expect("listener")
        );
        tasks.push(tokio::spawn(async move {
            let mut request = client.post(url).body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request.send().await.expect("send").status().as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert_eq!(
        app.running
            .store
            .webhook_count("makini")
            .await
            .expect("count"),
        100
    );
    assert_eq!(
        app.metric("connwatch_webhooks_received_total{platform=\"makini\",result=\"accepted\"}")
            .await,
        100.0
    );
    assert_eq!(
        app.metric("connwatch_webhooks_received_total{platform=\"makini\",result=\"duplicate\"}")
            .await,
        900.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_reauth_webhook_moves_the_connection_to_needs_reauth_and_triggers_a_probe() {
    let app = test_app(Kind::Sqlite).webhooks("").spawn().await;
    let token = token_of("acme");
    app.wait_health("acme", Health::Healthy).await;
    app.platform.set(&token, Behaviour::Revoked);
    let before = app.platform.requests(&token);
    let body = serde_json::json!({"type": "connection.reauthorization_required", "connectionId": "conn_acme"}).to_string();
    let now = now_millis() / 1000;
    let (status, _) = deliver(
        &reqwest::Client::new(),
        &app,
        "makini",
        signed("msg_r", now, &body, SECRET),
        body,
    )
    .await;
    assert_eq!(status, 200);
    let detail = app.detail("acme").await;
    assert_eq!(
        detail.summary.health,
        Health::NeedsReauth,
        "at once, before any probe"
    );
    assert_eq!(detail.transitions[0].cause, "webhook");
    eventually(Duration::from_secs(3), "a confirming probe", || async {
        (app.platform.requests(&token) > before).then_some(())
    })
    .await;
    app.shutdown().await;
}

/// Receives relayed changes, checks their signatures, can refuse the first N.
struct RelayReceiver {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<HashMap<String, u32>>>,
    refuse: Arc<Mutex<u32>>,
}

impl RelayReceiver {
    async fn start() -> RelayReceiver {
        let received = Arc::new(Mutex::new(HashMap::new()));
        let refuse = Arc::new(Mutex::new(0));
        let key = decode_standard_secret(RELAY_SECRET).expect("secret");
        let (sink, refusals) = (received.clone(), refuse.clone());
        let router = axum::Router::new().route(
            "/recovered",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (sink, refusals, key) = (sink.clone(), refusals.clone(), key.clone());
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let verified = verify_standard(
                        &[key],
                        header("webhook-id").as_deref(),
                        header("webhook-timestamp").as_deref(),
                        header("webhook-signature").as_deref(),
                        &body,
                        now_millis() / 1000,
                    );
                    if verified.is_err() {
                        return axum::http::StatusCode::UNAUTHORIZED;
                    }
                    {
                        let mut refusals = refusals.lock().expect("lock");
                        if *refusals > 0 {
                            *refusals -= 1;
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                    }
                    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
                    let change = json["change_id"].as_str().expect("change id").to_owned();
                    *sink.lock().expect("lock").entry(change).or_default() += 1;
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        RelayReceiver {
            addr,
            received,
            refuse,
        }
    }

    fn received(&self) -> HashMap<String, u32> {
        self.received.lock().expect("lock").clone()
    }
}

/// Delivers a signed webhook (id `msg_CHANGE`) of acme's change `change`, updated at
/// `updated_ms`; returns the status.
async fn deliver_change(
    client: &reqwest::Client,
    app: &TestApp,
    change: &str,
    updated_ms: i64,
) -> u16 {
    let body = change_event("conn_acme", change, updated_ms);
    let headers = signed(&format!("msg_{change}"), now_millis() / 1000, &body, SECRET);
    deliver(client, app, "makini", headers, body).await.0
}

/// The `modified_after` time of a recent-changes query.
fn since(query: &str) -> i64 {
    let url = reqwest::Url::parse(&format!("http://x/?{query}")).expect("url");
    let (_, value) = url.query_pairs().next().expect("param");
    connwatch::domain::time::parse_rfc3339(&value).expect("time")
}

/// Exactly the `expected` changes were relayed, each once.
fn assert_relayed_once(received: &HashMap<String, u32>, expected: &[&str]) {
    let mut changes: Vec<_> = received.keys().cloned().collect();
    changes.sort();
    assert_eq!(
        changes, expected,
        "exactly the changes no webhook delivered"
    );
    assert!(
        received.values().all(|count| *count == 1),
        "each relayed once: {received:?}"
    );
}

/// A webhook (change c7, updated at `updated_ms`) ends acme's quiet period; both show
/// in its transitions.
async fn assert_a_webhook_ends_the_quiet_period(
    client: &reqwest::Client,
    app: &TestApp,
    updated_ms: i64,
) {
    assert_eq!(deliver_change(client, app, "c7", updated_ms).await, 200);
    let summary = app.summary("acme").await.expect("acme");
    assert!(!summary.quiet);
    let causes: Vec<String> = app
        .detail("acme")
        .await
        .transitions
        .iter()
        .map(|t| t.cause.clone())
        .collect();
    assert!(
        causes.contains(&"quiet".to_owned()) && causes.contains(&"webhooks_resumed".to_owned()),
        "{causes:?}"
    );
}

async fn a_quiet_connection_is_polled_and_missed_changes_are_relayed_once(kind: Kind) {
    let relay = RelayReceiver::start().await;
    *relay.refuse.lock().expect("lock") = 1;
    let app = test_app(kind)
        .webhooks(
            "expected_interval = \"1s\"\ngrace = \"500ms\"\npoll_interval = \"1s\"\noverlap = \"1s\"",
        )
        .relay(&format!("http://{}/recovered", relay.addr))
        .spawn()
        .await;
    let client = reqwest::Client::new();
    let token = token_of("acme");
    let base = now_millis();
    // Webhooks delivered c1 and c2; the platform also has c3..c6 that no webhook brought.
    for (index, change) in ["c1", "c2"].iter().enumerate() {
        assert_eq!(
            deliver_change(&client, &app, change, base + index as i64).await,
            200
        );
    }
    for (index, change) in ["c1", "c2", "c3", "c4", "c5", "c6"].iter().enumerate() {
        app.platform.add_change(&token, change, base + index as i64);
    }
    // The third page fails: pagination is interrupted mid-way; then the daemon restarts.
    app.platform.fail_from_page(Some(2));
    eventually(
        Duration::from_secs(10),
        "a quiet poll reaching page 3",
        || async {
            (app.platform
                .change_queries()
                .iter()
                .any(|query| query.contains("cursor=4")))
            .then_some(())
        },
    )
    .await;
    let summary = app.summary("acme").await.expect("acme");
    assert!(summary.quiet, "quiet after expected interval + grace");
    let first = app.platform.change_queries()[0].clone();
    assert!(first.starts_with("modified_after="), "{first}");
    assert_eq!(
        since(&first),
        base + 1 - 1000,
        "from the watermark (newest webhook change) less the overlap"
    );
    let fixture = app.stop().await;
    let queries_before_restart = fixture.platform.change_queries().len();

    fixture.platform.fail_from_page(None);
    let restarted = fixture.start().await;
    // Every missed change relayed and recorded: none can be relayed again.
    eventually(
        Duration::from_secs(15),
        "every missed change relayed",
        || async {
            let (pending, _) = restarted.running.store.relay_counts().await.ok()?;
            (relay.received().len() == 4 && pending == 0).then_some(())
        },
    )
    .await;
    assert_relayed_once(&relay.received(), &["c3", "c4", "c5", "c6"]);
    let resumed = &restarted.platform.change_queries()[queries_before_restart];
    assert!(
        resumed.contains("cursor=4") && resumed.contains(&first),
        "resumed from the stored cursor: {resumed}"
    );
    let summary = restarted.summary("acme").await.expect("acme");
    assert!(
        summary.watermark.expect("watermark") >= base + 5,
        "watermark moved to the newest change"
    );
    assert_a_webhook_ends_the_quiet_period(&client, &restarted, base + 10).await;
    restarted.shutdown().await;
}

both_backends!(a_quiet_connection_is_polled_and_missed_changes_are_relayed_once);

#[tokio::test]
async fn an_auth_failure_while_polling_counts_as_an_auth_failure_of_the_connection() {
    // Probes are an hour apart, so the revoked token is first met by a poll.
    let app = test_app(Kind::Sqlite)
        .webhooks("expected_interval = \"1s\"\ngrace = \"200ms\"\npoll_interval = \"1s\"")
        .probe_interval("1h")
        .spawn()
        .await;
    app.platform.set(&token_of("acme"), Behaviour::Revoked);
    eventually(Duration::from_secs(8), "a failed poll", || async {
        let failed = app
            .metric("connwatch_polls_total{platform=\"makini\",result=\"auth_failed\"}")
            .await;
        (failed >= 1.0).then_some(())
    })
    .await;
    // The poll's auth failure counted as the first of the streak; the confirming probe
    // (confirm_after) makes it the second: needs_reauth long before the hourly probe.
    app.wait_health("acme", Health::NeedsReauth).await;
    let detail = app.detail("acme").await;
    assert!(
        detail
            .probes
            .iter()
            .filter(|probe| probe.outcome == Outcome::AuthFailed)
            .count()
            >= 2,
        "the poll's failure is recorded like a probe's"
    );
    app.shutdown().await;
}
