//! The daemon in-process against a fake platform over real HTTP and a real SQLite file.

use std::time::Duration;

use crate::helpers::{Conn, Kind, TestDb, config_text, eventually, parse, token_file};
use connwatch::app::{self, Hooks, Running};
use connwatch::demo::platform::{Behaviour, FakePlatform};
use connwatch::domain::{ConnectionId, Health, Outcome};
use connwatch::store::ConnectionSummary;

async fn summary(running: &Running, raw: &str) -> Option<ConnectionSummary> {
    let listed = running.store.list_connections().await.ok()?;
    listed
        .into_iter()
        .find(|connection| connection.id.as_str() == raw)
}

async fn wait_for_health(running: &Running, raw: &str, health: Health, limit: Duration) {
    eventually(limit, &format!("{raw} to become {health}"), || async {
        (summary(running, raw).await?.health == health).then_some(())
    })
    .await
}

async fn transitions(running: &Running, raw: &str) -> Vec<(Health, Health)> {
    let id = ConnectionId::parse(raw).expect("id");
    let detail = running
        .store
        .connection_detail(&id)
        .await
        .expect("read")
        .expect("exists");
    detail
        .transitions
        .iter()
        .rev()
        .map(|t| (t.from, t.to))
        .collect()
}

struct Setup {
    db: TestDb,
    platform: FakePlatform,
    running: Running,
}

async fn start_with(kind: Kind, ids: &[&str], extra_probe: &str) -> Setup {
    let db = TestDb::new(kind).await;
    let platform = FakePlatform::start().await.expect("platform");
    let connections: Vec<Conn> = ids
        .iter()
        .map(|id| {
            let token = format!("secret-token-{id}-v1");
            platform.set(&token, Behaviour::Healthy);
            Conn {
                id,
                platform: "makini",
                token_file: token_file(db.path(), id, &token),
            }
        })
        .collect();
    let text = config_text(
        &db.url,
        &[("makini", platform.base_url())],
        &connections,
        extra_probe,
    );
    let running = app::start(parse(&text), Hooks::default())
        .await
        .expect("start");
    Setup {
        db,
        platform,
        running,
    }
}

#[tokio::test]
async fn a_credential_change_becomes_needs_reauth_after_exactly_the_threshold() {
    let setup = start_with(Kind::Sqlite, &["acme", "other"], "").await;
    let running = &setup.running;
    wait_for_health(running, "acme", Health::Healthy, Duration::from_secs(5)).await;
    let before = setup.platform.requests("secret-token-acme-v1");
    setup
        .platform
        .set("secret-token-acme-v1", Behaviour::Revoked);
    wait_for_health(running, "acme", Health::NeedsReauth, Duration::from_secs(5)).await;
    assert_eq!(
        setup.platform.requests("secret-token-acme-v1") - before,
        2,
        "failure_threshold = 2 auth failures, then no more probes"
    );
    assert_eq!(
        transitions(running, "acme").await,
        vec![
            (Health::Unknown, Health::Healthy),
            (Health::Healthy, Health::Degraded),
            (Health::Degraded, Health::NeedsReauth),
        ]
    );
    let acme = summary(running, "acme").await.expect("acme");
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
    // The circuit breaker holds: no probe with the dead token for reauth_backoff (15 min).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(setup.platform.requests("secret-token-acme-v1") - before, 2);
    assert_eq!(
        summary(running, "other").await.expect("other").health,
        Health::Healthy
    );
    setup.running.shutdown().await;
}

