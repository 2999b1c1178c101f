//! The one-shot commands: `check-config`, `migrate`, `status`, `probe`.

use std::io::Write;

use anyhow::Context;
use tokio::sync::broadcast;

use crate::app::{VERSION, build_scheduler, open_store, open_store_with, sync_connections};
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::{ConnectionId, Millis, time};
use crate::metrics::Metrics;
use crate::store::{ConnectionSummary, StoreError};

/// Prints a one-line summary of a valid config.
pub fn check_config(config: &Config, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "config valid: {} platform(s), {} connection(s), store {}",
        config.platforms.len(),
        config.connections.len(),
        redact_url(&config.store.url)
    )
}

pub async fn migrate(config: &Config, out: &mut impl Write) -> anyhow::Result<()> {
    open_store(config).await?;
    writeln!(out, "store migrated: {}", redact_url(&config.store.url))?;
    Ok(())
}

/// `connwatch status [--json]`.
pub async fn status(config: &Config, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let connections = store.list_connections().await?;
    if json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({ "connections": connections }),
        )?;
        writeln!(out)?;
    } else {
        write_table(&connections, Clock::system().now(), out)?;
        let (pending, dead) = store.relay_counts().await?;
        if pending > 0 || dead > 0 {
            writeln!(
                out,
                "relay: {pending} recovered change(s) waiting, {dead} given up (see the log)"
            )?;
        }
    }
    store.close().await;
    Ok(())
}

/// The plain-text status table.
pub fn write_table(
    connections: &[ConnectionSummary],
    now: Millis,
    out: &mut impl Write,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<13} {:<10} {:<22} {:<16} INCIDENT",
        "ID", "HEALTH", "SINCE", "LAST PROBE", "LAST WEBHOOK"
    )?;
    for connection in connections {
        let last_probe = match (connection.last_probe_at, connection.last_outcome) {
            (Some(at), Some(outcome)) => format!("{outcome} {}", ago(now, at)),
            _ => "never".to_owned(),
        };
        let incident = match &connection.open_incident {
            Some(incident) => format!(
                "{} since {}{}",
                incident.kind,
                time::rfc3339(incident.first_failure_at),
                incident
                    .error_code
                    .as_ref()
                    .map(|code| format!(" ({code})"))
                    .unwrap_or_default()
            ),
            None => "-".to_owned(),
        };
        let webhook = match (connection.last_webhook_at, connection.quiet) {
            (Some(at), false) => ago(now, at),
            (Some(at), true) => format!("{} QUIET", ago(now, at)),
            (None, true) => "never QUIET".to_owned(),
            (None, false) => "-".to_owned(),
        };
        writeln!(
            out,
            "{:<24} {:<13} {:<10} {:<22} {:<16} {}",
            connection.id.as_str(),
            connection.health.as_str(),
            ago(now, connection.health_since),
            last_probe,
            webhook,
            incident
        )?;
    }
    let mut counts = std::collections::BTreeMap::new();
    for connection in connections {
        *counts.entry(connection.health.as_str()).or_insert(0) += 1;
    }
    let summary: Vec<String> = counts
        .iter()
        .map(|(health, count)| format!("{count} {health}"))
        .collect();
    writeln!(
        out,
        "{} connection(s): {}",
        connections.len(),
        summary.join(", ")
    )
}

fn ago(now: Millis, at: Millis) -> String {
    let seconds = ((now - at) / 1000).max(0);
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}

