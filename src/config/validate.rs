//! From config text to a validated `Config`, collecting every problem on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::raw::{
    RawChanges, RawConnection, RawEmail, RawLog, RawPlatform, RawPlatformWebhooks, RawProbe,
    RawRelay, RawServer, RawStore, RawWebhooks, SECTIONS,
};
use super::{
    ChangesConfig, Config, ConnectionConfig, EmailConfig, LogConfig, LogFormat, PlatformConfig,
    PlatformWebhooks, ProbeConfig, Problem, RelayConfig, SecretRef, ServerConfig, SignatureScheme,
    SmtpSecurity, StoreConfig, WebhooksConfig,
};
use crate::domain::{ConnectionId, EmailAddress};
use crate::webhook::verify::decode_standard_secret;

/// One step of a key path.
#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Segment]) -> String {
    let mut rendered = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !rendered.is_empty() {
                    rendered.push('.');
                }
                rendered.push_str(key);
            }
            Segment::Index(index) => rendered.push_str(&format!("[{index}]")),
        }
    }
    rendered
}

fn key(name: &str) -> Segment {
    Segment::Key(name.to_owned())
}

struct Checker<'t> {
    text: &'t str,
    /// Key positions, parsed only when there is a problem to place (a big config costs
    /// no second tree when it is valid).
    spans: Option<Option<Spanned<DeTable<'t>>>>,
    problems: Vec<Problem>,
}

impl<'t> Checker<'t> {
    fn new(text: &'t str) -> Checker<'t> {
        Checker {
            text,
            spans: None,
            problems: Vec::new(),
        }
    }

    fn line_of(&self, path: &[Segment]) -> Option<usize> {
        let mut offset = None;
        let mut current: Option<&DeValue<'t>> = None;
        let spans = self.spans.as_ref()?.as_ref()?;
        let mut table: Option<&DeTable<'t>> = Some(spans.get_ref());
        for segment in path {
            let next = match (segment, table, current) {
                (Segment::Key(name), Some(table), _) => table
                    .iter()
                    .find(|(candidate, _)| candidate.get_ref().as_ref() == name.as_str())
                    .map(|(candidate, value)| (candidate.span().start, value)),
                (Segment::Index(index), _, Some(DeValue::Array(array))) => {
                    array.get(*index).map(|value| (value.span().start, value))
                }
                _ => None,
            };
            let Some((start, value)) = next else { break };
            offset = Some(start);
            current = Some(value.get_ref());
            table = match value.get_ref() {
                DeValue::Table(inner) => Some(inner),
                _ => None,
            };
        }
        offset.map(|offset| self.text[..offset].matches('\n').count() + 1)
    }

    fn problem(&mut self, path: &[Segment], message: impl Into<String>) {
        if self.spans.is_none() {
            self.spans = Some(DeTable::parse(self.text).ok());
        }
        let line = self.line_of(path);
        self.problems.push(Problem {
            key: render_path(path),
            line,
            message: message.into(),
        });
    }

    /// Deserializes one section; unknown keys and type errors become problems.
    fn section<T: DeserializeOwned>(&mut self, value: toml::Value, path: &[Segment]) -> Option<T> {
        let mut unknown: Vec<Vec<Segment>> = Vec::new();
        let mut collect = |ignored_path: serde_ignored::Path| {
            unknown.push(ignored_segments(&ignored_path.to_string()));
        };
        let ignored = serde_ignored::Deserializer::new(value, &mut collect);
        let result: Result<T, _> = serde_path_to_error::deserialize(ignored);
        for unknown_path in unknown {
            let full: Vec<Segment> = path.iter().cloned().chain(unknown_path).collect();
            self.problem(&full, "unknown key");
        }
        match result {
            Ok(section) => Some(section),
            Err(error) => {
                let mut full = path.to_vec();
                for segment in error.path().iter() {
                    match segment {
                        serde_path_to_error::Segment::Seq { index } => {
                            full.push(Segment::Index(*index))
                        }
                        serde_path_to_error::Segment::Map { key: name } => full.push(key(name)),
                        serde_path_to_error::Segment::Enum { .. }
                        | serde_path_to_error::Segment::Unknown => {}
                    }
                }
                self.problem(&full, error.inner().message().to_owned());
                None
            }
        }
    }

    fn duration(&mut self, path: &[Segment], raw: Option<&str>, default: &str) -> Duration {
        let text = raw.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => duration,
            Ok(_) => {
                self.problem(path, "must be longer than zero");
                humantime::parse_duration(default).unwrap_or(Duration::from_secs(1))
            }
            Err(error) => {
                self.problem(
                    path,
                    format!(
                        "{text:?} is not a duration ({error}); write e.g. \"30s\", \"5m\", \"24h\""
                    ),
                );
                humantime::parse_duration(default).unwrap_or(Duration::from_secs(1))
            }
        }
    }

    fn positive(&mut self, path: &[Segment], raw: Option<u32>, default: u32) -> u32 {
        match raw {
            Some(0) => {
                self.problem(path, "must be at least 1");
                default
            }
            Some(value) => value,
            None => default,
        }
    }

    fn secret_readable(&mut self, path: &[Segment], secret: &SecretRef) {
        if let Err(error) = secret.read() {
            self.problem(path, error.to_string());
        }
    }
}

impl From<&str> for Segment {
    fn from(name: &str) -> Self {
        key(name)
    }
}

