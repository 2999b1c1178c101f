//! The `connwatch` binary as a user runs it: real processes, real signals, captured output.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use connwatch::demo::platform::Behaviour;

use crate::helpers::process::{
    BINARY, api_health, nix_kill, spawn_daemon, spawn_daemon_with, strip_ansi,
};
use crate::helpers::{Kind, WEBHOOK_SECRET, eventually, now_millis, test_app, token_of};

fn connwatch(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BINARY)
        .args(args)
        .output()
        .expect("run connwatch");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_every_bad_key_and_fails() {
    let folder = tempfile::tempdir().expect("temp dir");
    let path = folder.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[store]
url = "mysql://nope"

[probe]
interval = "every now and then"
failure_threshold = 0

[platforms.makini]
base_url = "not a url"
probe = { path = "/v1/connection" }
colour = "blue"

[[connections]]
id = "acme"
platform = "nango"
token = { file = "/nonexistent/acme.token" }
contacts = ["it-at-acme.example"]

[[connections]]
id = "acme"
platform = "makini"
token = "tok_literal_in_file"
"#,
    )
    .expect("write");
    let (code, _, stderr) = connwatch(&["check-config", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "store.url (line 2)",
        "probe.interval (line 5)",
        "probe.failure_threshold (line 6)",
        "platforms.makini.base_url (line 9)",
        "platforms.makini.colour (line 11): unknown key",
        "connections[0].platform (line 15)",
        "connections[0].token (line 16): cannot read secret file /nonexistent/acme.token",
        "connections[0].contacts[0]",
        "connections[1].token (line 22): a literal secret is not allowed",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("tok_literal_in_file"),
        "a literal secret is never echoed"
    );
}