/// `connwatch probe ID`: probes now, stores the result, prints it. Never the token.
pub async fn probe(config: &Config, raw_id: &str, out: &mut impl Write) -> anyhow::Result<bool> {
    let id = ConnectionId::parse(raw_id).map_err(anyhow::Error::msg)?;
    if config.connection(raw_id).is_none() {
        anyhow::bail!("no connection with id {raw_id} in the config");
    }
    // On SQLite a running daemon holds its probe leases in memory, where this process
    // cannot see them: probing beside it could probe a connection twice at once.
    let store = open_store_with(config, true, true).await.map_err(|error| {
        if matches!(
            error.downcast_ref::<StoreError>(),
            Some(StoreError::InUse(_))
        ) {
            anyhow::anyhow!(
                "{error:#}; ask the daemon instead: POST /api/v1/connections/{id}/probe \
                 on its admin listener ({})",
                config.server.admin
            )
        } else {
            error
        }
    })?;
    let (events, _) = broadcast::channel(16);
    let scheduler = build_scheduler(
        config,
        store.clone(),
        Metrics::new(VERSION),
        events,
        Clock::system(),
    )?;
    sync_connections(&store, &scheduler, config).await?;
    let record = scheduler
        .probe_now(&id)
        .await
        .with_context(|| format!("cannot probe {id}"))?;
    let report = &record.report;
    writeln!(out, "connection:  {id}")?;
    writeln!(out, "outcome:     {}", report.outcome)?;
    writeln!(
        out,
        "status:      {}",
        report
            .status
            .map(|status| status.to_string())
            .unwrap_or_else(|| "-".into())
    )?;
    writeln!(out, "latency:     {} ms", report.latency_ms)?;
    writeln!(
        out,
        "request id:  {}",
        report.request_id.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "error code:  {}",
        report.error_code.as_deref().unwrap_or("-")
    )?;
    if let Some(message) = &report.message {
        writeln!(out, "message:     {message}")?;
    }
    writeln!(out, "health:      {}", record.verdict.state.health)?;
    if let Some(transition) = &record.verdict.transition {
        writeln!(out, "transition:  {} -> {}", transition.from, transition.to)?;
    }
    store.close().await;
    Ok(report.outcome == crate::domain::Outcome::Ok)
}

/// Hides a password in a database URL (`user:password@` and a `password=` parameter).
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return url.to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(name, _)| name == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if name == "password" {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// `connwatch send-test-email --to ADDR`: proves the SMTP settings with one email.
pub async fn send_test_email(
    config: &Config,
    to: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let Some(settings) = &config.email else {
        anyhow::bail!("the config has no [email] section");
    };
    crate::domain::EmailAddress::parse(to).map_err(anyhow::Error::msg)?;
    let (mailer, _) =
        crate::app::prepare_email(config)?.context("the config has no [email] section")?;
    let domain = crate::rules::email::from_domain(&settings.from);
    let rendered = crate::alert::templates::Rendered {
        subject: "connwatch test email".to_owned(),
        text: format!(
            "This is a test email from connwatch {}.\nIf you can read it, [email] works.\n",
            crate::app::VERSION
        ),
        html: format!(
            "<p>This is a test email from connwatch {}.</p><p>If you can read it, [email] works.</p>",
            crate::app::VERSION
        ),
    };
    let message_id = format!("<cw.test.{:016x}@{domain}>", rand::random::<u64>());
    mailer
        .send(to, &message_id, &rendered)
        .await
        .map_err(|failure| {
            anyhow::anyhow!(
                "not sent ({}): {}",
                if failure.permanent {
                    "refused"
                } else {
                    "failed"
                },
                failure.message
            )
        })?;
    writeln!(
        out,
        "test email accepted by {}:{} ({:?}) for {to}, Message-ID {message_id}",
        settings.host, settings.port, settings.security
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_passwords_are_hidden_wherever_they_are_written() {
        assert_eq!(
            redact_url("postgres://cw:s3cret@db.internal/connwatch"),
            "postgres://cw:***@db.internal/connwatch"
        );
        let redacted = redact_url("postgres://db.internal/connwatch?user=cw&password=s3cret");
        assert!(
            !redacted.contains("s3cret") && redacted.contains("user=cw"),
            "{redacted}"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/connwatch/connwatch.db"),
            "sqlite:///var/lib/connwatch/connwatch.db"
        );
    }
}
