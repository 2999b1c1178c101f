//! Assembles the daemon: store, scheduler, listeners, background jobs; runs until cancelled.
//! Each piece's loop lives with the piece; this module only builds, starts, reloads and
//! stops them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alert::Mailer;
use crate::alert::dispatch::Dispatcher;
use crate::alert::templates::Templates;
use crate::clock::Clock;
use crate::config::Config;
use crate::events::Event;
use crate::gauges::refresh_health_gauges;
use crate::jobs::CronJobs;
use crate::leader::Leadership;
use crate::listen::Limits;
use crate::metrics::Metrics;
use crate::poll::Poller;
use crate::probe::Prober;
use crate::relay::Relay;
use crate::reload;
use crate::rules::{Rules, SharedRules};
use crate::schedule::{Roster, Scheduler, SchedulerParts, watch_token_files};
use crate::server::{AdminState, admin_router};
use crate::store::{Store, SyncConnection, checkpoint_wal};
use crate::webhook::{self, WebhookState};

pub use crate::reload::ReloadSummary;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Hooks for the service manager (systemd notify); no-ops by default.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called every scheduler turn (watchdog ping).
    pub on_tick: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Where the daemon reads the time (the system clock unless a test sets a manual one).
    pub clock: Clock,
}

/// A started daemon.
pub struct Running {
    /// Where the admin listener is bound (port 0 in tests resolves here).
    pub admin_addr: SocketAddr,
    /// Where the webhook listener is bound, when `[server] webhooks` is set.
    pub webhook_addr: Option<SocketAddr>,
    pub store: Store,
    pub scheduler: Scheduler,
    pub metrics: Metrics,
    pub events: broadcast::Sender<Event>,
    cancel: CancellationToken,
    probes: TaskTracker,
    background: Vec<JoinHandle<()>>,
    scheduler_loop: JoinHandle<()>,
    cron: CronJobs,
    drain_deadline: Duration,
    webhook_state: Option<WebhookState>,
    /// The config in force (reload compares against it).
    config: Config,
}

/// Opens the store and brings its schema up to date.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    open_store_with(config, true, false).await
}

/// As `open_store`; the daemon passes `auto_checkpoint` false (it runs `checkpoint_wal`)
/// and `own` true: on SQLite it must be the one process that owns the database
/// (`Store::hold_database`), checked before migrating. `connwatch probe` owns it too.
pub async fn open_store_with(
    config: &Config,
    auto_checkpoint: bool,
    own: bool,
) -> anyhow::Result<Store> {
    let store = Store::connect_with(
        &config.store.url,
        config.store.max_connections,
        auto_checkpoint,
    )
    .await
    .context("cannot open the store (store.url)")?;
    if own {
        store
            .hold_database()
            .context("cannot own the store (store.url)")?;
    }
    store.migrate().await.context("cannot migrate the store")?;
    Ok(store)
}

/// The mailer and templates, checked before anything starts.
pub fn prepare_email(config: &Config) -> anyhow::Result<Option<(Mailer, Templates)>> {
    let Some(email) = &config.email else {
        return Ok(None);
    };
    let templates = Templates::load(email.templates.as_deref())
        .map_err(|message| anyhow::anyhow!("email.templates: {message}"))?;
    let mailer = Mailer::new(email)?;
    Ok(Some((mailer, templates)))
}