/// serde_ignored renders paths as `a.0.b`; numbers are sequence indexes.
fn ignored_segments(rendered: &str) -> Vec<Segment> {
    rendered
        .split('.')
        .filter(|part| !part.is_empty() && *part != "?")
        .map(|part| match part.parse::<usize>() {
            Ok(index) => Segment::Index(index),
            Err(_) => key(part),
        })
        .collect()
}

/// Parses and validates config text; on failure returns every problem found.
///
/// A tree of the whole document costs about 4.5 KiB per connection (460 MiB of peak
/// resident memory for 100,000 connections), so the common case, a valid file, is read one
/// connection at a time. Anything unusual or wrong is read again as one tree: that path
/// alone words problems, so the diagnostics never depend on which path ran.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    match parse_in_pieces(text) {
        Some(config) => Ok(config),
        None => parse_whole(text),
    }
}

/// The whole document as one tree: slow and memory-hungry, but places every problem.
fn parse_whole(text: &str) -> Result<Config, Vec<Problem>> {
    let syntax_problem = |error: toml::de::Error| {
        vec![Problem {
            key: "(syntax)".into(),
            line: error
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1),
            message: error.message().trim().to_owned(),
        }]
    };
    let mut table: toml::Table = toml::from_str(text).map_err(syntax_problem)?;
    let mut entries = match table.remove("connections") {
        Some(toml::Value::Array(entries)) => ConnectionEntries::Parsed(entries.into_iter()),
        Some(_) => ConnectionEntries::NotAnArray,
        None => ConnectionEntries::Absent,
    };
    assemble(Checker::new(text), table, &mut entries)
}

/// The fast path: every other section as one small tree, then one tree per connection.
///
/// `None` when the file is anything but plainly valid: a piece that does not parse on its
/// own, a `connections` key outside a `[[connections]]` header, or any problem at all.
fn parse_in_pieces(text: &str) -> Option<Config> {
    let pieces = Pieces::split(text);
    // Every piece must parse on its own: then each cut lies between two statements (no
    // valid document ends inside a string or an array), and the pieces together say what
    // the whole file says. A header-looking line inside a multi-line string fails here.
    let mut others = String::new();
    for range in &pieces.others {
        let piece = &text[range.clone()];
        DeTable::parse(piece).ok()?;
        others.push_str(piece);
    }
    let table: toml::Table = toml::from_str(&others).ok()?;
    if table.contains_key("connections") {
        return None;
    }
    let mut entries = ConnectionEntries::Pieces {
        text,
        ranges: pieces.connections.into_iter(),
        strayed: false,
    };
    let config = assemble(Checker::new(&others), table, &mut entries).ok()?;
    match entries {
        ConnectionEntries::Pieces { strayed: false, .. } => Some(config),
        _ => None,
    }
}

/// A config cut before each `[[connections]]` header and before the header that ends a
/// connection's keys.
struct Pieces {
    /// Everything that is not a connection, in file order.
    others: Vec<Range<usize>>,
    /// One `[[connections]]` header and its keys each.
    connections: Vec<Range<usize>>,
}

impl Pieces {
    /// Cuts at lines that look like table headers. The lines are not lexed here: a cut
    /// that is not really at a header leaves a piece that does not parse on its own.
    fn split(text: &str) -> Pieces {
        let mut pieces = Pieces {
            others: Vec::new(),
            connections: Vec::new(),
        };
        let mut start = 0;
        let mut offset = 0;
        let mut in_connection = false;
        for line in text.split_inclusive('\n') {
            let trimmed = line.trim_start_matches([' ', '\t']);
            if trimmed.starts_with('[') {
                let connection_header = is_connection_header(trimmed);
                if connection_header || in_connection {
                    pieces.push(in_connection, start..offset);
                    start = offset;
                    in_connection = connection_header;
                }
            }
            offset += line.len();
        }
        pieces.push(in_connection, start..offset);
        pieces
    }

    fn push(&mut self, connection: bool, range: Range<usize>) {
        if connection {
            self.connections.push(range);
        } else if !range.is_empty() {
            self.others.push(range);
        }
    }
}

/// `[[connections]]`, with the spaces TOML allows inside the brackets.
fn is_connection_header(line: &str) -> bool {
    line.strip_prefix("[[")
        .and_then(|rest| rest.split_once("]]"))
        .is_some_and(|(name, _)| name.trim_matches([' ', '\t']) == "connections")
}

/// The `[[connections]]` entries, handed over one at a time so that on the fast path only
/// one connection's tree is alive at once.
enum ConnectionEntries<'t> {
    /// The file has no `connections`.
    Absent,
    /// `connections` is something other than an array of tables.
    NotAnArray,
    /// The entries of the whole document's tree.
    Parsed(std::vec::IntoIter<toml::Value>),
    /// `[[connections]]` pieces of the text, each parsed when its turn comes.
    Pieces {
        text: &'t str,
        ranges: std::vec::IntoIter<Range<usize>>,
        /// A piece was not exactly one connection: the entries stopped early and the
        /// result must not be used.
        strayed: bool,
    },
}

impl ConnectionEntries<'_> {
    /// How many entries are left (at most), to size the connection list once.
    fn remaining(&self) -> usize {
        match self {
            ConnectionEntries::Absent | ConnectionEntries::NotAnArray => 0,
            ConnectionEntries::Parsed(entries) => entries.len(),
            ConnectionEntries::Pieces { ranges, .. } => ranges.len(),
        }
    }
}

