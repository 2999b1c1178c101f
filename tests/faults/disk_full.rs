//! The SQLite database's file system filling up (a small tmpfs) while webhooks stream
//! in: deliveries are refused with 503, `/readyz` fails and the log says why; when space
//! returns the daemon accepts again on its own, and no acknowledged delivery is lost.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use connwatch::store::Store;

use crate::helpers::process::{Log, spawn_daemon_with, strip_ansi};
use crate::helpers::{Kind, eventually, test_app};
use crate::load::{Load, readyz, readyz_answer};
use crate::postgres_restart::assert_acknowledged_stored;

/// Deliveries acknowledged before the disk fills, and again after space returns.
const STEADY: usize = 30;

/// A small tmpfs mounted for the test, unmounted when dropped (lazily if still busy).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("mount (the fault tests need root)");
        assert!(status.success(), "mount -t tmpfs failed (root needed)");
        Tmpfs {
            path: path.to_owned(),
        }
    }

    /// Writes a filler file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let block = vec![0_u8; 4096];
        loop {
            match file.write_all(&block) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(28) => break,
                Err(error) => panic!("filling the disk: {error}"),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|status| status.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn log_text(log: &Log) -> String {
    strip_ansi(
        &log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// Prints the end of the daemon's log when the test fails.
struct LogOnFailure(Log);

impl Drop for LogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = log_text(&self.0);
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| !line.contains("TRACE"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("the daemon's log, last lines:\n{}", tail.join("\n"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_sqlite_refuses_webhooks_fails_readyz_and_recovers_when_space_returns() {
    let mut fixture = test_app(Kind::Sqlite).webhooks("").prepare().await;
    let disk = Tmpfs::mount(&fixture.db.path().join("disk"), "8m");
    let url = format!("sqlite://{}", disk.path.join("connwatch.db").display());
    fixture.config_text = fixture.config_text.replace(&fixture.db.url, &url);
    // Declared after the mount: the daemon is killed before the unmount.
    let (mut daemon, log, addresses) =
        spawn_daemon_with(&fixture.config_file(), &["admin_addr=", "webhook_addr="]);
    let _log_on_failure = LogOnFailure(log.clone());
    let admin = addresses[0].clone();
    let load = Load::start(addresses[1].parse().expect("webhook address"), 2048);
    eventually(
        Duration::from_secs(20),
        "deliveries before the disk fills",
        || async { (load.count_since(0, |answer| answer.acknowledged()) >= STEADY).then_some(()) },
    )
    .await;

    let filler = disk.fill();
    let full = load.sent();
    eventually(
        Duration::from_secs(30),
        "deliveries refused with 503",
        || async {
            let refused = load.count_since(full, |answer| answer.status == Some(503));
            (refused >= 3).then_some(())
        },
    )
    .await;
    let (_, why) = eventually(
        Duration::from_secs(30),
        "/readyz 503 on the full disk",
        || async {
            let answer = readyz_answer(&admin).await;
            (answer.0 == 503).then_some(answer)
        },
    )
    .await;
    assert!(why.contains("disk is full"), "/readyz says why: {why}");
    eventually(Duration::from_secs(10), "the log says why", || async {
        log_text(&log)
            .contains("database or disk is full")
            .then_some(())
    })
    .await;

    std::fs::remove_file(&filler).expect("remove the filler");
    let freed = load.sent();
    eventually(
        Duration::from_secs(60),
        "deliveries accepted again",
        || async {
            (load.count_since(freed, |answer| answer.acknowledged()) >= STEADY).then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(30), "/readyz 200 again", || async {
        (readyz(&admin).await == 200).then_some(())
    })
    .await;
    let answers = load.stop().await;
    eprintln!(
        "{} deliveries: {} acknowledged, {} refused with 503 while the disk was full",
        answers.len(),
        answers
            .iter()
            .filter(|answer| answer.acknowledged())
            .count(),
        answers[full..freed]
            .iter()
            .filter(|answer| answer.status == Some(503))
            .count()
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    let log = log_text(&log);
    assert!(!log.contains("panicked"), "{log}");
    let store = Store::connect(&url, 1).await.expect("open the database");
    assert_acknowledged_stored(&store, &answers).await;
    store.close().await;
}
