//! Measures the time from a credential change at the platform to the customer's email
//! being accepted by an SMTP server, with the real daemon code.
//!
//! `cargo run --release --example reauth_latency -- [interval] [confirm_after] [hold] [runs]`
//! (defaults: 60s 30s 60s 3). Loopback only: a simulated platform and an SMTP sink.

use std::time::{Duration, Instant};

use connwatch::app::{self, Hooks};
use connwatch::config::Config;
use connwatch::demo::mailbox::Mailbox;
use connwatch::demo::platform::{Behaviour, FakePlatform};
use connwatch::domain::Health;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let argument = |index: usize, default: &str| {
        arguments
            .get(index)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    let (interval, confirm_after, hold) =
        (argument(0, "60s"), argument(1, "30s"), argument(2, "60s"));
    let runs: usize = argument(3, "3").parse()?;
    println!(
        "probe interval {interval}, confirm_after {confirm_after}, failure_threshold 2, email hold {hold}"
    );
    for run in 1..=runs {
        let folder = tempfile_dir()?;
        let platform = FakePlatform::start().await?;
        let mailbox = Mailbox::start().await?;
        platform.set("tok-acme", Behaviour::Healthy);
        std::fs::write(folder.join("acme.token"), "tok-acme")?;
        let text = config_text(
            &folder,
            &platform,
            mailbox.port,
            &interval,
            &confirm_after,
            &hold,
        );
        let config = Config::parse(&text).map_err(|problems| anyhow::anyhow!("{problems:?}"))?;
        let running = app::start(config, Hooks::default()).await?;
        // Wait for the first (spread) probe, then change the credentials at a random point
        // of the interval, as a customer would.
        loop {
            let listed = running.store.list_connections().await?;
            if listed[0].health == Health::Healthy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let interval_ms = humantime::parse_duration(&interval)?.as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(
            rand::random::<u64>() % interval_ms.max(1),
        ))
        .await;
        platform.set("tok-acme", Behaviour::Revoked);
        let changed = Instant::now();
        let mut detected = None;
        let emailed = loop {
            if detected.is_none()
                && running.store.list_connections().await?[0].health == Health::NeedsReauth
            {
                detected = Some(changed.elapsed());
            }
            if !mailbox.messages().is_empty() {
                break changed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let detected = detected.unwrap_or(emailed);
        println!(
            "run {run}: credential change -> needs_reauth {:.1} s -> email accepted by SMTP {:.1} s",
            detected.as_secs_f64(),
            emailed.as_secs_f64()
        );
        running.shutdown().await;
        platform.stop();
        let _ = std::fs::remove_dir_all(&folder);
    }
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let path =
        std::env::temp_dir().join(format!("connwatch-latency-{:08x}", rand::random::<u32>()));
    std::fs::create_dir(&path)?;
    Ok(path)
}

/// The daemon's config for one run: one connection, a token file, the SMTP sink.
fn config_text(
    folder: &std::path::Path,
    platform: &FakePlatform,
    port: u16,
    interval: &str,
    confirm_after: &str,
    hold: &str,
) -> String {
    format!(
        r#"
[store]
url = "sqlite://{db}"
[server]
admin = "127.0.0.1:0"
[probe]
interval = "{interval}"
timeout = "2s"
confirm_after = "{confirm_after}"
failure_threshold = 2
[platforms.makini]
base_url = "{base}"
probe = {{ path = "/v1/connection" }}
auth_failure_codes = ["AUTHENTICATION_FAILED"]
request_id_header = "x-request-id"
[email]
smtp_url = "smtp://127.0.0.1:{port}?tls=none"
from = "Monitor <alerts@example.com>"
hold = "{hold}"
[[connections]]
id = "acme"
platform = "makini"
token = {{ file = "{token}" }}
contacts = ["it@acme.example"]
reconnect_url = "https://app.example.com/reconnect/acme"
"#,
        db = folder.join("connwatch.db").display(),
        base = platform.base_url(),
        port = port,
        token = folder.join("acme.token").display(),
    )
}