impl Iterator for ConnectionEntries<'_> {
    type Item = toml::Value;

    fn next(&mut self) -> Option<toml::Value> {
        match self {
            ConnectionEntries::Absent | ConnectionEntries::NotAnArray => None,
            ConnectionEntries::Parsed(entries) => entries.next(),
            ConnectionEntries::Pieces {
                text,
                ranges,
                strayed,
            } => {
                let range = ranges.next()?;
                let entry = only_connection(&text[range]);
                *strayed |= entry.is_none();
                entry
            }
        }
    }
}

/// The one entry of a `[[connections]]` piece; `None` if the piece holds anything else.
fn only_connection(piece: &str) -> Option<toml::Value> {
    let mut table: toml::Table = toml::from_str(piece).ok()?;
    let Some(toml::Value::Array(mut entries)) = table.remove("connections") else {
        return None;
    };
    if !table.is_empty() || entries.len() != 1 {
        return None;
    }
    entries.pop()
}

/// Deserializes and validates every section, in the order problems are reported.
fn assemble(
    mut checker: Checker,
    mut table: toml::Table,
    entries: &mut ConnectionEntries,
) -> Result<Config, Vec<Problem>> {
    for name in table.keys() {
        if !SECTIONS.contains(&name.as_str()) {
            checker.problem(
                &[key(name)],
                format!("unknown section; known: {}", SECTIONS.join(", ")),
            );
        }
    }
    let mut take = |name: &str| table.remove(name);
    let raw_store: RawStore = match take("store") {
        Some(value) => checker.section(value, &[key("store")]).unwrap_or_default(),
        None => RawStore::default(),
    };
    let raw_server: RawServer = match take("server") {
        Some(value) => checker.section(value, &[key("server")]).unwrap_or_default(),
        None => RawServer::default(),
    };
    let raw_probe: RawProbe = match take("probe") {
        Some(value) => checker.section(value, &[key("probe")]).unwrap_or_default(),
        None => RawProbe::default(),
    };
    let raw_log: RawLog = match take("log") {
        Some(value) => checker.section(value, &[key("log")]).unwrap_or_default(),
        None => RawLog::default(),
    };
    let raw_webhooks: RawWebhooks = match take("webhooks") {
        Some(value) => checker
            .section(value, &[key("webhooks")])
            .unwrap_or_default(),
        None => RawWebhooks::default(),
    };
    let raw_relay: Option<RawRelay> = match take("relay") {
        Some(value) => checker.section(value, &[key("relay")]),
        None => None,
    };
    let webhooks = webhooks(&mut checker, raw_webhooks);
    let relay = raw_relay.and_then(|raw| relay(&mut checker, raw));
    let raw_email: Option<RawEmail> = match take("email") {
        Some(value) => checker.section(value, &[key("email")]),
        None => None,
    };
    let email = raw_email.map(|raw| email(&mut checker, raw));
    let store = store(&mut checker, raw_store);
    let server = server(&mut checker, raw_server);
    let probe = probe(&mut checker, raw_probe);
    let log = log(&mut checker, raw_log);

    let mut platforms = BTreeMap::new();
    match take("platforms") {
        Some(toml::Value::Table(entries)) => {
            // With several platforms, one hanging platform must not take every probe slot.
            let default_concurrency = if entries.len() > 1 {
                (probe.concurrency / 2).max(1)
            } else {
                probe.concurrency
            };
            for (name, value) in entries {
                let path = [key("platforms"), key(&name)];
                if let Some(raw) = checker.section::<RawPlatform>(value, &path)
                    && let Some(platform) =
                        platform(&mut checker, &path, &name, raw, default_concurrency)
                {
                    platforms.insert(name, platform);
                }
            }
        }
        Some(_) => checker.problem(&[key("platforms")], "must be a table of [platforms.NAME]"),
        None => {}
    }

    // Sized once: with 100,000 connections, growing by doubling would briefly hold
    // the list twice.
    let mut connections = Vec::with_capacity(entries.remaining());
    let mut seen = BTreeSet::new();
    if matches!(entries, ConnectionEntries::NotAnArray) {
        checker.problem(&[key("connections")], "must be an array of [[connections]]");
    }
    for (index, value) in entries.enumerate() {
        let path = [key("connections"), Segment::Index(index)];
        let Some(raw) = checker.section::<RawConnection>(value, &path) else {
            continue;
        };
        let Some(connection) = connection(&mut checker, &path, raw, &platforms, &webhooks) else {
            continue;
        };
        if !seen.insert(connection.id.clone()) {
            checker.problem(
                &[path[0].clone(), path[1].clone(), key("id")],
                format!("duplicate connection id {:?}", connection.id.as_str()),
            );
            continue;
        }
        connections.push(std::sync::Arc::new(connection));
    }

    if checker.problems.is_empty() {
        Ok(Config {
            store,
            server,
            probe,
            platforms,
            connections,
            log,
            webhooks,
            relay,
            email,
        })
    } else {
        Err(checker.problems)
    }
}

fn store(checker: &mut Checker, raw: RawStore) -> StoreConfig {
    let url = raw
        .url
        .unwrap_or_else(|| "sqlite:///var/lib/connwatch/connwatch.db".to_owned());
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        checker.problem(
            &[key("store"), key("url")],
            "must start with sqlite: or postgres:// (the credentials may be given by PGPASSWORD)",
        );
    }
    let retention = checker.duration(
        &[key("store"), key("retention")],
        raw.retention.as_deref(),
        "7d",
    );
    let prune_schedule = raw
        .prune_schedule
        .unwrap_or_else(|| "0 17 3 * * *".to_owned());
    if prune_schedule.split_whitespace().count() != 6 {
        checker.problem(
            &[key("store"), key("prune_schedule")],
            "a cron expression with six fields (seconds first), e.g. \"0 17 3 * * *\"",
        );
    }
    let max_connections = checker.positive(
        &[key("store"), key("max_connections")],
        raw.max_connections,
        8,
    );
    StoreConfig {
        url,
        retention,
        prune_schedule,
        max_connections,
    }
}

