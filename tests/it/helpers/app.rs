//! The test app: the daemon in-process (`app::start`, listeners on port 0) on a fresh
//! database of either backend, against a fake platform over real HTTP, with a real SMTP
//! server when the test has email, on the system clock or on a manual one the test moves.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use connwatch::app::{self, Hooks, Running};
use connwatch::clock::{Clock, ManualClock};
use connwatch::config::Config;
use connwatch::demo::platform::{Behaviour, FakePlatform};
use connwatch::domain::{ConnectionId, Health, Millis};
use connwatch::store::{ConnectionDetail, ConnectionSummary};

use super::config::{email_section, relay_section, webhook_sections};
use super::smtp::{SmtpOptions, SmtpServer, free_port};
use super::{Conn, Kind, TestDb, config_text, eventually, metric, parse, token_file};

/// How long `wait_health` waits: far longer than any test's probe interval, far shorter
/// than the 15-minute reauth backoff.
const HEALTH_LIMIT: Duration = Duration::from_secs(10);

/// The token of a test connection: in its token file and known to the fake platform.
pub fn token_of(id: &str) -> String {
    format!("tok_SECRET_{id}")
}

/// A started test app of one connection, `acme`, healthy on the fake platform.
pub async fn spawn_app(kind: Kind) -> TestApp {
    test_app(kind).spawn().await
}

/// A test app to describe: `spawn` starts it in-process, `prepare` only sets it up (for a
/// daemon run as a process, or a test that starts the app itself).
pub fn test_app(kind: Kind) -> AppBuilder {
    AppBuilder {
        kind,
        connections: Vec::new(),
        probe_interval: "1s".to_owned(),
        probe_settings: String::new(),
        platform_settings: String::new(),
        server_settings: String::new(),
        extra_config: String::new(),
        email: None,
        smtp: Smtp::Answering {
            delay_secs: 0.0,
            refuse: 0,
            refuse_codes: &[],
        },
        webhooks: None,
        relay: None,
        manual_clock: false,
    }
}

/// What `spawn` and `prepare` build.
pub struct AppBuilder {
    kind: Kind,
    /// (id, platform); none given means `acme` on `makini`.
    connections: Vec<(String, String)>,
    probe_interval: String,
    probe_settings: String,
    platform_settings: String,
    server_settings: String,
    extra_config: String,
    /// Extra `[email]` lines; `None` means no email.
    email: Option<String>,
    smtp: Smtp,
    /// The `[webhooks]` settings; `None` means no webhook listener.
    webhooks: Option<String>,
    /// The relay receiver's URL.
    relay: Option<String>,
    manual_clock: bool,
}

/// Everything a test app runs against, without the app: its database, the fake platform,
/// the SMTP server, the config and the clock.
pub struct Fixture {
    pub db: TestDb,
    pub platform: FakePlatform,
    pub smtp: Option<SmtpServer>,
    /// Where `[email]` sends (`smtp` listens there, unless the test keeps it down).
    pub smtp_port: Option<u16>,
    pub config_text: String,
    /// The manual clock the app reads, when the test moves time itself.
    pub clock: Option<ManualClock>,
}

/// A running test app; derefs to its `Fixture` (`app.platform`, `app.db`, …).
pub struct TestApp {
    pub running: Running,
    pub admin_addr: SocketAddr,
    pub webhook_addr: Option<SocketAddr>,
    fixture: Fixture,
    /// Scheduler turns so far (the `on_tick` hook).
    turns: Arc<AtomicU64>,
}

/// Where `[email]` sends.
enum Smtp {
    /// A real SMTP server that answers each message after `delay_secs`, refusing the
    /// first `refuse` with `refuse_codes` in turn.
    Answering {
        delay_secs: f64,
        refuse: u32,
        refuse_codes: &'static [u16],
    },
    /// Nothing listens on the configured port until the test calls `start_smtp`.
    Down,
}

