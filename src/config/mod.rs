//! The one config shape: read, checked at start-up, every problem reported with its key.
//!
//! Parsing happens in two steps so that `check-config` can list every problem at once:
//! each section (and each connection) is deserialized on its own with unknown keys
//! collected rather than fatal, then the values are validated into typed fields.

mod raw;
pub mod secret;
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
    pub connections: Vec<ConnectionConfig>,
    pub log: LogConfig,
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
        validate::parse(text)
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
    }
}