fn server(checker: &mut Checker, raw: RawServer) -> ServerConfig {
    let admin_text = raw.admin.unwrap_or_else(|| "127.0.0.1:9464".to_owned());
    let admin = match admin_text.parse::<SocketAddr>() {
        Ok(address) => address,
        Err(_) => {
            checker.problem(
                &[key("server"), key("admin")],
                format!("{admin_text:?} is not an address like \"127.0.0.1:9464\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 9464))
        }
    };
    match &raw.admin_token {
        Some(token) => checker.secret_readable(&[key("server"), key("admin_token")], token),
        None if !admin.ip().is_loopback() => checker.problem(
            &[key("server"), key("admin_token")],
            "required when the admin listener is not bound to loopback",
        ),
        None => {}
    }
    let webhooks = raw
        .webhooks
        .and_then(|text| match text.parse::<SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                checker.problem(
                    &[key("server"), key("webhooks")],
                    format!("{text:?} is not an address like \"0.0.0.0:8080\""),
                );
                None
            }
        });
    let webhook_max_bytes = checker.positive(
        &[key("server"), key("webhook_max_bytes")],
        raw.webhook_max_bytes,
        256 * 1024,
    ) as usize;
    ServerConfig {
        admin,
        admin_token: raw.admin_token,
        webhooks,
        webhook_max_bytes,
        per_connection_metrics: raw.per_connection_metrics,
    }
}

fn webhooks(checker: &mut Checker, raw: RawWebhooks) -> WebhooksConfig {
    let path = |name: &str| [key("webhooks"), key(name)];
    let expected_interval = checker.duration(
        &path("expected_interval"),
        raw.expected_interval.as_deref(),
        "1h",
    );
    let grace = checker.duration(&path("grace"), raw.grace.as_deref(), "15m");
    let poll_interval =
        checker.duration(&path("poll_interval"), raw.poll_interval.as_deref(), "5m");
    let overlap = checker.duration(&path("overlap"), raw.overlap.as_deref(), "5m");
    let retention = checker.duration(&path("retention"), raw.retention.as_deref(), "48h");
    if retention < Duration::from_secs(48 * 3600) {
        checker.problem(
            &path("retention"),
            "must be at least 48h: longer than the platform's retry window, or duplicates pass",
        );
    }
    WebhooksConfig {
        expected_interval,
        grace,
        poll_interval,
        overlap,
        retention,
    }
}

fn email(checker: &mut Checker, raw: RawEmail) -> EmailConfig {
    let path = |name: &str| [key("email"), key(name)];
    let (host, port, security) = match reqwest::Url::parse(&raw.smtp_url) {
        Ok(url) if matches!(url.scheme(), "smtp" | "smtps") && url.host_str().is_some() => {
            let tls = url
                .query_pairs()
                .find(|(name, _)| name == "tls")
                .map(|(_, value)| value.into_owned());
            let security = match (url.scheme(), tls.as_deref()) {
                ("smtps", None) => SmtpSecurity::Implicit,
                ("smtp", None | Some("opportunistic")) => SmtpSecurity::StartTlsOpportunistic,
                ("smtp", Some("required")) => SmtpSecurity::StartTlsRequired,
                ("smtp", Some("none")) => SmtpSecurity::None,
                (_, Some(other)) => {
                    checker.problem(
                        &path("smtp_url"),
                        format!(
                            "tls={other:?}: use required, opportunistic or none (smtp:// only)"
                        ),
                    );
                    SmtpSecurity::StartTlsRequired
                }
                _ => SmtpSecurity::StartTlsRequired,
            };
            let default_port = if security == SmtpSecurity::Implicit {
                465
            } else {
                25
            };
            let host = url
                .host_str()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            (host, url.port().unwrap_or(default_port), security)
        }
        _ => {
            checker.problem(
                &path("smtp_url"),
                // Not echoed: a URL may carry user:password.
                "is not like smtp://host:port or smtps://host:port",
            );
            (String::new(), 25, SmtpSecurity::StartTlsRequired)
        }
    };
    if raw.from.parse::<lettre::message::Mailbox>().is_err() {
        checker.problem(
            &path("from"),
            format!("{:?} is not like \"Name <address@example.com>\"", raw.from),
        );
    }
    let mut staff = Vec::new();
    for (index, address) in raw.staff.iter().enumerate() {
        match EmailAddress::parse(address) {
            Ok(address) => staff.push(address),
            Err(message) => checker.problem(
                &[key("email"), key("staff"), Segment::Index(index)],
                message,
            ),
        }
    }
    if let Some(password) = &raw.password {
        checker.secret_readable(&path("password"), password);
        if raw.username.is_none() {
            checker.problem(&path("username"), "required when a password is set");
        }
    }
    let reminder_texts = raw
        .reminders
        .unwrap_or_else(|| vec!["24h".into(), "72h".into()]);
    let mut reminders = Vec::new();
    for (index, text) in reminder_texts.iter().enumerate() {
        reminders.push(checker.duration(
            &[key("email"), key("reminders"), Segment::Index(index)],
            Some(text),
            "24h",
        ));
    }
    let templates = raw.templates.map(PathBuf::from);
    if let Some(folder) = &templates
        && let Err(message) = crate::alert::templates::Templates::load(Some(folder))
    {
        checker.problem(&path("templates"), message);
    }
    let ca_file = raw.ca_file.map(PathBuf::from);
    if let Some(file) = &ca_file {
        match std::fs::read(file) {
            Ok(pem) if pem.windows(11).any(|window| window == b"CERTIFICATE") => {}
            Ok(_) => checker.problem(&path("ca_file"), "no PEM certificate in the file"),
            Err(error) => checker.problem(
                &path("ca_file"),
                format!("cannot read {}: {error}", file.display()),
            ),
        }
    }
    let timeout = checker.duration(&path("timeout"), raw.timeout.as_deref(), "30s");
    let hold = checker.duration(&path("hold"), raw.hold.as_deref(), "60s");
    let storm_window = checker.duration(&path("storm_window"), raw.storm_window.as_deref(), "10m");
    let storm_min_connections = checker.positive(
        &path("storm_min_connections"),
        raw.storm_min_connections,
        10,
    );
    let storm_share = raw.storm_share.unwrap_or(0.5);
    if !(storm_share > 0.0 && storm_share <= 1.0) {
        checker.problem(&path("storm_share"), "a share between 0 (excluded) and 1");
    }
    let daily_digest = raw.daily_digest.and_then(|text| {
        let parsed = text.split_once(':').and_then(|(hours, minutes)| {
            let hours: u32 = hours.parse().ok()?;
            let minutes: u32 = minutes.parse().ok()?;
            (hours < 24 && minutes < 60).then_some((hours, minutes))
        });
        if parsed.is_none() {
            checker.problem(
                &path("daily_digest"),
                format!("{text:?} is not a local time like \"08:30\""),
            );
        }
        parsed
    });
    EmailConfig {
        host,
        port,
        security,
        username: raw.username,
        password: raw.password,
        from: raw.from,
        staff,
        reminders,
        send_resolved: raw.send_resolved.unwrap_or(true),
        templates,
        timeout,
        ca_file,
        hold,
        storm_window,
        storm_min_connections,
        storm_share,
        daily_digest,
    }
}