#[tokio::test]
async fn a_rotated_token_file_is_probed_at_once_and_recovers() {
    let setup = start_with(Kind::Sqlite, &["acme"], "").await;
    let running = &setup.running;
    wait_for_health(running, "acme", Health::Healthy, Duration::from_secs(5)).await;
    setup
        .platform
        .set("secret-token-acme-v1", Behaviour::Revoked);
    wait_for_health(running, "acme", Health::NeedsReauth, Duration::from_secs(5)).await;
    setup
        .platform
        .set("secret-token-acme-v2", Behaviour::Healthy);
    token_file(setup.db.path(), "acme", "secret-token-acme-v2");
    // reauth_backoff is 15 minutes: only the rotation can bring it back this fast.
    wait_for_health(running, "acme", Health::Healthy, Duration::from_secs(3)).await;
    let id = ConnectionId::parse("acme").expect("id");
    let detail = running
        .store
        .connection_detail(&id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(detail.incidents.len(), 1);
    assert!(
        detail.incidents[0].closed_at.is_some(),
        "the incident is closed"
    );
    setup.running.shutdown().await;
}

#[tokio::test]
async fn a_storm_of_server_errors_is_an_outage_not_a_credential_change() {
    let setup = start_with(Kind::Sqlite, &["acme"], "").await;
    let running = &setup.running;
    wait_for_health(running, "acme", Health::Healthy, Duration::from_secs(5)).await;
    setup
        .platform
        .set("secret-token-acme-v1", Behaviour::ServerError);
    wait_for_health(running, "acme", Health::Unreachable, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acme = summary(running, "acme").await.expect("acme");
    assert_eq!(acme.health, Health::Unreachable);
    assert_eq!(acme.last_outcome, Some(Outcome::ServerError));
    assert!(
        !transitions(running, "acme")
            .await
            .iter()
            .any(|(_, to)| *to == Health::NeedsReauth),
        "5xx never counts as an auth failure"
    );
    setup.running.shutdown().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_not_taken_for_revoked_credentials() {
    let setup = start_with(Kind::Sqlite, &["acme"], "").await;
    let running = &setup.running;
    setup
        .platform
        .set("secret-token-acme-v1", Behaviour::Redirect);
    let acme = eventually(Duration::from_secs(5), "a probe", || async {
        summary(running, "acme")
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
    setup.running.shutdown().await;
}

#[tokio::test]
async fn a_hanging_platform_does_not_delay_another_platforms_probes() {
    let db = TestDb::new(Kind::Sqlite).await;
    let slow = FakePlatform::start().await.expect("platform");
    let fast = FakePlatform::start().await.expect("platform");
    let mut connections = Vec::new();
    let ids: Vec<String> = (0..6).map(|n| format!("slow{n}")).collect();
    for id in &ids {
        let token = format!("tok-{id}");
        slow.set(&token, Behaviour::Hang);
        connections.push(Conn {
            id,
            platform: "slow",
            token_file: token_file(db.path(), id, &token),
        });
    }
    fast.set("tok-fast", Behaviour::Healthy);
    connections.push(Conn {
        id: "fast",
        platform: "fast",
        token_file: token_file(db.path(), "fast", "tok-fast"),
    });
    let text = config_text(
        &db.url,
        &[("slow", slow.base_url()), ("fast", fast.base_url())],
        &connections,
        "concurrency = 4\n",
    );
    let running = app::start(parse(&text), Hooks::default())
        .await
        .expect("start");
    // The slow platform may use at most half of the 4 slots; the fast one keeps its pace.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let fast_probes = fast.requests("tok-fast");
    assert!(
        fast_probes >= 3,
        "one probe per 1 s interval expected, got {fast_probes}"
    );
    let slow_summary = summary(&running, "slow0").await.expect("slow0");
    assert!(matches!(
        slow_summary.last_outcome,
        None | Some(Outcome::Timeout)
    ));
    running.shutdown().await;
}

#[tokio::test]
async fn rate_limits_are_honoured_with_retry_after() {
    let setup = start_with(Kind::Sqlite, &["acme"], "").await;
    setup
        .platform
        .set("secret-token-acme-v1", Behaviour::RateLimited(30));
    eventually(Duration::from_secs(5), "a throttled probe", || async {
        (setup.platform.requests("secret-token-acme-v1") > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        setup.platform.requests("secret-token-acme-v1"),
        1,
        "Retry-After: 30 is honoured"
    );
    let acme = summary(&setup.running, "acme").await.expect("acme");
    assert_eq!(acme.last_outcome, Some(Outcome::RateLimited));
    assert!(acme.next_due >= acme.last_probe_at.unwrap_or_default() + 29_000);
    setup.running.shutdown().await;
}

/// One connection "acme" (token `tok-acme`) on a fake platform answering `behaviour`:
/// its database, the platform and the config text.
async fn one_connection(kind: Kind, behaviour: Behaviour) -> (TestDb, FakePlatform, String) {
    let db = TestDb::new(kind).await;
    let platform = FakePlatform::start().await.expect("platform");
    platform.set("tok-acme", behaviour);
    let connections = [Conn {
        id: "acme",
        platform: "makini",
        token_file: token_file(db.path(), "acme", "tok-acme"),
    }];
    let text = config_text(
        &db.url,
        &[("makini", platform.base_url())],
        &connections,
        "",
    );
    (db, platform, text)
}

#[tokio::test]
async fn health_and_history_survive_a_restart() {
    let (_db, platform, text) = one_connection(Kind::Postgres, Behaviour::Revoked).await;
    let running = app::start(parse(&text), Hooks::default())
        .await
        .expect("start");
    wait_for_health(
        &running,
        "acme",
        Health::NeedsReauth,
        Duration::from_secs(5),
    )
    .await;
    running.shutdown().await;
    let probes_before = platform.requests("tok-acme");

    let restarted = app::start(parse(&text), Hooks::default())
        .await
        .expect("restart");
    let acme = summary(&restarted, "acme").await.expect("acme");
    assert_eq!(acme.health, Health::NeedsReauth);
    assert!(acme.open_incident.is_some());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        platform.requests("tok-acme"),
        probes_before,
        "the backoff survives the restart"
    );
    restarted.shutdown().await;
}

#[tokio::test]
async fn a_second_daemon_on_the_same_sqlite_file_is_refused() {
    // The database folder and the platform live to the end of the test.
    let (_db, _platform, text) = one_connection(Kind::Sqlite, Behaviour::Healthy).await;
    let running = app::start(parse(&text), Hooks::default())
        .await
        .expect("start");
    let refused = app::start(parse(&text), Hooks::default()).await;
    let message = format!("{:#}", refused.err().expect("a second daemon is refused"));
    assert!(
        message.contains("another `connwatch run` uses")
            && message.contains("replicas share PostgreSQL"),
        "{message}"
    );
    // The one-shot commands still read and write beside the daemon.
    assert_eq!(
        app::open_store(&parse(&text))
            .await
            .expect("open")
            .list_connections()
            .await
            .expect("list")
            .len(),
        1
    );
    running.shutdown().await;
    let again = app::start(parse(&text), Hooks::default())
        .await
        .expect("the lock is released at shutdown");
    again.shutdown().await;
}

#[tokio::test]
async fn readyz_fails_when_the_store_goes_away() {
    let setup = start_with(Kind::Postgres, &["acme"], "").await;
    let url = format!("http://{}/readyz", setup.running.admin_addr);
    let client = reqwest::Client::new();
    let ready = client.get(&url).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
    setup.db.drop_postgres().await;
    let status = eventually(Duration::from_secs(15), "readyz to fail", || async {
        let status = client.get(&url).send().await.ok()?.status();
        (status == 503).then_some(status)
    })
    .await;
    assert_eq!(status, 503);
    let healthz = client
        .get(format!("http://{}/healthz", setup.running.admin_addr))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), 200, "the process itself is alive");
    setup.running.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_lists_details_and_probes_connections() {
    let setup = start_with(Kind::Sqlite, &["acme"], "").await;
    let base = format!("http://{}", setup.running.admin_addr);
    let client = reqwest::Client::new();
    wait_for_health(
        &setup.running,
        "acme",
        Health::Healthy,
        Duration::from_secs(5),
    )
    .await;
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
    setup
        .platform
        .set("secret-token-acme-v1", Behaviour::Revoked);
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
    setup.running.shutdown().await;
}

#[tokio::test]
async fn a_platform_rate_limit_caps_the_requests_per_second() {
    let db = TestDb::new(Kind::Sqlite).await;
    let platform = FakePlatform::start().await.expect("platform");
    let ids: Vec<String> = (0..20).map(|n| format!("c{n}")).collect();
    let connections: Vec<Conn> = ids
        .iter()
        .map(|id| {
            platform.set(&format!("tok-{id}"), Behaviour::Healthy);
            Conn {
                id,
                platform: "makini",
                token_file: token_file(db.path(), id, &format!("tok-{id}")),
            }
        })
        .collect();
    let text = config_text(
        &db.url,
        &[("makini", platform.base_url())],
        &connections,
        "",
    )
    .replace(
        "request_id_header = \"x-request-id\"\n",
        "request_id_header = \"x-request-id\"\nrate_limit = 4\n",
    );
    let running = app::start(parse(&text), Hooks::default())
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let served = platform.served();
    running.shutdown().await;
    // 20 connections every second would be 60 requests; 4 per second (burst 4) allows ~16.
    assert!(
        served <= 18,
        "rate limit not honoured: {served} requests in 3 s"
    );
    assert!(served >= 8, "probing continues under the cap: {served}");
}