/// Writes the configured connections into the store.
pub async fn sync_connections(
    store: &Store,
    scheduler: &Scheduler,
    config: &Config,
) -> anyhow::Result<()> {
    let now = scheduler.clock().now();
    let connections: Vec<SyncConnection> = config
        .connections
        .iter()
        .map(|connection| SyncConnection {
            id: &connection.id,
            name: &connection.name,
            platform: &connection.platform,
            remote_id: connection.remote_id.as_deref(),
            paused: connection.paused,
            first_due: scheduler.first_due(&connection.id, now),
            contacts: connection
                .contacts
                .iter()
                .map(|address| address.as_str())
                .collect(),
            reconnect_url: connection.reconnect_url.as_deref(),
            expected_webhook_ms: connection
                .expected_webhook_interval
                .map(crate::domain::time::millis),
        })
        .collect();
    // A transient failure (a PostgreSQL deadlock or serialization failure while other
    // replicas write) is retried before start-up or reload gives up.
    let mut attempt = 0;
    let deactivated = loop {
        match store.sync_connections(&connections, now).await {
            Ok(deactivated) => break deactivated,
            Err(error) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(%error, attempt, "cannot store the configured connections; retrying");
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
            Err(error) => {
                return Err(error).context("cannot store the configured connections");
            }
        }
    };
    tracing::info!(
        connections = connections.len(),
        deactivated,
        "connections synchronised with the config"
    );
    Ok(())
}

/// Builds the scheduler without starting anything (also used by `connwatch probe`).
pub fn build_scheduler(
    config: &Config,
    store: Store,
    metrics: Metrics,
    events: broadcast::Sender<Event>,
    clock: Clock,
) -> anyhow::Result<Scheduler> {
    let prober = Prober::new(&config.platforms, &config.probe)?;
    for platform in config.platforms.keys() {
        metrics.declare_platform(platform);
    }
    Ok(Scheduler::new(SchedulerParts {
        store,
        prober,
        metrics,
        roster: Roster::new(&config.connections),
        settings: config.probe.clone(),
        events,
        clock,
        rules: SharedRules::new(Rules::from_config(config)),
    }))
}

/// Starts everything; returns once the admin listener is bound and probing has begun.
pub async fn start(config: Config, hooks: Hooks) -> anyhow::Result<Running> {
    let metrics = Metrics::new(VERSION);
    let store = open_store_with(&config, false, true).await?;
    let email = prepare_email(&config)?;
    let (events, _) = broadcast::channel(1024);
    let scheduler = build_scheduler(
        &config,
        store.clone(),
        metrics.clone(),
        events.clone(),
        hooks.clock.clone(),
    )?;
    sync_connections(&store, &scheduler, &config).await?;
    let (admin, admin_token) = bind_admin(&config).await?;
    let admin_addr = admin.local_addr()?;
    let mut parts = Parts {
        store,
        scheduler,
        metrics,
        events,
        clock: hooks.clock.clone(),
        cancel: CancellationToken::new(),
        leadership: Leadership::default(),
        probes: TaskTracker::new(),
        background: Vec::new(),
    };
    parts.start_leadership();
    parts.serve_admin(admin, admin_token, config.server.admin_hosts.as_deref());
    let (webhook_addr, webhook_state) = parts.serve_webhooks(&config).await?;
    parts.start_workers(&config, email)?;
    parts.start_upkeep(&config);
    let on_tick = hooks.on_tick.unwrap_or_else(|| Arc::new(|| {}));
    let scheduler_loop = tokio::spawn(parts.scheduler.clone().run(
        parts.cancel.clone(),
        parts.probes.clone(),
        on_tick,
    ));
    let cron = parts.start_cron(&config).await?;
    tracing::info!(%admin_addr, connections = config.connections.len(), "connwatch running");
    Ok(Running {
        admin_addr,
        webhook_addr,
        store: parts.store,
        scheduler: parts.scheduler,
        metrics: parts.metrics,
        events: parts.events,
        cancel: parts.cancel,
        probes: parts.probes,
        background: parts.background,
        scheduler_loop,
        cron,
        drain_deadline: config.probe.timeout + Duration::from_secs(5),
        webhook_state,
        // The connections live in the scheduler's roster; one copy is enough.
        config: Config {
            connections: Vec::new(),
            ..config
        },
    })
}

