//! What a reload changes: connections added, removed or changed, tokens rotated, and the
//! settings whose new values wait for a restart. Pure comparisons; `app` applies them.

use crate::config::Config;
use crate::domain::ConnectionId;
use crate::schedule::Roster;

/// What a reload changed, for the log.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
    /// Keys whose new values wait for a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Compares the connections in force (`roster`) and the config in force (`old`) with the
/// new config.
pub fn summarize(roster: &Roster, old: &Config, new: &Config) -> ReloadSummary {
    let mut summary = ReloadSummary::default();
    for connection in &new.connections {
        match roster.connections.get(&connection.id) {
            None => summary.added += 1,
            Some(previous) if previous != connection => summary.changed += 1,
            Some(_) => {}
        }
    }
    summary.removed = roster
        .connections
        .keys()
        .filter(|id| new.connection(id.as_str()).is_none())
        .count();
    summary.needs_restart = needs_restart(old, new);
    summary
}

/// The connections kept by the new config whose token reference changed: they are
/// probed at once.
pub fn rotated_tokens<'a>(
    roster: &'a Roster,
    new: &'a Config,
) -> impl Iterator<Item = &'a ConnectionId> + 'a {
    new.connections.iter().filter_map(|connection| {
        let previous = roster.connections.get(&connection.id)?;
        (previous.token != connection.token).then_some(&connection.id)
    })
}

/// The keys whose new values a running daemon cannot take.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let checks: [(&'static str, bool); 9] = [
        (
            "server.admin_token",
            old.server.admin_token != new.server.admin_token,
        ),
        ("relay", relay_changed(old, new)),
        (
            "webhooks (quiet and polling settings)",
            webhooks_changed(old, new),
        ),
        ("store", old.store.url != new.store.url),
        ("server.admin", old.server.admin != new.server.admin),
        (
            "server.webhooks",
            old.server.webhooks != new.server.webhooks,
        ),
        ("log", old.log.format != new.log.format),
        (
            "probe.concurrency",
            old.probe.concurrency != new.probe.concurrency,
        ),
        (
            "email (SMTP settings and templates)",
            email_transport_changed(old, new),
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key)
        .collect()
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
