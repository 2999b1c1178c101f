//! Running as a service: reload on SIGHUP, systemd notifications, JSON logs, and the
//! metrics checked by the real promtool against the rules and dashboard shipped beside them.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use connwatch::demo::platform::{Behaviour, FakePlatform};

use crate::helpers::app::Fixture;
use crate::helpers::process::{
    BINARY, Daemon, Log, api_health, nix_kill, spawn_daemon, spawn_daemon_with, strip_ansi,
};
use crate::helpers::{
    Conn, Kind, RELAY_SECRET, TestDb, WEBHOOK_SECRET, config_text, eventually, test_app,
    token_file, token_of,
};

async fn listed_ids(admin: &str) -> Option<BTreeSet<String>> {
    let answer: serde_json::Value = reqwest::get(format!("http://{admin}/api/v1/connections"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        answer["connections"]
            .as_array()?
            .iter()
            .filter_map(|connection| connection["id"].as_str().map(str::to_owned))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_new_config_and_refuses_an_invalid_one() {
    let db = TestDb::new(Kind::Sqlite).await;
    let platform = FakePlatform::start().await.expect("platform");
    for id in ["a", "b", "c"] {
        platform.set(&format!("tok-{id}"), Behaviour::Healthy);
    }
    let conn = |id: &'static str| Conn {
        id,
        platform: "makini",
        token_file: token_file(db.path(), id, &format!("tok-{id}")),
    };
    let config = db.path().join("connwatch.toml");
    let write = |connections: &[Conn]| {
        std::fs::write(
            &config,
            config_text(&db.url, &[("makini", platform.base_url())], connections, ""),
        )
        .expect("config");
    };
    write(&[conn("a"), conn("b")]);
    let (mut child, log, admin) = spawn_daemon(&config);
    eventually(Duration::from_secs(5), "a probed", || async {
        (api_health(&admin, "a").await? == "healthy").then_some(())
    })
    .await;
    // b removed, c added; a unchanged keeps its history.
    write(&[conn("a"), conn("c")]);
    nix_kill(child.id(), "HUP");
    let ids = eventually(Duration::from_secs(5), "the reload", || async {
        let ids = listed_ids(&admin).await?;
        (ids.contains("c") && !ids.contains("b")).then_some(ids)
    })
    .await;
    assert_eq!(ids, BTreeSet::from(["a".to_owned(), "c".to_owned()]));
    let detail: serde_json::Value = reqwest::get(format!("http://{admin}/api/v1/connections/a"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        detail["transitions"].as_array().map(Vec::len),
        Some(1),
        "a's state survived the reload"
    );
    eventually(Duration::from_secs(5), "c probed", || async {
        (platform.requests("tok-c") > 0).then_some(())
    })
    .await;

    std::fs::write(&config, "[probe]\ninterval = \"never\"\n").expect("config");
    nix_kill(child.id(), "HUP");
    eventually(Duration::from_secs(5), "the refusal in the log", || async {
        strip_ansi(&log.lock().expect("log"))
            .contains("reload refused")
            .then_some(())
    })
    .await;
    let text = strip_ansi(&log.lock().expect("log"));
    assert!(
        text.contains("probe.interval"),
        "the reason is logged: {text}"
    );
    assert_eq!(
        listed_ids(&admin).await,
        Some(ids),
        "the old config keeps running"
    );
    nix_kill(child.id(), "TERM");
    assert!(child.wait().expect("wait").success());
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_watchdog_status_and_stopping() {
    let fixture = test_app(Kind::Sqlite).prepare().await;
    let config = fixture.config_file();
    let socket_path = fixture.db.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut child = Daemon(
        Command::new(BINARY)
            .args(["run", "--config", config.to_str().expect("utf-8")])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "2000000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1") && seen.contains("STATUS=")) {
        let size = socket
            .recv(&mut buffer)
            .expect("a notification within 20 s");
        seen.push_str(&String::from_utf8_lossy(&buffer[..size]));
        seen.push('\n');
    }
    assert!(seen.contains("STATUS=1 connections: "), "{seen}");
    nix_kill(child.id(), "TERM");
    loop {
        let size = socket.recv(&mut buffer).expect("STOPPING=1");
        if String::from_utf8_lossy(&buffer[..size]).contains("STOPPING=1") {
            break;
        }
    }
    assert!(child.wait().expect("wait").success());
}

/// A daemon with every feature on, so every metric family is exported: webhooks, the
/// polling fallback, the relay and email (to ports nobody listens on), per-connection
/// metrics, JSON logs. Returns its fixture, the process, its admin address and its log.
async fn full_daemon() -> (Fixture, Daemon, String, Log) {
    let fixture = test_app(Kind::Sqlite)
        .connections(["a"])
        .server_setting("per_connection_metrics = true")
        .webhooks("")
        .relay("http://127.0.0.1:9/recovered")
        .email("")
        .smtp_down()
        .extra_config("[log]\nformat = \"json\"")
        .prepare()
        .await;
    let (child, log, admin) = spawn_daemon_with(&fixture.config_file(), &["\"admin_addr\":\""]);
    let admin = admin[0].split('"').next().unwrap_or_default().to_owned();
    (fixture, child, admin, log)
}

/// The metric families `/metrics` must export.
const REQUIRED_FAMILIES: [&str; 12] = [
    "connwatch_connections",
    "connwatch_probes_total",
    "connwatch_probe_duration_seconds",
    "connwatch_webhooks_received_total",
    "connwatch_connections_quiet",
    "connwatch_polls_total",
    "connwatch_changes_recovered_total",
    "connwatch_emails_total",
    "connwatch_email_outbox_pending",
    "connwatch_scheduler_last_tick_timestamp_seconds",
    "connwatch_build_info",
    "connwatch_connection_health",
];

/// The metric families named by `# TYPE` lines.
fn families(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|line| line.starts_with("# TYPE "))
        .filter_map(|line| line.split_whitespace().nth(2).map(str::to_owned))
        .collect()
}

/// `promtool check metrics` finds nothing to say about `metrics`.
fn promtool_check_metrics(metrics: &str) {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write");
    let output = check.wait_with_output().expect("promtool");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "promtool check metrics: {complaints}"
    );
}

/// Every metric name in the alert rules, their tests and the dashboard.
fn metrics_named_in_rules_and_dashboard() -> BTreeSet<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut used = BTreeSet::new();
    for file in [
        "alerts/connwatch.rules.yml",
        "alerts/connwatch.rules.test.yml",
        "grafana/connwatch.json",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect("read");
        let bytes = text.as_bytes();
        let mut index = 0;
        while let Some(found) = text[index..].find("connwatch_") {
            let start = index + found;
            let end = start
                + text[start..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(text.len() - start);
            let preceded =
                start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            // A bare prefix (a regex such as connwatch_.*) names no metric.
            if !preceded && !text[start..end].ends_with('_') {
                used.insert(text[start..end].to_owned());
            }
            index = end;
        }
    }
    used
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_the_live_metrics_and_every_metric_in_rules_and_dashboard_is_exported() {
    let (fixture, mut child, admin, _log) = full_daemon().await;
    eventually(Duration::from_secs(5), "a probe", || async {
        (fixture.platform.requests(&token_of("a")) > 0).then_some(())
    })
    .await;
    // Once the first probe is counted and the gauges refreshed, every family is there.
    let metrics = eventually(
        Duration::from_secs(10),
        "every metric family exported",
        || async {
            let metrics = reqwest::get(format!("http://{admin}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let exported = families(&metrics);
            REQUIRED_FAMILIES
                .iter()
                .all(|family| exported.contains(*family))
                .then_some(metrics)
        },
    )
    .await;
    promtool_check_metrics(&metrics);

    let exported = families(&metrics);
    for required in REQUIRED_FAMILIES {
        assert!(exported.contains(required), "{required} not exported");
    }
    let used = metrics_named_in_rules_and_dashboard();
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name.as_str(), |name, suffix| {
                    name.strip_suffix(suffix).unwrap_or(name)
                });
            !exported.contains(*name)
                && !exported.contains(base)
                && !name.starts_with("connwatch_test")
        })
        .collect();
    assert!(
        used.len() > 10,
        "the rules and dashboard name metrics: {used:?}"
    );
    assert!(
        missing.is_empty(),
        "used in alerts/ or grafana/ but not exported: {missing:?}"
    );
    nix_kill(child.id(), "TERM");
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_and_name_no_secret() {
    let (_fixture, mut child, _admin, log) = full_daemon().await;
    // The first probe's result stored and logged.
    eventually(
        Duration::from_secs(5),
        "the first probe in the log",
        || async {
            log.lock()
                .expect("log")
                .contains("first probe ok")
                .then_some(())
        },
    )
    .await;
    nix_kill(child.id(), "TERM");
    let _ = child.wait();
    let text = log.lock().expect("log").clone();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    for line in &lines {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
    }
    assert!(
        text.contains("connwatch running") && text.contains("stopped"),
        "{text}"
    );
    for secret in [token_of("a").as_str(), WEBHOOK_SECRET, RELAY_SECRET] {
        assert!(!text.contains(secret), "a secret in the log");
    }
}