#[test]
fn check_config_accepts_the_example_config() {
    let credentials = tempfile::tempdir().expect("temp dir");
    std::fs::write(credentials.path().join("acme-token"), "tok_example").expect("write");
    std::fs::write(credentials.path().join("smtp-password"), "smtp-pass").expect("write");
    for name in ["makini-webhook-secret", "relay-secret"] {
        std::fs::write(
            credentials.path().join(name),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .expect("write");
    }
    let output = Command::new(BINARY)
        .args(["check-config", "--config", "connwatch.example.toml"])
        .env("CREDENTIALS_DIRECTORY", credentials.path())
        .env("BUGFREE_TOKEN", "tok_example_2")
        .output()
        .expect("run");
    let (code, stdout, stderr) = (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("config valid"), "{stdout}");
}

#[test]
fn the_demo_tour_detects_the_credential_change_and_the_recovery() {
    let started = Instant::now();
    let (code, stdout, stderr) = connwatch(&["demo"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(stdout.contains("degraded -> needs_reauth"), "{stdout}");
    assert!(
        stdout.contains("error_code=AUTHENTICATION_FAILED"),
        "{stdout}"
    );
    assert!(stdout.contains("request_id=req_"), "{stdout}");
    assert!(stdout.contains("needs_reauth -> healthy"), "{stdout}");
    assert!(
        !stdout.contains("tok_acme"),
        "no token in the tour's output"
    );
}

/// What the daemon at `base` and the commands beside it answer: the API, metrics and
/// readiness, a probe asked for, `status`, `probe` and `check-config`.
async fn answers(base: &str, config: &std::path::Path) -> String {
    let client = reqwest::Client::new();
    let mut answers = String::new();
    for path in [
        "/metrics",
        "/api/v1/connections",
        "/api/v1/connections/acme",
        "/readyz",
    ] {
        answers.push_str(
            &client
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("get")
                .text()
                .await
                .expect("text"),
        );
    }
    answers.push_str(
        &client
            .post(format!("{base}/api/v1/connections/acme/probe"))
            .send()
            .await
            .expect("post")
            .text()
            .await
            .expect("text"),
    );
    let config_arg = config.to_str().expect("utf-8");
    for args in [
        vec!["status", "--config", config_arg],
        vec!["status", "--json", "--config", config_arg],
        vec!["probe", "acme", "--config", config_arg],
        vec!["check-config", "--config", config_arg],
    ] {
        let (_, stdout, stderr) = connwatch(&args);
        answers.push_str(&stdout);
        answers.push_str(&stderr);
    }
    answers
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_never_appears_in_logs_api_answers_metrics_or_commands() {
    let fixture = test_app(Kind::Sqlite).prepare().await;
    let token = token_of("acme");
    let config = fixture.config_file();
    let (mut child, log, address) = spawn_daemon(&config);
    let wait_health = async |wanted: &str| {
        eventually(Duration::from_secs(10), wanted, || async {
            (api_health(&address, "acme").await? == wanted).then_some(())
        })
        .await
    };
    wait_health("healthy").await;
    fixture.platform.set(&token, Behaviour::Revoked);
    wait_health("needs_reauth").await;
    let rotated = fixture.rotate_token("acme");
    wait_health("healthy").await;
    let answers = answers(&format!("http://{address}"), &config).await;
    assert!(
        answers.contains("\"acme\""),
        "the answers were captured: {answers}"
    );
    assert!(
        answers.contains("another `connwatch run` uses")
            && answers.contains("ask the daemon instead: POST /api/v1/connections/acme/probe"),
        "`connwatch probe` beside the daemon on SQLite is refused with a way out: {answers}"
    );
    assert!(
        fixture.platform.requests(&rotated) > 0,
        "the rotated token was used"
    );
    nix_kill(child.id(), "TERM");
    let status = child.wait().expect("wait");
    let log = strip_ansi(&log.lock().expect("log"));
    assert!(
        log.contains("health changed"),
        "the log was captured: {log}"
    );
    for secret in [&token, &rotated] {
        assert!(!log.contains(secret), "token in the log");
        assert!(!answers.contains(secret), "token in an answer");
    }
    assert!(status.success(), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_cleanly_while_a_probe_hangs() {
    let fixture = test_app(Kind::Sqlite).prepare().await;
    let token = token_of("acme");
    fixture.platform.set(&token, Behaviour::Hang);
    let (mut child, log, _) = spawn_daemon(&fixture.config_file());
    eventually(Duration::from_secs(5), "a hanging probe", || async {
        (fixture.platform.requests(&token) > 0).then_some(())
    })
    .await;
    let stopping = Instant::now();
    nix_kill(child.id(), "TERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{}", log.lock().expect("log"));
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "drained within the deadline"
    );
    let mut rest = String::new();
    let _ = child
        .stderr
        .take()
        .map(|mut stderr| stderr.read_to_string(&mut rest));
    assert!(strip_ansi(&log.lock().expect("log")).contains("stopped"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_answered_2xx_survives_kill_9() {
    use connwatch::webhook::verify::{decode_standard_secret, sign_standard};
    let fixture = test_app(Kind::Sqlite).webhooks("").prepare().await;
    let (mut child, _log, addresses) =
        spawn_daemon_with(&fixture.config_file(), &["admin_addr=", "webhook_addr="]);
    let key = decode_standard_secret(WEBHOOK_SECRET).expect("key");
    let client = reqwest::Client::new();
    let timestamp = now_millis() / 1000;
    for index in 0..20 {
        let id = format!("msg_kill_{index}");
        let body = format!("{{\"connectionId\":\"conn_acme\",\"n\":{index}}}");
        let status = client
            .post(format!("http://{}/webhooks/makini", addresses[1]))
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                sign_standard(&key, &id, timestamp, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .expect("deliver")
            .status();
        assert_eq!(status, 200);
    }
    nix_kill(child.id(), "KILL");
    let _ = child.wait();
    let store = connwatch::store::Store::connect(&fixture.db.url, 1)
        .await
        .expect("reopen");
    assert_eq!(
        store.webhook_count("makini").await.expect("count"),
        20,
        "every 2xx is durable"
    );
}
