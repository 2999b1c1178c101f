//! PostgreSQL restarted (`pg_ctlcluster … restart`) while webhooks stream in: the daemon
//! resumes on its own and no acknowledged delivery is lost.

use std::process::Command;
use std::time::Duration;

use crate::helpers::{Kind, eventually, postgres_admin_url, test_app};
use crate::load::{Load, readyz};

/// Deliveries acknowledged before the restart, and again after it.
const STEADY: usize = 30;

/// The local cluster's version (`/etc/postgresql/VERSION`).
fn cluster_version() -> String {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster in /etc/postgresql")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort();
    versions.pop().expect("a cluster version")
}

fn pg_ctlcluster(action: &str) -> bool {
    Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &cluster_version(),
            "main",
            action,
        ])
        .status()
        .is_ok_and(|status| status.success())
}

fn postgres_ready() -> bool {
    Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", "5432"])
        .status()
        .is_ok_and(|status| status.success())
}

/// When the PostgreSQL server last started (tells a restart that happened from one that
/// did not).
async fn postmaster_started() -> String {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
        .await
        .expect("PostgreSQL");
    let (started,): (String,) = sqlx::query_as("SELECT pg_postmaster_start_time()::text")
        .fetch_one(&mut admin)
        .await
        .expect("start time");
    started
}

/// Starts PostgreSQL again when dropped if it is not answering, so a failed test leaves
/// it running for the next one.
struct PostgresUp;

impl Drop for PostgresUp {
    fn drop(&mut self) {
        for _ in 0..30 {
            if postgres_ready() {
                return;
            }
            pg_ctlcluster("start");
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!("PostgreSQL did not come back up");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_under_load_loses_no_acknowledged_webhook_and_the_daemon_resumes() {
    let _postgres = PostgresUp;
    let app = test_app(Kind::Postgres).webhooks("").spawn().await;
    let load = Load::start(app.webhook_addr.expect("webhook listener"), 200);
    eventually(
        Duration::from_secs(20),
        "deliveries before the restart",
        || async { (load.count_since(0, |answer| answer.acknowledged()) >= STEADY).then_some(()) },
    )
    .await;
    let started = postmaster_started().await;
    let before = load.sent();
    let restarted = tokio::task::spawn_blocking(|| pg_ctlcluster("restart"))
        .await
        .expect("pg_ctlcluster");
    assert!(restarted, "pg_ctlcluster restart failed");
    let after = load.sent();
    eventually(
        Duration::from_secs(60),
        "deliveries accepted again",
        || async {
            (load.count_since(after, |answer| answer.acknowledged()) >= STEADY).then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(30), "/readyz 200 again", || async {
        (readyz(app.admin_addr).await == 200).then_some(())
    })
    .await;
    let answers = load.stop().await;
    assert_ne!(postmaster_started().await, started, "PostgreSQL restarted");
    let refused: Vec<_> = answers[before..]
        .iter()
        .filter(|answer| !answer.acknowledged())
        .collect();
    eprintln!(
        "{} deliveries, {} during the restart, {} not acknowledged since it began: {:?}",
        answers.len(),
        after - before,
        refused.len(),
        refused.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        refused
            .iter()
            .all(|answer| answer.status.is_none_or(|status| status == 503)),
        "refused only with 503 (the platform retries): {refused:?}"
    );
    assert_acknowledged_stored(&app.running.store, &answers).await;
    app.shutdown().await;
}

/// Every delivery answered 2xx is in the store.
pub async fn assert_acknowledged_stored(
    store: &connwatch::store::Store,
    answers: &[crate::load::Answer],
) {
    let mut lost = Vec::new();
    let mut acknowledged = 0;
    for answer in answers.iter().filter(|answer| answer.acknowledged()) {
        acknowledged += 1;
        let stored = store
            .webhook_stored("makini", &answer.webhook_id)
            .await
            .expect("read the store");
        if !stored {
            lost.push(answer.webhook_id.clone());
        }
    }
    assert!(acknowledged > 0);
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
}