impl Running {
    /// Applies a new, already validated config without a restart: connections added,
    /// removed or changed (a changed token is probed at once), platform profiles and
    /// webhook secrets, probe thresholds, email recipients. Listener addresses, the store
    /// and the log format keep their old values until a restart (reported).
    pub async fn reload(&mut self, config: Config) -> anyhow::Result<ReloadSummary> {
        let prober = Prober::new(&config.platforms, &config.probe)?;
        if let Some(state) = &self.webhook_state {
            state
                .reload(&config.platforms)
                .context("cannot load the webhook secrets")?;
        }
        let old = self.scheduler.roster();
        let summary = reload::summarize(&old, &self.config, &config);
        for platform in config.platforms.keys() {
            self.metrics.declare_platform(platform);
        }
        self.scheduler.reconfigure(prober, config.probe.clone());
        self.scheduler.set_roster(Roster::new(&config.connections));
        self.scheduler.rules().replace(Rules::from_config(&config));
        sync_connections(&self.store, &self.scheduler, &config).await?;
        let now = self.scheduler.clock().now();
        for id in reload::rotated_tokens(&old, &config) {
            self.store.request_probe(id, now).await?;
        }
        self.config = Config {
            connections: Vec::new(),
            ..config
        };
        Ok(summary)
    }

    /// A token that stops the daemon when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops claiming, drains in-flight probes (up to the deadline), stops the
    /// listeners and jobs, and closes the pool.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new probes; draining those in flight");
        self.cancel.cancel();
        self.probes.close();
        if tokio::time::timeout(self.drain_deadline, self.probes.wait())
            .await
            .is_err()
        {
            tracing::warn!("probes still in flight at the drain deadline; their leases expire");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.scheduler_loop).await;
        self.cron.shutdown(Duration::from_secs(5)).await;
        for task in self.background {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("a listener did not stop within 5 s");
            }
        }
        self.store.close().await;
        tracing::info!("stopped");
    }
}

/// The shared handles while the daemon is being started; background tasks are kept in
/// the order they started (shutdown waits for them in that order).
struct Parts {
    store: Store,
    scheduler: Scheduler,
    metrics: Metrics,
    events: broadcast::Sender<Event>,
    clock: Clock,
    cancel: CancellationToken,
    leadership: Leadership,
    /// Probes and polls run here; shutdown drains it.
    probes: TaskTracker,
    background: Vec<JoinHandle<()>>,
}

impl Parts {
    /// The leader election (PostgreSQL advisory lock; on SQLite this process leads).
    fn start_leadership(&mut self) {
        let leadership = self.leadership.clone();
        self.background.push(tokio::spawn(leadership.run(
            self.store.clone(),
            self.metrics.clone(),
            self.cancel.clone(),
        )));
    }

    /// The admin router on its bound listener, until cancelled.
    fn serve_admin(
        &mut self,
        listener: tokio::net::TcpListener,
        admin_token: Option<Arc<secrecy::SecretString>>,
        extra_hosts: Option<&[String]>,
    ) {
        let allowed_hosts = listener
            .local_addr()
            .ok()
            .and_then(|address| crate::server::allowed_hosts(address, extra_hosts))
            .map(Arc::new);
        let router = admin_router(AdminState {
            store: self.store.clone(),
            scheduler: self.scheduler.clone(),
            metrics: self.metrics.clone(),
            admin_token,
            allowed_hosts,
            forced: Arc::default(),
        });
        self.background.push(tokio::spawn(crate::listen::serve(
            listener,
            router,
            Limits::ADMIN,
            self.cancel.clone(),
            "admin",
        )));
    }

    /// The webhook listener, when `[server] webhooks` is set: its address and state.
    async fn serve_webhooks(
        &mut self,
        config: &Config,
    ) -> anyhow::Result<(Option<SocketAddr>, Option<WebhookState>)> {
        let Some(address) = config.server.webhooks else {
            return Ok((None, None));
        };
        let state = WebhookState::new(
            &config.platforms,
            self.store.clone(),
            self.metrics.clone(),
            self.events.clone(),
            self.clock.clone(),
            self.scheduler.rules().clone(),
        )
        .context("cannot load the webhook secrets")?;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on server.webhooks {address}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(webhook_addr = %bound, "webhook listener bound");
        let router = webhook::router(state.clone(), config.server.webhook_max_bytes);
        self.background.push(tokio::spawn(crate::listen::serve(
            listener,
            router,
            Limits::WEBHOOKS,
            self.cancel.clone(),
            "webhooks",
        )));
        Ok((Some(bound), Some(state)))
    }

