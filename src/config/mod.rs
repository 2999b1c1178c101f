//! The one config shape: read, checked at start-up, every problem reported with its key.
//!
//! Parsing happens in two steps so that `check-config` can list every problem at once:
//! each section (and each connection) is deserialized on its own with unknown keys
//! collected rather than fatal, then the values are validated into typed fields.
//!
//! `parse.rs` turns the text into tables (`toml_lines.rs` knows where things are in the
//! text), `raw.rs` is the file as written, `validate/` checks it a section per file.

mod entries;
mod parse;
mod raw;
pub mod secret;
pub(crate) mod templates;
mod toml_lines;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

pub use secret::{SecretError, SecretRef};

use crate::domain::{ConnectionId, EmailAddress};

/// The default config path when neither `--config` nor `$CONNWATCH_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/connwatch/connwatch.toml";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub probe: ProbeConfig,
    pub platforms: BTreeMap<String, PlatformConfig>,
    /// Shared with the scheduler's roster (one copy of 100,000 connections, not two).
    pub connections: Vec<std::sync::Arc<ConnectionConfig>>,
    pub log: LogConfig,
    pub webhooks: WebhooksConfig,
    pub relay: Option<RelayConfig>,
    pub email: Option<EmailConfig>,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// `smtps://`: TLS from the first byte.
    Implicit,
    /// `smtp://…?tls=required`: STARTTLS or no mail at all.
    StartTlsRequired,
    /// `smtp://` (default): STARTTLS when the server offers it.
    StartTlsOpportunistic,
    /// `smtp://…?tls=none`: clear text (a local relay).
    None,
}

/// Reauthorization emails (`[email]`).
#[derive(Debug, Clone)]
pub struct EmailConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    /// `Name <address>` as written.
    pub from: String,
    pub staff: Vec<EmailAddress>,
    /// Delays after the incident opened at which reminders go out.
    pub reminders: Vec<Duration>,
    pub send_resolved: bool,
    pub templates: Option<PathBuf>,
    pub timeout: Duration,
    /// Extra CA certificate (PEM) trusted for the SMTP server.
    pub ca_file: Option<PathBuf>,
    /// Per-connection emails wait this long, so a platform-wide storm is recognised first
    /// and a flap shorter than this sends nothing.
    pub hold: Duration,
    pub storm_window: Duration,
    pub storm_min_connections: u32,
    pub storm_share: f64,
    /// Local time (`HH:MM`) of the daily staff digest of open incidents; off when unset.
    pub daily_digest: Option<(u32, u32)>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://…`.
    pub url: String,
    /// How long raw probe results are kept.
    pub retention: Duration,
    /// Cron expression (with seconds) of the pruning job, in UTC.
    pub prune_schedule: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub admin: SocketAddr,
    /// Bearer token for the admin listener; required unless it is bound to loopback.
    pub admin_token: Option<SecretRef>,
    /// Public webhook listener; none when unset.
    pub webhooks: Option<SocketAddr>,
    /// Largest webhook body accepted (413 above).
    pub webhook_max_bytes: usize,
    /// Adds `connwatch_connection_health{connection,health}` (for small fleets).
    pub per_connection_metrics: bool,
    /// Host names the admin listener answers to besides loopback names (`None`: the
    /// default, loopback names on a loopback listener, any elsewhere).
    pub admin_hosts: Option<Vec<String>>,
}

/// Quiet detection and polling (`[webhooks]`).
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// Default expected time between webhooks of one connection.
    pub expected_interval: Duration,
    pub grace: Duration,
    /// Time between polls of a quiet connection.
    pub poll_interval: Duration,
    /// How far before the watermark a poll starts (clock skew).
    pub overlap: Duration,
    /// How long webhook ids are kept for de-duplication (at least 48 h).
    pub retention: Duration,
}