fn relay(checker: &mut Checker, raw: RawRelay) -> Option<RelayConfig> {
    let before = checker.problems.len();
    if reqwest::Url::parse(&raw.url)
        .map(|url| !matches!(url.scheme(), "http" | "https"))
        .unwrap_or(true)
    {
        checker.problem(
            &[key("relay"), key("url")],
            "is not an http(s) URL (not echoed: it may carry credentials)",
        );
    }
    match raw.secret.read() {
        Ok(secret) => {
            if let Err(message) =
                decode_standard_secret(secrecy::ExposeSecret::expose_secret(&secret))
            {
                checker.problem(&[key("relay"), key("secret")], message);
            }
        }
        Err(error) => checker.problem(&[key("relay"), key("secret")], error.to_string()),
    }
    let timeout = checker.duration(
        &[key("relay"), key("timeout")],
        raw.timeout.as_deref(),
        "10s",
    );
    let max_attempts = checker.positive(&[key("relay"), key("max_attempts")], raw.max_attempts, 20);
    (checker.problems.len() == before).then_some(RelayConfig {
        url: raw.url,
        secret: raw.secret,
        timeout,
        max_attempts,
    })
}

fn platform_webhooks(
    checker: &mut Checker,
    path: &[Segment],
    raw: RawPlatformWebhooks,
) -> PlatformWebhooks {
    let at = |leaf: &str| {
        let mut full = path.to_vec();
        full.push(key(leaf));
        full
    };
    let scheme = match raw.scheme.as_deref() {
        None | Some("standard") => SignatureScheme::Standard,
        Some("hmac-sha256-hex") => match raw.signature_header {
            Some(header) => SignatureScheme::HexHmac { header },
            None => {
                checker.problem(
                    &at("signature_header"),
                    "required with scheme \"hmac-sha256-hex\"",
                );
                SignatureScheme::Standard
            }
        },
        Some(other) => {
            checker.problem(
                &at("scheme"),
                format!("{other:?} is not a scheme; use \"standard\" or \"hmac-sha256-hex\""),
            );
            SignatureScheme::Standard
        }
    };
    if raw.secrets.is_empty() {
        checker.problem(&at("secrets"), "at least one secret is required");
    }
    for (index, secret) in raw.secrets.iter().enumerate() {
        let mut secret_path = at("secrets");
        secret_path.push(Segment::Index(index));
        match secret.read() {
            Ok(value) => {
                let value = secrecy::ExposeSecret::expose_secret(&value);
                let check = match scheme {
                    SignatureScheme::Standard => decode_standard_secret(value).map(|_| ()),
                    SignatureScheme::HexHmac { .. } if value.len() < 16 => {
                        Err("a signing secret must be at least 16 characters".to_owned())
                    }
                    SignatureScheme::HexHmac { .. } => Ok(()),
                };
                if let Err(message) = check {
                    checker.problem(&secret_path, message);
                }
            }
            Err(error) => checker.problem(&secret_path, error.to_string()),
        }
    }
    let connection_pointer = json_pointer(
        checker,
        &at("connection_pointer"),
        Some(raw.connection_pointer),
    )
    .unwrap_or_default();
    PlatformWebhooks {
        secrets: raw.secrets,
        scheme,
        id_header: raw.id_header,
        connection_pointer,
        type_pointer: json_pointer(checker, &at("type_pointer"), raw.type_pointer),
        reauth_types: raw.reauth_types,
        reconnect_types: raw.reconnect_types,
        change_id_pointer: json_pointer(checker, &at("change_id_pointer"), raw.change_id_pointer),
        change_updated_pointer: json_pointer(
            checker,
            &at("change_updated_pointer"),
            raw.change_updated_pointer,
        ),
    }
}