impl AppBuilder {
    /// The connections, on the `makini` platform.
    pub fn connections<I, S>(self, ids: I) -> AppBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.connections_on("makini", ids)
    }

    /// More connections, on `platform` (a profile of its own, served by the same fake
    /// platform).
    pub fn connections_on<I, S>(mut self, platform: &str, ids: I) -> AppBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.connections
            .extend(ids.into_iter().map(|id| (id.into(), platform.to_owned())));
        self
    }

    /// `[probe] interval` (1 s unless set).
    pub fn probe_interval(mut self, interval: &str) -> AppBuilder {
        self.probe_interval = interval.to_owned();
        self
    }

    /// A line for `[probe]`.
    pub fn probe_setting(mut self, line: &str) -> AppBuilder {
        self.probe_settings.push_str(line);
        self.probe_settings.push('\n');
        self
    }

    /// A line for every `[platforms.NAME]`.
    pub fn platform_setting(mut self, line: &str) -> AppBuilder {
        self.platform_settings.push_str(line);
        self.platform_settings.push('\n');
        self
    }

    /// A line for `[server]`.
    pub fn server_setting(mut self, line: &str) -> AppBuilder {
        self.server_settings.push_str(line);
        self.server_settings.push('\n');
        self
    }

    /// Sections of their own at the end of the config.
    pub fn extra_config(mut self, text: &str) -> AppBuilder {
        self.extra_config.push('\n');
        self.extra_config.push_str(text);
        self.extra_config.push('\n');
        self
    }

    /// Emails through a real SMTP server; `extra` lines for `[email]` (staff, a 500 ms
    /// hold and a 1 s timeout unless they set their own).
    pub fn email(mut self, extra: &str) -> AppBuilder {
        self.email = Some(extra.to_owned());
        self
    }

    /// The SMTP server stores each message at once but answers only after `delay`.
    pub fn smtp_answering_after(mut self, delay: Duration) -> AppBuilder {
        self.smtp = Smtp::Answering {
            delay_secs: delay.as_secs_f64(),
            refuse: 0,
            refuse_codes: &[],
        };
        self
    }

    /// The SMTP server refuses the first `count` messages with `codes` in turn (451 or
    /// 421: try again later), storing none of them, then accepts every one.
    pub fn smtp_refusing_first(mut self, count: u32, codes: &'static [u16]) -> AppBuilder {
        self.smtp = Smtp::Answering {
            delay_secs: 0.0,
            refuse: count,
            refuse_codes: codes,
        };
        self
    }

    /// No SMTP server until the test calls `start_smtp`.
    pub fn smtp_down(mut self) -> AppBuilder {
        self.smtp = Smtp::Down;
        self
    }

    /// A webhook listener (4 KiB bodies at most), signed webhooks and recent changes for
    /// `makini`, hex-HMAC webhooks for `nango`, and `settings` for `[webhooks]`.
    pub fn webhooks(mut self, settings: &str) -> AppBuilder {
        self.webhooks = Some(settings.to_owned());
        self
    }

    /// Recovered changes are relayed to `url`, signed with `RELAY_SECRET`.
    pub fn relay(mut self, url: &str) -> AppBuilder {
        self.relay = Some(url.to_owned());
        self
    }

    /// The app reads a manual clock: time stands still until the test calls `advance`.
    pub fn manual_clock(mut self) -> AppBuilder {
        self.manual_clock = true;
        self
    }

    /// Starts the app in-process.
    pub async fn spawn(self) -> TestApp {
        self.prepare().await.start().await
    }

    /// The database, the fake platform (every connection healthy), the SMTP server and
    /// the config, without starting the app.
    pub async fn prepare(self) -> Fixture {
        let db = TestDb::new(self.kind).await;
        let platform = FakePlatform::start().await.expect("platform");
        let mut connections = self.connections.clone();
        if connections.is_empty() {
            connections.push(("acme".to_owned(), "makini".to_owned()));
        }
        for (id, _) in &connections {
            platform.set(&token_of(id), Behaviour::Healthy);
        }
        let (smtp, smtp_port) = match (&self.email, &self.smtp) {
            (None, _) => (None, None),
            (
                Some(_),
                Smtp::Answering {
                    delay_secs,
                    refuse,
                    refuse_codes,
                },
            ) => {
                let options = SmtpOptions {
                    delay_secs: *delay_secs,
                    refuse: *refuse,
                    refuse_codes,
                    ..SmtpOptions::default()
                };
                let server = SmtpServer::start(&db.path().join("mail"), options);
                let port = server.port;
                (Some(server), Some(port))
            }
            (Some(_), Smtp::Down) => (None, Some(free_port())),
        };
        let config_text = self.config_text(&db, &platform.base_url(), &connections, smtp_port);
        Fixture {
            db,
            platform,
            smtp,
            smtp_port,
            config_text,
            clock: self.manual_clock.then(ManualClock::starting_now),
        }
    }

    /// The config: every platform profile on the one fake platform, a token file per
    /// connection, then the settings and sections asked for.
    fn config_text(
        &self,
        db: &TestDb,
        base_url: &str,
        connections: &[(String, String)],
        smtp_port: Option<u16>,
    ) -> String {
        let mut platforms: Vec<&str> = Vec::new();
        let webhook_platforms = if self.webhooks.is_some() {
            &["makini", "nango"][..]
        } else {
            &[]
        };
        let named = connections.iter().map(|(_, name)| name.as_str());
        for name in named.chain(webhook_platforms.iter().copied()) {
            if !platforms.contains(&name) {
                platforms.push(name);
            }
        }
        let profiles: Vec<(&str, String)> = platforms
            .iter()
            .map(|name| (*name, base_url.to_owned()))
            .collect();
        let listed: Vec<Conn> = connections
            .iter()
            .map(|(id, platform)| Conn {
                id,
                platform,
                token_file: token_file(db.path(), id, &token_of(id)),
            })
            .collect();
        let mut server_settings = self.server_settings.clone();
        if self.webhooks.is_some() {
            server_settings.push_str("webhooks = \"127.0.0.1:0\"\nwebhook_max_bytes = 4096\n");
        }
        let mut text = config_text(&db.url, &profiles, &listed, &self.probe_settings)
            .replace(
                "interval = \"1s\"",
                &format!("interval = \"{}\"", self.probe_interval),
            )
            .replace(
                "request_id_header = \"x-request-id\"\n",
                &format!(
                    "request_id_header = \"x-request-id\"\n{}",
                    self.platform_settings
                ),
            )
            .replace(
                "admin = \"127.0.0.1:0\"\n",
                &format!("admin = \"127.0.0.1:0\"\n{server_settings}"),
            );
        if let Some(settings) = &self.webhooks {
            text.push_str(&webhook_sections(db, settings));
        }
        if let Some(url) = &self.relay {
            text.push_str(&relay_section(db, url));
        }
        if let (Some(extra), Some(port)) = (&self.email, smtp_port) {
            text.push_str(&email_section(port, extra));
        }
        text.push_str(&self.extra_config);
        text
    }
}

