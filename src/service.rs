//! Running under a service manager: signals (TERM/INT stop, HUP reloads), systemd
//! notifications (READY, WATCHDOG from the scheduler loop, STATUS, RELOADING, STOPPING).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

use crate::app::{self, Hooks, Running};
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::Health;

/// `connwatch run`: starts the daemon; SIGHUP reloads the config at `config_path`;
/// SIGTERM or SIGINT stop it gracefully.
pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let last_ping = Arc::new(AtomicI64::new(0));
    let clock = Clock::system();
    let watchdog_clock = clock.clone();
    let hooks = Hooks {
        // The watchdog is pinged from the scheduler loop itself: a stuck loop stops the
        // pings and systemd restarts the service. At most one ping a second.
        on_tick: Some(Arc::new(move || {
            let now = watchdog_clock.now();
            if now - last_ping.load(Ordering::Relaxed) >= 1000 {
                last_ping.store(now, Ordering::Relaxed);
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            }
        })),
        clock,
    };
    let mut running = app::start(config, hooks).await?;
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut status_every = tokio::time::interval(Duration::from_secs(10));
    status_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = interrupt.recv() => { tracing::info!("SIGINT received"); break; }
            _ = hangup.recv() => reload(&mut running, &config_path).await,
            _ = status_every.tick() => report_status(&running).await,
        }
    }
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    running.shutdown().await;
    Ok(())
}

/// Re-reads the config; an invalid one is refused with every problem logged, and the
/// running config stays in force.
async fn reload(running: &mut Running, config_path: &Path) {
    let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
    match Config::load(config_path) {
        Err(error) => {
            tracing::error!(%error, "reload refused: the new config is invalid; the old one keeps running");
        }
        Ok(config) => match running.reload(config).await {
            Ok(summary) => {
                tracing::info!(
                    added = summary.added,
                    removed = summary.removed,
                    changed = summary.changed,
                    "config reloaded"
                );
                if !summary.needs_restart.is_empty() {
                    tracing::warn!(
                        keys = ?summary.needs_restart,
                        "these changes take effect at the next restart"
                    );
                }
            }
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "reload failed; the old config keeps running")
            }
        },
    }
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

/// `STATUS=` for `systemctl status`: connections per health and quiet ones.
async fn report_status(running: &Running) {
    let Ok(counts) = running.store.health_counts().await else {
        let _ = sd_notify::notify(false, &[NotifyState::Status("store unreachable")]);
        return;
    };
    let total: i64 = counts.iter().map(|(_, count)| count).sum();
    let count = |wanted: Health| {
        counts
            .iter()
            .find(|(health, _)| *health == wanted)
            .map(|(_, count)| *count)
            .unwrap_or_default()
    };
    let quiet = running.store.quiet_count().await.unwrap_or_default();
    let status = format!(
        "{total} connections: {} healthy, {} needs_reauth, {} unreachable, {} degraded, {quiet} quiet",
        count(Health::Healthy),
        count(Health::NeedsReauth),
        count(Health::Unreachable),
        count(Health::Degraded),
    );
    let _ = sd_notify::notify(false, &[NotifyState::Status(&status)]);
}