fn changes(checker: &mut Checker, path: &[Segment], raw: RawChanges) -> ChangesConfig {
    let at = |leaf: &str| {
        let mut full = path.to_vec();
        full.push(key(leaf));
        full
    };
    if !raw.path.starts_with('/') {
        checker.problem(&at("path"), "must start with '/'");
    }
    let mut pointer = |name: &str, raw: Option<String>, default: &str| {
        json_pointer(
            checker,
            &at(name),
            Some(raw.unwrap_or_else(|| default.to_owned())),
        )
        .unwrap_or_default()
    };
    let items_pointer = pointer("items_pointer", raw.items_pointer, "/data");
    let next_pointer = pointer("next_pointer", raw.next_pointer, "/next");
    let id_pointer = pointer("id_pointer", raw.id_pointer, "/id");
    let updated_pointer = pointer("updated_pointer", raw.updated_pointer, "/updated_at");
    ChangesConfig {
        path: raw.path,
        since_param: raw
            .since_param
            .unwrap_or_else(|| "modified_after".to_owned()),
        items_pointer,
        next_pointer,
        cursor_param: raw.cursor_param.unwrap_or_else(|| "cursor".to_owned()),
        id_pointer,
        updated_pointer,
        max_pages: checker.positive(&at("max_pages"), raw.max_pages, 1000),
    }
}

fn probe(checker: &mut Checker, raw: RawProbe) -> ProbeConfig {
    let path = |name: &str| [key("probe"), key(name)];
    let interval = checker.duration(&path("interval"), raw.interval.as_deref(), "5m");
    let timeout = checker.duration(&path("timeout"), raw.timeout.as_deref(), "10s");
    let connect_timeout = checker.duration(
        &path("connect_timeout"),
        raw.connect_timeout.as_deref(),
        "5s",
    );
    let confirm_after =
        checker.duration(&path("confirm_after"), raw.confirm_after.as_deref(), "30s");
    let reauth_backoff = checker.duration(
        &path("reauth_backoff"),
        raw.reauth_backoff.as_deref(),
        "15m",
    );
    let token_check_interval = checker.duration(
        &path("token_check_interval"),
        raw.token_check_interval.as_deref(),
        "10s",
    );
    let concurrency = checker.positive(&path("concurrency"), raw.concurrency, 256);
    let failure_threshold = checker.positive(&path("failure_threshold"), raw.failure_threshold, 2);
    let unreachable_threshold =
        checker.positive(&path("unreachable_threshold"), raw.unreachable_threshold, 3);
    if timeout >= interval {
        checker.problem(&path("timeout"), "must be shorter than probe.interval");
    }
    ProbeConfig {
        interval,
        timeout,
        connect_timeout: connect_timeout.min(timeout),
        concurrency,
        confirm_after,
        failure_threshold,
        unreachable_threshold,
        reauth_backoff,
        token_check_interval,
    }
}