impl Fixture {
    /// The config the app runs with.
    pub fn parsed_config(&self) -> Config {
        parse(&self.config_text)
    }

    /// Writes the config to `connwatch.toml` beside the database (for a daemon process).
    pub fn config_file(&self) -> PathBuf {
        let path = self.db.path().join("connwatch.toml");
        std::fs::write(&path, &self.config_text).expect("write the config");
        path
    }

    /// The SMTP server (the app has `email`).
    pub fn smtp(&self) -> &SmtpServer {
        self.smtp
            .as_ref()
            .expect("an SMTP server (test_app(..).email(..))")
    }

    /// Starts the SMTP server on the port the config names (after `smtp_down`).
    pub fn start_smtp(&mut self) {
        let port = self.smtp_port.expect("email configured");
        self.smtp = Some(SmtpServer::start(
            &self.db.path().join("mail"),
            SmtpOptions {
                port: Some(port),
                ..SmtpOptions::default()
            },
        ));
    }

    /// Writes a new token into `id`'s token file, one the platform accepts; returns it.
    pub fn rotate_token(&self, id: &str) -> String {
        let rotated = format!("{}_v2", token_of(id));
        self.platform.set(&rotated, Behaviour::Healthy);
        token_file(self.db.path(), id, &rotated);
        rotated
    }

    /// Now on the app's clock (epoch milliseconds).
    pub fn now(&self) -> Millis {
        self.app_clock().now()
    }

    /// Moves the app's manual clock forward.
    pub fn advance(&self, by: Duration) {
        self.clock
            .as_ref()
            .expect("a manual clock (test_app(..).manual_clock())")
            .advance(by);
    }

