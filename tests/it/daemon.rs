//! The daemon in-process against a fake platform over real HTTP and a real database.

use std::time::Duration;

use connwatch::app::{self, Hooks};
use connwatch::demo::platform::Behaviour;
use connwatch::domain::{Health, Outcome};

use crate::helpers::{Kind, eventually, now_millis, spawn_app, test_app, token_of};

#[tokio::test]
async fn a_credential_change_becomes_needs_reauth_after_exactly_the_threshold() {
    let app = test_app(Kind::Sqlite)
        .connections(["acme", "other"])
        .manual_clock()
        .spawn()
        .await;
    let token = token_of("acme");
    // Every connection's first slot falls within one interval (1 s).
    app.advance(Duration::from_secs(1));
    app.wait_health("acme", Health::Healthy).await;
    let before = app.platform.requests(&token);
    app.platform.set(&token, Behaviour::Revoked);
    // The next slot fails; the failure is confirmed after confirm_after (200 ms).
    app.advance(Duration::from_secs(1));
    app.wait_health("acme", Health::Degraded).await;
    app.advance(Duration::from_millis(200));
    app.wait_health("acme", Health::NeedsReauth).await;
    assert_eq!(
        app.platform.requests(&token) - before,
        2,
        "failure_threshold = 2 auth failures, then no more probes"
    );
    assert_eq!(
        app.transitions("acme").await,
        vec![
            (Health::Unknown, Health::Healthy),
            (Health::Healthy, Health::Degraded),
            (Health::Degraded, Health::NeedsReauth),
        ]
    );
    let acme = app.summary("acme").await.expect("acme");
    let incident = acme.open_incident.expect("incident");
    assert_eq!(
        incident.error_code.as_deref(),
        Some("AUTHENTICATION_FAILED")
    );
    assert!(
        incident
            .request_id
            .as_deref()
            .is_some_and(|id| id.starts_with("req_"))
    );
    // The circuit breaker holds: 14 minutes on, long past the 1 s interval but within
    // reauth_backoff (15 min), the dead token is not used again.
    app.advance(Duration::from_secs(14 * 60));
    app.wait_for_scheduler_turns(3).await;
    assert_eq!(app.platform.requests(&token) - before, 2);
    assert_eq!(app.health("other").await, Some(Health::Healthy));
    // Once the backoff is over, the connection is probed again.
    app.advance(Duration::from_secs(2 * 60));
    eventually(
        Duration::from_secs(5),
        "a probe after the backoff",
        || async { (app.platform.requests(&token) - before == 3).then_some(()) },
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_rotated_token_file_is_probed_at_once_and_recovers() {
    let app = spawn_app(Kind::Sqlite).await;
    app.wait_health("acme", Health::Healthy).await;
    app.platform.set(&token_of("acme"), Behaviour::Revoked);
    app.wait_health("acme", Health::NeedsReauth).await;
    app.rotate_token("acme");
    // reauth_backoff is 15 minutes: only the rotation can bring it back this soon.
    app.wait_health("acme", Health::Healthy).await;
    let detail = app.detail("acme").await;
    assert_eq!(detail.incidents.len(), 1);
    assert!(
        detail.incidents[0].closed_at.is_some(),
        "the incident is closed"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_storm_of_server_errors_is_an_outage_not_a_credential_change() {
    let app = spawn_app(Kind::Sqlite).await;
    app.wait_health("acme", Health::Healthy).await;
    app.platform.set(&token_of("acme"), Behaviour::ServerError);
    app.wait_health("acme", Health::Unreachable).await;
    // Two more server errors stored on top of those that made it unreachable.
    let server_errors = "connwatch_probes_total{outcome=\"server_error\",platform=\"makini\"}";
    let counted = app.metric(server_errors).await;
    eventually(Duration::from_secs(10), "two more probes", || async {
        (app.metric(server_errors).await >= counted + 2.0).then_some(())
    })
    .await;
    let acme = app.summary("acme").await.expect("acme");
    assert_eq!(acme.health, Health::Unreachable);
    assert_eq!(acme.last_outcome, Some(Outcome::ServerError));
    assert!(
        !app.transitions("acme")
            .await
            .iter()
            .any(|(_, to)| *to == Health::NeedsReauth),
        "5xx never counts as an auth failure"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_not_taken_for_revoked_credentials() {
    let fixture = test_app(Kind::Sqlite).prepare().await;
    fixture.platform.set(&token_of("acme"), Behaviour::Redirect);
    let app = fixture.start().await;
    let acme = eventually(Duration::from_secs(5), "a probe", || async {
        app.summary("acme")
            .await
            .filter(|acme| acme.last_outcome.is_some())
    })
    .await;
    assert_eq!(acme.last_outcome, Some(Outcome::InvalidResponse));
    assert_eq!(acme.last_status, Some(302));
    assert!(
        acme.last_message
            .as_deref()
            .unwrap_or_default()
            .contains("redirect")
    );
    assert_ne!(acme.health, Health::NeedsReauth);
    app.shutdown().await;
}

#[tokio::test]
async fn a_hanging_platform_does_not_delay_another_platforms_probes() {
    let slow: Vec<String> = (0..6).map(|n| format!("slow{n}")).collect();
    let fixture = test_app(Kind::Sqlite)
        .connections_on("slow", &slow)
        .connections_on("fast", ["fast"])
        .probe_setting("concurrency = 4")
        .prepare()
        .await;
    for id in &slow {
        fixture.platform.set(&token_of(id), Behaviour::Hang);
    }
    let app = fixture.start().await;
    let started = now_millis();
    // The slow platform may use at most half of the 4 slots; the fast one keeps its pace:
    // a probe every 1 s interval, three within the first 4 s.
    let fast = eventually(Duration::from_secs(10), "three fast probes", || async {
        let times = app.platform.request_times(&token_of("fast"));
        (times.len() >= 3).then_some(times)
    })
    .await;
    assert!(
        fast[2] <= started + 4_000,
        "one probe per 1 s interval expected; they came after {:?} ms",
        fast.iter().map(|at| at - started).collect::<Vec<_>>()
    );
    // What the user sees of the slow platform: its probes time out (timeout 500 ms).
    let slow0 = eventually(Duration::from_secs(10), "a slow probe stored", || async {
        app.summary("slow0")
            .await
            .filter(|summary| summary.last_outcome.is_some())
    })
    .await;
    assert_eq!(slow0.last_outcome, Some(Outcome::Timeout));
    app.shutdown().await;
}

#[tokio::test]
async fn rate_limits_are_honoured_with_retry_after() {
    let app = test_app(Kind::Sqlite).manual_clock().spawn().await;
    let token = token_of("acme");
    app.platform.set(&token, Behaviour::RateLimited(30));
    app.advance(Duration::from_secs(1));
    let acme = eventually(Duration::from_secs(5), "a throttled probe", || async {
        app.summary("acme")
            .await
            .filter(|acme| acme.last_outcome.is_some())
    })
    .await;
    assert_eq!(app.platform.requests(&token), 1);
    assert_eq!(acme.last_outcome, Some(Outcome::RateLimited));
    assert!(acme.next_due >= acme.last_probe_at.unwrap_or_default() + 29_000);
    // 28 s on: long past the 1 s interval, still within Retry-After.
    app.advance(Duration::from_secs(28));
    app.wait_for_scheduler_turns(3).await;
    assert_eq!(
        app.platform.requests(&token),
        1,
        "Retry-After: 30 is honoured"
    );
    // Once Retry-After has passed, the connection is probed again.
    app.advance(Duration::from_secs(3));
    eventually(
        Duration::from_secs(5),
        "the probe after Retry-After",
        || async { (app.platform.requests(&token) == 2).then_some(()) },
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn health_and_history_survive_a_restart() {
    let fixture = test_app(Kind::Postgres).manual_clock().prepare().await;
    let token = token_of("acme");
    fixture.platform.set(&token, Behaviour::Revoked);
    let app = fixture.start().await;
    // The first slot fails; confirm_after (200 ms) later, the second failure.
    app.advance(Duration::from_secs(1));
    app.wait_health("acme", Health::Degraded).await;
    app.advance(Duration::from_millis(200));
    app.wait_health("acme", Health::NeedsReauth).await;
    let fixture = app.stop().await;
    let probes_before = fixture.platform.requests(&token);

    let restarted = fixture.start().await;
    let acme = restarted.summary("acme").await.expect("acme");
    assert_eq!(acme.health, Health::NeedsReauth);
    assert!(acme.open_incident.is_some());
    // 14 minutes on, long past the 1 s interval: the 15-minute backoff still holds.
    restarted.advance(Duration::from_secs(14 * 60));
    restarted.wait_for_scheduler_turns(3).await;
    assert_eq!(
        restarted.platform.requests(&token),
        probes_before,
        "the backoff survives the restart"
    );
    restarted.advance(Duration::from_secs(2 * 60));
    eventually(
        Duration::from_secs(5),
        "a probe after the backoff",
        || async { (restarted.platform.requests(&token) == probes_before + 1).then_some(()) },
    )
    .await;
    restarted.shutdown().await;
}

#[tokio::test]
async fn a_second_daemon_on_the_same_sqlite_file_is_refused() {
    let app = spawn_app(Kind::Sqlite).await;
    let refused = app::start(app.parsed_config(), Hooks::default()).await;
    let message = format!("{:#}", refused.err().expect("a second daemon is refused"));
    assert!(
        message.contains("another `connwatch run` uses")
            && message.contains("replicas share PostgreSQL"),
        "{message}"
    );
    // The one-shot commands still read and write beside the daemon.
    assert_eq!(
        app::open_store(&app.parsed_config())
            .await
            .expect("open")
            .list_connections()
            .await
            .expect("list")
            .len(),
        1
    );
    let fixture = app.stop().await;
    let again = app::start(fixture.parsed_config(), Hooks::default())
        .await
        .expect("the lock is released at shutdown");
    again.shutdown().await;
}

#[tokio::test]
async fn readyz_fails_when_the_store_goes_away() {
    let app = spawn_app(Kind::Postgres).await;
    let url = format!("http://{}/readyz", app.admin_addr);
    let client = reqwest::Client::new();
    let ready = client.get(&url).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
    app.db.drop_postgres().await;
    let status = eventually(Duration::from_secs(15), "readyz to fail", || async {
        let status = client.get(&url).send().await.ok()?.status();
        (status == 503).then_some(status)
    })
    .await;
    assert_eq!(status, 503);
    let healthz = client
        .get(format!("http://{}/healthz", app.admin_addr))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), 200, "the process itself is alive");
    app.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_lists_details_and_probes_connections() {
    let app = spawn_app(Kind::Sqlite).await;
    let base = format!("http://{}", app.admin_addr);
    let client = reqwest::Client::new();
    app.wait_health("acme", Health::Healthy).await;
    let list: serde_json::Value = client
        .get(format!("{base}/api/v1/connections"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["connections"][0]["id"], "acme");
    assert_eq!(list["connections"][0]["health"], "healthy");
    assert!(
        list["connections"][0]["health_since"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "RFC 3339 UTC"
    );
    let missing = client
        .get(format!("{base}/api/v1/connections/nobody"))
        .send()
        .await
        .expect("detail");
    assert_eq!(missing.status(), 404);
    app.platform.set(&token_of("acme"), Behaviour::Revoked);
    let probed: serde_json::Value = client
        .post(format!("{base}/api/v1/connections/acme/probe"))
        .send()
        .await
        .expect("probe")
        .json()
        .await
        .expect("json");
    assert_eq!(probed["outcome"], "auth_failed");
    assert_eq!(probed["error_code"], "AUTHENTICATION_FAILED");
    let detail: serde_json::Value = client
        .get(format!("{base}/api/v1/connections/acme"))
        .send()
        .await
        .expect("detail")
        .json()
        .await
        .expect("json");
    assert_eq!(detail["probes"][0]["outcome"], "auth_failed");
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "connwatch_connections{health=\"healthy\"}",
        "connwatch_probes_total{outcome=\"auth_failed\",platform=\"makini\"} 1",
        "connwatch_probe_duration_seconds_bucket",
        "connwatch_scheduler_last_tick_timestamp_seconds",
        "connwatch_build_info{version=",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_platform_rate_limit_caps_the_requests_per_second() {
    let ids: Vec<String> = (0..20).map(|n| format!("c{n}")).collect();
    let app = test_app(Kind::Sqlite)
        .connections(&ids)
        .platform_setting("rate_limit = 4")
        .spawn()
        .await;
    let started = now_millis();
    // Until the first request past the first 3 s: then every request of those 3 s is in.
    let times = eventually(Duration::from_secs(15), "19 requests", || async {
        let mut times: Vec<i64> = ids
            .iter()
            .flat_map(|id| app.platform.request_times(&token_of(id)))
            .collect();
        times.sort_unstable();
        (times.len() >= 19).then_some(times)
    })
    .await;
    app.shutdown().await;
    let served = times.iter().filter(|at| **at < started + 3_000).count();
    // 20 connections every second would be 60 requests; 4 per second (burst 4) allows ~16.
    assert!(
        served <= 18,
        "rate limit not honoured: {served} requests in 3 s"
    );
    assert!(served >= 8, "probing continues under the cap: {served}");
}