fn log(checker: &mut Checker, raw: RawLog) -> LogConfig {
    let format = match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            checker.problem(
                &[key("log"), key("format")],
                format!("{other:?} is not a log format; use \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    LogConfig {
        format,
        level: raw.level.unwrap_or_else(|| "info".to_owned()),
    }
}

fn json_pointer(
    checker: &mut Checker,
    path: &[Segment],
    pointer: Option<String>,
) -> Option<String> {
    match pointer {
        Some(pointer) if !pointer.is_empty() && !pointer.starts_with('/') => {
            checker.problem(
                path,
                format!("{pointer:?} is not a JSON pointer (it starts with '/')"),
            );
            None
        }
        other => other,
    }
}

fn platform(
    checker: &mut Checker,
    path: &[Segment],
    name: &str,
    raw: RawPlatform,
    default_concurrency: u32,
) -> Option<PlatformConfig> {
    let at = |leaf: &str| {
        let mut full = path.to_vec();
        full.push(key(leaf));
        full
    };
    let before = checker.problems.len();
    if reqwest::Url::parse(&raw.base_url)
        .map(|url| !matches!(url.scheme(), "http" | "https"))
        .unwrap_or(true)
    {
        checker.problem(
            &at("base_url"),
            format!("{:?} is not an http(s) URL", raw.base_url),
        );
    }
    if !raw.probe.path.starts_with('/') {
        checker.problem(&at("probe"), "path must start with '/'");
    }
    let method_text = raw.probe.method.unwrap_or_else(|| "GET".to_owned());
    let probe_method = match reqwest::Method::from_bytes(method_text.to_uppercase().as_bytes()) {
        Ok(method) => method,
        Err(_) => {
            checker.problem(
                &at("probe"),
                format!("{method_text:?} is not an HTTP method"),
            );
            reqwest::Method::GET
        }
    };
    let (auth_header, auth_scheme) = match raw.auth {
        Some(auth) => (
            auth.header.unwrap_or_else(|| "Authorization".to_owned()),
            auth.scheme.unwrap_or_else(|| "Bearer".to_owned()),
        ),
        None => ("Authorization".to_owned(), "Bearer".to_owned()),
    };
    if reqwest::header::HeaderName::from_bytes(auth_header.as_bytes()).is_err() {
        checker.problem(&at("auth"), format!("{auth_header:?} is not a header name"));
    }
    let reauth_pointer = json_pointer(checker, &at("reauth_pointer"), raw.reauth_pointer);
    let error_code_pointer = json_pointer(
        checker,
        &at("error_code_pointer"),
        raw.error_code_pointer
            .or_else(|| Some("/error/code".to_owned())),
    );
    let error_message_pointer = json_pointer(
        checker,
        &at("error_message_pointer"),
        raw.error_message_pointer
            .or_else(|| Some("/error/message".to_owned())),
    );
    let concurrency = checker.positive(&at("concurrency"), raw.concurrency, default_concurrency);
    if raw.rate_limit == Some(0) {
        checker.problem(&at("rate_limit"), "must be at least 1 request per second");
    }
    let webhooks = raw
        .webhooks
        .map(|webhooks| platform_webhooks(checker, &at("webhooks"), webhooks));
    let changes = raw
        .changes
        .map(|changes| self::changes(checker, &at("changes"), changes));
    (checker.problems.len() == before).then(|| PlatformConfig {
        name: name.to_owned(),
        base_url: raw.base_url.trim_end_matches('/').to_owned(),
        probe_method,
        probe_path: raw.probe.path,
        auth_header,
        auth_scheme,
        auth_failure_status: raw.auth_failure_status.unwrap_or_else(|| vec![401, 403]),
        reauth_pointer,
        reauth_values: raw.reauth_values,
        error_code_pointer,
        error_message_pointer,
        auth_failure_codes: raw.auth_failure_codes,
        request_id_header: raw.request_id_header,
        concurrency,
        rate_limit: raw.rate_limit.filter(|limit| *limit > 0),
        webhooks,
        changes,
    })
}

fn connection(
    checker: &mut Checker,
    path: &[Segment],
    raw: RawConnection,
    platforms: &BTreeMap<String, PlatformConfig>,
    webhooks: &WebhooksConfig,
) -> Option<ConnectionConfig> {
    let at = |leaf: &str| {
        let mut full = path.to_vec();
        full.push(key(leaf));
        full
    };
    let before = checker.problems.len();
    let id = match ConnectionId::parse(&raw.id) {
        Ok(id) => Some(id),
        Err(message) => {
            checker.problem(&at("id"), message);
            None
        }
    };
    if !platforms.contains_key(&raw.platform) {
        let known: Vec<&str> = platforms.keys().map(String::as_str).collect();
        checker.problem(
            &at("platform"),
            format!(
                "unknown platform {:?}; defined: {}",
                raw.platform,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
    let mut contacts = Vec::new();
    for (index, contact) in raw.contacts.iter().enumerate() {
        let mut contact_path = at("contacts");
        contact_path.push(Segment::Index(index));
        match EmailAddress::parse(contact) {
            Ok(address) => contacts.push(address),
            Err(message) => checker.problem(&contact_path, message),
        }
    }
    if let Some(url) = &raw.reconnect_url
        && reqwest::Url::parse(url).is_err()
    {
        checker.problem(&at("reconnect_url"), format!("{url:?} is not a URL"));
    }
    checker.secret_readable(&at("token"), &raw.token);
    let platform_has_webhooks = platforms
        .get(&raw.platform)
        .is_some_and(|platform| platform.webhooks.is_some());
    let expected_webhook_interval = match (&raw.expected_webhook_interval, platform_has_webhooks) {
        (Some(text), true) => {
            Some(checker.duration(&at("expected_webhook_interval"), Some(text), "1h"))
        }
        (None, true) => Some(webhooks.expected_interval),
        (Some(_), false) => {
            checker.problem(
                &at("expected_webhook_interval"),
                format!(
                    "platform {:?} has no [platforms.{}.webhooks] section",
                    raw.platform, raw.platform
                ),
            );
            None
        }
        (None, false) => None,
    };
    let id = id?;
    (checker.problems.len() == before).then(|| ConnectionConfig {
        name: raw.name.unwrap_or_else(|| id.to_string()),
        id,
        platform: raw.platform,
        remote_id: raw.remote_id,
        token: raw.token,
        contacts,
        reconnect_url: raw.reconnect_url,
        paused: raw.paused,
        expected_webhook_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLATFORM: &str = r#"
[platforms.makini]
base_url = "http://127.0.0.1:1"
probe = { path = "/v1/connection" }
"#;

    #[test]
    fn a_minimal_config_is_valid_with_defaults() {
        let config = parse(PLATFORM).expect("valid");
        assert_eq!(config.probe.interval, Duration::from_secs(300));
        assert_eq!(config.probe.failure_threshold, 2);
        assert_eq!(config.platforms["makini"].auth_scheme, "Bearer");
    }

    #[test]
    fn every_problem_is_reported_with_its_key_and_line() {
        let text = format!(
            r#"
[probe]
interval = "soon"
timeout = "often"
colour = "blue"
{PLATFORM}
[[connections]]
id = "acme"
platform = "nango"
token = {{ env = "CONNWATCH_TEST_SURELY_UNSET" }}
contacts = ["not-an-email"]

[[connections]]
id = "acme"
platform = "makini"
token = "literal-secret"
"#
        );
        let problems = parse(&text).expect_err("invalid");
        let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let has = |needle: &str| rendered.iter().any(|line| line.contains(needle));
        assert!(has("probe.interval (line 3)"), "{rendered:#?}");
        assert!(has("probe.timeout (line 4)"), "{rendered:#?}");
        assert!(has("probe.colour (line 5): unknown key"), "{rendered:#?}");
        assert!(has("connections[0].platform"), "{rendered:#?}");
        assert!(has("connections[0].contacts[0]"), "{rendered:#?}");
        assert!(has("CONNWATCH_TEST_SURELY_UNSET"), "{rendered:#?}");
        assert!(has("connections[1].token"), "{rendered:#?}");
        assert!(has("literal secret"), "{rendered:#?}");
        assert!(!has("literal-secret"), "the literal value is never echoed");
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let text = format!(
            "{PLATFORM}\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\ntoken = {{ file = \"/etc/hostname\" }}\n\
             [[connections]]\nid = \"a\"\nplatform = \"makini\"\ntoken = {{ file = \"/etc/hostname\" }}\n"
        );
        let problems = parse(&text).expect_err("invalid");
        assert!(
            problems
                .iter()
                .any(|problem| problem.key == "connections[1].id"
                    && problem.message.contains("duplicate"))
        );
    }

    #[test]
    fn short_or_malformed_webhook_secrets_are_refused_at_load() {
        let folder = std::env::temp_dir().join(format!("connwatch-secret-{}", std::process::id()));
        std::fs::create_dir_all(&folder).expect("folder");
        std::fs::write(folder.join("short"), "whsec_c2hvcnQ=").expect("write");
        std::fs::write(
            folder.join("good"),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .expect("write");
        let text = format!(
            "{PLATFORM}\n[platforms.makini.webhooks]\nconnection_pointer = \"/connectionId\"\n\
             secrets = [{{ file = \"{0}/good\" }}, {{ file = \"{0}/short\" }}]\n",
            folder.display()
        );
        let problems = parse(&text).expect_err("invalid");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "platforms.makini.webhooks.secrets[1]");
        assert!(
            problems[0].message.contains("24 to 64"),
            "{}",
            problems[0].message
        );
        let _ = std::fs::remove_dir_all(folder);
    }

    #[test]
    fn a_valid_config_is_read_one_connection_at_a_time_with_the_same_result() {
        let text = format!(
            "# comment\n{PLATFORM}\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
             token = {{ file = \"/etc/hostname\" }}\ncontacts = [\n  \"ops@example.com\",\n]\n\
             \n[[ connections ]]  # spaced header\nid = \"b\"\nplatform = \"makini\"\n\
             token.file = \"/etc/hostname\"\n\
             \n[probe]\ninterval = \"2m\"\n\
             \n[[connections]]\r\nid = \"c\"\r\nplatform = \"makini\"\r\n\
             token = {{ env = \"PATH\" }}\r\npaused = true\r\n"
        );
        let piecewise = parse_in_pieces(&text).expect("read in pieces");
        let whole = parse_whole(&text).expect("valid");
        assert_eq!(format!("{piecewise:?}"), format!("{whole:?}"));
        let ids: Vec<&str> = piecewise
            .connections
            .iter()
            .map(|connection| connection.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(piecewise.probe.interval, Duration::from_secs(120));
    }

    #[test]
    fn the_example_config_reads_the_same_in_pieces_as_whole() {
        let folder = std::env::temp_dir().join(format!("connwatch-example-{}", std::process::id()));
        std::fs::create_dir_all(&folder).expect("folder");
        let example = include_str!("../../connwatch.example.toml");
        for name in example
            .split("credential = \"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
        {
            std::fs::write(folder.join(name), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .expect("write");
        }
        let text = example
            .replace(
                "{ credential = \"",
                &format!("{{ file = \"{}/", folder.display()),
            )
            .replace("{ env = \"BUGFREE_TOKEN\" }", "{ env = \"PATH\" }");
        let piecewise = parse_in_pieces(&text).expect("read in pieces");
        let whole = parse_whole(&text).expect("valid");
        assert_eq!(format!("{piecewise:?}"), format!("{whole:?}"));
        assert_eq!(piecewise.connections.len(), 2);
        let _ = std::fs::remove_dir_all(folder);
    }

    #[test]
    fn a_header_inside_a_multi_line_string_is_not_taken_for_a_connection() {
        let text = format!(
            "[log]\nlevel = \"\"\"\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
             token = {{ file = \"/etc/hostname\" }}\n[probe]\n\"\"\"\n{PLATFORM}"
        );
        assert!(parse_in_pieces(&text).is_none());
        let config = parse(&text).expect("valid");
        assert!(config.connections.is_empty());
        assert!(config.log.level.contains("[[connections]]"));
    }

    #[test]
    fn a_connection_sub_table_is_read_from_the_whole_document() {
        let text = format!(
            "{PLATFORM}\n[[connections]]\nid = \"a\"\nplatform = \"makini\"\n\
             [connections.token]\nfile = \"/etc/hostname\"\n"
        );
        assert!(parse_in_pieces(&text).is_none());
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.connections[0].token,
            SecretRef::File(PathBuf::from("/etc/hostname"))
        );
    }

    #[test]
    fn a_problem_in_a_late_connection_is_placed_on_its_line_in_the_file() {
        let connection = "\n[[connections]]\nid = \"ID\"\nplatform = \"makini\"\n\
                          token = { file = \"/etc/hostname\" }\n";
        let text = format!(
            "{PLATFORM}{}{}[probe]\ninterval = \"1m\"\n{}",
            connection.replace("ID", "a"),
            connection.replace("ID", "b"),
            connection
                .replace("ID", "c")
                .replace("platform", "colour = 1\nplatform"),
        );
        assert!(parse_in_pieces(&text).is_none());
        let problems = parse(&text).expect_err("invalid");
        let rendered: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(rendered, ["connections[2].colour (line 20): unknown key"]);
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let problems = parse("[store]\nurl = \n").expect_err("invalid");
        assert_eq!(problems[0].line, Some(2));
    }
}