    /// Starts the app in-process on the fixture.
    pub async fn start(self) -> TestApp {
        let turns = Arc::new(AtomicU64::new(0));
        let counter = turns.clone();
        let hooks = Hooks {
            on_tick: Some(Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })),
            clock: self.app_clock(),
        };
        let running = app::start(self.parsed_config(), hooks)
            .await
            .expect("start the app");
        TestApp {
            admin_addr: running.admin_addr,
            webhook_addr: running.webhook_addr,
            running,
            fixture: self,
            turns,
        }
    }

    fn app_clock(&self) -> Clock {
        self.clock
            .as_ref()
            .map(ManualClock::clock)
            .unwrap_or_else(Clock::system)
    }
}

impl Deref for TestApp {
    type Target = Fixture;

    fn deref(&self) -> &Fixture {
        &self.fixture
    }
}

impl DerefMut for TestApp {
    fn deref_mut(&mut self) -> &mut Fixture {
        &mut self.fixture
    }
}

impl TestApp {
    /// The connection as the store lists it.
    pub async fn summary(&self, id: &str) -> Option<ConnectionSummary> {
        let listed = self.running.store.list_connections().await.ok()?;
        listed
            .into_iter()
            .find(|connection| connection.id.as_str() == id)
    }

    pub async fn health(&self, id: &str) -> Option<Health> {
        Some(self.summary(id).await?.health)
    }

    /// Waits until the connection has `health`.
    pub async fn wait_health(&self, id: &str, health: Health) {
        eventually(
            HEALTH_LIMIT,
            &format!("{id} to become {health}"),
            || async { (self.health(id).await? == health).then_some(()) },
        )
        .await
    }

    /// The connection with its history (transitions and incidents newest first).
    pub async fn detail(&self, id: &str) -> ConnectionDetail {
        let id = ConnectionId::parse(id).expect("id");
        self.running
            .store
            .connection_detail(&id)
            .await
            .expect("read the connection")
            .expect("the connection exists")
    }

    /// The connection's health changes, oldest first.
    pub async fn transitions(&self, id: &str) -> Vec<(Health, Health)> {
        self.detail(id)
            .await
            .transitions
            .iter()
            .rev()
            .map(|transition| (transition.from, transition.to))
            .collect()
    }

    /// The connection's emails: (kind, audience, recipient, state).
    pub async fn emails_of(&self, id: &str) -> Vec<(String, String, String, String)> {
        let id = ConnectionId::parse(id).expect("id");
        self.running.store.emails_of(&id).await.expect("emails")
    }

    /// A sample (or the sum of the samples) on `/metrics`; see `helpers::metric`.
    pub async fn metric(&self, prefix: &str) -> f64 {
        metric(self.admin_addr, prefix).await
    }

    /// Waits until the scheduler loop has begun `count` more turns: the positive signal
    /// before asserting that something was *not* probed. A turn reads the clock, then
    /// claims what is due and starts its probes, then pauses (150–250 ms) unless more is
    /// due. The first turn counted may have read the clock before this call; so after an
    /// `advance`, three turns mean a whole claim ran at the new time and any probe it
    /// started has had a pause to reach the platform.
    pub async fn wait_for_scheduler_turns(&self, count: u64) {
        let start = self.turns.load(Ordering::SeqCst);
        eventually(
            Duration::from_secs(10),
            &format!("{count} scheduler turns"),
            || async { (self.turns.load(Ordering::SeqCst) >= start + count).then_some(()) },
        )
        .await
    }

    /// Waits until no email in the outbox is due within `horizon`: whatever was due has
    /// been sent (or refused for good) and recorded, so nothing more goes out meanwhile.
    pub async fn wait_outbox_settled(&self, horizon: Duration) {
        let horizon = connwatch::domain::time::millis(horizon);
        eventually(
            Duration::from_secs(20),
            "nothing due in the email outbox",
            || async {
                let (_, oldest_due) = self
                    .running
                    .store
                    .outbox_stats(self.now() + horizon)
                    .await
                    .ok()?;
                oldest_due.is_none().then_some(())
            },
        )
        .await
    }

    /// Shuts the app down; returns what it ran against (to start it again).
    pub async fn stop(self) -> Fixture {
        self.running.shutdown().await;
        self.fixture
    }

    /// Shuts the app down (draining probes, closing the pool) before the test ends.
    pub async fn shutdown(self) {
        self.stop().await;
    }
}
