//! Running under a service manager: signals, systemd notifications, graceful stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

use crate::app::{self, Hooks};
use crate::config::Config;
use crate::store::now_millis;

/// `connwatch run`: starts the daemon and runs it until SIGTERM or SIGINT.
pub async fn run(config: Config, _config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let last_ping = Arc::new(AtomicI64::new(0));
    let hooks = Hooks {
        // The watchdog is pinged from the scheduler loop itself: a stuck loop stops the
        // pings and systemd restarts the service. At most one ping a second.
        on_tick: Some(Arc::new(move || {
            let now = now_millis();
            if now - last_ping.load(Ordering::Relaxed) >= 1000 {
                last_ping.store(now, Ordering::Relaxed);
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            }
        })),
    };
    let running = app::start(config, hooks).await?;
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    running.shutdown().await;
    Ok(())
}