/// How a platform signs its webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureScheme {
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<b64>`.
    Standard,
    /// Hex HMAC-SHA256 of the raw body in one header (Nango, Merge style).
    HexHmac { header: String },
}

/// Webhook profile of a platform (`[platforms.NAME.webhooks]`).
#[derive(Debug, Clone)]
pub struct PlatformWebhooks {
    pub secrets: Vec<SecretRef>,
    pub scheme: SignatureScheme,
    /// Header carrying a delivery id for the hex scheme (else a body hash is used).
    pub id_header: Option<String>,
    pub connection_pointer: String,
    pub type_pointer: Option<String>,
    pub reauth_types: Vec<String>,
    pub reconnect_types: Vec<String>,
    pub change_id_pointer: Option<String>,
    pub change_updated_pointer: Option<String>,
}

/// Recent-changes endpoint of a platform (`[platforms.NAME.changes]`).
#[derive(Debug, Clone)]
pub struct ChangesConfig {
    pub path: String,
    pub since_param: String,
    pub items_pointer: String,
    pub next_pointer: String,
    pub cursor_param: String,
    pub id_pointer: String,
    pub updated_pointer: String,
    /// Safety stop for a platform whose pagination never ends.
    pub max_pages: u32,
}

/// Where recovered changes are handed on (`[relay]`).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub url: String,
    pub secret: SecretRef,
    pub timeout: Duration,
    pub max_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub concurrency: u32,
    pub confirm_after: Duration,
    pub failure_threshold: u32,
    pub unreachable_threshold: u32,
    pub reauth_backoff: Duration,
    pub token_check_interval: Duration,
}

/// How to talk to one platform.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    pub name: String,
    pub base_url: String,
    pub probe_method: reqwest::Method,
    pub probe_path: String,
    pub auth_header: String,
    /// `Bearer` by default; empty sends the bare token.
    pub auth_scheme: String,
    pub auth_failure_status: Vec<u16>,
    pub reauth_pointer: Option<String>,
    pub reauth_values: Vec<String>,
    pub error_code_pointer: Option<String>,
    pub error_message_pointer: Option<String>,
    pub auth_failure_codes: Vec<String>,
    pub request_id_header: Option<String>,
    /// At most this many probes in flight against this platform.
    pub concurrency: u32,
    /// At most this many requests per second to this platform (probes and polls).
    pub rate_limit: Option<u32>,
    pub webhooks: Option<PlatformWebhooks>,
    pub changes: Option<ChangesConfig>,
}

/// One customer connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionConfig {
    pub id: ConnectionId,
    pub name: String,
    pub platform: String,
    pub remote_id: Option<String>,
    pub token: SecretRef,
    pub contacts: Vec<EmailAddress>,
    pub reconnect_url: Option<String>,
    pub paused: bool,
    /// Expected time between webhooks; `None` when its platform sends none.
    pub expected_webhook_interval: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `connections[2].platform`.
    pub key: String,
    /// 1-based line, where the parser knows it.
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(formatter, "{} (line {line}): {}", self.key, self.message),
            None => write!(formatter, "{}: {}", self.key, self.message),
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but has problems; all of them are listed.
    #[error("{path}: {} problem(s):\n{}", problems.len(), render(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Validates config text; on failure returns every problem found.
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        parse::parse(text)
    }

    /// The resolved path: `--config`, else `$CONNWATCH_CONFIG`, else the default.
    pub fn resolve_path(explicit: Option<PathBuf>) -> PathBuf {
        explicit
            .or_else(|| std::env::var_os("CONNWATCH_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
    }

    pub fn connection(&self, id: &str) -> Option<&ConnectionConfig> {
        self.connections
            .iter()
            .find(|connection| connection.id.as_str() == id)
            .map(|connection| connection.as_ref())
    }
}

/// The smallest valid config: one platform, no connections.
#[cfg(test)]
pub(crate) const PLATFORM: &str = r#"
[platforms.makini]
base_url = "http://127.0.0.1:1"
probe = { path = "/v1/connection" }
"#;
