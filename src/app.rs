//! Assembles the daemon: store, scheduler, listeners, background jobs; runs until cancelled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
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
use crate::config::secret::FileStamp;
use crate::domain::ConnectionId;
use crate::jobs::CronJobs;
use crate::leader::Leadership;
use crate::listen::Limits;
use crate::metrics::Metrics;
use crate::poll::Poller;
use crate::probe::Prober;
use crate::relay::Relay;
use crate::rules::{Rules, SharedRules};
use crate::schedule::{Event, Roster, Scheduler};
use crate::server::{AdminState, admin_router};
use crate::store::{Store, SyncConnection};
use crate::webhook::{self, WebhookState};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often the fleet-wide gauges are recounted (a count over every connection; scrapes
/// are typically 15–60 s apart).
const GAUGE_REFRESH: Duration = Duration::from_secs(5);
/// How often the SQLite WAL is copied into the database (`Store::checkpoint`).
const WAL_CHECKPOINT: Duration = Duration::from_millis(500);

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
    Ok(Scheduler::new(
        store,
        prober,
        metrics,
        Roster::new(&config.connections),
        config.probe.clone(),
        events,
        clock,
        SharedRules::new(Rules::from_config(config)),
    ))
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

    let admin_token = match &config.server.admin_token {
        Some(reference) => Some(Arc::new(
            reference.read().context("cannot read server.admin_token")?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.server.admin)
        .await
        .with_context(|| format!("cannot listen on server.admin {}", config.server.admin))?;
    let admin_addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let leadership = Leadership::default();
    let router = admin_router(AdminState {
        store: store.clone(),
        scheduler: scheduler.clone(),
        metrics: metrics.clone(),
        admin_token,
        allowed_hosts: crate::server::default_allowed_hosts(admin_addr).map(Arc::new),
        forced: Arc::default(),
    });
    let mut background = Vec::new();
    background.push(tokio::spawn(leadership.clone().run(
        store.clone(),
        metrics.clone(),
        cancel.clone(),
    )));
    background.push(tokio::spawn(crate::listen::serve(
        listener,
        router,
        Limits::ADMIN,
        cancel.clone(),
        "admin",
    )));
    let mut webhook_addr = None;
    let mut webhook_state = None;
    if let Some(address) = config.server.webhooks {
        let state = WebhookState::new(
            &config.platforms,
            store.clone(),
            metrics.clone(),
            events.clone(),
            hooks.clock.clone(),
            scheduler.rules().clone(),
        )
        .context("cannot load the webhook secrets")?;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on server.webhooks {address}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(webhook_addr = %bound, "webhook listener bound");
        webhook_addr = Some(bound);
        webhook_state = Some(state.clone());
        let router = webhook::router(state, config.server.webhook_max_bytes);
        background.push(tokio::spawn(crate::listen::serve(
            listener,
            router,
            Limits::WEBHOOKS,
            cancel.clone(),
            "webhooks",
        )));
    }
    let probes = TaskTracker::new();
    if config
        .platforms
        .values()
        .any(|platform| platform.webhooks.is_some())
    {
        let poller = Poller {
            store: store.clone(),
            scheduler: scheduler.clone(),
            metrics: metrics.clone(),
            settings: config.webhooks.clone(),
            relay_enabled: config.relay.is_some(),
            events: events.clone(),
        };
        background.push(tokio::spawn(poller.run(cancel.clone(), probes.clone())));
    }
    if let Some(relay) = &config.relay {
        let relay = Relay::new(
            store.clone(),
            metrics.clone(),
            relay.clone(),
            scheduler.owner().to_owned(),
            hooks.clock.clone(),
        )
        .context("cannot set up the relay ([relay])")?;
        background.push(tokio::spawn(relay.run(cancel.clone())));
    }
    if let (Some((mailer, templates)), Some(settings)) = (email, &config.email) {
        let dispatcher = Dispatcher {
            store: store.clone(),
            mailer,
            templates,
            settings: settings.clone(),
            metrics: metrics.clone(),
            owner: scheduler.owner().to_owned(),
            leadership: leadership.clone(),
            clock: hooks.clock.clone(),
            rules: scheduler.rules().clone(),
        };
        background.push(tokio::spawn(dispatcher.run(cancel.clone())));
    }
    background.push(tokio::spawn(checkpoint_wal(store.clone(), cancel.clone())));
    background.push(tokio::spawn(refresh_health_gauges(
        store.clone(),
        metrics.clone(),
        config.server.per_connection_metrics,
        leadership.clone(),
        cancel.clone(),
    )));
    background.push(tokio::spawn(watch_token_files(
        scheduler.clone(),
        store.clone(),
        config.probe.token_check_interval,
        cancel.clone(),
    )));
    let on_tick = hooks.on_tick.unwrap_or_else(|| Arc::new(|| {}));
    let scheduler_loop = tokio::spawn(scheduler.clone().run(
        cancel.clone(),
        probes.clone(),
        on_tick,
    ));
    let cron = CronJobs::start(
        &config,
        store.clone(),
        metrics.clone(),
        leadership.clone(),
        hooks.clock.clone(),
        scheduler.rules().clone(),
    )
    .await
    .context("cannot start the pruning job (store.prune_schedule)")?;
    tracing::info!(%admin_addr, connections = config.connections.len(), "connwatch running");
    Ok(Running {
        admin_addr,
        webhook_addr,
        store,
        scheduler,
        metrics,
        events,
        cancel,
        probes,
        background,
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

/// What a reload changed, for the log.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
    /// Keys whose new values wait for a restart.
    pub needs_restart: Vec<&'static str>,
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
        let mut summary = ReloadSummary::default();
        for connection in &config.connections {
            match old.connections.get(&connection.id) {
                None => summary.added += 1,
                Some(previous) if previous != connection => summary.changed += 1,
                Some(_) => {}
            }
        }
        summary.removed = old
            .connections
            .keys()
            .filter(|id| config.connection(id.as_str()).is_none())
            .count();
        for platform in config.platforms.keys() {
            self.metrics.declare_platform(platform);
        }
        self.scheduler.reconfigure(prober, config.probe.clone());
        self.scheduler.set_roster(Roster::new(&config.connections));
        self.scheduler.rules().replace(Rules::from_config(&config));
        sync_connections(&self.store, &self.scheduler, &config).await?;
        let now = self.scheduler.clock().now();
        for connection in &config.connections {
            if let Some(previous) = old.connections.get(&connection.id)
                && previous.token != connection.token
            {
                self.store.request_probe(&connection.id, now).await?;
            }
        }
        let old_config = &self.config;
        let checks: [(&'static str, bool); 9] = [
            (
                "server.admin_token",
                old_config.server.admin_token != config.server.admin_token,
            ),
            ("relay", relay_changed(old_config, &config)),
            (
                "webhooks (quiet and polling settings)",
                webhooks_changed(old_config, &config),
            ),
            ("store", old_config.store.url != config.store.url),
            (
                "server.admin",
                old_config.server.admin != config.server.admin,
            ),
            (
                "server.webhooks",
                old_config.server.webhooks != config.server.webhooks,
            ),
            ("log", old_config.log.format != config.log.format),
            (
                "probe.concurrency",
                old_config.probe.concurrency != config.probe.concurrency,
            ),
            (
                "email (SMTP settings and templates)",
                email_transport_changed(old_config, &config),
            ),
        ];
        summary.needs_restart = checks
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| key)
            .collect();
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

/// Keeps `connwatch_connections{health}` (and, when enabled, the per-connection
/// `connwatch_connection_health{connection,health}`) current from the store.
async fn refresh_health_gauges(
    store: Store,
    metrics: Metrics,
    per_connection: bool,
    leadership: Leadership,
    cancel: CancellationToken,
) {
    loop {
        // Fleet-wide gauges come from the leader only; the others show 0, so `max`
        // across replicas is the fleet's value.
        if !leadership.is_leader() {
            for health in crate::domain::Health::ALL {
                metrics
                    .connections
                    .with_label_values(&[health.as_str()])
                    .set(0);
            }
            metrics.connections_quiet.set(0);
            metrics.relay_outbox_pending.set(0);
            metrics.relay_outbox_dead.set(0);
            metrics.email_outbox_pending.set(0);
            metrics.email_outbox_oldest_age.set(0.0);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(GAUGE_REFRESH) => {}
            }
            continue;
        }
        if per_connection {
            match store.list_connections().await {
                Ok(connections) => {
                    metrics.connection_health.reset();
                    for connection in connections {
                        metrics
                            .connection_health
                            .with_label_values(&[
                                connection.id.as_str(),
                                connection.health.as_str(),
                            ])
                            .set(1);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot list connections for per-connection metrics")
                }
            }
        }
        match store.health_counts().await {
            Ok(counts) => {
                for (health, count) in counts {
                    metrics
                        .connections
                        .with_label_values(&[health.as_str()])
                        .set(count);
                }
            }
            Err(error) => {
                metrics
                    .store_errors
                    .with_label_values(&["health_counts"])
                    .inc();
                tracing::warn!(%error, "cannot count connections per health");
            }
        }
        match (store.quiet_count().await, store.relay_counts().await) {
            (Ok(quiet), Ok((pending, dead))) => {
                metrics.connections_quiet.set(quiet);
                metrics.relay_outbox_pending.set(pending);
                metrics.relay_outbox_dead.set(dead);
            }
            (Err(error), _) | (_, Err(error)) => {
                metrics.store_errors.with_label_values(&["gauges"]).inc();
                tracing::warn!(%error, "cannot count quiet connections and relay messages");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(GAUGE_REFRESH) => {}
        }
    }
}

/// Checkpoints the SQLite WAL every `WAL_CHECKPOINT` beside the writers (no-op on
/// PostgreSQL); a last one on shutdown.
async fn checkpoint_wal(store: Store, cancel: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(WAL_CHECKPOINT) => false,
        };
        if let Err(error) = store.checkpoint().await {
            tracing::warn!(%error, "cannot checkpoint the database");
        }
        if stopping {
            return;
        }
    }
}

/// Re-stats token files; a changed file (rotated token) gets an immediate probe.
async fn watch_token_files(
    scheduler: Scheduler,
    store: Store,
    every: Duration,
    cancel: CancellationToken,
) {
    // One stat per distinct file, however many connections share it.
    let mut known: HashMap<PathBuf, Option<FileStamp>> = HashMap::new();
    let mut first_pass = true;
    loop {
        let roster = scheduler.roster();
        let mut by_file: HashMap<PathBuf, Vec<&ConnectionId>> = HashMap::new();
        for (id, connection) in &roster.connections {
            if let Some(path) = connection.token.path() {
                by_file.entry(path).or_default().push(id);
            }
        }
        for (path, ids) in &by_file {
            let stamp = FileStamp::of(path);
            let previous = known.insert(path.clone(), stamp);
            if !matches!(previous, Some(old) if old != stamp) {
                continue;
            }
            scheduler.tokens().forget();
            for id in ids {
                tracing::info!(connection_id = %id, "token file changed; probing now");
                if let Err(error) = store.request_probe(id, scheduler.clock().now()).await {
                    tracing::warn!(connection_id = %id, %error, "cannot schedule the probe");
                }
            }
        }
        known.retain(|path, _| by_file.contains_key(path));
        if first_pass {
            // A token cached before its file's first stamp was taken may be older than it.
            scheduler.tokens().forget();
            first_pass = false;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

fn email_transport_changed(old: &Config, new: &Config) -> bool {
    match (&old.email, &new.email) {
        (Some(old), Some(new)) => {
            old.host != new.host
                || old.port != new.port
                || old.security != new.security
                || old.from != new.from
                || old.templates != new.templates
                || old.username != new.username
                || old.password != new.password
                || old.ca_file != new.ca_file
                || old.timeout != new.timeout
                || old.hold != new.hold
                || old.storm_window != new.storm_window
                || old.storm_min_connections != new.storm_min_connections
                || old.storm_share != new.storm_share
        }
        (None, None) => false,
        (Some(_), None) | (None, Some(_)) => true,
    }
}

fn relay_changed(old: &Config, new: &Config) -> bool {
    match (&old.relay, &new.relay) {
        (Some(old), Some(new)) => {
            old.url != new.url
                || old.secret != new.secret
                || old.timeout != new.timeout
                || old.max_attempts != new.max_attempts
        }
        (None, None) => false,
        (Some(_), None) | (None, Some(_)) => true,
    }
}

fn webhooks_changed(old: &Config, new: &Config) -> bool {
    let (old, new) = (&old.webhooks, &new.webhooks);
    old.grace != new.grace
        || old.poll_interval != new.poll_interval
        || old.overlap != new.overlap
        || old.retention != new.retention
}