    /// The leased workers besides the scheduler: the poller (when a platform sends
    /// webhooks), the relay (`[relay]`) and the email dispatcher (`[email]`).
    fn start_workers(
        &mut self,
        config: &Config,
        email: Option<(Mailer, Templates)>,
    ) -> anyhow::Result<()> {
        if config
            .platforms
            .values()
            .any(|platform| platform.webhooks.is_some())
        {
            let poller = Poller {
                store: self.store.clone(),
                scheduler: self.scheduler.clone(),
                metrics: self.metrics.clone(),
                settings: config.webhooks.clone(),
                relay_enabled: config.relay.is_some(),
                events: self.events.clone(),
            };
            let run = poller.run(self.cancel.clone(), self.probes.clone());
            self.background.push(tokio::spawn(run));
        }
        if let Some(relay) = &config.relay {
            let relay = Relay::new(
                self.store.clone(),
                self.metrics.clone(),
                relay.clone(),
                self.scheduler.owner().to_owned(),
                self.clock.clone(),
            )
            .context("cannot set up the relay ([relay])")?;
            self.background
                .push(tokio::spawn(relay.run(self.cancel.clone())));
        }
        if let (Some((mailer, templates)), Some(settings)) = (email, &config.email) {
            let dispatcher = Dispatcher {
                store: self.store.clone(),
                mailer,
                templates,
                settings: settings.clone(),
                metrics: self.metrics.clone(),
                owner: self.scheduler.owner().to_owned(),
                leadership: self.leadership.clone(),
                clock: self.clock.clone(),
                rules: self.scheduler.rules().clone(),
            };
            self.background
                .push(tokio::spawn(dispatcher.run(self.cancel.clone())));
        }
        Ok(())
    }

    /// Upkeep: the WAL checkpoint, the fleet-wide gauges, the token file watcher.
    fn start_upkeep(&mut self, config: &Config) {
        let checkpoint = checkpoint_wal(self.store.clone(), self.cancel.clone());
        self.background.push(tokio::spawn(checkpoint));
        let gauges = refresh_health_gauges(
            self.store.clone(),
            self.metrics.clone(),
            config.server.per_connection_metrics,
            self.leadership.clone(),
            self.cancel.clone(),
        );
        self.background.push(tokio::spawn(gauges));
        let tokens = watch_token_files(
            self.scheduler.clone(),
            self.store.clone(),
            config.probe.token_check_interval,
            self.cancel.clone(),
        );
        self.background.push(tokio::spawn(tokens));
    }

    /// The wall-clock jobs (pruning, daily digest).
    async fn start_cron(&self, config: &Config) -> anyhow::Result<CronJobs> {
        CronJobs::start(
            config,
            self.store.clone(),
            self.metrics.clone(),
            self.leadership.clone(),
            self.clock.clone(),
            self.scheduler.rules().clone(),
        )
        .await
        .context("cannot start the pruning job (store.prune_schedule)")
    }
}

/// The admin listener, bound, and the admin token (read before anything starts).
async fn bind_admin(
    config: &Config,
) -> anyhow::Result<(tokio::net::TcpListener, Option<Arc<secrecy::SecretString>>)> {
    let admin_token = match &config.server.admin_token {
        Some(reference) => Some(Arc::new(
            reference.read().context("cannot read server.admin_token")?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.server.admin)
        .await
        .with_context(|| format!("cannot listen on server.admin {}", config.server.admin))?;
    Ok((listener, admin_token))
}
